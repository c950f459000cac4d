"""The zero-shot text-to-image evaluation from the config: what `evaluate_network` needs to score a
text generator on COCO (``evaluate.prompts``, ``evaluate.coco``, ``evaluate.clip``).

- `check_zero_shot(cfg)`: the settings agree with each other (one-line ConfigError), and notes
  where they differ from the published protocol (another sample count).
- `load_prompts(cfg)`: the captions, or None for a generator without text.
- `coco_resolution(cfg)`, `coco_reference(cfg, extractor)`: the size images are compared at and
  the reference statistics (computed once from the COCO images, cached under the evaluation cache).
- `build_clip_scorer(cfg, device)`: the `ClipScorer`, or None.
- `asset_path(cfg, value, kind, key)`: a setting that names a fetch asset or a path, as a local path.

Per run r (seeds s): prompts = ``prompts_for_seeds(captions, s)``; images = the generator's
samples for those prompts; ``prepare_images(images, coco_resolution(cfg))`` go to the clean-mode
Inception (FID against `coco_reference`) and to ``scorer.score(prepared, prompts)`` (CLIP score:
its mean), so both metrics see the same 256-px images, as in GigaGAN's script.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import AssetError, ConfigError
from .clip_score import ClipScorer
from .coco import get_protocol, read_captions, reference_stats
from .features import Extractor, cache_dir
from .refstats import Reference

__all__ = ["asset_path", "check_zero_shot", "load_prompts", "coco_resolution", "coco_reference",
           "build_clip_scorer"]


def asset_path(cfg: dict, value: str, kind: str, key: str) -> Path:
    """The local path of setting `key` = `value`: the fetch stage's output when `value` names a
    fetch asset (its ``output`` in the fetch folder, else where the manifest says it lies), else
    `value` itself as a path."""
    assets = [a for a in ((cfg.get("fetch") or {}).get("assets") or []) if isinstance(a, dict)]
    named = [a for a in assets if a.get("name") == value]
    if not named:
        return Path(value)
    if named[0].get("kind") != kind:
        raise ConfigError(f"{key}: fetch asset '{value}' is of kind {named[0].get('kind')}, not {kind}")
    fetch_dir = Path(cfg["results_dir"]) / cfg["experiment"] / "fetch"
    manifest = fetch_dir / "manifest.json"
    entries = json.loads(manifest.read_text())["assets"] if manifest.is_file() else []
    entry = next((e for e in entries if e.get("name") == value), None)
    if entry is None:
        raise AssetError(f"{key}: asset '{value}' has not been fetched ({manifest} does not list it): run the "
                         f"fetch stage")
    return fetch_dir / entry["output"] if entry.get("output") else Path(entry["local_path"])


def check_zero_shot(cfg: dict) -> list[str]:
    """Raise a one-line ConfigError where the zero-shot settings contradict each other; return
    notes where they differ from the published protocol."""
    ev = cfg["evaluate"]
    coco = ev.get("coco")
    if coco is None:
        return []
    protocol = get_protocol(coco["protocol"])
    if not ev.get("prompts"):
        raise ConfigError(f"evaluate.coco needs evaluate.prompts (the {protocol.captions}): the COCO FID scores "
                          f"a text-to-image generator on the captions")
    if ev["extractor"] != "inception" or ev["inception_mode"] != "clean":
        raise ConfigError("evaluate.coco: the zero-shot COCO FID uses clean-fid's Inception in clean mode: set "
                          "evaluate.extractor: inception and evaluate.inception_mode: clean")
    if ev["num_samples"] != protocol.num_samples:
        return [f"{protocol.name}: {ev['num_samples']} samples per run where the published numbers use "
                f"{protocol.num_samples}; FID depends on the sample count, so compare only like with like"]
    return []


def load_prompts(cfg: dict) -> list[str] | None:
    """The captions of ``evaluate.prompts`` (None when unset)."""
    value = cfg["evaluate"].get("prompts")
    if not value:
        return None
    return read_captions(asset_path(cfg, value, "captions", "evaluate.prompts"), asset=value)


def coco_resolution(cfg: dict) -> int:
    """The side images are compared at: ``evaluate.coco.resolution`` or the protocol's."""
    coco = cfg["evaluate"]["coco"]
    return coco.get("resolution") or get_protocol(coco["protocol"]).resolution


def coco_reference(cfg: dict, extractor: Extractor) -> Reference:
    """The protocol's reference statistics of ``evaluate.coco.images`` (see `reference_stats`)."""
    coco, ev = cfg["evaluate"]["coco"], cfg["evaluate"]
    images = asset_path(cfg, coco["images"], "images", "evaluate.coco.images")
    return reference_stats(images, extractor, coco_resolution(cfg), cache_dir(cfg), batch=ev["batch"])


def build_clip_scorer(cfg: dict, device: torch.device | str = "cpu") -> ClipScorer | None:
    """The CLIP scorer of ``evaluate.clip`` on `device` (None when unset)."""
    clip = cfg["evaluate"].get("clip")
    if clip is None:
        return None
    weights = asset_path(cfg, clip["weights"], "clip", "evaluate.clip.weights")
    return ClipScorer(clip["model"], weights, device, prefix=clip["prefix"], asset=clip["weights"])
