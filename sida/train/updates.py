"""The pieces of an optimiser update shared by the teacher and the distillation loops.

Batch splitting (`accumulation`), the one optimiser factory (`make_optimizer`), learning-rate
warm-up, the generator's turn, gradient synchronisation over processes with the official code's
non-finite handling, and EDM's EMA. The loops (`sida.train.teacher`, `sida.train.loop`) say
when each runs.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from ..errors import ConfigError

OPTIMIZERS = ("adam", "adamw")


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


def make_optimizer(params: Iterable[torch.nn.Parameter], kind: str, lr: float,
                   betas: Sequence[float] = (0.0, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                   fused: bool = True) -> torch.optim.Optimizer:
    """Adam (SiD: betas (0, 0.999), no weight decay; EDM's teachers (0.9, 0.999)) or AdamW (DMD2:
    (0.9, 0.999), weight decay 0.01). Floats throughout: torch rejects ints in betas.

    `fused`: torch's fused implementation (one kernel over all parameters, same update rule) where
    torch has one for the parameters' device (CPU and CUDA floating-point tensors); otherwise, and
    with fused False, torch's default (on the CPU a Python loop of about ten small ops per tensor).
    The two round differently, so a run's weights depend on the choice. Both loops fuse, the
    faster step (measured by `bench.step --compare-unfused`: docs/performance.md); fused=False is
    for that comparison.
    """
    params = list(params)
    kw = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
              weight_decay=float(weight_decay))
    if fused and params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        kw["fused"] = True
    if kind == "adam":
        return torch.optim.Adam(params, **kw)
    if kind == "adamw":
        return torch.optim.AdamW(params, **kw)
    raise ValueError(f"optimizer kind must be one of {OPTIMIZERS}, got {kind!r}")


def run_optimizers(rc: dict, g_params: list[torch.nn.Parameter], critic_params: list[torch.nn.Parameter],
                   fused: bool = True) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """The generator's and the critic's optimisers from a run's settings (`optimizer`, `lr_g` /
    `lr_fake`, `beta1_g` / `beta1_fake`, `beta2`, `adam_eps`, `weight_decay`); the critic's is
    None when it has no parameters (ADD without a discriminator: its distillation term alone
    trains the student)."""
    opt = dict(kind=rc["optimizer"], eps=rc["adam_eps"], weight_decay=rc["weight_decay"], fused=fused)
    opt_g = make_optimizer(g_params, lr=rc["lr_g"], betas=(rc["beta1_g"], rc["beta2"]), **opt)
    opt_critic = (make_optimizer(critic_params, lr=rc["lr_fake"], betas=(rc["beta1_fake"], rc["beta2"]), **opt)
                  if critic_params else None)
    return opt_g, opt_critic


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in opt.param_groups:
        group["lr"] = lr


def warmup_lr(lr: float, nimg: int, warmup_kimg: float) -> float:
    """Linear warm-up by images seen: lr * min(1, nimg / warmup_nimg) (0 before the first image,
    as DMD2's constant_with_warmup and the teacher loop's ramp)."""
    ramp = warmup_kimg * 1000
    return lr * (min(nimg / ramp, 1.0) if ramp > 0 else 1.0)


def generator_turn(nimg: int, batch: int, critic_ratio: int) -> bool:
    """Whether the iteration starting at `nimg` images updates the generator (DMD2: every
    critic_ratio-th iteration, the first one included)."""
    return (nimg // batch) % critic_ratio == 0


# What non-finite gradient entries become (the official SiD/SiDA loops and EDM's training loop:
# torch.nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5) before clipping and the optimiser step).
GRAD_NAN, GRAD_POSINF, GRAD_NEGINF = 0.0, 1e5, -1e5


def sync_gradients(params: list[torch.nn.Parameter], group: object = None) -> torch.Tensor:
    """Average gradients over processes (the job's, or `group`'s), replace non-finite entries as the official code does
    (NaN -> 0, +inf -> 1e5, -inf -> -1e5), and return how many there were.

    One flat all-reduce instead of one per tensor; the average (not the sum) keeps the loss
    scale independent of the process count. Non-finite entries are counted after averaging so
    every rank sees (and replaces) the same ones. The count stays a device tensor: reading it
    here would synchronise the host on every iteration.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.int64)
    world = dist.get_world_size(group)
    if world > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n
    bad = torch.zeros((), dtype=torch.int64, device=grads[0].device)
    # One multi-tensor max-norm says whether anything is non-finite (NaN and inf propagate);
    # the per-tensor count and masking (a handful of small ops per tensor) run only then. The
    # check costs one host read per call, instead of ~4 kernel launches per parameter tensor.
    if bool(torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()):
        return bad
    for g in grads:
        bad += (~torch.isfinite(g)).sum()
        torch.nan_to_num_(g, nan=GRAD_NAN, posinf=GRAD_POSINF, neginf=GRAD_NEGINF)
    return bad


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
    # Multi-tensor forms of the per-tensor lerp_/copy_ (same arithmetic, one call each).
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1 - beta)
    buffers = list(ema.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(net.buffers()))
    return beta
