"""Unpickling published snapshots without running any of their code.

EDM snapshots are plain `pickle.dump`s of ``dict(ema=..., loss_fn=..., augment_pipe=...,
dataset_kwargs=...)``. Every network object in them is written as a call to
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` holds the class
name, the *full source code of its module* and the object's ``__dict__`` (parameters, buffers,
sub-modules, recorded constructor arguments). Unpickling that normally ``exec``s the source.

We never do. `_SafeUnpickler` resolves only a short allow-list of globals (tensor and storage
rebuilders, numpy scalar/array reconstruction, ``OrderedDict``), turns every persistent-object
call into an inert `PersistentObject` that merely holds ``meta``, and refuses anything else with
a `CheckpointError` naming the global. Storages inside EDM pickles are nested legacy
``torch.save`` blobs; we read those with ``torch.load(weights_only=True)``. `read_edm_pickle`
returns the raw structure; `sida.io.edm_pickle` turns its captured networks into ours.

EDM2 snapshots (``edm2-img512-*.pkl``) use the same persistence format. The SiDA authors' EDM2
one-step generators (``EDM_2_Precond_Generator``) register a forward pre-hook, a bound method, on
every layer; pickle writes it as ``builtins.getattr(<the layer>, '<method name>')``. That one
call is answered with an inert `BoundMethodRef` when its target is a captured object and the name
a plain identifier, and refused otherwise.

EDM2's reference statistics (``img512.pkl``) are a plain pickle of numpy arrays:
`NumpyOnlyUnpickler` builds numpy arrays and plain containers and refuses every other global.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ..errors import CheckpointError, DataError, brief_reason

__all__ = ["PersistentObject", "TorchModuleStub", "BoundMethodRef", "read_edm_pickle", "describe_source",
           "NumpyOnlyUnpickler", "EDM_PERSISTENCE_VERSION"]


# EDM's persistence format version; recorded for introspection, not enforced (the layout of
# `meta` has been stable and we only read `class_name` and `state`).
EDM_PERSISTENCE_VERSION = 6

CHUNK_BYTES = 1 << 20


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


def describe_source(path_or_file: Any) -> str:
    """How errors name a snapshot: its path, or the stream's name."""
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
    source = describe_source(path_or_file)
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


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays/scalars and plain containers; refuses every other global (a
    statistics pickle such as EDM2's img512.pkl holds nothing else), raising `DataError`."""

    def __init__(self, f: Any, source: str) -> None:
        super().__init__(f)
        ma = _numpy_multiarray()
        self._source = source
        self._allowed = {("numpy", "dtype"): np.dtype, ("numpy", "ndarray"): np.ndarray}
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            self._allowed[(mod, "_reconstruct")] = ma._reconstruct
            self._allowed[(mod, "scalar")] = ma.scalar
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            self._allowed[(mod, "_frombuffer")] = _numpy_frombuffer()
        self._allowed[("collections", "OrderedDict")] = dict
        self._allowed[("_codecs", "encode")] = lambda text, enc="latin1": text.encode("latin1")

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise DataError(f"refusing to read {self._source}: it references {module}.{name}, which could "
                            f"execute code (a statistics pickle holds only numpy arrays)")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"refusing to read {self._source}: it uses persistent ids (not a statistics pickle)")
