"""The training monitor: a quick FD/FID of the generator during distillation, on a few fixed
seeds, for keeping the best checkpoint (`evaluate.during_training`).

Its samples are drawn and scored as evaluation's are (`sida.eval.extract`, the same reference
statistics), only fewer; `sida.eval.evaluation` reports every evaluated network's value at the
monitor's sample count too, for plotting next to the training curves.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from ..run import dist
from ..run.config import resolve_extractor_name
from .extract import extract_generated
from .features import Extractor, build_extractor
from .metrics import feature_stats, frechet_distance
from .refstats import Reference, get_reference
from .sampling import GenerateFn, decode_fn

__all__ = ["TrainingMonitor"]


class TrainingMonitor:
    """A quick FD/FID of the generator during distillation (fixed seeds, few samples).

    `TrainingMonitor(cfg, device, dist_info)`; `monitor(generate)` with
    `generate(z [B,C,H,W], labels [B,label_dim] | None) -> images in [-1, 1]` returns
    `{monitor.key: value}` (key 'fd' for the digits classifier, 'fid' for Inception), the same on
    every rank. Lower is better. The extractor and the reference are loaded on first use.
    """

    def __init__(self, cfg: dict, device: torch.device, dist_info: dist.DistInfo,
                 noise_shape: tuple[int, int, int] | None = None) -> None:
        self.cfg = cfg
        self.noise_shape = noise_shape  # (C, H, W) of the generator's input, when not the data's (text latents)
        self.device = torch.device(device)
        self.info = dist_info
        self.settings = cfg["evaluate"]["during_training"]
        self._extractor: Extractor | None = None
        self._ref: Reference | None = None
        self._decode: Callable | None = None

    @property
    def enabled(self) -> bool:
        """True when `evaluate.during_training.every_kimg` > 0."""
        return float(self.settings["every_kimg"]) > 0

    @property
    def every_kimg(self) -> float:
        """Evaluate every this many kimg (0 = never)."""
        return float(self.settings["every_kimg"])

    @property
    def key(self) -> str:
        """The metric name in the returned dict ('fd' or 'fid')."""
        return "fid" if resolve_extractor_name(self.cfg) == "inception" else "fd"

    def _setup(self) -> None:
        if self._extractor is None:
            d = self.cfg["data"]
            self._extractor = build_extractor(self.cfg, self.device)
            self._extractor.check_images(d["resolution"], d["channels"], "the generator's images")
            self._ref = get_reference(self.cfg, self._extractor, self.info, d["resolution"])
            self._decode = decode_fn(self.cfg, self.device)

    @torch.no_grad()
    def __call__(self, generate: GenerateFn) -> dict[str, float]:
        """FD/FID of `generate` on `during_training.num_samples` fixed seeds."""
        self._setup()
        if self._decode is not None:
            inner = generate
            generate = lambda z, c: self._decode(inner(z, c))  # noqa: E731
        d, s = self.cfg["data"], self.settings
        seeds = range(s["seed"], s["seed"] + s["num_samples"])
        info = replace(self.info, device=self.device)
        shape = self.noise_shape or (d["channels"], d["resolution"], d["resolution"])
        feats, _ = extract_generated(self._extractor, generate, seeds, shape,
                                     d["label_dim"], self.cfg["evaluate"]["batch"], info, desc="monitor",
                                     want_probs=False, labels=self.cfg["evaluate"]["labels"],
                                     latents=self.cfg["evaluate"]["latents"])
        value = frechet_distance(*feature_stats(feats), self._ref.mu, self._ref.sigma) if info.is_main else 0.0
        return {self.key: float(dist.broadcast_object(value))}
