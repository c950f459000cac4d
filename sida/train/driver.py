"""The driver shared by the teacher and the distillation loops: `run` takes a loop from its image
count to the end, with progress ticks, snapshots, checkpoint/resume (`sida.train.checkpointer`,
which keeps every rank's RNG states, `sida.train.draws`), non-finite guards and time accounting.

The loops themselves (`sida.train.teacher`, `sida.train.loop`) say what one iteration does;
the pieces of an update (gradient sync, optimisers, EMA) are in `sida.train.updates`.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol

import torch
import torch.distributed as dist

from ..io import checkpoints
from ..run.dist import DistInfo
from ..errors import NonFiniteError
from ..io.killpoint import kill_point
from ..run import signals
from .checkpointer import Checkpointer
from .sharding import is_sharded, local_tensor, sharded_peak


class Loop(Protocol):
    """What `run` drives: one iteration, its state, and its outputs."""

    nimg: int
    batch: int
    gens: dict[str, torch.Generator]

    def step(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def phase_name(self) -> str: ...


def format_eta(seconds: float) -> str:
    """'1h02m', '3m20s', '12s'."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class TickStats:
    """What one progress tick accumulates: per-stat sums (device tensors: no host sync per
    iteration), the update count, and how many updates had non-finite gradients (a stat whose
    name starts with ``nonfinite`` counts the non-finite gradient entries of an update)."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.iters = 0
        self.skipped = torch.zeros((), dtype=torch.int64)

    def add(self, stats: dict) -> None:
        bad = None
        for k, v in stats.items():
            v = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1
            if k.startswith("nonfinite"):
                bad = (v > 0) if bad is None else bad | (v > 0)
        self.iters += 1
        if bad is not None:
            self.skipped = self.skipped + bad

    def means(self) -> dict[str, float]:
        return {k: float(self.sums[k]) / self.counts[k] for k in self.sums}

    def state_dict(self) -> dict:
        return {"start": self.start, "sums": {k: v.cpu() for k, v in self.sums.items()},
                "counts": dict(self.counts), "iters": self.iters, "skipped": self.skipped.cpu()}

    @classmethod
    def from_state(cls, state: dict | None, start: int) -> "TickStats":
        """The tick a checkpoint was written in (or a fresh one at `start`)."""
        tick = cls(start)
        if state:
            tick.start, tick.iters = int(state["start"]), int(state["iters"])
            tick.sums, tick.counts = dict(state["sums"]), dict(state["counts"])
            tick.skipped = state["skipped"]
        return tick


class NonFiniteGuard:
    """Stops a run before a non-finite result can be written.

    After every update the largest |value| of every watched parameter is folded into one
    device flag (NaN/inf propagate through it; no host sync); the flag is read at tick ends and
    before each checkpoint, so no checkpoint or output ever holds NaN/inf weights. A tick in
    which more than `budget` updates had non-finite gradients also stops the run (`budget`
    None: all of them, i.e. a whole tick of skipped updates).
    """

    def __init__(self, nets: dict[str, torch.nn.Module], budget: int | None, label: str = "") -> None:
        self.nets = nets
        self.params = [p for net in nets.values() for p in net.parameters()]
        self.budget = budget
        self.label = label
        self.flag: torch.Tensor | None = None
        # Sharded networks: the peak over every process's shards (the same flag on every process).
        self.sharded = any(is_sharded(net) for net in nets.values())

    @torch.no_grad()
    def after_update(self) -> None:
        if self.params:
            peak = (sharded_peak(self.params) if self.sharded
                    else torch.nn.utils.get_total_norm(self.params, float("inf")))
            self.flag = peak if self.flag is None else torch.maximum(self.flag, peak)

    def check_params(self, nimg: int, checkpointer: Checkpointer) -> None:
        """Raise `NonFiniteError` naming the first non-finite tensor, if any update made one."""
        flag, self.flag = self.flag, None
        if flag is None or bool(torch.isfinite(flag)):
            return
        where = "a network"  # (sharded: the tensor is named by the process whose shard holds it)
        for net_name, net in self.nets.items():
            bad = checkpoints.nonfinite_tensors({k: local_tensor(v) for k, v in net.state_dict().items()})
            if bad:
                name, count = bad[0]
                where = f"{net_name}.{name} holds {count} NaN/inf value(s)"
                break
        else:
            where += " of another process's shard holds NaN/inf values"
        raise NonFiniteError(
            f"{self.label}training diverged: {where} after the updates up to {nimg / 1000:.3f} kimg; "
            f"{checkpointer.where()} and no network was written: lower the learning rate or check the inputs, "
            f"then delete {checkpointer.work_dir} and rerun")

    def end_tick(self, tick: TickStats, nimg: int, checkpointer: Checkpointer) -> None:
        """The checks of a tick's end: parameters, then the skipped-update budget."""
        self.check_params(nimg, checkpointer)
        skipped = int(tick.skipped)
        allowed = tick.iters - 1 if self.budget is None else self.budget
        if skipped > allowed:
            what = "all" if skipped == tick.iters else f"{skipped} of the"
            raise NonFiniteError(
                f"{self.label}{what} {tick.iters} updates of the tick ending at {nimg / 1000:.3f} kimg had NaN/inf "
                f"gradients (nonfinite_budget: {'a whole tick' if self.budget is None else self.budget}); "
                f"{checkpointer.where()} and no network was written: check the teacher, the data and the "
                f"learning rates (or raise nonfinite_budget), then delete {checkpointer.work_dir} and rerun")


class Timings:
    """Wall seconds of a training stage by kind of work, for its log: `iterations` (the loop's
    own steps), `evaluation` (declared evaluations, e.g. the in-training FD), `snapshot` (sample
    grids), `checkpoint` (state writes), `logging` (progress lines, tracker), `setup` (from the
    moment the object is made, which a stage does first thing, to the first iteration: reading
    inputs, building networks, resuming). `with timings("evaluation"): ...` adds to one.
    """

    KINDS = ("iterations", "evaluation", "snapshot", "checkpoint", "logging", "setup")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds = {k: 0.0 for k in self.KINDS}
        self.images = 0

    @contextmanager
    def __call__(self, kind: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[kind] += time.perf_counter() - t0

    def end_setup(self) -> None:
        """Mark the first iteration's start: the time so far not booked elsewhere is set-up."""
        if self.seconds["setup"] == 0.0:
            self.seconds["setup"] = time.perf_counter() - self.start - sum(self.seconds.values())

    def report(self) -> dict[str, float]:
        """Totals so far: seconds per kind, wall, `other` (the rest: what follows the loop),
        the iteration rate, and `iteration_share`: iterations / (wall - evaluation - checkpoint)."""
        wall = time.perf_counter() - self.start
        out = {f"{k}_s": round(v, 3) for k, v in self.seconds.items()}
        out["wall_s"] = round(wall, 3)
        out["other_s"] = round(wall - sum(self.seconds.values()), 3)
        it = self.seconds["iterations"]
        out["images_per_sec"] = self.images / it if it > 0 else 0.0
        busy = wall - self.seconds["evaluation"] - self.seconds["checkpoint"]
        out["iteration_share"] = it / busy if busy > 0 else 0.0
        return out

    def line(self) -> str:
        r = self.report()
        parts = [f"{k} {r[k + '_s']:.1f}s" for k in self.KINDS]
        return (f"wall {r['wall_s']:.1f}s: " + ", ".join(parts) + f", other {r['other_s']:.1f}s; "
                f"{r['images_per_sec']:.1f} img/s over the iterations, which take "
                f"{100 * r['iteration_share']:.1f}% of the wall time outside evaluations and checkpoints")


def run(loop: Loop, total_nimg: int, tick_kimg: float, snapshot_kimg: float,
        checkpointer: Checkpointer, info: DistInfo,
        on_tick: Callable[[dict[str, float]], None] | None = None,
        on_snapshot: Callable[[], None] | None = None, label: str = "",
        watch: dict[str, torch.nn.Module] | None = None, nonfinite_budget: int | None = None,
        timings: Timings | None = None) -> Timings:
    """Drive `loop` from its current `nimg` to `total_nimg` images: ticks (progress + `on_tick`),
    snapshots and checkpoints. Call `checkpointer.load_if_any` first to resume.

    Losses are averaged over the iterations of a tick on the host only at tick boundaries, so
    the hot loop has no device-to-host synchronisation. The networks in `watch` must stay finite
    and at most `nonfinite_budget` updates per tick may have non-finite gradients (see
    `NonFiniteGuard`); otherwise the run stops with `NonFiniteError`, keeping its last checkpoint.
    The tick's accumulators go into every checkpoint, so a resumed run ticks (and evaluates, in
    `on_tick`) at the same image counts, with the same numbers, as an uninterrupted one.
    The logged `images_per_sec` is the iteration rate: a tick's images over the time its
    iterations took; snapshots, checkpoint writes and the tick callback (where stages evaluate)
    are timed apart in `timings`, which is returned.
    """
    timings = timings if timings is not None else Timings()
    timings.end_setup()
    tick_nimg = int(tick_kimg * 1000)
    snap_nimg = int(snapshot_kimg * 1000)
    guard = NonFiniteGuard(watch or {}, nonfinite_budget, label)
    start_nimg = loop.nimg
    start_iter_s = tick_iter_s = timings.seconds["iterations"]
    # A checkpoint taken on a signal lies between snapshots: the schedule comes back with it.
    last_snapshot = int(checkpointer.driver.get("last_snapshot", loop.nimg))
    tick = TickStats.from_state(checkpointer.driver.get("tick"), loop.nimg)
    while loop.nimg < total_nimg:
        t_iter = time.perf_counter()
        phase = loop.phase_name()  # before the step: the counter moves on during it
        stats = loop.step()
        loop.nimg += loop.batch
        guard.after_update()
        tick.add(stats)
        done = loop.nimg >= total_nimg
        tick_due = loop.nimg - tick.start >= tick_nimg or done
        if tick_due:  # reading the sums waits for the device: part of the iterations' time
            row = tick.means()
        timings.seconds["iterations"] += time.perf_counter() - t_iter
        timings.images += loop.batch
        if tick_due:
            with timings("logging"):
                it_s = timings.seconds["iterations"]
                row["images_per_sec"] = (loop.nimg - max(tick.start, start_nimg)) / max(it_s - tick_iter_s, 1e-9)
                rate = (loop.nimg - start_nimg) / max(it_s - start_iter_s, 1e-9)
                row["phase"] = phase
                if info.is_main:
                    parts = [f"{label}kimg {loop.nimg / 1000:8.2f}/{total_nimg / 1000:.1f}",
                             f"phase {row['phase']:<6}", f"img/s {row['images_per_sec']:7.1f}"]
                    parts += [f"{k} {v:9.4g}" for k, v in row.items() if k not in ("images_per_sec", "phase")]
                    parts.append(f"eta {format_eta((total_nimg - loop.nimg) / max(rate, 1e-9))}")
                    print("  ".join(parts), file=sys.stderr, flush=True)
            guard.end_tick(tick, loop.nimg, checkpointer)
            if on_tick is not None:
                on_tick(row)
            tick, tick_iter_s = TickStats(loop.nimg), timings.seconds["iterations"]
            kill_point("tick")
        if (loop.nimg - last_snapshot >= snap_nimg) and not done:
            guard.check_params(loop.nimg, checkpointer)
            if on_snapshot is not None:
                with timings("snapshot"):
                    on_snapshot()
            with timings("checkpoint"):
                checkpointer.save(loop, driver={"tick": tick.state_dict(), "last_snapshot": loop.nimg})
            last_snapshot = loop.nimg
            kill_point("checkpointed")
        kill_point("iteration")
        if not done and signals.stop_agreed(info.group):
            _stop_on_signal(loop, checkpointer, info, guard, timings,
                            {"tick": tick.state_dict(), "last_snapshot": last_snapshot}, label)
    return timings


def _stop_on_signal(loop: Loop, checkpointer: Checkpointer, info: DistInfo, guard: NonFiniteGuard,
                    timings: Timings, driver: dict, label: str) -> None:
    """Write the resume checkpoint of this iteration boundary (unless the snapshot just did),
    wait until it is on disk on every rank, and raise `signals.Preempted`."""
    if checkpointer.saved_nimg != loop.nimg:
        guard.check_params(loop.nimg, checkpointer)
        with timings("checkpoint"):
            checkpointer.save(loop, driver=driver)
    dist.barrier(group=info.group)  # no rank exits (and gets its peers stopped) before the write is done
    name = signals.requested() or "a signal to another process"
    raise signals.Preempted(f"{label}stopped by {name} at {loop.nimg / 1000:.3f} kimg: checkpoint {checkpointer.path} "
                            f"written; rerun the same command to resume")
