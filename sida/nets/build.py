"""Build networks from an experiment config (the teacher's architecture, shared by G and f_psi)."""

from __future__ import annotations

import copy

import torch

from ..errors import CheckpointError


def network_classes() -> dict:
    """Our network classes by name: what a network file's `class` may be."""
    from .diffusers_sdxl import DiffusersSDXLPrecond  # late: keeps `import sida.nets.build` light
    from .diffusers_text import DiffusersTextPrecond
    from .diffusers_vp import DiffusersVPPrecond
    from .precond import PRECOND_CLASSES

    return {**PRECOND_CLASSES, "DiffusersVPPrecond": DiffusersVPPrecond, "DiffusersTextPrecond": DiffusersTextPrecond,
            "DiffusersSDXLPrecond": DiffusersSDXLPrecond}


def build_network(class_name: str, kwargs: dict) -> torch.nn.Module:
    """Construct one of our network classes by name from its constructor kwargs."""
    classes = network_classes()
    if class_name not in classes:
        raise CheckpointError(f"unknown network class '{class_name}' (known: {', '.join(classes)})")
    return classes[class_name](**kwargs)


def teacher_kwargs(cfg: dict) -> dict:
    """Constructor kwargs of the teacher's preconditioned network from `data` + `network`."""
    net, data = cfg["network"], cfg["data"]
    kwargs = dict(img_resolution=data["resolution"], img_channels=data["channels"],
                  label_dim=data["label_dim"], use_fp16=net["use_fp16"])
    if net["precond"] != "EDM2Precond":  # EDM2Precond has one UNet of its own (sida.nets.edm2)
        kwargs["model_type"] = net["model_type"]
    if net["precond"] in ("EDMPrecond", "EDM2Precond"):
        kwargs["sigma_data"] = net["sigma_data"]
    kwargs.update(copy.deepcopy(net["kwargs"]))
    return kwargs


def network_from_config(cfg: dict, dropout: float | None = None) -> torch.nn.Module:
    """A freshly initialised network of the config's architecture (dropout overridable)."""
    kwargs = teacher_kwargs(cfg)
    if dropout is not None:
        kwargs["dropout"] = dropout
    return build_network(cfg["network"]["precond"], kwargs)


def clone_with_dropout(net: torch.nn.Module, dropout: float | None) -> torch.nn.Module:
    """A copy of `net` (same weights), rebuilt with another dropout rate when one is given.

    The official code builds the generator and the fake score with `--dropout` (0.13 for
    CIFAR-10, 0.05 for FFHQ/AFHQv2) whatever rate the teacher they start from was trained with.
    """
    if dropout is None or dropout == net.init_kwargs.get("dropout"):
        return copy.deepcopy(net)
    kwargs = dict(net.init_kwargs)
    kwargs["dropout"] = dropout
    out = build_network(type(net).__name__, kwargs).to(next(net.parameters()).device)
    out.load_state_dict(net.state_dict(), strict=True)
    return out


def precision_dtype(precision: str) -> torch.dtype | None:
    """Autocast dtype of a config `precision` ('fp32' → None: no autocast)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, precision: str):
    """An autocast context for the config's precision (a no-op for fp32)."""
    dtype = precision_dtype(precision)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
