"""Training-loop machinery shared by the teacher and the distillation loops.

Gradient synchronisation (our own all-reduce, so accumulation and several processes give
the one-big-batch gradient), non-finite gradient handling, EMA, optimisers, RNG state capture,
checkpoint/resume and progress lines. The loops themselves (`sida.train.teacher`, `sida.train.distill`)
only say what one iteration does.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
import torch.distributed as dist

from ..io import checkpoints
from ..run.dist import DistInfo, gather_objects
from ..errors import CheckpointError, ConfigError


def accumulation(batch: int, batch_per_proc: int | None, world_size: int) -> tuple[int, int]:
    """(per-process micro-batch, accumulation rounds) for a global batch."""
    if batch_per_proc is None:
        if batch % world_size:
            raise ConfigError(f"batch {batch} is not divisible by {world_size} processes")
        return batch // world_size, 1
    if batch % (batch_per_proc * world_size):
        raise ConfigError(f"batch {batch} is not a multiple of batch_per_proc {batch_per_proc} x "
                          f"{world_size} processes")
    return batch_per_proc, batch // (batch_per_proc * world_size)


def make_adam(params: Iterable[torch.nn.Parameter], lr: float, eps: float,
              betas: tuple[float, float] = (0.0, 0.999)) -> torch.optim.Adam:
    """Adam as SiD uses it: beta1 = 0 (the generator's is a setting), beta2 = 0.999 (floats:
    torch rejects ints in betas)."""
    return torch.optim.Adam(params, lr=lr, betas=(float(betas[0]), float(betas[1])), eps=float(eps))


# What non-finite gradient entries become (the official SiD/SiDA loops and EDM's training loop:
# torch.nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5) before clipping and the optimiser step).
GRAD_NAN, GRAD_POSINF, GRAD_NEGINF = 0.0, 1e5, -1e5


def sync_gradients(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Average gradients over processes, replace non-finite entries as the official code does
    (NaN -> 0, +inf -> 1e5, -inf -> -1e5), and return how many there were.

    One flat all-reduce instead of one per tensor; the average (not the sum) keeps the loss
    scale independent of the process count. Non-finite entries are counted after averaging so
    every rank sees (and replaces) the same ones. The count stays a device tensor: reading it
    here would synchronise the host on every iteration.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.int64)
    world = dist.get_world_size()
    if world > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n
    bad = torch.zeros((), dtype=torch.int64, device=grads[0].device)
    for g in grads:
        bad += (~torch.isfinite(g)).sum()
        torch.nan_to_num_(g, nan=GRAD_NAN, posinf=GRAD_POSINF, neginf=GRAD_NEGINF)
    return bad


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in opt.param_groups:
        group["lr"] = lr


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, nimg: int, batch: int,
               halflife_kimg: float, rampup_ratio: float | None) -> float:
    """EDM's EMA: half-life in images, optionally ramped up as a fraction of images seen.

    beta = 0.5 ** (batch / halflife_nimg), halflife_nimg = min(halflife_kimg*1e3, nimg*ratio).
    Buffers are copied, not averaged. Returns beta.
    """
    halflife = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife = min(halflife, nimg * rampup_ratio)
    beta = 0.5 ** (batch / max(halflife, 1e-8))
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), 1 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)
    return beta


def capture_rng(gens: dict[str, torch.Generator]) -> dict:
    """This process's RNG states: the loop's named generators, torch's global one (dropout), CUDA's."""
    out = {"gens": {k: g.get_state() for k, g in gens.items()}, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(gens: dict[str, torch.Generator], states: dict) -> None:
    """Inverse of `capture_rng`."""
    for k, g in gens.items():
        g.set_state(states["gens"][k])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def make_generators(seed: int, rank: int, device: torch.device, rounds: int = 1) -> dict[str, torch.Generator]:
    """The generators of one process: every random draw of a loop comes from one of them, so
    their state can be checkpointed.

    There is one pair per *micro-batch slot*: accumulation round r of rank k is global slot
    k * rounds + r, and its generators are seeded by that slot. One process running two
    accumulation rounds therefore draws exactly what two processes running one round each
    draw, and a run's result does not depend on how its global batch is split.
    `noise` (round r: `noise/r`) lives on the compute device (latents, sigmas, noise); `data`
    (`data/r`) on the CPU (dataset indices and labels, which index host-side datasets).
    """
    gens = {}
    for r in range(rounds):
        base = seed * 1_000_003 + (rank * rounds + r) * 7919
        noise = torch.Generator(device=device)
        noise.manual_seed(base)
        data = torch.Generator()
        data.manual_seed(base + 1)
        suffix = "" if r == 0 else f"/{r}"
        gens["noise" + suffix], gens["data" + suffix] = noise, data
    return gens


def slot_generator(gens: dict[str, torch.Generator], kind: str, r: int) -> torch.Generator:
    """The `kind` ('noise' or 'data') generator of accumulation round `r`."""
    return gens[kind if r == 0 else f"{kind}/{r}"]


class Loop(Protocol):
    """What `run` drives: one iteration, its state, and its outputs."""

    nimg: int
    batch: int
    gens: dict[str, torch.Generator]

    def step(self) -> dict[str, float]: ...
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


class Checkpointer:
    """The resumable state of one stage in `<out>/work/state.pt` (atomic; rank 0 writes).

    Holds whatever the loop's `state_dict` returns plus every rank's RNG states, and the config
    hash: resuming under a different config is refused rather than silently mixed.
    """

    def __init__(self, work_dir: Path, info: DistInfo, cfg_hash: str, stage: str) -> None:
        self.work_dir = Path(work_dir)
        self.path = self.work_dir / "state.pt"
        self.info = info
        self.cfg_hash = cfg_hash
        self.stage = stage

    def save(self, loop: Loop) -> None:
        """Gather RNG states from all ranks; rank 0 writes the checkpoint."""
        rngs = gather_objects(capture_rng(loop.gens))
        if self.info.is_main:
            state = loop.state_dict()
            state["rng"] = rngs
            state["meta"] = {"stage": self.stage, "config_hash": self.cfg_hash, "nimg": loop.nimg,
                             "world_size": self.info.world_size, "phase": loop.phase_name()}
            checkpoints.save_state(self.path, state)

    def load_if_any(self, loop: Loop) -> bool:
        """Resume from the checkpoint if one exists; False when starting fresh."""
        if not self.path.exists():
            return False
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
        return True

    def clear(self) -> None:
        """Remove the work dir once the stage's outputs are written: a forced rerun starts fresh."""
        if self.info.is_main:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def run(loop: Loop, total_nimg: int, tick_kimg: float, snapshot_kimg: float,
        checkpointer: Checkpointer, info: DistInfo,
        on_tick: Callable[[dict[str, float]], None] | None = None,
        on_snapshot: Callable[[], None] | None = None, label: str = "") -> None:
    """Drive `loop` from its current `nimg` to `total_nimg` images: ticks (progress + `on_tick`),
    snapshots and checkpoints. Call `checkpointer.load_if_any` first to resume.

    Losses are averaged over the iterations of a tick on the host only at tick boundaries, so
    the hot loop has no device-to-host synchronisation.
    """
    tick_nimg = int(tick_kimg * 1000)
    snap_nimg = int(snapshot_kimg * 1000)
    start_time = tick_time = time.time()
    start_nimg = tick_start = loop.nimg
    last_snapshot = loop.nimg
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    while loop.nimg < total_nimg:
        phase = loop.phase_name()  # before the step: the counter moves on during it
        stats = loop.step()
        loop.nimg += loop.batch
        for k, v in stats.items():
            v = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            sums[k] = sums[k] + v if k in sums else v.clone()
            counts[k] = counts.get(k, 0) + 1
        done = loop.nimg >= total_nimg
        if loop.nimg - tick_start >= tick_nimg or done:
            now = time.time()
            row = {k: float(sums[k]) / counts[k] for k in sums}
            row["images_per_sec"] = (loop.nimg - tick_start) / max(now - tick_time, 1e-9)
            rate = (loop.nimg - start_nimg) / max(now - start_time, 1e-9)
            row["phase"] = phase
            if info.is_main:
                parts = [f"{label}kimg {loop.nimg / 1000:8.2f}/{total_nimg / 1000:.1f}",
                         f"phase {row['phase']:<6}", f"img/s {row['images_per_sec']:7.1f}"]
                parts += [f"{k} {v:9.4g}" for k, v in row.items() if k not in ("images_per_sec", "phase")]
                parts.append(f"eta {format_eta((total_nimg - loop.nimg) / max(rate, 1e-9))}")
                print("  ".join(parts), file=sys.stderr, flush=True)
            if on_tick is not None:
                on_tick(row)
            sums, counts = {}, {}
            tick_start, tick_time = loop.nimg, time.time()
        if (loop.nimg - last_snapshot >= snap_nimg) and not done:
            if on_snapshot is not None:
                on_snapshot()
            checkpointer.save(loop)
            last_snapshot = loop.nimg
