"""Teachers in the diffusers format: a pixel-space `UNet2DModel` with its scheduler, or a Stable
Diffusion 1.x / 2.x / SDXL text-to-image pipeline.

Three layouts are read (offline, local files only):
- a pipeline folder, as `DDPMPipeline.save_pretrained` writes it: `unet/config.json` + weights
  and `scheduler/scheduler_config.json`;
- a bare UNet folder: `config.json` + weights with `scheduler_config.json` beside them;
- a text-to-image pipeline, as `StableDiffusionPipeline.save_pretrained` writes it: `unet/` (a
  UNet2DConditionModel), `text_encoder/` + `tokenizer/` (CLIP), `scheduler/` and, for a latent
  model, `vae/` (without it the UNet works in pixel space: our digits testbed);
- an SDXL pipeline, as `StableDiffusionXLPipeline.save_pretrained` writes it: the same parts plus
  `text_encoder_2/` (a CLIPTextModelWithProjection) and `tokenizer_2/`, `vae/` required, the UNet
  with addition_embed_type "text_time" (`sida.nets.diffusers_sdxl`).

`check_folder` reads only the JSON files (no torch, no diffusers), so config validation can
reject a wrong folder with one line before any job starts; `load_teacher` builds the EDM-style
`DiffusersVPPrecond` / `DiffusersTextPrecond` / `DiffusersSDXLPrecond` (see `sida.nets.diffusers_vp` for the VP <-> EDM
correspondence); `download_hub_pipeline` fetches a pipeline for `teacher.hub`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Optional

from ..errors import AssetError, brief_reason
from ..nets.diffusers_config import sdxl_pooled_problem, text_unet_problem

# Schedulers whose `alphas_cumprod` (DDPM's beta schedules) define the training noise levels. The
# discrete-sigma samplers of SD pipelines (Euler, LMS, DPM-Solver) compute them from the same betas;
# their Karras / exponential spacing is an inference choice. Flow matching is not VP and is refused.
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "LMSDiscreteScheduler",
              "DPMSolverMultistepScheduler")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
# What `fetch` downloads from a teacher.url (a pipeline folder's base URL).
PIPELINE_FILES = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json")
# What `teacher.hub` downloads: configs, tokenizer files and safetensors weights of the parts a teacher
# needs (not fp16/non-EMA variants, safety checker or .bin duplicates).
HUB_PATTERNS = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
                "tokenizer_2/*", "text_encoder_2/config.json", "text_encoder_2/model.safetensors")
PIPELINE_LAYOUT = ("unet/, text_encoder/, tokenizer/, scheduler/ and, for a latent model, vae/, as "
                   "StableDiffusionPipeline.save_pretrained writes them")
SDXL_LAYOUT = ("unet/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, vae/ and scheduler/, as "
               "StableDiffusionXLPipeline.save_pretrained writes them")


class DiffusersFolder(NamedTuple):
    """Where the parts of a diffusers teacher are, and what their configs say. `kind` "pixel" is a
    UNet2DModel; "text" a text-to-image pipeline (UNet2DConditionModel + CLIP text encoder), in
    the VAE's latent space when `vae_dir` is set, else in pixel space; "sdxl" an SDXL pipeline
    (its second encoder and tokenizer are `text_encoder_2/`, `tokenizer_2/` beside the first)."""

    unet_dir: Path
    scheduler_file: Path
    unet_config: dict
    scheduler_config: dict
    kind: str = "pixel"
    text_encoder_dir: Optional[Path] = None
    tokenizer_dir: Optional[Path] = None
    vae_dir: Optional[Path] = None


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AssetError(f"diffusers teacher: {path} is not a readable JSON {what} ({type(exc).__name__}): "
                         f"replace it with the model's own file") from None
    if not isinstance(data, dict):
        raise AssetError(f"diffusers teacher: {path} is not a {what} (not a JSON object)")
    return data


def _is_sdxl(root: Path, ucfg: dict) -> bool:
    """Any sign of an SDXL pipeline: its UNet's addition embedding, its index or text_encoder_2/."""
    index = root / "model_index.json"
    cls = _read_json(index, "pipeline index").get("_class_name", "") if index.is_file() else ""
    return (ucfg.get("addition_embed_type") == "text_time" or "XL" in str(cls)
            or (root / "text_encoder_2").is_dir())


def _check_unet2d(unet_dir: Path, ucfg: dict) -> None:
    if ucfg.get("time_embedding_type", "positional") != "positional":
        raise AssetError(f"diffusers teacher: time_embedding_type {ucfg['time_embedding_type']!r} in {unet_dir}: "
                         f"only 'positional' (DDPM's sinusoidal embedding of fractional timesteps) is supported")
    if ucfg.get("class_embed_type") is not None:
        raise AssetError(f"diffusers teacher: class_embed_type {ucfg['class_embed_type']!r} in {unet_dir}: only "
                         f"class labels through num_class_embeds are supported")


def _require_parts(root: Path, parts: tuple, layout: str) -> None:
    for part in parts:
        if not (root / part).is_dir():
            raise AssetError(f"diffusers teacher: the pipeline folder {root} has no {part}/: place the pipeline's "
                             f"{part}/ there ({layout})")


def _check_vae(root: Path, ucfg: dict) -> Optional[Path]:
    vae = root / "vae" if (root / "vae").is_dir() else None
    if vae is not None:
        vcfg = _read_json(vae / "config.json", "VAE config")
        if vcfg.get("latent_channels", 4) != ucfg.get("in_channels", 4):
            raise AssetError(f"diffusers teacher: the VAE's latent_channels {vcfg.get('latent_channels', 4)} ({vae}) "
                             f"differ from the UNet's in_channels {ucfg.get('in_channels', 4)}: the vae/ is not this "
                             f"UNet's; place the pipeline's own")
    return vae


def _text_parts(root: Path, unet_dir: Path, ucfg: dict) -> dict:
    """The text pipeline's other folders, checked: one line naming the missing or mismatched part."""
    if unet_dir == root:
        raise AssetError(f"diffusers teacher: {root} holds a bare UNet2DConditionModel: set teacher.path to its "
                         f"pipeline folder ({PIPELINE_LAYOUT})")
    problem = text_unet_problem(ucfg)
    if problem:
        raise AssetError(f"diffusers teacher: {unet_dir}: {problem}")
    _require_parts(root, ("text_encoder", "tokenizer"), PIPELINE_LAYOUT)
    tcfg = _read_json(root / "text_encoder" / "config.json", "text encoder config")
    if tcfg.get("hidden_size") != ucfg["cross_attention_dim"]:
        raise AssetError(f"diffusers teacher: the text encoder's hidden_size {tcfg.get('hidden_size')} "
                         f"({root / 'text_encoder'}) differs from the UNet's cross_attention_dim "
                         f"{ucfg['cross_attention_dim']}: the text_encoder/ is not this UNet's; place the pipeline's "
                         f"own")
    return dict(kind="text", text_encoder_dir=root / "text_encoder", tokenizer_dir=root / "tokenizer",
                vae_dir=_check_vae(root, ucfg))


def _sdxl_parts(root: Path, unet_dir: Path, ucfg: dict) -> dict:
    """An SDXL pipeline's folders, checked: both text encoders and tokenizers, the VAE, and widths
    that fit the UNet (hidden sizes summing to its cross-attention width; the second encoder's
    projection + the 6 time ids' embedding = its add_embedding input)."""
    if unet_dir == root:
        raise AssetError(f"diffusers teacher: {root} holds a bare SDXL UNet2DConditionModel: set teacher.path to "
                         f"its pipeline folder ({SDXL_LAYOUT})")
    _require_parts(root, ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"), SDXL_LAYOUT)
    problem = text_unet_problem(ucfg, sdxl=True)
    if problem:
        raise AssetError(f"diffusers teacher: {unet_dir}: {problem}")
    one = _read_json(root / "text_encoder" / "config.json", "text encoder config")
    two = _read_json(root / "text_encoder_2" / "config.json", "text encoder config")
    if "CLIPTextModelWithProjection" not in two.get("architectures", ["CLIPTextModelWithProjection"]):
        raise AssetError(f"diffusers teacher: {root / 'text_encoder_2'} is a {two.get('architectures')}: SDXL's "
                         f"second text encoder is a CLIPTextModelWithProjection (its pooled projection conditions "
                         f"the UNet); place the pipeline's own")
    widths = (one.get("hidden_size"), two.get("hidden_size"))
    if not all(isinstance(w, int) for w in widths) or sum(widths) != ucfg["cross_attention_dim"]:
        raise AssetError(f"diffusers teacher: the text encoders' hidden sizes {widths[0]} + {widths[1]} "
                         f"(text_encoder/, text_encoder_2/ of {root}) do not sum to the UNet's cross_attention_dim "
                         f"{ucfg['cross_attention_dim']}: they are not this UNet's; place the pipeline's own")
    problem = sdxl_pooled_problem(ucfg, int(two.get("projection_dim", 0)))
    if problem:
        raise AssetError(f"diffusers teacher: {root}: {problem}")
    return dict(kind="sdxl", text_encoder_dir=root / "text_encoder", tokenizer_dir=root / "tokenizer",
                vae_dir=_check_vae(root, ucfg))


def check_folder(path: str | Path) -> DiffusersFolder:
    """Locate and check a diffusers teacher folder; raise AssetError with one line naming the fix.
    JSON files only (no torch): the config check runs it before any job starts."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise AssetError(f"diffusers teacher: folder {root} does not exist: set teacher.path to a local folder "
                         f"holding the model (unet/ and scheduler/, or config.json and scheduler_config.json)")
    if (root / "unet" / "config.json").is_file():
        unet_dir, sched = root / "unet", root / "scheduler" / "scheduler_config.json"
    elif (root / "config.json").is_file():
        unet_dir, sched = root, root / "scheduler_config.json"
    elif (root / "model_index.json").is_file():
        raise AssetError(f"diffusers teacher: the pipeline folder {root} has no unet/config.json: place the "
                         f"pipeline's unet/ there ({PIPELINE_LAYOUT})")
    else:
        raise AssetError(f"diffusers teacher: {root} has no config.json (nor unet/config.json): it is not a "
                         f"diffusers model folder; save the model with save_pretrained into it")
    ucfg = _read_json(unet_dir / "config.json", "model config")
    cls, parts = ucfg.get("_class_name"), {}
    if cls == "UNet2DConditionModel":
        parts = (_sdxl_parts if _is_sdxl(root, ucfg) else _text_parts)(root, unet_dir, ucfg)
    elif cls == "UNet2DModel":
        _check_unet2d(unet_dir, ucfg)
    else:
        raise AssetError(f"diffusers teacher: {unet_dir}/config.json is a {cls or 'model of unknown class'}; only "
                         f"UNet2DModel (pixel) and UNet2DConditionModel (SD 1.x / 2.x / SDXL text-to-image) are "
                         f"supported")
    size = ucfg.get("sample_size")
    if isinstance(size, (list, tuple)) and len(set(size)) != 1 or size is None:
        raise AssetError(f"diffusers teacher: sample_size {size!r} in {unet_dir}: only square images are supported")
    if not sched.is_file():
        raise AssetError(f"diffusers teacher: {sched} is missing: the scheduler config defines the noise levels; "
                         f"save the model's scheduler there (scheduler.save_pretrained)")
    scfg = _read_json(sched, "scheduler config")
    if scfg.get("_class_name") not in SCHEDULERS or scfg.get("use_flow_sigmas"):
        raise AssetError(f"diffusers teacher: scheduler {scfg.get('_class_name')!r} ({sched}) is not supported: "
                         f"use a variance-preserving one ({', '.join(SCHEDULERS)}) with the model's betas")
    pred = scfg.get("prediction_type", "epsilon")
    if pred not in PREDICTIONS:
        raise AssetError(f"diffusers teacher: prediction_type {pred!r} ({sched}) is not supported: "
                         f"one of {', '.join(PREDICTIONS)}")
    return DiffusersFolder(unet_dir, sched, ucfg, scfg, **parts)


def diffusers_teacher_assets(cfg: dict) -> list[dict]:
    """The fetch stage's teacher asset of `teacher.source: diffusers` (none otherwise), in the
    normalized form of `sida.io.assets.check_assets`: a local folder, the pipeline files at
    `teacher.url` downloaded into the cache (unverified: diffusers folders carry no hashes), or the
    hub repository `teacher.hub` (`download_hub_pipeline`)."""
    t = cfg.get("teacher") or {}
    if t.get("source") != "diffusers":
        return []
    hub = None if t.get("path") else t.get("hub")
    files = {} if t.get("path") or hub else {f: None for f in PIPELINE_FILES}
    return [{"name": "teacher", "kind": "teacher", "path": t.get("path"), "url": t.get("url"), "hub": hub,
             "sha256": None, "files": files, "index": "teacher"}]


def _complete(folder: Path) -> bool:
    """A folder that passes the check and holds the UNet's weights: a finished download."""
    try:
        found = check_folder(folder)
    except AssetError:
        return False
    return any(found.unet_dir.glob("*.safetensors"))


def download_hub_pipeline(repo_id: str, dest: Path) -> Path:
    """The pipeline `repo_id` of the Hugging Face hub in folder `dest` (kept when already complete):
    only the parts a teacher needs (`HUB_PATTERNS`, safetensors weights). Offline or unreachable:
    one AssetError line naming the layout to place by hand and teacher.path."""
    dest = Path(dest)
    if _complete(dest):
        return dest
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_dir=str(dest), allow_patterns=list(HUB_PATTERNS))
    except Exception as exc:  # offline, unreachable, gated, unknown repo: the hub's many error types
        raise AssetError(f"diffusers teacher: hub repository {repo_id!r} could not be downloaded "
                         f"({brief_reason(exc)}): download it elsewhere and set teacher.path to a folder with "
                         f"{PIPELINE_LAYOUT} (model_index.json, *.json configs, *.safetensors weights)") from None
    check_folder(dest)
    return dest


def alphas_cumprod(scheduler_config: dict) -> list[float]:
    """The scheduler's alphas_cumprod, computed by diffusers itself from its config."""
    import diffusers

    sched = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    return [float(a) for a in sched.alphas_cumprod.double()]


def _from_pretrained(cls: Any, folder: Path) -> Any:
    try:
        return cls.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise AssetError(f"diffusers teacher: {folder} could not be loaded ({brief_reason(exc)}): check that its "
                         f"weights file is complete") from None


def _unet_config(unet: Any) -> dict:
    return {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}


def sdxl_image_size(folder: DiffusersFolder) -> int:
    """The side in pixels of an SDXL pipeline's images: the UNet's sample_size times the VAE's
    downsampling (diffusers' default height, which the pipeline's time ids name; 1024 for SDXL)."""
    vcfg = _read_json(folder.vae_dir / "config.json", "VAE config")
    return int(folder.unet_config["sample_size"]) * 2 ** (len(vcfg.get("block_out_channels", [0])) - 1)


def load_teacher(path: str | Path) -> Any:
    """The diffusers teacher at `path` (eval mode, local files only): a `DiffusersVPPrecond` for a
    UNet2DModel, a `DiffusersTextPrecond` for a text pipeline, a `DiffusersSDXLPrecond` for an SDXL
    one, its `uncond` the condition of "" (zeros for SDXL)."""
    folder = check_folder(path)
    sched, pred = folder.scheduler_config, folder.scheduler_config.get("prediction_type", "epsilon")
    if folder.kind in ("text", "sdxl"):
        from diffusers import UNet2DConditionModel

        from ..nets.diffusers_sdxl import DiffusersSDXLPrecond
        from ..nets.diffusers_text import DiffusersTextPrecond
        from .text_encoder import load_text_encoder

        unet = _from_pretrained(UNet2DConditionModel, folder.unet_dir)
        root = folder.unet_dir.parent
        encoder = load_text_encoder(root)
        cls, extra = DiffusersTextPrecond, {}
        if folder.kind == "sdxl":
            cls, extra = DiffusersSDXLPrecond, dict(pooled_dim=encoder.pooled_dim, image_size=sdxl_image_size(folder))
        net = cls(_unet_config(unet), alphas_cumprod(sched), pred, cond_shape=encoder.cond_shape,
                  pipeline_dir=str(root.resolve()), **extra)
        net.uncond.copy_(encoder.encode([""]))
    else:
        from diffusers import UNet2DModel

        from ..nets.diffusers_vp import DiffusersVPPrecond, label_dim_of

        unet = _from_pretrained(UNet2DModel, folder.unet_dir)
        net = DiffusersVPPrecond(_unet_config(unet), alphas_cumprod(sched), pred,
                                 label_dim=label_dim_of(_unet_config(unet)))
    net.model.unet.load_state_dict(unet.state_dict(), strict=True)
    return net.eval()
