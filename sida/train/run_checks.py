"""What a distillation run's settings require of its networks and data, checked once before the
loop is built (`check_run`): one line per problem, naming the setting and the fix; and settings
that run but badly on this machine (`precision_warning`)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..io.data import ImageDataset
from ..run.config import discriminator_kind, run_method
from .augment import AUGMENT_DIM
from .nets import Nets


def check_run(rc: dict, nets: Nets, dataset: ImageDataset | None) -> None:
    """Real images for a discriminator or ADD; augmentation labels in the fake score for
    `augment`; an uncertainty head for `logvar`; a text / diffusers teacher for the text settings.
    One-process `parallel: fsdp` is refused where the process count is known (`shard_run`)."""
    disc = discriminator_kind(rc["discriminator"])
    if (disc != "none" or run_method(rc["phases"]) == "add") and dataset is None:
        raise ConfigError(f"a run with discriminator {disc} or ADD phases needs real images: configure `data`")
    check_text_settings(rc, nets.teacher)
    augment_dim = getattr(nets.fake, "augment_dim", 0)
    if rc["augment"] > 0 and augment_dim < AUGMENT_DIM:
        raise ConfigError(f"distill.augment {rc['augment']} feeds {AUGMENT_DIM} augmentation labels to the fake "
                          f"score, but its network has augment_dim {augment_dim}: use a teacher built with "
                          f"network.kwargs.augment_dim: {AUGMENT_DIM}, or set distill.augment: 0")
    if rc.get("logvar") and not getattr(nets.fake, "has_logvar", False):
        raise ConfigError("distill.logvar: true needs a teacher with an uncertainty head (EDM2Precond): "
                          "set it false for this teacher")


def check_text_settings(rc: dict, teacher: torch.nn.Module) -> None:
    """Guidance needs a text teacher (its empty-prompt embedding); discrete timesteps need a
    diffusers teacher (its sigma table). One line each, naming the setting."""
    scales = {k: rc[k] for k in ("guidance_fake_train", "guidance_fake", "guidance_teacher") if rc[k] != 1}
    if scales and not hasattr(teacher, "uncond"):
        raise ConfigError(f"distill.{next(iter(scales))} {next(iter(scales.values()))}: classifier-free guidance "
                          f"needs a text-to-image teacher (an empty-prompt embedding); set it to 1 for this teacher")
    for key in ("timestep_range", "init_timestep"):
        if rc[key] is not None and not hasattr(teacher, "log_sigmas"):
            raise ConfigError(f"distill.{key} needs a diffusers teacher (a discrete scheduler): set it to null")
    if rc["timestep_range"] is not None:
        lo, hi = rc["timestep_range"]
        n = teacher.log_sigmas.shape[0]
        if not 0 <= lo < hi <= n:
            raise ConfigError(f"distill.timestep_range {[lo, hi]}: need 0 <= lo < hi <= {n} (the scheduler's "
                              f"timesteps), e.g. [20, 980]")
    if rc["init_timestep"] is not None and rc["init_timestep"] >= teacher.log_sigmas.shape[0]:
        raise ConfigError(f"distill.init_timestep {rc['init_timestep']}: the scheduler has "
                          f"{teacher.log_sigmas.shape[0]} timesteps")


def precision_warning(precision: str, device: torch.device) -> str | None:
    """One warning line for `precision: bf16` on a CPU without bf16 instructions (AVX-512 BF16 or
    AMX), where oneDNN's bf16 convolutions fall back to slow paths: 6x (channels-last) to 44x
    (NCHW) fp32's time for a [16, 64, 16, 16] 3x3 convolution on an AVX2 AMD EPYC, one thread,
    2026-12-07. None otherwise."""
    if precision != "bf16" or torch.device(device).type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return ("warning: distill.precision bf16 on a CPU without bf16 instructions (AVX-512 BF16 or AMX): its "
            "convolutions run several times slower than in fp32 here; set distill.precision: fp32 on this machine")
