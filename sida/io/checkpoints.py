"""Checkpoints in our own format, loaded with `weights_only=True` (no code execution).

Two kinds of file, both a `torch.save` of plain containers and tensors:
- a *network file* (`save_network`/`load_network`): one network's class name, constructor
  kwargs and state dict, plus JSON-able metadata; what stages hand each other;
- a *training state* (`save_state`/`load_state`): every network, optimizer, EMA, RNG state of
  every rank, the image counter, the phase and the config hash; what a killed stage resumes from.
Published EDM pickles are imported by `load_edm_pickle` (see `sida.io.edm_pickle`).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_save_torch
from ..errors import CheckpointError

NETWORK_FORMAT = "sida-network"
STATE_FORMAT = "sida-state"
VERSION = 1


def _precond_classes() -> dict:
    from ..nets.precond import PRECOND_CLASSES  # late: keeps `import sida.io.checkpoints` light

    return PRECOND_CLASSES


def build_network(class_name: str, kwargs: dict) -> torch.nn.Module:
    """Construct one of our network classes by name from its constructor kwargs."""
    classes = _precond_classes()
    if class_name not in classes:
        raise CheckpointError(f"unknown network class '{class_name}' (known: {', '.join(classes)})")
    return classes[class_name](**kwargs)


def network_record(net: torch.nn.Module) -> dict:
    """Class name + kwargs + state dict of a network, as stored in files."""
    return {"class": type(net).__name__, "kwargs": json.loads(json.dumps(net.init_kwargs)),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}


def network_from_record(rec: dict, source: str = "record") -> torch.nn.Module:
    """Rebuild a network from `network_record` output (strict load)."""
    try:
        net = build_network(rec["class"], rec["kwargs"])
        net.load_state_dict(rec["state_dict"], strict=True)
    except (KeyError, RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{source}: the stored network does not match its architecture ({first})") from None
    return net


def _torch_load(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist: run the stage that produces it first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        # First sentence only: torch's messages go on with internal advice.
        reason = str(exc).strip().splitlines()[0].split(". ")[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what} {path} is corrupt or truncated ({reason}): delete it and rerun "
                              f"the stage that writes it") from None
    except Exception:  # pickle.UnpicklingError from the weights-only loader, among others
        # torch's own message suggests weights_only=False, which would run code from the file: not passed on.
        raise CheckpointError(f"{what} {path} holds objects other than tensors and plain containers, so it is "
                              f"not a sida file (published EDM pickles go through the fetch stage)") from None


def save_network(path: str | Path, net: torch.nn.Module, meta: dict | None = None) -> None:
    """Write one network to `path` atomically, with JSON-able `meta` (source, config hash, ...)."""
    rec = network_record(net)
    rec.update(format=NETWORK_FORMAT, version=VERSION, meta=json.dumps(meta or {}, default=str))
    atomic_save_torch(rec, path)


def load_network(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a network file written by `save_network`; eval mode, gradients off."""
    path = Path(path)
    rec = _torch_load(path, "network file")
    if not isinstance(rec, dict) or rec.get("format") != NETWORK_FORMAT:
        raise CheckpointError(f"network file {path} is not a sida network file (format "
                              f"{rec.get('format') if isinstance(rec, dict) else type(rec).__name__}): "
                              f"convert published EDM pickles with the fetch stage")
    net = network_from_record(rec, str(path)).to(device).eval().requires_grad_(False)
    net.sida_meta = json.loads(rec.get("meta") or "{}")
    return net


def network_meta(path: str | Path) -> dict:
    """The metadata stored with a network file."""
    rec = _torch_load(Path(path), "network file")
    return json.loads(rec.get("meta") or "{}")


def save_state(path: str | Path, state: dict) -> None:
    """Write a training state atomically. `state` holds tensors, plain containers and a `meta` dict."""
    out = dict(state)
    out.update(format=STATE_FORMAT, version=VERSION, meta=json.dumps(state.get("meta", {}), default=str))
    atomic_save_torch(out, path)


def load_state(path: str | Path) -> dict:
    """Read a training state written by `save_state`; `meta` comes back as a dict."""
    path = Path(path)
    st = _torch_load(path, "checkpoint")
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a sida training state: delete it to start over")
    st["meta"] = json.loads(st.get("meta") or "{}")
    return st


def load_edm_pickle(path_or_file: Any) -> torch.nn.Module:
    """Import a published EDM pickle without executing its code (see `sida.io.edm_pickle`)."""
    from .edm_pickle import load_edm_pickle as _load

    return _load(path_or_file)
