"""A stage's resumable state (`Checkpointer`): `<out>/work/state.pt` written by rank 0, or, for a
sharded loop (`parallel: fsdp`), the directory `<out>/work/state` every process writes its shards
to; and how a sharded state's per-rank random streams follow their micro-batch slots to another
process count (`slot_rng`). `sida.train.driver.run` saves it at snapshots and on signals.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import CheckpointError
from ..io import checkpoints
from ..io.sharded_checkpoint import load_sharded, save_sharded
from ..run.dist import DistInfo, gather_objects
from .draws import capture_rng, restore_rng

if TYPE_CHECKING:
    from .driver import Loop


class Stateful(Protocol):
    """Anything whose state belongs in the resume checkpoint beside the loop's."""

    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Checkpointer:
    """The resumable state of one stage in `<out>/work/state.pt` (atomic; rank 0 writes), or, for
    a sharded loop (`sharded`: `parallel: fsdp`), in the directory `<out>/work/state` that every
    process writes its shards to (`sida.io.sharded_checkpoint`).

    Holds whatever the loop's `state_dict` returns (sharded: its `sharded_entries` and
    `counters`) plus every rank's RNG states, the state of the objects registered with `track`
    (e.g. the best-snapshot keeper), the loop driver's own counters, and the config hash:
    resuming under a different config is refused rather than silently mixed. Everything that
    steers what a run does next is in here, so a run killed at any point resumes exactly where
    its last checkpoint stood. A sharded state also resumes at another process count: the
    networks and optimisers reshard and each micro-batch slot's random streams move with it.
    """

    def __init__(self, work_dir: Path, info: DistInfo, cfg_hash: str, stage: str, sharded: bool = False) -> None:
        self.work_dir = Path(work_dir)
        self.sharded = sharded
        self.path = self.work_dir / ("state" if sharded else "state.pt")
        self.info = info
        self.cfg_hash = cfg_hash
        self.stage = stage
        self.tracked: dict[str, Stateful] = {}
        self.driver: dict = {}  # `run`'s counters from the checkpoint resumed from
        self.saved_nimg: int | None = None  # the image count of the checkpoint on disk

    def track(self, name: str, obj: Stateful) -> None:
        """Save `obj.state_dict()` with every checkpoint and restore it on resume (register
        before `load_if_any`)."""
        self.tracked[name] = obj

    def save(self, loop: Loop, driver: dict | None = None) -> None:
        """Gather RNG states from all ranks; rank 0 writes the checkpoint (sharded: every rank its shards)."""
        rngs = gather_objects(capture_rng(loop.gens))
        meta = {"stage": self.stage, "config_hash": self.cfg_hash, "nimg": loop.nimg,
                "world_size": self.info.world_size, "phase": loop.phase_name()}
        if self.sharded:
            extra = {**loop.counters(), "rng": rngs, "tracked": self._tracked_state(), "driver": driver or {}}
            save_sharded(self.path, loop.sharded_entries(), extra, meta)
        elif self.info.is_main:
            state = loop.state_dict()
            state.update(rng=rngs, tracked=self._tracked_state(), driver=driver or {}, meta=meta)
            checkpoints.save_state(self.path, state)
        self.saved_nimg = loop.nimg

    def _tracked_state(self) -> dict:
        return {name: obj.state_dict() for name, obj in self.tracked.items()}

    def load_if_any(self, loop: Loop) -> bool:
        """Resume from the checkpoint if one exists; False when starting fresh."""
        other = self.work_dir / ("state.pt" if self.sharded else "state")
        if other.exists():  # starting fresh beside it would silently drop the work it holds
            was, now = ("ddp", "fsdp") if self.sharded else ("fsdp", "ddp")
            raise CheckpointError(f"{other} was written by a `parallel: {was}` run and this run is `parallel: "
                                  f"{now}`: set distill.parallel back to {was} to resume it, or delete "
                                  f"{self.work_dir} to start this stage over")
        state = self._load_sharded(loop) if self.sharded else self._load_whole(loop)
        if state is None:
            return False
        tracked = state.get("tracked", {})
        for name, obj in self.tracked.items():
            if name in tracked:
                obj.load_state_dict(tracked[name])
        self.driver = state.get("driver", {})
        self.saved_nimg = loop.nimg
        return True

    def _load_whole(self, loop: Loop) -> dict | None:
        if not self.path.exists():
            return None
        try:
            state = checkpoints.load_state(self.path)
        except CheckpointError as exc:  # say what this file is and how to get going again
            raise CheckpointError(f"{exc}; it is this stage's resume checkpoint: delete {self.path} to "
                                  f"start the stage over") from None
        meta = state["meta"]
        if meta.get("config_hash") != self.cfg_hash:
            raise CheckpointError(f"checkpoint {self.path} was written with another config (hash "
                                  f"{meta.get('config_hash')} vs {self.cfg_hash}): restore that config, "
                                  f"or delete {self.work_dir} to start this stage over")
        if meta.get("world_size") != self.info.world_size:
            raise CheckpointError(f"checkpoint {self.path} was written by {meta.get('world_size')} processes, "
                                  f"this run has {self.info.world_size}: resume with the same process count")
        loop.load_state_dict(state)
        restore_rng(loop.gens, state["rng"][self.info.rank])
        return state

    def _load_sharded(self, loop: Loop) -> dict | None:
        loaded = load_sharded(self.path, loop.sharded_entries(), self.cfg_hash)
        if loaded is None:
            return None
        extra, _ = loaded
        loop.load_counters(extra)
        restore_rng(loop.gens, slot_rng(extra["rng"], self.info.rank, self.info.world_size, list(loop.gens),
                                         self.path))
        return extra

    def where(self) -> str:
        """Which checkpoint a stopped run keeps, for error messages."""
        if self.saved_nimg is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint {self.path} ({self.saved_nimg / 1000:.3f} kimg) is kept"

    def clear(self) -> None:
        """Remove the work dir once the stage's outputs are written: a forced rerun starts fresh."""
        if self.info.is_main:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def slot_rng(rngs: list[dict], rank: int, world_size: int, names: list[str], path: Path) -> dict:
    """Process `rank`'s RNG states (`capture_rng`) from a checkpoint's per-rank list, at this
    run's process count: its own at the same count; at another, the streams of the micro-batch
    slots it now runs (slot k * rounds + r, `make_generators`) and the global stream of the
    process that had its first slot. The slot count (global batch / micro-batch) must stay.
    `names`: this process's generators in `make_generators`' order, a noise and a data stream
    per round, the order every process's states were captured in."""
    if len(rngs) == world_size:
        return rngs[rank]
    rounds, old_rounds = len(names) // 2, len(rngs[0]["gens"]) // 2
    if old_rounds * len(rngs) != rounds * world_size:
        raise CheckpointError(f"checkpoint {path} has {old_rounds * len(rngs)} micro-batch slots ({len(rngs)} "
                              f"processes x {old_rounds} rounds), this run has {rounds * world_size}: resume with "
                              f"{len(rngs)} processes, or set batch_per_proc so the micro-batch stays the same")
    gens = {}
    for i, name in enumerate(names):
        k, old_r = divmod(rank * rounds + i // 2, old_rounds)
        gens[name] = list(rngs[k]["gens"].values())[2 * old_r + i % 2]
    return {**rngs[rank * rounds // old_rounds], "gens": gens}
