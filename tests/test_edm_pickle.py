"""Safe import of EDM-format pickles: round trip, refusal of code, numpy names, truncation.

The pickles are written here in EDM's exact layout: each network object is a call to
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta`` holding the module
source, the class name and the object's ``__dict__``; stock torch containers (ModuleDict) are
plain NEWOBJ + BUILD; tensors use torch's own ``__reduce_ex__`` (``_rebuild_tensor_v2`` over
``torch.storage._load_from_bytes``), exactly what ``pickle.dump`` produces in EDM.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from sida.io.edm_pickle import export_edm_state, import_sid_generator, load_edm_pickle, load_edm_state
from sida.io.safe_unpickle import PersistentObject, read_edm_pickle
from sida.errors import CheckpointError
from sida.nets.precond import EDMPrecond
from tests.edm2_assets import fake_edm_modules

# A stand-in for the embedded module source: if anything exec'd it, the marker file would appear.
from tests.edm2_assets import MARKER_ENV, FAKE_SRC  # noqa: E402

TINY = dict(img_resolution=8, img_channels=3, label_dim=10, model_type="SongUNet", model_channels=16,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0, augment_dim=9,
            channel_mult_noise=1, resample_filter=[1, 1])


def _fake_persistence_module():
    """`torch_utils.persistence._reconstruct_persistent_obj` importable while dumping (yields it)."""
    return _fake_fn(fake_edm_modules())


@contextmanager
def _fake_fn(ctx):
    with ctx as (fn, _easydict):
        yield fn


class _Persistent:
    """Pickles like an EDM `@persistent_class` instance."""

    def __init__(self, fn, module: torch.nn.Module, init_kwargs: dict | None = None):
        state = dict(module.__dict__)
        state["_modules"] = collections.OrderedDict(
            (k, _wrap(fn, v)) for k, v in module._modules.items())
        state["_init_args"] = ()
        state["_init_kwargs"] = dict(init_kwargs or {})
        state.pop("init_kwargs", None)  # our attribute; EDM keeps it as _init_kwargs
        self.meta = dict(type="class", version=6, module_src=FAKE_SRC, class_name=type(module).__name__,
                         state=state)
        self.fn = fn

    def __reduce__(self):
        return self.fn, (self.meta,)


def _torch_container(fn, module: torch.nn.Module) -> torch.nn.Module:
    """A stock torch container (ModuleDict) that pickles like one inside an EDM network
    (NEWOBJ + BUILD), but whose children are the persistent-object wrappers."""
    obj = object.__new__(type(module))  # no __init__: we set the whole __dict__ ourselves
    state = dict(module.__dict__)
    state["_modules"] = collections.OrderedDict((k, _wrap(fn, v)) for k, v in module._modules.items())
    obj.__dict__.update(state)
    return obj


def _wrap(fn, module):
    if module is None:
        return None
    if type(module).__module__.startswith("torch.nn"):
        return _torch_container(fn, module)
    return _Persistent(fn, module)


def make_edm_pickle(net: torch.nn.Module, protocol: int = 4, extra: dict | None = None) -> bytes:
    """Bytes of an EDM snapshot holding `net` as its 'ema' (plus EDM's other top-level keys)."""
    with _fake_persistence_module() as fn:
        loss_fn = _Persistent(fn, torch.nn.Module(), dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5))
        loss_fn.meta["class_name"] = "EDMLoss"
        data = dict(ema=_Persistent(fn, net, net.init_kwargs), loss_fn=loss_fn, augment_pipe=None,
                    dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="x.zip",
                                        use_labels=True, xflip=False, cache=True, resolution=8, max_size=10))
        data.update(extra or {})
        return pickle.dumps(data, protocol=protocol)


def tiny_net(seed: int = 0, **overrides) -> EDMPrecond:
    """A tiny class-conditional EDMPrecond(SongUNet) with non-trivial weights."""
    torch.manual_seed(seed)
    net = EDMPrecond(**{**TINY, **overrides})
    with torch.no_grad():  # EDM zero-inits some output layers; randomize so outputs are informative
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(autouse=True)
def _marker(tmp_path, monkeypatch):
    marker = tmp_path / "executed.txt"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    yield marker
    assert not marker.exists(), "embedded source code was executed"


def _outputs(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.1, 1.0, 5.0, 40.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 7, 9]), 10).float()
    aug = torch.randn(4, 9, generator=g)
    with torch.no_grad():
        return net(x, sigma, labels, augment_labels=aug)


def test_round_trip_identical_outputs(tmp_path):
    net = tiny_net()
    path = tmp_path / "network-snapshot-000000.pkl"
    path.write_bytes(make_edm_pickle(net))
    loaded = load_edm_pickle(path)
    assert type(loaded) is EDMPrecond and not loaded.training
    assert loaded.init_kwargs == net.init_kwargs
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(_outputs(loaded), _outputs(net))
    # Also from an open file object.
    with open(path, "rb") as f:
        assert torch.equal(_outputs(load_edm_pickle(f)), _outputs(net))


def test_read_edm_pickle_structure(tmp_path):
    raw = read_edm_pickle(io.BytesIO(make_edm_pickle(tiny_net())))
    assert set(raw) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    assert isinstance(raw["ema"], PersistentObject) and raw["ema"].class_name == "EDMPrecond"
    assert raw["ema"].init_kwargs["model_type"] == "SongUNet"
    assert "class EDMPrecond" in raw["ema"].module_src  # kept as text, never run
    assert raw["loss_fn"].class_name == "EDMLoss"
    assert raw["dataset_kwargs"]["resolution"] == 8


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec", "getattr"])
def test_planted_code_is_refused(tmp_path, kind):
    target = tmp_path / "pwned.txt"
    if kind == "os.system":
        payload, expect = _Evil(os.system, f"touch {target}"), f"{os.system.__module__}.system"
    elif kind == "builtins.eval":
        payload, expect = _Evil(eval, f"open({str(target)!r}, 'w').write('x')"), "builtins.eval"
    elif kind == "builtins.exec":
        payload, expect = _Evil(exec, f"open({str(target)!r}, 'w').write('x')"), "builtins.exec"
    else:
        payload, expect = _Evil(getattr, "x"), "builtins.getattr"
    path = tmp_path / "evil.pkl"
    path.write_bytes(make_edm_pickle(tiny_net(), extra={"dataset_kwargs": {"path": payload}}))
    with pytest.raises(CheckpointError) as info:
        load_edm_pickle(path)
    msg = str(info.value)
    assert expect in msg and "refusing to load" in msg and str(path) in msg
    assert "\n" not in msg
    assert not target.exists()


def test_nested_storage_bytes_are_loaded_weights_only(tmp_path):
    # A storage blob that itself plants a global must be refused by torch's weights-only loader.
    class _BadBytes:
        def __reduce__(self):
            import torch.storage as ts
            inner = pickle.dumps(_Evil(os.system, f"touch {tmp_path / 'pwned2.txt'}"), protocol=2)
            return ts._load_from_bytes, (inner,)

    path = tmp_path / "evil2.pkl"
    path.write_bytes(make_edm_pickle(tiny_net(), extra={"augment_pipe": _BadBytes()}))
    with pytest.raises(CheckpointError):
        load_edm_pickle(path)
    assert not (tmp_path / "pwned2.txt").exists()


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_numpy_scalars_and_arrays_both_module_names(tmp_path, numpy_module):
    extra = {"dataset_kwargs": {"scale": np.float32(1.5), "count": np.int64(7),
                                "arr": np.arange(6, dtype=np.float64).reshape(2, 3)}}
    # Protocol 2 writes globals as text lines, so the module name can be swapped in place.
    blob = make_edm_pickle(tiny_net(), protocol=2, extra=extra)
    current = np.float32(0).__reduce__()[0].__module__  # the name this numpy writes
    for old in ("numpy._core.multiarray", "numpy.core.multiarray"):
        blob = blob.replace(f"c{old}\n".encode(), f"c{numpy_module}\n".encode())
    assert f"c{numpy_module}\n".encode() in blob and current.startswith("numpy")
    path = tmp_path / "np.pkl"
    path.write_bytes(blob)
    raw = read_edm_pickle(path)
    dk = raw["dataset_kwargs"]
    assert dk["scale"] == np.float32(1.5) and dk["count"] == 7
    np.testing.assert_array_equal(dk["arr"], np.arange(6.0).reshape(2, 3))
    assert load_edm_pickle(path).init_kwargs["img_resolution"] == 8


def test_truncated_file_one_line_error(tmp_path):
    blob = make_edm_pickle(tiny_net())
    for cut in (len(blob) // 2, len(blob) - 3, 10):
        path = tmp_path / f"trunc{cut}.pkl"
        path.write_bytes(blob[:cut])
        with pytest.raises(CheckpointError) as info:
            load_edm_pickle(path)
        assert "truncated or corrupt" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_edm_pickle(tmp_path / "missing.pkl")


def test_unsupported_class_and_missing_ema(tmp_path):
    blob = make_edm_pickle(tiny_net())
    with pytest.raises(CheckpointError, match="no network under 'ema'"):
        from sida.io.edm_pickle import _network_object
        _network_object(read_edm_pickle(io.BytesIO(pickle.dumps({"x": 1}))), "f")
    raw = read_edm_pickle(io.BytesIO(blob))
    raw["ema"].class_name = "iDDPMPrecond"
    from sida.io.edm_pickle import build_from_captured
    with pytest.raises(CheckpointError, match="not supported"):
        build_from_captured(raw["ema"])


def test_export_and_sid_generator_import(tmp_path):
    gen = tiny_net(seed=3)
    # Published SiD generators are EDM-format snapshots.
    pkl = tmp_path / "sid.pkl"
    pkl.write_bytes(make_edm_pickle(gen))
    target = tiny_net(seed=4)
    import_sid_generator(pkl, target)
    assert torch.equal(_outputs(target), _outputs(gen))
    # Our pickle-free export form.
    exported = tmp_path / "gen.pt"
    rec = export_edm_state(gen)
    assert rec["class_name"] == "training.networks.EDMPrecond"
    torch.save(rec, exported)
    target2 = tiny_net(seed=5)
    import_sid_generator(exported, target2)
    assert torch.equal(_outputs(target2), _outputs(gen))
    assert torch.equal(_outputs(load_edm_state(exported)), _outputs(gen))


def test_sid_generator_architecture_mismatch(tmp_path):
    pkl = tmp_path / "sid.pkl"
    pkl.write_bytes(make_edm_pickle(tiny_net()))
    other = tiny_net(model_channels=32)
    with pytest.raises(CheckpointError) as info:
        import_sid_generator(pkl, other)
    msg = str(info.value)
    assert "model_channels=16" in msg and "model_channels=32" in msg and "\n" not in msg
    unconditional = tiny_net(label_dim=0)
    with pytest.raises(CheckpointError, match=r"label_dim=10 .*unexpected \(e.g. model.map_label"):
        import_sid_generator(pkl, unconditional)
    exported = tmp_path / "gen.pt"
    torch.save(export_edm_state(tiny_net()), exported)
    with pytest.raises(CheckpointError, match="does not match the network architecture"):
        import_sid_generator(exported, other)
