"""Safe import of published EDM / SiD pickles (`network-snapshot-*.pkl`).

EDM snapshots are plain `pickle.dump`s of ``dict(ema=..., loss_fn=..., augment_pipe=...,
dataset_kwargs=...)``. Every network object in them is written as a call to
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` holds the class
name, the *full source code of its module* and the object's ``__dict__`` (parameters, buffers,
sub-modules, recorded constructor arguments). Unpickling that normally ``exec``s the source.

We never do. `_SafeUnpickler` resolves only a short allow-list of globals (tensor and storage
rebuilders, numpy scalar/array reconstruction, ``OrderedDict``), turns every persistent-object
call into an inert `PersistentObject` that merely holds ``meta``, and refuses anything else with
a `CheckpointError` naming the global. Storages inside EDM pickles are nested legacy
``torch.save`` blobs; we read those with ``torch.load(weights_only=True)``. The captured tensors
are then loaded, by their dotted names, into our own `sida.nets.precond` class built from the recorded
constructor kwargs (same parameter names as EDM, so ``strict=True`` works).

EDM2 snapshots (``edm2-img512-*.pkl``) use the same persistence format: ``dict(encoder=
StabilityVAEEncoder, loss_fn=EDM2Loss, dataset_kwargs, ema=Precond)`` with the network in fp16;
it becomes our `sida.nets.edm2.EDM2Precond` in fp32. The SiDA authors' EDM2 one-step generators
(``EDM_2_Precond_Generator``) register a forward pre-hook, a bound method, on every layer; pickle
writes it as ``builtins.getattr(<the layer>, '<method name>')``. That one call is answered with an
inert `BoundMethodRef` when its target is a captured object and the name a plain identifier, and
refused otherwise. `edm_pickle_info` reports the encoder's latent scale/bias and the loss's
P_mean/P_std for the fetch stage's manifest.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
import torch

from ..errors import CheckpointError, brief_reason

# EDM's persistence format version; recorded for introspection, not enforced (the layout of
# `meta` has been stable and we only read `class_name` and `state`).
EDM_PERSISTENCE_VERSION = 6

CHUNK_BYTES = 1 << 20

# EDM class name (meta['class_name'] is the bare name) -> name in sida.nets.precond.PRECOND_CLASSES.
_SUPPORTED_PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond")
# EDM2-family class names -> whether the network carries the uncertainty (logvar) head; all become
# EDM2Precond. Precond: NVlabs' release; EDM_2_Precond_*: the SiDA authors' fake score / generator.
_EDM2_CLASSES = {"Precond": True, "EDM_2_Precond_EncoderDecoder": True, "EDM_2_Precond_Generator": False}
# Constructor arguments of the SiDA authors' EDM2 classes that only steer their training code.
_EDM2_TRAINING_ONLY_KWARGS = ("force_normalization", "use_gan")


class PersistentObject:
    """Inert stand-in for an EDM persistent object: holds its pickled `meta`, runs nothing.

    Attributes: ``class_name`` (bare class name, e.g. 'EDMPrecond'), ``module_src`` (the embedded
    source, kept only as text), ``state`` (the object's ``__dict__``), ``meta`` (everything).
    """

    def __init__(self, meta: Any) -> None:
        self.meta = dict(meta) if isinstance(meta, dict) else {"invalid_meta": meta}
        self.class_name = str(self.meta.get("class_name", "?"))
        self.module_src = self.meta.get("module_src", "")
        state = self.meta.get("state")
        self.state = dict(state) if isinstance(state, dict) else {}

    @property
    def init_args(self) -> tuple:
        """Positional constructor arguments EDM recorded (usually empty)."""
        return tuple(self.state.get("_init_args") or ())

    @property
    def init_kwargs(self) -> dict:
        """Keyword constructor arguments EDM recorded."""
        return dict(self.state.get("_init_kwargs") or {})

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name})"


class TorchModuleStub:
    """Inert stand-in for a plain torch module inside a snapshot (e.g. ``torch.nn.ModuleDict``).

    EDM's own layers are persistent objects, but it keeps sub-layers in stock torch containers,
    which are pickled as ``NEWOBJ(cls) + BUILD(state)``. We capture the state instead of building
    the real class, so the tree is walked the same way for both kinds of node.
    """

    class_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "TorchModuleStub":
        obj = super().__new__(cls)
        obj.state = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        # BUILD may pass (dict_state, slot_state); only the dict part matters for modules.
        if isinstance(state, tuple) and len(state) == 2:
            state = state[0] or {}
        self.state = dict(state) if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"TorchModuleStub({self.class_name})"


def _module_stub(qualname: str) -> type:
    """A `TorchModuleStub` subclass remembering which torch class it replaces."""
    return type("TorchModuleStub", (TorchModuleStub,), {"class_name": qualname})


class BoundMethodRef:
    """Inert record of ``getattr(obj, name)`` in a snapshot (a pickled bound method, e.g. a forward
    pre-hook of the SiDA authors' EDM2 layers). Nothing is looked up or called."""

    def __init__(self, target: Any, name: str) -> None:
        self.target_class = getattr(target, "class_name", "?")
        self.name = name

    def __repr__(self) -> str:
        return f"BoundMethodRef({self.target_class}.{self.name})"


class _EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict`` (a dict subclass some snapshots contain)."""


def _safe_load_from_bytes(b: bytes) -> Any:
    # Replaces torch.storage._load_from_bytes, which would call a full (code-executing) torch.load.
    if not isinstance(b, (bytes, bytearray)):
        raise CheckpointError("storage record is not bytes")
    return torch.load(io.BytesIO(bytes(b)), map_location="cpu", weights_only=True)


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    # Protocol <3 writes bytes as _codecs.encode(str, 'latin1'); other codecs are not needed.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise CheckpointError(f"unexpected _codecs.encode call with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_multiarray() -> Any:
    try:  # numpy >= 2 moved the module; importing the old name only warns, so prefer the new.
        from numpy._core import multiarray  # type: ignore[attr-defined]
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


def _numpy_frombuffer() -> Any:
    try:
        from numpy._core.numeric import _frombuffer  # type: ignore[attr-defined]
    except ImportError:
        from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]
    return _frombuffer


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The complete allow-list: (module, name) -> the object the unpickler may use."""
    ma = _numpy_multiarray()
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _safe_load_from_bytes,
        ("torch", "Size"): torch.Size,
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentObject,
    }
    if hasattr(torch._utils, "_rebuild_parameter_with_state"):
        allowed[("torch._utils", "_rebuild_parameter_with_state")] = torch._utils._rebuild_parameter_with_state
    # Typed storage classes (torch.FloatStorage, ...) as named by legacy pickles.
    for name in ("DoubleStorage", "FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage",
                 "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage"):
        if hasattr(torch, name):
            allowed[("torch", name)] = getattr(torch, name)
    # numpy 1.x and 2.x write different module names for the same reconstruction helpers.
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "scalar")] = ma.scalar
        allowed[(mod, "_reconstruct")] = ma._reconstruct
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = _numpy_frombuffer()
    # Protocol 0-2 pickles spell some containers and bytes as globals; these build plain data only.
    for mod in ("builtins", "__builtin__"):
        for name, fn in (("set", set), ("frozenset", frozenset), ("bytearray", bytearray),
                         ("complex", complex)):
            allowed[(mod, name)] = fn
    allowed[("_codecs", "encode")] = _latin1_encode
    # Stock torch containers that EDM uses around its persistent layers: captured, not built.
    for cls in ("ModuleDict", "ModuleList", "Sequential"):
        allowed[("torch.nn.modules.container", cls)] = _module_stub(f"torch.nn.{cls}")
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals (see `_allowed_globals`)."""

    def __init__(self, file: IO[bytes], source: str) -> None:
        super().__init__(file)
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name == "getattr":
            return self._inert_getattr
        obj = self._allowed.get((module, name))
        if obj is None:
            raise CheckpointError(f"refusing to load {self._source}: it references {module}.{name}, "
                                  f"which could execute code")
        return obj

    def _inert_getattr(self, target: Any = None, name: Any = None, *default: Any) -> BoundMethodRef:
        # Only the shape a pickled bound method of a captured layer has; anything else (a getattr
        # on a string, a module, a dunder) is what an attack would use and is refused.
        if (default or not isinstance(target, (PersistentObject, TorchModuleStub)) or not isinstance(name, str)
                or not name.isidentifier() or name.startswith("__")):
            raise CheckpointError(f"refusing to load {self._source}: it references builtins.getattr on "
                                  f"{type(target).__name__}, which could execute code")
        return BoundMethodRef(target, name)

    def persistent_load(self, pid: Any) -> Any:
        # EDM snapshots are plain pickles; a persistent id means a different (unknown) format.
        raise CheckpointError(f"refusing to load {self._source}: it uses persistent ids, which EDM "
                              f"snapshots do not (is it a torch.save file?)")


def _describe(path_or_file: Any) -> str:
    if isinstance(path_or_file, (str, os.PathLike)):
        return str(path_or_file)
    return str(getattr(path_or_file, "name", "<stream>"))


def _unpickle(f: IO[bytes], source: str) -> Any:
    # Peek at the magic: a torch.save zip needs a different loader, and saying so beats
    # "refusing ... persistent ids" or a garbled-pickle message.
    head = f.read(2)
    if not isinstance(head, (bytes, bytearray)):
        raise CheckpointError(f"{source} must be opened in binary mode")
    if head == b"PK":
        raise CheckpointError(f"{source} is a torch.save zip file, not an EDM pickle: load it with "
                              f"sida.io.checkpoints.load_network or import_sid_generator")
    try:
        # Streamed from the file rather than read into memory: ImageNet snapshots exceed 1 GB.
        return _SafeUnpickler(io.BufferedReader(_Prefixed(bytes(head), f), CHUNK_BYTES), source).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncation and corruption surface as many exception types
        reason = brief_reason(exc)
        raise CheckpointError(f"EDM pickle {source} is truncated or corrupt ({type(exc).__name__}: "
                              f"{reason}): download it again") from None


class _Prefixed(io.RawIOBase):
    """A binary stream yielding `head` and then the rest of `f` (so `f` need not be seekable)."""

    def __init__(self, head: bytes, f: IO[bytes]) -> None:
        super().__init__()
        self._head, self._f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self._head:
            n = min(len(buf), len(self._head))
            buf[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._f.read(len(buf))
        buf[:len(data)] = data
        return len(data)


def read_edm_pickle(path_or_file: str | os.PathLike | IO[bytes]) -> dict:
    """Unpickle an EDM snapshot without running any of its code; return the raw structure.

    Network objects come back as `PersistentObject` (``.class_name``, ``.state``, ``.meta``),
    stock torch containers as `TorchModuleStub`; tensors are real CPU tensors. Raises
    `CheckpointError` for unsafe globals, truncated/corrupt data, or a non-dict top level.
    """
    source = _describe(path_or_file)
    if isinstance(path_or_file, (str, os.PathLike)):
        path = Path(path_or_file)
        if not path.is_file():
            raise CheckpointError(f"EDM pickle {path} does not exist: check the path or run the fetch stage")
        with open(path, "rb") as f:
            obj = _unpickle(f, source)
    else:
        obj = _unpickle(path_or_file, source)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} is not an EDM snapshot: top level is {type(obj).__name__}, "
                              f"expected a dict with 'ema'")
    return obj


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
    source = _describe(path_or_file)
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
