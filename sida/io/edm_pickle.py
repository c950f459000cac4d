"""Published EDM / EDM2 / SiD snapshots (`network-snapshot-*.pkl`) as our networks, and EDM's
pickle-free export format.

`sida.io.safe_unpickle.read_edm_pickle` reads a snapshot without running its code; here the
tensors it captured are loaded, by their dotted names, into our own `sida.nets.precond` class
built from the recorded constructor kwargs (same parameter names as EDM, so ``strict=True``
works). EDM2 snapshots (``dict(encoder=StabilityVAEEncoder, loss_fn=EDM2Loss, dataset_kwargs,
ema=Precond)``, the network in fp16) become our `sida.nets.edm2.EDM2Precond` in fp32, as do the
SiDA authors' EDM2 generators. `edm_pickle_info` reports the encoder's latent scale/bias and the
loss's P_mean/P_std for the fetch stage's manifest.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
import torch

from ..errors import CheckpointError, brief_reason
from .safe_unpickle import PersistentObject, TorchModuleStub, describe_source, read_edm_pickle

__all__ = ["captured_state_dict", "build_from_captured", "load_edm_pickle", "load_edm_pickle_with_info",
           "edm_pickle_info", "export_edm_state", "load_edm_state", "import_sid_generator"]

# EDM class name (meta['class_name'] is the bare name) -> name in sida.nets.precond.PRECOND_CLASSES.
_SUPPORTED_PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond")
# EDM2-family class names -> whether the network carries the uncertainty (logvar) head; all become
# EDM2Precond. Precond: NVlabs' release; EDM_2_Precond_*: the SiDA authors' fake score / generator.
_EDM2_CLASSES = {"Precond": True, "EDM_2_Precond_EncoderDecoder": True, "EDM_2_Precond_Generator": False}
# Constructor arguments of the SiDA authors' EDM2 classes that only steer their training code.
_EDM2_TRAINING_ONLY_KWARGS = ("force_normalization", "use_gan")


def _iter_tensors(node: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (dotted name, tensor) like ``Module.state_dict`` would, from captured stubs."""
    if not isinstance(node, (PersistentObject, TorchModuleStub)):
        raise CheckpointError(f"unexpected object {type(node).__name__} at '{prefix.rstrip('.')}' in the "
                              f"module tree")
    state = node.state
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            yield prefix + name, value
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in non_persistent:
            yield prefix + name, value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            yield from _iter_tensors(child, f"{prefix}{name}.")


def captured_state_dict(obj: PersistentObject) -> dict[str, torch.Tensor]:
    """The state dict (dotted names -> tensors) of a captured EDM network."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in _iter_tensors(obj, ""):
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"entry '{name}' of {obj.class_name} is {type(tensor).__name__}, not a tensor")
        out[name] = tensor.detach().clone() if isinstance(tensor, torch.nn.Parameter) else tensor.detach()
    return out


def _precond_classes() -> dict:
    from ..nets.precond import PRECOND_CLASSES  # late: keeps importing this module light

    return PRECOND_CLASSES


def _first_line(exc: BaseException) -> str:
    return brief_reason(exc)


def _summarize_mismatch(net: torch.nn.Module, sd: dict[str, torch.Tensor]) -> str:
    """Human summary of how a state dict differs from a network: missing/extra/shape."""
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(own) - set(got))
    extra = sorted(set(got) - set(own))
    shape = sorted(k for k in set(own) & set(got) if own[k] != got[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
    if shape:
        k = shape[0]
        parts.append(f"{len(shape)} with other shapes (e.g. {k}: file {list(got[k])} vs network {list(own[k])})")
    return "; ".join(parts) or "no difference in names or shapes"


def _load_strict(net: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, what: str) -> None:
    own = net.state_dict()
    if set(own) != set(sd) or any(tuple(own[k].shape) != tuple(sd[k].shape) for k in sd):
        raise CheckpointError(f"{source}: the {what} does not match the network architecture "
                              f"({_summarize_mismatch(net, sd)}): fix the network settings in the config")
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: cannot load the {what} ({_first_line(exc)})") from None


def _network_object(raw: dict, source: str, key: str = "ema") -> PersistentObject:
    obj = raw.get(key)
    if obj is None and key == "ema" and isinstance(raw.get("net"), PersistentObject):
        obj = raw["net"]  # some EDM-derived code bases store the network under 'net'
    if not isinstance(obj, PersistentObject):
        raise CheckpointError(f"{source} has no network under '{key}' (keys: {', '.join(map(str, raw))}): "
                              f"is it an EDM network snapshot?")
    return obj


def build_from_captured(obj: PersistentObject, source: str = "EDM pickle") -> torch.nn.Module:
    """Build our `sida.nets.precond` network from a captured EDM network and load its tensors."""
    if obj.class_name not in _SUPPORTED_PRECONDS and obj.class_name not in _EDM2_CLASSES:
        raise CheckpointError(f"{source}: network class '{obj.class_name}' is not supported (supported: "
                              f"{', '.join(_SUPPORTED_PRECONDS + tuple(_EDM2_CLASSES))})")
    classes = _precond_classes()
    kwargs = obj.init_kwargs
    if obj.class_name in _EDM2_CLASSES:
        cls = classes["EDM2Precond"]
        kwargs = {k: v for k, v in kwargs.items() if k not in _EDM2_TRAINING_ONLY_KWARGS}
        kwargs["logvar"] = _EDM2_CLASSES[obj.class_name]
    else:
        cls = classes[obj.class_name]
    try:
        net = cls(*obj.init_args, **kwargs)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise CheckpointError(f"{source}: cannot build {obj.class_name} from the recorded arguments "
                              f"{sorted(obj.init_kwargs)} ({_first_line(exc)})") from None
    # Published EDM2 weights are fp16; load_state_dict copies them into our fp32 parameters.
    _load_strict(net, captured_state_dict(obj), source, "stored network")
    return net.eval()


def load_edm_pickle(path_or_file: str | os.PathLike | IO[bytes]) -> torch.nn.Module:
    """Import the EMA network of a published EDM / EDM2 (or SiD / SiDA) snapshot as our network.

    Returns a `sida.nets.precond` module (EDMPrecond/VPPrecond/VEPrecond/EDM2Precond, fp32) in eval
    mode, with gradients left enabled so callers can copy it into trainable networks; call it as
    ``net(x, sigma, class_labels)``. Nothing from the file is executed.
    """
    return load_edm_pickle_with_info(path_or_file)[0]


def load_edm_pickle_with_info(path_or_file: str | os.PathLike | IO[bytes]) -> tuple[torch.nn.Module, dict]:
    """`load_edm_pickle` plus `edm_pickle_info` of the same file (read once)."""
    source = describe_source(path_or_file)
    raw = read_edm_pickle(path_or_file)
    obj = _network_object(raw, source)
    return build_from_captured(obj, source), edm_pickle_info(raw)


def _plain_value(v: Any) -> Any:
    """numpy arrays / scalars -> lists / numbers (JSON-able)."""
    if isinstance(v, np.ndarray):
        return v.astype(np.float64).tolist() if v.dtype.kind == "f" else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def edm_pickle_info(raw: dict) -> dict:
    """JSON-able facts about a snapshot beyond its network, for the fetch stage's manifest:
    the network class and dtype, the latent encoder (EDM2's StabilityVAEEncoder: vae_name,
    scale, bias) and the loss (class, P_mean, P_std, sigma_data) when present."""
    info: dict[str, Any] = {"keys": sorted(str(k) for k in raw)}
    net = raw.get("ema") if isinstance(raw.get("ema"), PersistentObject) else raw.get("net")
    if isinstance(net, PersistentObject):
        dtypes = sorted({str(t.dtype).replace("torch.", "") for _, t in _iter_tensors(net, "")
                         if isinstance(t, torch.Tensor)})
        info["network"] = {"class": net.class_name, "stored_dtypes": dtypes}
    enc = raw.get("encoder")
    if isinstance(enc, PersistentObject):
        info["encoder"] = {"class": enc.class_name,
                           **{k: _plain_value(enc.state[k]) for k in ("vae_name", "scale", "bias", "batch_size")
                              if k in enc.state}}
    loss = raw.get("loss_fn")
    if isinstance(loss, PersistentObject):
        info["loss"] = {"class": loss.class_name,
                        **{k: _plain_value(loss.state[k]) for k in ("P_mean", "P_std", "sigma_data")
                           if k in loss.state}}
    return info


def export_edm_state(net: torch.nn.Module) -> dict:
    """Our network in EDM's pickle-free form: class name (EDM's full name), kwargs, state dict.

    Save it with ``torch.save``; `import_sid_generator` and `load_edm_state` read it back with
    ``weights_only=True``.
    """
    init_kwargs = getattr(net, "init_kwargs", None)
    if init_kwargs is None:
        raise CheckpointError(f"{type(net).__name__} has no init_kwargs: only sida.nets.precond networks can be exported")
    return {
        "class_name": f"training.networks.{type(net).__name__}",
        "init_kwargs": dict(init_kwargs),
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
    }


def _read_exported(path: Path, source: str) -> dict:
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, unsafe content refused by the weights-only loader, ...
        raise CheckpointError(f"{source} cannot be read as an exported network ({_first_line(exc)})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("state_dict"), dict):
        raise CheckpointError(f"{source} is a torch.save file without a 'state_dict': not an exported network")
    return rec


def load_edm_state(path: str | os.PathLike) -> torch.nn.Module:
    """Rebuild a network from an `export_edm_state` file (torch.save, read weights-only)."""
    path = Path(path)
    rec = _read_exported(path, str(path))
    name = str(rec.get("class_name", "")).rsplit(".", 1)[-1]
    if name not in _SUPPORTED_PRECONDS + ("EDM2Precond",):
        raise CheckpointError(f"{path}: network class '{rec.get('class_name')}' is not supported")
    try:
        net = _precond_classes()[name](**dict(rec.get("init_kwargs") or {}))
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise CheckpointError(f"{path}: cannot build {name} from its kwargs ({_first_line(exc)})") from None
    _load_strict(net, rec["state_dict"], str(path), "stored network")
    return net.eval()


def import_sid_generator(path: str | os.PathLike, net: torch.nn.Module) -> torch.nn.Module:
    """Load a published SiD one-step generator's weights into `net` (in place) and return it.

    Accepts EDM-format snapshot pickles (the published SiD generators; read safely as above)
    and files written from `export_edm_state`. Raises `CheckpointError` naming the first
    missing/unexpected/mis-shaped parameter when the architectures differ.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"SiD generator {path} does not exist: check the path or run the fetch stage")
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"
    if is_zip and zipfile.is_zipfile(path):
        sd = _read_exported(path, source)["state_dict"]
    else:
        obj = _network_object(read_edm_pickle(path), source)
        sd = captured_state_dict(obj)
        theirs = obj.init_kwargs
        ours = dict(getattr(net, "init_kwargs", {}) or {})
        # Name the differing setting too: more useful than "shape mismatch in enc.8x8_block0".
        diff = sorted(k for k in set(theirs) & set(ours) if theirs[k] != ours[k]
                      and k not in ("use_fp16", "dropout", "sigma_min", "sigma_max"))
        own = net.state_dict()
        if diff and (set(own) != set(sd) or any(tuple(own[k].shape) != tuple(sd[k].shape) for k in sd)):
            k = diff[0]
            raise CheckpointError(f"{source}: the SiD generator was built with {k}={theirs[k]!r} but the "
                                  f"network has {k}={ours[k]!r} ({_summarize_mismatch(net, sd)}): fix the "
                                  f"network settings in the config")
    _load_strict(net, sd, source, "SiD generator")  # load_state_dict copies across devices
    return net
