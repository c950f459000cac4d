"""The networks of a distillation run (`Nets`), where they start (`init_nets`) and how a run
prepares them before its first iteration (`prepare_networks`: precision, modes, memory layout,
EDM2's weight normalisation, activation checkpointing, torch.compile)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nets.edm2 import force_weight_norm_
from ..nets.heads import head_from_record


@dataclass
class Nets:
    """The networks of a distillation run. The teacher is frozen; G_ema is G's EMA."""

    teacher: torch.nn.Module
    G: torch.nn.Module
    G_ema: torch.nn.Module
    fake: torch.nn.Module
    head: torch.nn.Module | None = None      # DMD2's classifier head or ADD's heads (trained by the critic)
    features: torch.nn.Module | None = None  # ADD's frozen feature network (not trained, not stored)




def apply_precision(nets: "Nets", precision: str) -> None:
    """Set every network's compute dtype for the run's `precision`, as the official code does.

    fp16: EDM's `use_fp16` path in all networks (the UNet blocks in fp16, fp32 master weights,
    embedding and output in fp32); G, G_ema and f_psi are marked use_fp16 like the official
    ones (their network files then sample in fp16 on CUDA, as the authors' pickles do).
    fp32 and bf16: the UNets take fp32 inputs (bf16 then comes from torch.autocast), even for a
    teacher published with use_fp16 (the official code builds all three networks with --fp16).
    Networks without EDM preconditioning (analytic test doubles) are left alone.
    """
    dtype = torch.float16 if precision == "fp16" else torch.float32
    for name in ("teacher", "G", "G_ema", "fake"):
        net = getattr(nets, name)
        if not hasattr(net, "unet_dtype"):
            continue
        net.compute_dtype = dtype
        if name != "teacher":
            net.use_fp16 = precision == "fp16"
            net.init_kwargs["use_fp16"] = net.use_fp16




def init_nets(teacher: torch.nn.Module, dropout: float | None, init_state: dict | None = None,
              init_generator: torch.nn.Module | None = None) -> Nets:
    """The run's networks: G and f_psi from the teacher, or from a previous run's final state;
    G (and its EMA) from another run's EMA generator for SiD2A. G, G_ema and f_psi get the run's
    `dropout` (None: keep the rate they were built with), as the official code builds all of
    them with --dropout; the teacher keeps its own (it never trains)."""
    from ..io.checkpoints import network_from_record
    from ..nets.build import clone_with_dropout

    device = next(teacher.parameters()).device
    if init_state is not None:
        G, G_ema, fake = (network_from_record(init_state[k], "init state").to(device) for k in ("G", "G_ema", "fake"))
    else:
        G, G_ema, fake = teacher, teacher, teacher
    if init_generator is not None:
        G = G_ema = init_generator.to(device)
    G, G_ema, fake = (clone_with_dropout(net, dropout) for net in (G, G_ema, fake))
    # A run that starts from a DMD2 / ADD run's state keeps its discriminator head (the loop
    # builds a fresh one when the state has none or one of another kind).
    head = head_from_record(init_state["head"]).to(device) if init_state and "head" in init_state else None
    return Nets(teacher=teacher, G=G.requires_grad_(True), G_ema=G_ema, fake=fake, head=head)


def checkpoint_blocks(net: torch.nn.Module) -> None:
    """Activation checkpointing of `net`'s UNet blocks whenever a graph is built: our SongUNet /
    DhariwalUNet (`checkpoint_blocks`) and diffusers UNets (their own gradient checkpointing,
    which their blocks honour under our adapter too). Other networks (EDM2's UNet) have none: one
    line rather than a setting that silently does nothing."""
    from ..errors import ConfigError
    from ..nets.networks import DhariwalUNet, SongUNet

    model = getattr(net, "model", net)
    unet = getattr(model, "unet", None)
    if unet is not None and hasattr(unet, "enable_gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    elif isinstance(model, (SongUNet, DhariwalUNet)):
        model.checkpoint_blocks = True
    else:
        raise ConfigError(f"distill.checkpoint_generator: the generator's {type(model).__name__} has no activation "
                          f"checkpointing (SongUNet, DhariwalUNet and diffusers UNets have): set it false")


def prepare_networks(nets: Nets, rc: dict) -> None:
    """Everything a run does to its networks before the first iteration, from its settings."""
    apply_precision(nets, rc["precision"])
    nets.teacher.eval().requires_grad_(False)
    nets.G_ema.eval().requires_grad_(False)
    if rc.get("channels_last"):
        # NHWC weights make every convolution (and, from the first one on, every activation)
        # channels-last: oneDNN's native layout, faster on the CPU (docs/performance.md). Inputs
        # stay NCHW: the first conv switches the layout.
        for net in (nets.teacher, nets.G, nets.G_ema, nets.fake):
            net.to(memory_format=torch.channels_last)
    if rc.get("force_weight_norm"):
        # EDM2's forced weight normalisation runs after every optimiser step and here, at the
        # start: a resumed run then loads its saved weights over it, so resuming stays bit-exact.
        force_weight_norm_(nets.G)
        force_weight_norm_(nets.fake)
    # Activation checkpointing of the generator's blocks in the generator step (a memory option
    # for large networks on a GPU: the block forwards run twice). Under `parallel: fsdp` the
    # sharding checkpoints the blocks itself (`sida.train.sharding.shard_run`).
    if rc.get("checkpoint_generator") and rc.get("parallel") != "fsdp":
        checkpoint_blocks(nets.G)
    if rc.get("compile"):
        # torch.compile of the networks an iteration runs (G_ema only samples). In place, so
        # state-dict keys stay as they are; static shapes: each call site (batch, return flag,
        # grad mode) gets its own graph once, instead of a dynamic-shape recompile. The three share
        # EDMPrecond.forward, whose compiled variants count against one recompile limit (8 by
        # default): an iteration alone needs about 5.
        from torch import _dynamo

        _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
        for net in (nets.teacher, nets.G, nets.fake):
            net.compile(dynamic=False)
