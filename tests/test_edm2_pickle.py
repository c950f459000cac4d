"""Safe import of EDM2 snapshots (NVlabs' release layout, fp16) and of the SiDA authors' EDM2
generators (forward pre-hooks pickled as builtins.getattr), without executing anything."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

from sida.errors import CheckpointError
from sida.io.edm_pickle import import_sid_generator, load_edm_pickle, load_edm_pickle_with_info
from sida.io.safe_unpickle import BoundMethodRef, PersistentObject, TorchModuleStub, read_edm_pickle
from sida.nets.precond import EDM2Precond
from tests.edm2_assets import make_edm2_pickle
from tests.test_edm_pickle import _marker  # noqa: F401  (autouse: fails a test that ran embedded code)
from tests.test_edm2 import _inputs, tiny_edm2


def _out(net):
    x, sigma, labels = _inputs()
    with torch.no_grad():
        return net(x, sigma, labels, return_flag="encoder_decoder", return_logvar=net.has_logvar)


def test_release_layout_fp16_imported_as_fp32(tmp_path):
    net = tiny_edm2(seed=2)
    path = tmp_path / "edm2-img512-xs-2147483-0.135.pkl"
    path.write_bytes(make_edm2_pickle(net, P_mean=-0.4, P_std=1.0))
    raw = read_edm_pickle(path)
    assert set(raw) == {"encoder", "dataset_kwargs", "loss_fn", "ema"}
    assert raw["ema"].class_name == "Precond" and raw["ema"].state["_modules"]["unet"].class_name == "UNet"
    assert raw["ema"].state["_parameters"] == {}  # Precond's own: none; the head sits in a child
    loaded, info = load_edm_pickle_with_info(path)
    assert type(loaded) is EDM2Precond and not loaded.training and loaded.has_logvar
    assert all(p.dtype == torch.float32 for p in loaded.state_dict().values())
    assert loaded.init_kwargs == net.init_kwargs
    # The same network built directly, with the weights the fp16 file holds.
    ref = copy.deepcopy(net).half().float()
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    for a, b in zip(_out(loaded), _out(ref)):
        assert torch.equal(a, b)
    # ... and close to the fp32 original (fp16 rounding of the weights only).
    for a, b in zip(_out(loaded), _out(net)):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    # What the manifest records.
    assert info["network"] == {"class": "Precond", "stored_dtypes": ["float16"]}
    enc = info["encoder"]
    assert enc["class"] == "StabilityVAEEncoder" and enc["vae_name"] == "stabilityai/sd-vae-ft-mse"
    np.testing.assert_allclose(enc["scale"], 0.5 / np.float32([4.17, 4.62, 3.71, 3.28]), rtol=1e-6)
    np.testing.assert_allclose(enc["bias"], -np.float32([5.81, 3.25, 0.12, -2.15]) * np.array(enc["scale"]),
                               rtol=1e-6)
    assert info["loss"] == {"class": "EDM2Loss", "P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5}


def test_sida_generator_with_pickled_hooks(tmp_path):
    gen = tiny_edm2(seed=5, logvar=False)
    blob = make_edm2_pickle(gen, layout="sida")
    assert b"getattr" in blob and b"_apply_forced_weight_normalization" in blob
    raw = read_edm_pickle(io.BytesIO(blob))
    ema = raw["ema"]
    assert ema.class_name == "EDM_2_Precond_Generator"
    assert ema.init_kwargs["force_normalization"] is True and ema.init_kwargs["use_gan"] is True
    conv = ema.state["_modules"]["unet"].state["_modules"]["out_conv"]
    hooks = list(conv.state["_forward_pre_hooks"].values())
    assert len(hooks) == 1 and isinstance(hooks[0], BoundMethodRef)
    assert hooks[0].name == "_apply_forced_weight_normalization" and hooks[0].target_class == "MPConv"
    loaded = load_edm_pickle(io.BytesIO(blob))
    assert not loaded.has_logvar and "logvar_linear.weight" not in loaded.state_dict()
    for a, b in zip(_out(loaded), _out(gen)):
        assert torch.equal(a, b)
    # Into an existing generator of the same architecture (SiD2A's init_generator path).
    path = tmp_path / "network-snapshot-1.000000-001234.pkl"
    path.write_bytes(blob)
    target = tiny_edm2(seed=9, logvar=False)
    import_sid_generator(path, target)
    for a, b in zip(_out(target), _out(gen)):
        assert torch.equal(a, b)


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("args", [("abc", "upper"), (torch.zeros(1), "numpy"), (None, "x")])
def test_getattr_on_anything_but_a_captured_layer_is_refused(tmp_path, args):
    path = tmp_path / "evil.pkl"
    path.write_bytes(make_edm2_pickle(tiny_edm2(), extra={"dataset_kwargs": {"x": _Evil(getattr, *args)}}))
    with pytest.raises(CheckpointError) as info:
        load_edm_pickle(path)
    msg = str(info.value)
    assert "refusing to load" in msg and str(path) in msg and "\n" not in msg


def test_getattr_dunder_on_a_layer_is_refused(tmp_path):
    # A bound-method reference must name a plain method: getattr(layer, '__class__') is refused.
    blob = make_edm2_pickle(tiny_edm2(logvar=False), layout="sida")
    name = b"_apply_forced_weight_normalization"
    dunder = b"__class__".ljust(len(name), b"_")  # same length: the pickle stays well formed
    assert blob.count(name) >= 1
    blob = blob.replace(name, dunder)
    with pytest.raises(CheckpointError, match="builtins.getattr"):
        read_edm_pickle(io.BytesIO(blob))


def test_planted_code_in_edm2_layout_is_refused(tmp_path):
    import os

    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pkl"
    path.write_bytes(make_edm2_pickle(tiny_edm2(), extra={"encoder": _Evil(os.system, f"touch {target}")}))
    with pytest.raises(CheckpointError, match="refusing to load .*system"):
        load_edm_pickle(path)
    assert not target.exists()


def test_edm2_architecture_mismatch_one_line(tmp_path):
    path = tmp_path / "edm2.pkl"
    path.write_bytes(make_edm2_pickle(tiny_edm2()))
    raw = read_edm_pickle(path)
    assert isinstance(raw["ema"], PersistentObject)
    assert isinstance(raw["ema"].state["_modules"]["unet"].state["_modules"]["enc"], TorchModuleStub)
    other = tiny_edm2(model_channels=32)
    with pytest.raises(CheckpointError) as info:
        import_sid_generator(path, other)
    assert "model_channels=16" in str(info.value) and "\n" not in str(info.value)
