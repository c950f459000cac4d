"""Export of generators distilled from a text-to-image teacher (`DiffusersTextPrecond`, or
`DiffusersSDXLPrecond` for SDXL).

Besides generator.safetensors / generator.json (see `sida.io.export`), the folder gets the parts a
diffusers user needs: `unet/` (the generator's UNet2DConditionModel), `text_encoder/`,
`tokenizer/` (SDXL: and `text_encoder_2/`, `tokenizer_2/`) and, for a latent teacher, `vae/`
(copied from the teacher's pipeline folder), and
`scheduler/`: a DDPMScheduler with the teacher's betas and `clip_sample` off, because it accepts
`timesteps=[t]` and, at the last step (alpha_bar_prev = 1), its `prev_sample` is exactly the x0
prediction (LCMScheduler would mix in c_skip(t) x_t, DDIM refuses custom timesteps). With a VAE a
`model_index.json` makes the folder a `StableDiffusionPipeline` (SDXL: a `StableDiffusionXLPipeline`,
whose default size is the generator's, so its time ids are the ones the generator was distilled
with); the README gives the exact call.

`TextGenerator` is what `sida.load_generator` returns for such a folder:
``G(z, prompts=[...])`` or ``G(z, cond=embeddings)`` -> images in [-1, 1] (decoded by the VAE
when there is one; `decode=False` gives the UNet's latents).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..errors import AssetError
from .export import Generator

__all__ = ["export_text_parts", "text_readme", "TextGenerator", "load_text_generator"]

PIPELINES = {False: "StableDiffusionPipeline", True: "StableDiffusionXLPipeline"}  # by "is SDXL"
_COPIED = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae")


def _scheduler(net: Any, pipeline: Path) -> Any:
    """DDPMScheduler of the teacher's betas (from its scheduler config), checked against the network."""
    import diffusers

    from .diffusers_teacher import check_folder

    config = check_folder(pipeline).scheduler_config
    sched = diffusers.DDPMScheduler.from_config(config, clip_sample=False, thresholding=False,
                                                prediction_type=net.prediction_type)
    ours = torch.tensor(net.init_kwargs["alphas_cumprod"], dtype=torch.float64)
    if sched.alphas_cumprod.shape != ours.shape or not torch.allclose(sched.alphas_cumprod.double(), ours, atol=1e-6):
        raise AssetError(f"export: the scheduler of {pipeline} has another noise schedule than the generator's "
                         f"teacher: pass the teacher's own pipeline folder (--teacher)")
    return sched


def export_text_parts(net: Any, out: Path, sigma_init: float, pipeline_dir: Optional[str | Path] = None) -> dict:
    """Write unet/, scheduler/, the teacher's text encoder, tokenizer (and vae/, model_index.json)
    into `out`; return the facts the README needs. `pipeline_dir` defaults to the teacher folder
    the network records (`DiffusersTextPrecond.pipeline_dir`)."""
    where = pipeline_dir or net.pipeline_dir
    pipeline = Path(where or ".").expanduser()
    if not where or not (pipeline / "text_encoder").is_dir():
        raise AssetError(f"export: the teacher's pipeline folder {where or '(not recorded in the network)'} with "
                         f"text_encoder/, tokenizer/ (and vae/) is not there: pass it with --teacher FOLDER")
    sched = _scheduler(net, pipeline)
    net.model.unet.save_pretrained(out / "unet")
    sched.save_pretrained(out / "scheduler")
    parts = [p for p in _COPIED if (pipeline / p).is_dir()]
    for part in parts:
        shutil.copytree(pipeline / part, out / part, dirs_exist_ok=True)
    vae, sdxl = "vae" in parts, type(net).__name__ == "DiffusersSDXLPrecond"
    if vae:  # the teacher's index with our scheduler and no safety checker or image encoder (not copied)
        src = pipeline / "model_index.json"
        index = json.loads(src.read_text()) if src.is_file() else {"_class_name": PIPELINES[sdxl]}
        index.update(unet=["diffusers", "UNet2DConditionModel"], scheduler=["diffusers", "DDPMScheduler"],
                     feature_extractor=[None, None])
        if not sdxl:  # StableDiffusionXLPipeline has no safety checker argument
            index.update(safety_checker=[None, None], requires_safety_checker=False)
        index.pop("image_encoder", None)
        (out / "model_index.json").write_text(json.dumps(index, indent=2))
    t = net.one_step_timestep(sigma_init)
    return {"cond_shape": list(net.cond_shape), "vae": vae, "pipeline": str(pipeline), "timestep": t,
            "int_timestep": int(round(t)), "latent_scale": float(sigma_init / (1 + sigma_init ** 2) ** 0.5),
            "pipeline_class": PIPELINES[sdxl], "image_size": getattr(net, "image_size", None)}


def text_readme(cfg: dict) -> list[str]:
    """The README's diffusers section of a text generator's export."""
    text, (c, h, w) = cfg["text"], cfg["img_shape"]
    exact = abs(text["timestep"] - text["int_timestep"]) < 1e-2
    note = ("" if exact else f" The generator's timestep is {text['timestep']:.4g}, between two integer ones: the "
            f"pipeline's integer timestep approximates it; sida.load_generator is exact.")
    lines = ["", "## With diffusers alone", ""]
    call = (f"timesteps=[{text['int_timestep']}], latents={text['latent_scale']!r} * z, guidance_scale=1.0")
    pipe_cls = text.get("pipeline_class", PIPELINES[False])
    if text["vae"]:
        lines += [f"This folder is a `diffusers.{pipe_cls}` (DDPMScheduler, clip_sample off). One step:",
                  "",
                  "```python", "import torch", f"from diffusers import {pipe_cls}",
                  f"pipe = {pipe_cls}.from_pretrained('.')  # this folder",
                  "prompts = ['a photo of a dog', 'a red car']",
                  f"z = torch.randn(len(prompts), {c}, {h}, {w})",
                  f"images = pipe(prompts, num_inference_steps=1, {call}, output_type='pt').images  # in [0, 1]",
                  "```", ""]
    else:
        lines += ["A pixel-space text generator: `unet/` (UNet2DConditionModel), `text_encoder/`, `tokenizer/`, "
                  "`scheduler/`; not a StableDiffusionPipeline (it has no VAE). One step by hand:", "",
                  "```python", f"x = {text['latent_scale']!r} * z  # z ~ N(0, I) [n, {c}, {h}, {w}]",
                  f"F = unet(x, {text['int_timestep']}, encoder_hidden_states=embeddings).sample",
                  f"images = scheduler.step(F, {text['int_timestep']}, x).pred_original_sample  "
                  f"# after scheduler.set_timesteps(timesteps=[{text['int_timestep']}])",
                  "```", ""]
    lines += [f"The input is SiD-LSG's sqrt(1 - alpha_bar_t) z = sigma_init / sqrt(1 + sigma_init^2) z (a pipeline "
              f"multiplies `latents` by init_noise_sigma = 1); guidance_scale 1 disables classifier-free guidance "
              f"(guidance acted during distillation; SiD-LSG samples without it).{note}"]
    if text.get("image_size"):
        lines += ["", f"Leave height and width at the pipeline's default ({text['image_size']} px): SDXL's time ids "
                      f"(original and target size {text['image_size']}, crop (0, 0)) are the ones the generator was "
                      f"distilled with."]
    return lines


class TextGenerator(Generator):
    """A loaded text-to-image generator:
    ``G(z, prompts=None, cond=None, steps=1, generator=None, decode=True) -> images``.

    z ~ N(0, I) of shape [n, *img_shape] (latent shape for a latent model); the condition is the
    `prompts` (encoded by the exported text encoder) or precomputed `cond` embeddings [n, L, D]; with
    neither, the empty prompt. Images are float32 in [-1, 1], NCHW, decoded by the VAE when the
    teacher had one (`decode=False`: the UNet's latents). `encoder` and `vae` are public."""

    def __init__(self, net: torch.nn.Module, config: dict, encoder: torch.nn.Module,
                 vae: Optional[torch.nn.Module]) -> None:
        super().__init__(net, config)
        self.encoder, self.vae = encoder, vae

    def to(self, device: str | torch.device) -> "TextGenerator":
        for m in (self.net, self.encoder, self.vae):
            if m is not None:
                m.to(device)
        return self

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, prompts: Optional[Sequence[str]] = None, cond: Optional[torch.Tensor] = None,
                 steps: int = 1, generator: Optional[torch.Generator] = None, decode: bool = True) -> torch.Tensor:
        if prompts is not None and cond is not None:
            raise ValueError("pass prompts or cond (their embeddings), not both")
        if prompts is not None:
            cond = self.encoder.encode(prompts)
        x = self.sample(z, cond, steps, generator)
        return self.vae.decode(x) if decode and self.vae is not None else x


def load_text_generator(net: torch.nn.Module, config: dict, folder: Path) -> TextGenerator:
    """The text generator of export folder `folder` around its loaded network (text encoder and
    VAE from the folder, on the network's device)."""
    from .latent_vae import load_vae
    from .text_encoder import load_text_encoder

    device = next(net.parameters()).device
    vae = load_vae(folder, device) if (folder / "vae").is_dir() else None
    return TextGenerator(net, config, load_text_encoder(folder, device), vae)
