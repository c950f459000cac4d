"""Finished evaluation runs, kept on disk so an evaluation stopped by a signal or a kill resumes
without recomputing them.

An evaluation is `num_runs` independent runs (hours each for a large network and 50k samples).
After each run its scores and the few features the training-monitor protocol needs are written
atomically to ``<work>/<stem>.run<R>.<key>.pt``; a rerun takes them instead of sampling again,
so its `metrics.json` is the one an uninterrupted evaluation writes. `key` hashes everything the
numbers depend on (the resolved config, the network file's sha256, the sampler, the process
count): a run kept under other settings is never mixed in. The files go once metrics.json is
written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..io.atomic import atomic_save_torch
from ..io.killpoint import kill_point
from ..run import dist
from ..run.config import config_hash


class RunStore:
    """The kept runs of one evaluation (`stem`: its metrics file's name) under `work`."""

    def __init__(self, work: str | Path, stem: str, key: dict, info: dist.DistInfo) -> None:
        self.work, self.stem, self.info = Path(work), stem, info
        self.key = config_hash(key)

    def path(self, r: int) -> Path:
        return self.work / f"{self.stem}.run{r}.{self.key}.pt"

    def load(self, r: int) -> tuple[dict, np.ndarray] | None:
        """(scores, monitor features) of run `r` as kept, on every rank (rank 0 reads), or None."""
        kept = None
        if self.info.is_main and self.path(r).is_file():
            record = torch.load(self.path(r), weights_only=True)
            kept = (record["scores"], record["head"].numpy())
        return dist.broadcast_object(kept)

    def save(self, r: int, scores: dict, head: np.ndarray) -> None:
        """Keep run `r`'s result (rank 0, atomically)."""
        if self.info.is_main:
            atomic_save_torch({"scores": scores, "head": torch.from_numpy(np.ascontiguousarray(head))}, self.path(r))
        kill_point("eval-run")

    @staticmethod
    def clear_kept(work: str | Path, stem: str) -> None:
        """Remove the kept runs of evaluation `stem` (and `work` when nothing else is in it)."""
        work = Path(work)
        for p in work.glob(f"{stem}.run*.pt"):
            p.unlink(missing_ok=True)
        try:
            work.rmdir()
        except OSError:
            pass
