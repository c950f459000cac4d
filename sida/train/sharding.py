"""FSDP2 for a distillation run (`parallel: fsdp`): which modules become shards, their precision
and activation checkpointing, and what replaces the hand-made gradient average.

`shard_networks` applies `torch.distributed.fsdp.fully_shard` to each network's *blocks*, then to
the network itself (the root, which keeps whatever is outside the blocks: embeddings, the first
and last convolutions). One rule says what a block is, for every network we train:

    the outermost submodules whose class name contains "Block"

which is SongUNet's / DhariwalUNet's `UNetBlock`s and EDM2's `Block`s (the `enc` / `dec` entries
that take (x, emb); their plain convolutions stay with the root), and diffusers' `down_blocks`,
`mid_block` and `up_blocks` (`DownBlock2D`, `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`,
..., whose inner `ResnetBlock2D` / `BasicTransformerBlock` are not outermost). A network with no
such submodule (DMD2's and ADD's heads) is one unit.

The trained networks (G, the fake score, the critic's head) and the frozen teacher share one
policy: with `precision: bf16` the parameters are gathered in bf16 and gradients reduced in fp32;
inputs are not cast, so the computation's dtypes still come from `torch.autocast` as without
FSDP and EDM's preconditioning (c_skip x) stays fp32. G_ema is sharded with G's rule on the same
mesh, so every process holds the same slice of G and of G_ema and the EMA is elementwise on local
shards; it is gathered in fp32 (it only samples, also outside autocast).

Gradients: FSDP reduce-scatters them (averaged over processes, in the policy's reduce dtype) in
the backward, so the loop's `sync_gradients` is replaced by `sync_sharded_gradients`, which only
counts and replaces the non-finite entries, on each process's shard. FSDP shards no 0-dim
parameter (EDM2's gains): those stay whole on every process and are averaged as without FSDP.
`clip_grad_value_`, `clip_grad_norm_` and the optimiser work on the sharded (DTensor) gradients,
mixed with the whole ones, as they are; the non-finite guard's peak needs `sharded_peak`.
`consolidated_network` gives rank 0 (or every process) the unsharded network: to export, and for
the work that does not run the same forwards on every process (the in-training monitor splits its
seeds over processes unevenly).

Every call into a sharded network must go through its `forward` (module call): FSDP gathers the
parameters in forward hooks.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..errors import ConfigError
from ..io.sharded_checkpoint import consolidated_state_dict
from .nets import Nets
from .updates import GRAD_NAN, GRAD_NEGINF, GRAD_POSINF, sync_gradients


def is_sharded(net: torch.nn.Module) -> bool:
    """Whether `fully_shard` made `net` a sharded module."""
    return isinstance(net, FSDPModule)


def check_fsdp(world_size: int) -> None:
    """`parallel: fsdp` shards over processes: a one-process run has nothing to shard over."""
    if world_size < 2:
        raise ConfigError(f"parallel: fsdp shards the networks over processes, but this run has {world_size} "
                          f"process(es): set parallel: ddp, or launch 2 or more processes (num_procs)")


def fsdp_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    """The one-dimensional mesh of the whole job (explicit, so gloo on the CPU works too)."""
    return init_device_mesh(device.type, (world_size,))


def blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost submodules of `net` whose class name contains "Block" (the module docstring's
    rule), in registration order."""
    found: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        for child in module.children():
            if "Block" in type(child).__name__:
                found.append(child)
            else:
                visit(child)

    visit(net)
    return found


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16 gathers and fp32 gradient reduction for `precision: bf16`; fp32 otherwise (fp16 runs
    EDM's own fp16 path inside the networks, on fp32 parameters)."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    return MixedPrecisionPolicy(cast_forward_inputs=False)


def shard_network(net: torch.nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy,
                  activation_checkpointing: bool = False) -> torch.nn.Module:
    """`fully_shard` each block of `net` (with non-reentrant activation checkpointing if asked),
    then `net` itself; in place, state-dict keys unchanged. Returns `net`."""
    # FSDP shards no 0-dim parameter (EDM2's gains): they stay whole on every process.
    scalars = {p for p in net.parameters() if p.ndim == 0}
    for block in blocks(net):
        if activation_checkpointing:
            # Before fully_shard: the recomputation in the backward then runs inside FSDP's hooks,
            # on gathered parameters. Composable: no wrapper module, so keys and isinstance hold.
            checkpoint_activations(block)
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True, ignored_params=scalars)
    fully_shard(net, mesh=mesh, mp_policy=policy, reshard_after_forward=True, ignored_params=scalars)
    return net


def shard_networks(nets: Nets, mesh: DeviceMesh, precision: str, activation_checkpointing: bool = False,
                   shard_teacher: bool = True) -> None:
    """Shard a run's networks in place: G, G_ema, the fake score, the critic's head and, with
    `shard_teacher`, the frozen teacher. Call after the networks are prepared and the head is
    built, and before the optimisers are made (they must hold the sharded parameters).

    Activation checkpointing covers the networks a backward runs through (G, the fake score, the
    teacher); G_ema never builds a graph. ADD's frozen feature network is left whole (small).
    """
    if nets.G_ema is nets.G or nets.fake is nets.G:
        raise ValueError("G, G_ema and the fake score must be separate modules before sharding")
    policy = mixed_precision(precision)
    shard_network(nets.G, mesh, policy, activation_checkpointing)
    shard_network(nets.G_ema, mesh, mixed_precision("fp32"))
    shard_network(nets.fake, mesh, policy, activation_checkpointing)
    if nets.head is not None:
        shard_network(nets.head, mesh, policy)
    if shard_teacher:
        shard_network(nets.teacher, mesh, policy, activation_checkpointing)


def shard_run(nets: Nets, rc: dict, world_size: int, device: torch.device) -> DeviceMesh | None:
    """A run's sharding (`parallel: fsdp`): the mesh its networks are now sharded over, or None
    (`ddp`). `checkpoint_generator` becomes the blocks' activation checkpointing of every network
    a backward runs through (`prepare_networks` leaves the generator's own to it)."""
    if rc["parallel"] != "fsdp":
        return None
    check_fsdp(world_size)
    mesh = fsdp_mesh(device, world_size)
    shard_networks(nets, mesh, rc["precision"], activation_checkpointing=bool(rc["checkpoint_generator"]))
    return mesh


def sync_sharded_gradients(params: Iterable[torch.nn.Parameter], group: object = None) -> torch.Tensor:
    """What replaces `sync_gradients` under FSDP, after the backward (whose reduce-scatter already
    averaged the sharded gradients over processes): count the non-finite entries of every
    process's shards (summed over `group`, the mesh's, so every process returns the job's count),
    replace them as the official code does (NaN -> 0, +inf -> 1e5, -inf -> -1e5) and return the
    count. The gradients of parameters FSDP leaves whole (0-dim ones) are averaged and counted by
    `sync_gradients`, as without FSDP.
    """
    sharded, whole = [], []
    for p in params:
        if p.grad is not None:
            (sharded if isinstance(p.grad, DTensor) else whole).append(p)
    grads = [g for g in (p.grad.to_local() for p in sharded) if g.numel()]  # a shard can be empty
    device = grads[0].device if grads else torch.device("cpu")
    bad = torch.zeros((), dtype=torch.int64, device=device)
    # As in sync_gradients: one multi-tensor max-norm says whether anything is non-finite; the
    # per-tensor count and masking run only then.
    if grads and not bool(torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()):
        for g in grads:
            bad += (~torch.isfinite(g)).sum()
            torch.nan_to_num_(g, nan=GRAD_NAN, posinf=GRAD_POSINF, neginf=GRAD_NEGINF)
    dist.all_reduce(bad, op=dist.ReduceOp.SUM, group=group)
    # (after the average the whole gradients are the same on every process: counted once)
    return bad + sync_gradients(whole, group).to(device) if whole else bad


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of `t` (its shard of a DTensor), detached."""
    return t.detach().to_local() if isinstance(t, DTensor) else t.detach()


def sharded_peak(params: Iterable[torch.nn.Parameter], group: object = None) -> torch.Tensor:
    """The largest |value| of `params` over every process's shards (inf if any is NaN or inf), the
    same on every process: the loop's non-finite guard on sharded networks, whose
    `get_total_norm(params, inf)` fails on a process whose shard of a small tensor is empty. A
    collective."""
    local = [t for t in map(local_tensor, params) if t.numel()]
    peak = torch.stack(torch._foreach_norm(local, float("inf"))).max() if local else torch.zeros(())
    # NaN does not survive a MAX reduction reliably: it becomes inf first.
    peak = torch.where(peak.isfinite(), peak, torch.full_like(peak, float("inf")))
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return peak


def plain_module(net: torch.nn.Module) -> torch.nn.Module:
    """A fresh, unsharded network of sharded `net`'s class, from its `init_kwargs` (fully_shard
    gives `net` a subclass FSDP<name> of its class, which `network_record` cannot store), in eval
    mode and frozen: it samples and is stored, never trained (no dropout in the monitor's samples)."""
    cls = next(c for c in type(net).__mro__ if not issubclass(c, FSDPModule))
    return cls(**net.init_kwargs).eval().requires_grad_(False)


def consolidated_network(net: torch.nn.Module, everywhere: bool = False) -> torch.nn.Module | None:
    """An unsharded copy of sharded `net` holding the full weights: on rank 0's CPU (what
    `network_record` stores as network.pt), None elsewhere; with `everywhere`, on every process's
    device. A collective."""
    state = consolidated_state_dict(net, everywhere)
    if not everywhere and dist.get_rank() != 0:
        return None
    plain = plain_module(net)
    plain.load_state_dict(state)
    return plain.to(next(iter(state.values())).device) if state else plain
