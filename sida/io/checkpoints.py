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
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_save_torch
from ..nets.build import build_network
from ..errors import (CheckpointError, FileSystemError, NonFiniteError, brief_reason, describe_os_error,
                      is_os_failure, require_file)

NETWORK_FORMAT = "sida-network"
STATE_FORMAT = "sida-state"
VERSION = 1


def nonfinite_tensors(state_dict: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """(name, count of NaN/inf values) of every floating-point tensor that holds any."""
    out = []
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                out.append((name, bad))
    return out


def check_finite(state_dict: dict[str, torch.Tensor], source: str, fix: str) -> None:
    """Raise `NonFiniteError` naming the first tensor of `state_dict` with NaN/inf values."""
    bad = nonfinite_tensors(state_dict)
    if bad:
        name, count = bad[0]
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise NonFiniteError(f"{source}: tensor '{name}' holds {count} non-finite value(s) (NaN/inf){more}: {fix}")


def network_record(net: torch.nn.Module, source: str = "network") -> dict:
    """Class name + kwargs + state dict of a network, as stored in files. Non-finite weights are
    refused: such a network is never a result (nor a start) of anything."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    check_finite(state, f"refusing to write {source}", "a network with NaN/inf weights is never stored (did "
                 "training diverge, or is its source damaged?)")
    return {"class": type(net).__name__, "kwargs": json.loads(json.dumps(net.init_kwargs)), "state_dict": state}


def network_from_record(rec: dict, source: str = "record") -> torch.nn.Module:
    """Rebuild a network from `network_record` output (strict load); its weights must be finite."""
    try:
        net = build_network(rec["class"], rec["kwargs"])
        net.load_state_dict(rec["state_dict"], strict=True)
    except (KeyError, RuntimeError, TypeError) as exc:
        first = brief_reason(exc)
        raise CheckpointError(f"{source}: the stored network does not match its architecture ({first})") from None
    check_finite(rec["state_dict"], source, "it comes from a diverged run or is damaged; use another file")
    return net


def _damage(path: Path) -> str:
    """Why a file that torch cannot read is not one of our checkpoints (no torch internals)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if head == b"PK\x03\x04":
        if not zipfile.is_zipfile(path):
            return "a zip archive cut short (truncated?)"
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith("/data.pkl") for n in z.namelist()):
                return "a zip archive, but not one written by torch.save"
        return "a damaged torch.save archive"
    return "not a torch.save archive"


def _torch_load(path: Path, what: str) -> Any:
    require_file(path, what, CheckpointError, "run the stage that produces it first",
                 directory_fix="pass the file itself")
    corrupt = (f"{what} {path} is corrupt or not a checkpoint ({{}}): delete it and rerun the stage that "
               f"writes it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        if is_os_failure(exc):  # the OS could not read it: not the file's fault
            raise FileSystemError(describe_os_error(exc, path, "read")) from None
        raise CheckpointError(corrupt.format(_damage(path))) from None
    except pickle.UnpicklingError:
        reason = _damage(path)
        if reason == "a damaged torch.save archive":
            # A sound archive whose pickle names other classes. torch's own message suggests
            # weights_only=False, which would run code from the file: not passed on.
            raise CheckpointError(f"{what} {path} holds objects other than tensors and plain containers, so it "
                                  f"is not a sida file (published EDM pickles go through the fetch stage)") from None
        raise CheckpointError(corrupt.format(reason)) from None
    except Exception:  # noqa: BLE001 - torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        raise CheckpointError(corrupt.format(_damage(path))) from None


def save_network(path: str | Path, net: torch.nn.Module, meta: dict | None = None) -> None:
    """Write one network to `path` atomically, with JSON-able `meta` (source, config hash, ...)."""
    rec = network_record(net, f"network file {path}")
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
    net = network_from_record(rec, f"network file {path}").to(device).eval().requires_grad_(False)
    net.sida_meta = json.loads(rec.get("meta") or "{}")
    return net


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
        kind = "a network file" if isinstance(st, dict) and st.get("format") == NETWORK_FORMAT else "another file"
        raise CheckpointError(f"checkpoint {path} is {kind}, not a sida training state: pass the state.pt a "
                              f"stage wrote")
    st["meta"] = json.loads(st.get("meta") or "{}")
    for key, rec in st.items():  # the networks a later run starts from
        if isinstance(rec, dict) and "class" in rec and isinstance(rec.get("state_dict"), dict):
            check_finite(rec["state_dict"], f"checkpoint {path} ({key})",
                         "it comes from a diverged run or is damaged; rerun the stage that writes it")
    return st


def load_edm_pickle(path_or_file: Any) -> torch.nn.Module:
    """Import a published EDM pickle without executing its code (see `sida.io.edm_pickle`)."""
    from .edm_pickle import load_edm_pickle as _load

    return _load(path_or_file)
