"""The zero-shot COCO evaluation of a text-to-image network inside `evaluate_network`.

When ``evaluate.coco`` is set, every evaluation run of a text network follows the recipe of
`sida.eval.zero_shot`: seed ``s`` is sampled from its own noise (`latents_for_seeds`, as every
evaluation draws it) conditioned on caption ``s mod N`` (`prompts_for_seeds`), decoded by the
network's VAE, centre-cropped and resized to the protocol's side (`prepare_images`); the prepared
images go to the clean-mode Inception (FID against `coco_reference`) and, with ``evaluate.clip``,
to the `ClipScorer` (``clip_score``: the mean raw cosine of the run). Each rank takes every
world_size-th seed and the results are gathered in seed order, so the numbers do not depend on the
process count. Everything else (runs, summaries, kept runs, report) is `evaluate_network`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..io.text_run import is_text_network, text_encoder_of
from ..run import dist
from .clip_score import ClipScorer
from .coco import prompts_for_seeds, prepare_images
from .extract import Progress, gather_in_order
from .features import Extractor
from .noise import latents_for_seeds
from .prompting import ClassPrompts, Encode
from .refstats import Reference
from .sampling import GenerateFn
from .zero_shot import build_clip_scorer, check_zero_shot, coco_reference, coco_resolution, load_prompts

__all__ = ["ZeroShot", "prepare_zero_shot", "zero_shot_run"]


@dataclass
class ZeroShot:
    """What a zero-shot run needs besides the sampler: the captions, the side images are compared
    at, the network's text encoder and the CLIP scorer (None without ``evaluate.clip``)."""

    captions: list[str]
    resolution: int
    encode: Encode
    scorer: ClipScorer | None
    protocol: str

    def grid_prompts(self, rows: int) -> ClassPrompts:
        """The sample grid's rows: the first `rows` captions (seeds 0.. take them too)."""
        return ClassPrompts(self.captions[:rows], self.encode)

    @property
    def info(self) -> dict:
        """JSON-able description for metrics.json."""
        return {"protocol": self.protocol, "resolution": self.resolution, "num_captions": len(self.captions),
                "seed_to_caption": "seed mod num_captions", "clip": None if self.scorer is None else self.scorer.info}


def _reference(cfg: dict, extractor: Extractor, info: dist.DistInfo) -> Reference:
    """`coco_reference` computed by the main rank while the others wait, then read from its cache
    by them (it is keyed by the image files, so every rank finds the same file)."""
    ref = coco_reference(cfg, extractor) if info.is_main else None
    dist.barrier()
    return ref if ref is not None else coco_reference(cfg, extractor)


def prepare_zero_shot(cfg: dict, net: torch.nn.Module, path: str, extractor: Extractor,
                      info: dist.DistInfo) -> tuple[ZeroShot, Reference] | None:
    """(ZeroShot, its FID reference) when ``evaluate.coco`` is set, else None; a one-line
    ConfigError when the settings do not fit the network."""
    ev = cfg["evaluate"]
    if ev.get("coco") is None:
        if ev.get("clip") is not None:  # nothing else draws the captions it scores against
            raise ConfigError("evaluate.clip scores a text network's samples against their COCO captions: set "
                              "evaluate.coco (and evaluate.prompts) too, or unset evaluate.clip")
        return None
    if not is_text_network(net):
        raise ConfigError(f"evaluate.coco scores a text-to-image network on captions, but network {path} is not "
                          f"conditioned on text: unset evaluate.coco for this experiment")
    if ev.get("extra_extractors"):
        raise ConfigError("evaluate.extra_extractors are not computed on the zero-shot COCO protocol: unset them "
                          "with evaluate.coco")
    notes = check_zero_shot(cfg)
    captions = load_prompts(cfg)
    ref = _reference(cfg, extractor, info)
    ref.notes += notes + (["precision/recall skipped: the COCO reference statistics keep no image features"]
                          if ev["precision_recall"] else [])
    zs = ZeroShot(captions, coco_resolution(cfg), text_encoder_of(net, info.device).encode,
                  build_clip_scorer(cfg, info.device), ev["coco"]["protocol"])
    return zs, ref


@torch.no_grad()
def zero_shot_run(zs: ZeroShot, extractor: Extractor, generate: GenerateFn, seeds: Sequence[int],
                  shape: Sequence[int], batch: int, info: dist.DistInfo, desc: str = "samples",
                  want_probs: bool = False, latents: str = "iid"
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One run's (Inception features [N, D], class probabilities [N, K] or None, CLIP cosines [N]
    or None) of `generate(z, caption embeddings)`, in seed order on every rank."""
    seeds = list(seeds)
    prompts = prompts_for_seeds(zs.captions, seeds)
    mine = list(range(info.rank, len(seeds), info.world_size))
    feats, probs, cosines = [], [], []
    prog = Progress(desc, len(seeds), info.is_main)
    for i in range(0, len(mine), batch):
        pos = mine[i:i + batch]
        texts = [prompts[j] for j in pos]
        z, _ = latents_for_seeds([seeds[j] for j in pos], shape, 0, info.device, latents=latents,
                                 run_start=seeds[0])
        images = prepare_images(generate(z, zs.encode(texts)), zs.resolution)
        f, p = extractor(images.to(info.device))
        feats.append(f.float().cpu().numpy())
        if want_probs and p is not None:
            probs.append(p.float().cpu().numpy())
        if zs.scorer is not None:
            cosines.append(zs.scorer.score(images, texts).numpy()[:, None])
        prog.update(min(len(seeds), (i + len(pos)) * info.world_size))
    empty = np.zeros([0, 1], np.float32)  # a rank without seeds (more ranks than seeds) still answers
    f_all, p_all = gather_in_order(mine, np.concatenate(feats) if feats else empty,
                                   np.concatenate(probs) if probs else None, len(seeds))
    clip = None
    if zs.scorer is not None:
        clip = gather_in_order(mine, np.concatenate(cosines) if cosines else empty, None, len(seeds))[0][:, 0]
    prog.update(len(seeds), force=True)
    return f_all, p_all, clip
