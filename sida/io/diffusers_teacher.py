"""Teachers in the diffusers format: a local pixel-space `UNet2DModel` folder with its scheduler.

Two layouts are read (offline, local files only):
- a pipeline folder, as `DDPMPipeline.save_pretrained` writes it: `unet/config.json` + weights
  and `scheduler/scheduler_config.json`;
- a bare UNet folder: `config.json` + weights with `scheduler_config.json` beside them.

`check_folder` reads only the JSON files (no torch, no diffusers), so config validation can
reject a wrong folder with one line before any job starts; `load_teacher` builds the EDM-style
`DiffusersVPPrecond` (see `sida.nets.diffusers_vp` for the VP <-> EDM correspondence).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import AssetError

# VP schedulers whose `alphas_cumprod` define the training noise levels (they share the beta
# schedules of DDPM); others (Euler/Karras sigmas, flow matching) are not VP-discrete and are refused.
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
# What `fetch` downloads from a teacher.url (a pipeline folder's base URL).
PIPELINE_FILES = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json")


class DiffusersFolder(NamedTuple):
    """Where the parts of a diffusers teacher are, and what their configs say."""

    unet_dir: Path
    scheduler_file: Path
    unet_config: dict
    scheduler_config: dict


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AssetError(f"diffusers teacher: {path} is not a readable JSON {what} ({type(exc).__name__}): "
                         f"replace it with the model's own file") from None
    if not isinstance(data, dict):
        raise AssetError(f"diffusers teacher: {path} is not a {what} (not a JSON object)")
    return data


def check_folder(path: str | Path) -> DiffusersFolder:
    """Locate and check a diffusers teacher folder; raise AssetError with one line naming the fix."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise AssetError(f"diffusers teacher: folder {root} does not exist: set teacher.path to a local folder "
                         f"holding the model (unet/ and scheduler/, or config.json and scheduler_config.json)")
    if (root / "unet" / "config.json").is_file():
        unet_dir, sched = root / "unet", root / "scheduler" / "scheduler_config.json"
    elif (root / "config.json").is_file():
        unet_dir, sched = root, root / "scheduler_config.json"
    else:
        raise AssetError(f"diffusers teacher: {root} has no config.json (nor unet/config.json): it is not a "
                         f"diffusers model folder; save the model with save_pretrained into it")
    ucfg = _read_json(unet_dir / "config.json", "model config")
    cls = ucfg.get("_class_name")
    if cls == "UNet2DConditionModel":
        raise AssetError(f"diffusers teacher: {unet_dir} holds a UNet2DConditionModel (a latent, text-conditioned "
                         f"model): not supported yet; only pixel-space UNet2DModel teachers are")
    if cls != "UNet2DModel":
        raise AssetError(f"diffusers teacher: {unet_dir}/config.json is a {cls or 'model of unknown class'}; only "
                         f"pixel-space UNet2DModel teachers are supported")
    if ucfg.get("time_embedding_type", "positional") != "positional":
        raise AssetError(f"diffusers teacher: time_embedding_type {ucfg['time_embedding_type']!r} in {unet_dir}: "
                         f"only 'positional' (DDPM's sinusoidal embedding of fractional timesteps) is supported")
    if ucfg.get("class_embed_type") is not None:
        raise AssetError(f"diffusers teacher: class_embed_type {ucfg['class_embed_type']!r} in {unet_dir}: only "
                         f"class labels through num_class_embeds are supported")
    size = ucfg.get("sample_size")
    if isinstance(size, (list, tuple)) and len(set(size)) != 1 or size is None:
        raise AssetError(f"diffusers teacher: sample_size {size!r} in {unet_dir}: only square images are supported")
    if not sched.is_file():
        raise AssetError(f"diffusers teacher: {sched} is missing: the scheduler config defines the noise levels; "
                         f"save the model's scheduler there (scheduler.save_pretrained)")
    scfg = _read_json(sched, "scheduler config")
    if scfg.get("_class_name") not in SCHEDULERS:
        raise AssetError(f"diffusers teacher: scheduler {scfg.get('_class_name')!r} ({sched}) is not supported: "
                         f"use a variance-preserving one ({', '.join(SCHEDULERS)}) with the model's betas")
    pred = scfg.get("prediction_type", "epsilon")
    if pred not in PREDICTIONS:
        raise AssetError(f"diffusers teacher: prediction_type {pred!r} ({sched}) is not supported: "
                         f"one of {', '.join(PREDICTIONS)}")
    return DiffusersFolder(unet_dir, sched, ucfg, scfg)


def diffusers_teacher_assets(cfg: dict) -> list[dict]:
    """The fetch stage's teacher asset of `teacher.source: diffusers` (none otherwise), in the
    normalized form of `sida.io.assets.check_assets`: a local folder, or the pipeline files at
    `teacher.url` downloaded into the cache (unverified: diffusers folders carry no hashes)."""
    t = cfg.get("teacher") or {}
    if t.get("source") != "diffusers":
        return []
    files = {} if t.get("path") else {f: None for f in PIPELINE_FILES}
    return [{"name": "teacher", "kind": "teacher", "path": t.get("path"), "url": t.get("url"), "sha256": None,
             "files": files, "index": "teacher"}]


def alphas_cumprod(scheduler_config: dict) -> list[float]:
    """The scheduler's alphas_cumprod, computed by diffusers itself from its config."""
    import diffusers

    sched = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    return [float(a) for a in sched.alphas_cumprod.double()]


def load_teacher(path: str | Path) -> Any:
    """The diffusers teacher at `path` as a `DiffusersVPPrecond` (eval mode, local files only)."""
    from diffusers import UNet2DModel

    from ..nets.diffusers_vp import DiffusersVPPrecond, label_dim_of

    folder = check_folder(path)
    try:
        unet = UNet2DModel.from_pretrained(folder.unet_dir, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise AssetError(f"diffusers teacher: {folder.unet_dir} could not be loaded ({str(exc).splitlines()[0][:160]}): "
                         f"check that its weights file is complete") from None
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    net = DiffusersVPPrecond(config, alphas_cumprod(folder.scheduler_config),
                             folder.scheduler_config.get("prediction_type", "epsilon"),
                             label_dim=label_dim_of(config))
    net.model.unet.load_state_dict(unet.state_dict(), strict=True)
    return net.eval()
