"""Sharded training states (`parallel: fsdp`) with `torch.distributed.checkpoint` (DCP).

A state is a directory: every process writes its own shards of the networks and optimisers
(DCP's files and `.metadata`), rank 0 adds `extra.pt` (the small rest of the state: image count,
RNG states, the driver's counters; loaded with `weights_only=True`) and, last, `meta.json` (format,
config hash, stage, world size, image count, the optimisers that had stepped). Atomic as a
directory: everything is written into `.<name>.tmp` beside the target; after a barrier rank 0 moves the previous state to `.<name>.old`,
renames the new one into place and removes the old one. A crash leaves either the previous state
or the new one in place, or, between the two renames, the previous one as `.<name>.old`, which
`load_sharded` then reads. A directory without `meta.json` was never completed.

DCP reshards on load: a state written by N processes loads at M (FSDP or plain networks; at one
process with unsharded networks too). The files must be on a file system every process reads.
`consolidated_state_dict` gathers one network's full state on rank 0 for export (network.pt).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from ..errors import CheckpointError, FileSystemError, brief_reason, describe_os_error
from .killpoint import kill_point

SHARDED_FORMAT = "sida-sharded-state"
VERSION = 1
META = "meta.json"
EXTRA = "extra.pt"

# name -> (module, its optimiser or None); e.g. {"G": (G, opt_g), "G_ema": (G_ema, None),
# "critic": (ModuleDict(fake=fake, head=head), opt_f)}: the optimiser's state is keyed by the
# module's parameter names, so one module per optimiser.
Entries = dict[str, tuple[torch.nn.Module, torch.optim.Optimizer | None]]


def _side(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _collect(entries: Entries, stepped: set[str]) -> dict[str, dict]:
    """The DCP state dict of every entry, {name: {"model": ..., "optim": ...}}, the optimiser's
    only for the entries in `stepped`: DCP would give an optimiser without state one by a step
    on zero gradients, and Adam's step count would then be one ahead of the run's."""
    out = {}
    for name, (module, opt) in entries.items():
        if name in stepped:
            model_sd, optim_sd = get_state_dict(module, opt)
            out[name] = {"model": model_sd, "optim": optim_sd}
        else:
            out[name] = {"model": get_model_state_dict(module)}
    return out


@contextmanager
def _trainable(entries: Entries, stateful: dict[str, set[str]] | None = None) -> Iterator[None]:
    """The optimisers' parameters made trainable for the duration: DCP skips the state of frozen
    parameters (when it loads it, and when it gives a fresh optimiser its state to load into), and
    the loop keeps its networks frozen between updates. `stateful` (a load): per entry, the names
    of the parameters whose optimiser state the checkpoint holds; the others stay frozen, since
    DCP would give them a state (a step on zero gradients) the checkpoint cannot fill, e.g. a
    generator's augmentation-label weights that never get a gradient."""
    params, flags = [], []
    for name, (module, opt) in entries.items():
        if opt is None:
            continue
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        for pname, p in module.named_parameters():
            if id(p) in in_opt:
                params.append(p)
                flags.append(p.requires_grad)
                p.requires_grad_(stateful is None or pname in stateful[name])
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _stateful_parameters(directory: Path, entries: Entries) -> dict[str, set[str]]:
    """Per entry, the parameters whose optimiser state the sharded state in `directory` holds
    (from DCP's metadata: keys `<entry>.optim.state.<parameter>.<state>`)."""
    keys = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    out = {}
    for name in entries:
        prefix = f"{name}.optim.state."
        out[name] = {k[len(prefix):].rsplit(".", 1)[0] for k in keys if k.startswith(prefix)}
    return out


def save_sharded(path: str | Path, entries: Entries, extra: dict[str, Any], meta: dict[str, Any],
                 group: object = None) -> None:
    """Write the sharded state of `entries` (a collective: every process calls it) with `extra`
    (rank 0's copy is written) and `meta` (config_hash, stage, nimg; format, version and the
    world size are added) to directory `path`, atomically."""
    path = Path(path)
    tmp, old = _side(path, "tmp"), _side(path, "old")
    rank = dist.get_rank(group)
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers
            tmp.mkdir(parents=True)
        dist.barrier(group=group)
        stepped = {name for name, (_, opt) in entries.items() if opt is not None and opt.state}
        with _trainable(entries):
            dcp.save(_collect(entries, stepped), checkpoint_id=tmp, process_group=group)
        if rank == 0:
            _write_file(tmp / EXTRA, lambda f: torch.save(extra, f))
            full_meta = {"format": SHARDED_FORMAT, "version": VERSION, **meta,
                         "world_size": dist.get_world_size(group), "stepped": sorted(stepped)}
            _write_file(tmp / META, lambda f: f.write((json.dumps(full_meta, indent=2, sort_keys=True) + "\n").encode()))
            _fsync_dir(tmp)
        dist.barrier(group=group)  # every process's shards are on disk before the state counts
        if rank == 0:
            kill_point(f"write:{path.name}")
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise FileSystemError(describe_os_error(exc, path, "write")) from exc
    dist.barrier(group=group)  # no process goes on (or exits on a signal) before the rename


def sharded_state_dir(path: str | Path) -> Path | None:
    """The directory a resume reads: `path`, or the previous state a save cut short between
    its renames left as `.<name>.old`; None when there is neither."""
    path = Path(path)
    for candidate in (path, _side(path, "old")):
        if candidate.is_dir():
            return candidate
    return None


def read_meta(directory: Path) -> dict:
    """`meta.json` of a sharded state; CheckpointError when it is missing or not ours."""
    fix = f"delete {directory} to start the stage over"
    try:
        meta = json.loads((directory / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"sharded checkpoint {directory} is incomplete (no {META}: its write was cut short or "
                              f"files were removed): {fix}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"sharded checkpoint {directory}: {META} is unreadable ({brief_reason(exc)}): {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARDED_FORMAT:
        raise CheckpointError(f"{directory} is not a sida sharded checkpoint ({META} names no {SHARDED_FORMAT}): {fix}")
    return meta


def load_sharded(path: str | Path, entries: Entries, config_hash: str,
                 group: object = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Load the sharded state at `path` into `entries` (a collective), at any world size; returns
    (extra, meta), or None when there is no state. Refused in one line (CheckpointError): a state
    of another config, an incomplete or damaged directory."""
    directory = sharded_state_dir(path)
    if directory is None:
        return None
    meta = read_meta(directory)
    if meta.get("config_hash") != config_hash:
        raise CheckpointError(f"sharded checkpoint {directory} was written with another config (hash "
                              f"{meta.get('config_hash')} vs {config_hash}): restore that config, or delete "
                              f"{directory} to start this stage over")
    stepped = set(meta.get("stepped", ()))
    damaged = f"sharded checkpoint {directory} is damaged ({{}}): delete {directory} to start the stage over"
    try:
        stateful = _stateful_parameters(directory, entries)
    except Exception as exc:  # noqa: BLE001 - no or a truncated .metadata
        raise CheckpointError(damaged.format(brief_reason(exc))) from None
    with _trainable(entries, stateful):
        state = _collect(entries, stepped)
        try:
            dcp.load(state, checkpoint_id=directory, process_group=group)
            extra = torch.load(directory / EXTRA, map_location="cpu", weights_only=True)
        except Exception as exc:  # DCP wraps every rank's failure (missing or truncated shards, mismatched keys)
            raise CheckpointError(damaged.format(brief_reason(exc))) from None
        for name, (module, opt) in entries.items():
            if name not in stepped:  # (an optimiser that had not stepped keeps its fresh state)
                set_model_state_dict(module, state[name]["model"])
            else:
                set_state_dict(module, opt, model_state_dict=state[name]["model"],
                               optim_state_dict=state[name]["optim"])
    return extra, meta


def consolidated_state_dict(net: torch.nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict of `net` on rank 0's CPU (a collective; the other processes
    get an empty dict), or with `everywhere` on every process's device; see
    `sida.train.sharding.consolidated_network`."""
    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))
