"""What a training stage sets up before its loop: config, processes, seeds, output dirs, tracker.

Kept here so the stage modules stay thin and no two stages repeat the same set-up.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import dist, signals
from ..io.atomic import atomic_write
from .config import config_hash
from .tracking import Tracker


@dataclass
class StageContext:
    """Everything a stage needs that is not its algorithm."""

    cfg: dict
    cfg_hash: str
    info: dist.DistInfo
    out: Path
    work: Path
    seed: int

    def log(self, msg: str) -> None:
        """A progress line on stderr from the main process."""
        if self.info.is_main:
            print(msg, file=sys.stderr, flush=True)

    def tracker(self, stage: str, run_name: str = "", resume_kimg: float | None = None) -> Tracker:
        """The stage's tracker: JSONL in the work dir (copied to the outputs at the end) + W&B."""
        return Tracker(self.work / "metrics.jsonl", enabled=self.info.is_main, cfg=self.cfg, stage=stage,
                       run_name=run_name, resume_step=resume_kimg)

    def finish(self, tracker: Tracker, checkpointer, written: Path) -> None:
        """The end of every training stage, after its outputs are written: close the tracker,
        publish the metrics, record provenance, then drop the resume state (a forced rerun
        starts fresh)."""
        if self.info.is_main:
            tracker.close()
            self.publish_metrics()
            from .provenance import write_provenance

            write_provenance(self.out, self.cfg)
            self.log(f"wrote {written}")
        checkpointer.clear()

    def publish_metrics(self) -> None:
        """Copy the work dir's metrics JSONL to the declared output (atomic)."""
        if self.info.is_main:
            src = self.work / "metrics.jsonl"
            with atomic_write(self.out / "metrics.jsonl") as tmp:
                shutil.copyfile(src, tmp) if src.exists() else tmp.write_text("")


def start_stage(cfg: dict, out: str | Path, salt: str = "") -> StageContext:
    """Join the process group, seed, make the output dirs, for a config already loaded and
    validated by the stage (`sida.run.config.load_config`: it needs the config to name --out).

    `salt` (e.g. the run name) makes the per-stage config hash and random streams distinct.
    """
    signals.install()  # SIGTERM / SIGUSR1 / SIGINT: checkpoint after the iteration in progress, then exit 75
    info = dist.init(cfg["device"], cfg["threads"])
    out = Path(out)
    work = out / "work"
    if info.is_main:
        work.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    seed = cfg["seed"] + (int(config_hash({"salt": salt}), 16) % 10_000 if salt else 0)
    torch.manual_seed(seed * 1000 + info.rank)
    return StageContext(cfg=cfg, cfg_hash=config_hash({"cfg": cfg, "salt": salt}), info=info, out=out,
                        work=work, seed=seed)
