"""A distilled generator in a format users load: safetensors + a JSON config + a small loader.

`export_generator(net, out)` writes
- ``generator.safetensors``: the network's state dict (the exact tensors, safetensors' plain format);
- ``generator.json``: what rebuilds it (class, constructor kwargs) and what generation needs
  without any experiment config: the generation sigmas (sigma_init first), the image shape,
  the number of classes, and where the network came from;
- ``README.md``: how to load it;
- for a generator distilled from a diffusers teacher (`DiffusersVPPrecond`), ``unet/``: a folder
  `diffusers.UNet2DModel.from_pretrained` loads, with the exact one-step formula in the README and
  its numbers (timestep, c_in, c_skip, c_out at sigma_init) in ``generator.json``;
- for one distilled from a text-to-image teacher (`DiffusersTextPrecond`, `DiffusersSDXLPrecond`), the
  diffusers parts of a StableDiffusionPipeline or StableDiffusionXLPipeline (`sida.io.export_text`).

`load_generator(path)` (also `sida.load_generator`) reads the first two back with torch and
safetensors only (diffusers is imported when the network is a diffusers UNet): the result is
``G(z, labels=None, steps=1) -> images`` in the data's range [-1, 1], NCHW float32; for a text
generator ``G(z, prompts=[...])`` or ``G(z, cond=embeddings)`` (`sida.io.export_text.TextGenerator`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

FORMAT = "sida-generator"
VERSION = 1
WEIGHTS, CONFIG = "generator.safetensors", "generator.json"
TEXT_CLASSES = ("DiffusersTextPrecond", "DiffusersSDXLPrecond")  # text-to-image generators (`export_text`)


def _one_step_numbers(net: Any, sigma: float) -> dict:
    """The one-step formula's constants of a DiffusersVPPrecond at sigma (python floats)."""
    s = torch.tensor([float(sigma)])
    c_skip, c_out, c_in, t = (float(v.reshape(-1)[0]) for v in net.coefficients(s))
    return {"sigma_init": float(sigma), "timestep": t, "c_in": c_in, "c_skip": c_skip, "c_out": c_out,
            "prediction_type": net.prediction_type}


def _readme(cfg: dict) -> str:
    c, h, w = cfg["img_shape"]
    text = [f"# One-step generator ({cfg['class']})", "",
            "Distilled with sida-pipeline (Score identity Distillation). Generation needs no experiment config:",
            "", "```python", "import torch, sida", "G = sida.load_generator('.')  # this folder",
            f"z = torch.randn(16, {c}, {h}, {w})",
            ("images = G(z, prompts=['a photo of a dog'] * 16)  # or cond=embeddings [16, L, D]" if cfg.get("text")
             else "images = G(z" + (f", labels=torch.arange(16) % {cfg['label_dim']})" if cfg["label_dim"] else ")"))
            + "  # float32 in [-1, 1], NCHW", "```", "",
            f"One step: images = D(sigma_init z; sigma_init) with sigma_init = {cfg['gen_sigmas'][0]:.6g} "
            f"(generation sigmas, largest first: {', '.join(f'{s:.6g}' for s in cfg['gen_sigmas'])})."]
    if cfg.get("text"):
        from .export_text import text_readme

        text += text_readme(cfg)
    one = cfg.get("diffusers_one_step")
    if one:
        text += ["", "## With diffusers alone", "", "`unet/` is a `diffusers.UNet2DModel`. One step, exactly:", "",
                 "```python", "import torch", "from diffusers import UNet2DModel",
                 "unet = UNet2DModel.from_pretrained('unet')",
                 f"z = torch.randn(16, {c}, {h}, {w}); x = {one['sigma_init']!r} * z",
                 f"F = unet({one['c_in']!r} * x, torch.full([16], {one['timestep']!r}), class_labels).sample"
                 "  # class_labels: int classes, or None",
                 f"images = {one['c_skip']!r} * x + {one['c_out']!r} * F  # {one['prediction_type']} converted to x0",
                 "```", "",
                 "c_in = 1/sqrt(1+sigma^2); the fractional timestep interpolates the scheduler's sigma table "
                 "sqrt((1-abar_k)/abar_k) linearly in log sigma; c_skip/c_out convert the prediction to x0 "
                 "(epsilon: 1, -sigma; v_prediction: 1/(1+sigma^2), -sigma/sqrt(1+sigma^2); sample: 0, 1)."]
    return "\n".join(text) + "\n"


def export_generator(net: torch.nn.Module, out: str | Path, meta: Optional[dict] = None,
                     teacher_dir: Optional[str | Path] = None) -> dict:
    """Write `net` (a generator loaded from a network file) into folder `out`; return its config.
    `teacher_dir`: a text generator's teacher pipeline folder (default: the one the network records)."""
    from safetensors.torch import save_file

    from .atomic import atomic_write_json

    meta = dict(meta if meta is not None else getattr(net, "sida_meta", {}) or {})
    gen_sigmas = [float(s) for s in (meta.get("gen_sigmas") or [meta.get("sigma_init", 2.5)])]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    cfg = {"format": FORMAT, "version": VERSION, "class": type(net).__name__,
           "kwargs": json.loads(json.dumps(net.init_kwargs)), "gen_sigmas": gen_sigmas,
           "sigma_init": gen_sigmas[0], "img_shape": [net.img_channels, net.img_resolution, net.img_resolution],
           "label_dim": int(net.label_dim), "source": {k: meta.get(k) for k in ("experiment", "run", "kimg", "method",
                                                                                    "config_hash") if k in meta}}
    if type(net).__name__ == "DiffusersVPPrecond":
        net.model.unet.save_pretrained(out / "unet")
        cfg["diffusers_one_step"] = _one_step_numbers(net, gen_sigmas[0])
        atomic_write_json(out / "unet" / "sida_one_step.json", cfg["diffusers_one_step"])
    elif type(net).__name__ in TEXT_CLASSES:
        from .export_text import export_text_parts

        cfg["text"] = export_text_parts(net, out, gen_sigmas[0], teacher_dir)
    (out / "README.md").write_text(_readme(cfg))
    atomic_write_json(out / CONFIG, cfg)  # last: its presence means the export is complete
    return cfg


class Generator:
    """A loaded one-step (or few-step) generator: ``G(z, labels=None, steps=1) -> images``."""

    def __init__(self, net: torch.nn.Module, config: dict) -> None:
        self.net, self.config = net, config
        self.gen_sigmas: list[float] = [float(s) for s in config["gen_sigmas"]]
        self.sigma_init = self.gen_sigmas[0]
        self.img_shape = tuple(config["img_shape"])
        self.label_dim = int(config["label_dim"])

    def to(self, device: str | torch.device) -> "Generator":
        self.net.to(device)
        return self

    def _labels(self, labels: Optional[torch.Tensor], n: int, device: torch.device) -> Optional[torch.Tensor]:
        if not self.label_dim:
            return None
        if labels is None:
            raise ValueError(f"this generator is class-conditional ({self.label_dim} classes): pass labels")
        labels = torch.as_tensor(labels, device=device)
        if labels.ndim == 1 and not labels.is_floating_point():  # class indices
            labels = torch.nn.functional.one_hot(labels.long(), self.label_dim)
        return labels.to(torch.float32).reshape(n, self.label_dim)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, cond: Optional[torch.Tensor], steps: int = 1,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The network's output for noise z under `cond` as the network takes it (one-hot labels,
        prompt embeddings, or None)."""
        from ..nets.sampler import few_step_generate, sampling_sigmas

        z = z.to(next(self.net.parameters()).device, torch.float32)
        sigmas: Sequence[float] = sampling_sigmas(self.gen_sigmas, steps)
        return few_step_generate(self.net, z, sigmas, cond, generator=generator)

    def __call__(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None, steps: int = 1,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        device = next(self.net.parameters()).device
        return self.sample(z, self._labels(labels, z.shape[0], device), steps, generator)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """The generator exported into folder `path` (or its generator.json / generator.safetensors)."""
    from safetensors.torch import load_file

    from ..errors import CheckpointError
    from .checkpoints import check_finite
    from ..nets.build import build_network

    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"{folder} is not an exported generator (needs {CONFIG} and {WEIGHTS}): export one "
                              f"with python -m stages.export")
    config = json.loads((folder / CONFIG).read_text())
    if config.get("format") != FORMAT or int(config.get("version", 0)) > VERSION:
        raise CheckpointError(f"{folder / CONFIG} is not a {FORMAT} v{VERSION} config: re-export the generator")
    state = load_file(str(folder / WEIGHTS))
    check_finite(state, f"exported generator {folder}", "export it again from a finite network file")
    net = build_network(config["class"], config["kwargs"])
    net.load_state_dict(state, strict=True)
    net = net.to(device).eval().requires_grad_(False)
    if config["class"] in TEXT_CLASSES:
        from .export_text import load_text_generator

        return load_text_generator(net, config, folder)
    return Generator(net, config)
