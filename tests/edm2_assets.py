"""Assets of the EDM2 / ImageNet-512 path, made here for tests and the CI preset (nothing is downloaded).

- `make_edm2_pickle`: a network pickled exactly as EDM2 publishes snapshots (``pickle.dump`` of an
  EasyDict ``{encoder, loss_fn, dataset_kwargs, ema}`` whose objects go through
  ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` carrying their module source), or as
  the SiDA authors publish their EDM2 generators (``{ema}``, fp32, a forward pre-hook per layer).
- `make_tiny_vae_folder`: diffusers' AutoencoderKL of the real architecture with tiny widths and
  random weights, saved as a local folder (config.json + weights), as the fetch stage expects.
- `make_encoded_zip`: a dataset in EDM2's encoded layout (``img-mean-std-*.npy`` float32 [8,R,R]
  per image + ``dataset.json`` labels).
- `make_img512_refs`: a reference-statistics pickle shaped like EDM2's ``img512.pkl``.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import sys
import types
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from sida.nets.edm2 import Block, EDM2UNet, MPConv, MPFourier
from sida.nets.precond import EDM2Precond

MARKER_ENV = "SIDA_TEST_EXEC_MARKER"
# Stand-in for the embedded module source: executing it would create the marker file.
FAKE_SRC = ("import os, pathlib\n"
            f"pathlib.Path(os.environ.get('{MARKER_ENV}', '/tmp/sida-exec-marker')).write_text('executed')\n"
            "class EDMPrecond: pass\nclass Precond: pass\n")

# Our classes -> their names in NVlabs' release / in the SiDA authors' EDM2 code.
RELEASE_NAMES = {EDM2Precond: "Precond", EDM2UNet: "UNet", Block: "Block", MPConv: "MPConv", MPFourier: "MPFourier"}
SIDA_NAMES = {EDM2Precond: "EDM_2_Precond_Generator", EDM2UNet: "UNet_EncoderDecoder", Block: "Block",
              MPConv: "MPConv", MPFourier: "MPFourier"}


@contextmanager
def fake_edm_modules():
    """`torch_utils.persistence._reconstruct_persistent_obj` and `dnnlib.util.EasyDict` as importable
    names while pickling (the loader under test must never call them)."""
    def _reconstruct_persistent_obj(meta):
        raise AssertionError("the safe loader must not call the real reconstruct function")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    tu, pers = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    pers._reconstruct_persistent_obj = _reconstruct_persistent_obj
    tu.persistence = pers
    dn, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    easydict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    util.EasyDict = easydict
    dn.util = util
    names = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")
    saved = {k: sys.modules.get(k) for k in names}
    sys.modules.update({"torch_utils": tu, "torch_utils.persistence": pers, "dnnlib": dn, "dnnlib.util": util})
    try:
        yield _reconstruct_persistent_obj, easydict
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _persistent_reduce(fn, class_name: str):
    """A __reduce__ writing EDM's persistence call: fn(meta), meta.state = the object's state
    (for torch modules, Module.__getstate__: a shallow copy of __dict__, as in EDM2)."""
    def __reduce__(self):
        state = self.__getstate__() if isinstance(self, torch.nn.Module) else dict(self.__dict__)
        meta = dict(type="class", version=6, module_src=FAKE_SRC, class_name=class_name, state=state)
        return fn, (meta,)
    return __reduce__


def _apply_forced_weight_normalization(self, module, inputs):  # the authors' hook's name; never run here
    raise AssertionError("hooks are not run while pickling")


class _Plain:
    """A non-module persistent object (encoder, loss) holding only attributes."""


def _persistent_copy(net: torch.nn.Module, fn, names: dict, top_kwargs: dict, hooks: bool) -> torch.nn.Module:
    net = copy.deepcopy(net)
    for m in net.modules():
        cls = type(m)
        if cls not in names:
            continue  # stock torch containers pickle as themselves (NEWOBJ + BUILD)
        attrs = {"__reduce__": _persistent_reduce(fn, names[cls])}
        if cls is MPConv:
            attrs["_apply_forced_weight_normalization"] = _apply_forced_weight_normalization
        m.__class__ = type(f"Persistent{cls.__name__}", (cls,), attrs)
        m._init_args = ()
        m._init_kwargs = dict(top_kwargs) if m is net else {}
        if hooks and cls is MPConv:
            m.register_forward_pre_hook(m._apply_forced_weight_normalization)
    return net


def _plain_object(fn, class_name: str, **attrs) -> _Plain:
    obj = _Plain()
    obj.__dict__.update(attrs, _init_args=(), _init_kwargs={})
    obj.__class__ = type(f"Persistent{class_name}", (_Plain,), {"__reduce__": _persistent_reduce(fn, class_name)})
    return obj


def published_kwargs(net: EDM2Precond) -> dict:
    """The constructor arguments EDM2's training loop records for `Precond`."""
    return {k: v for k, v in net.init_kwargs.items() if k != "logvar"}


def make_edm2_pickle(net: EDM2Precond, layout: str = "release", extra: dict | None = None,
                     P_mean: float = -0.4, P_std: float = 1.0) -> bytes:
    """Bytes of `net` pickled as NVlabs publishes EDM2 snapshots (layout 'release': fp16 ``ema``,
    encoder, loss, dataset kwargs) or as the SiDA authors publish EDM2 generators ('sida': fp32,
    class EDM_2_Precond_Generator, a forward pre-hook on every MPConv)."""
    with fake_edm_modules() as (fn, easydict):
        if layout == "release":
            ema = _persistent_copy(net, fn, RELEASE_NAMES, published_kwargs(net), hooks=False)
            ema = ema.eval().requires_grad_(False).to(torch.float16)
            raw_mean = np.float32([5.81, 3.25, 0.12, -2.15])
            raw_std = np.float32([4.17, 4.62, 3.71, 3.28])
            scale = np.float32(0.5) / raw_std
            encoder = _plain_object(fn, "StabilityVAEEncoder", vae_name="stabilityai/sd-vae-ft-mse", scale=scale,
                                    bias=np.float32(0) - raw_mean * scale, batch_size=8, _vae=None)
            loss = _plain_object(fn, "EDM2Loss", P_mean=P_mean, P_std=P_std, sigma_data=0.5)
            data = easydict(encoder=encoder, dataset_kwargs=easydict(
                class_name="training.dataset.ImageFolderDataset", path="img512-sd.zip", use_labels=True),
                loss_fn=loss, ema=ema)
        elif layout == "sida":
            kwargs = dict(published_kwargs(net), force_normalization=True, use_gan=True)
            ema = _persistent_copy(net, fn, SIDA_NAMES, kwargs, hooks=True).eval().requires_grad_(False)
            data = dict(ema=ema)
        else:
            raise ValueError(layout)
        data.update(extra or {})
        return pickle.dumps(data, protocol=4)


# -- latents, VAE, references -------------------------------------------------------------------

TINY_VAE = dict(block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], sample_size=16)


def make_tiny_vae_folder(path: str | Path, seed: int = 0) -> Path:
    """A randomly initialised diffusers AutoencoderKL (sd-vae-ft-mse's architecture with tiny widths;
    one downsampling, so 16x16 pixels <-> 8x8x4 latents) saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, **TINY_VAE)
    path = Path(path)
    vae.save_pretrained(str(path))
    return path


def make_encoded_zip(path: str | Path, n: int, resolution: int, label_dim: int, seed: int = 0,
                     labels: bool = True) -> Path:
    """A zip in EDM2's encoded layout: per image a .npy float32 [8, R, R] (4 mean + 4 std channels,
    std > 0) at ``{idx:08d}[:5]/img-mean-std-{idx:08d}.npy``, and dataset.json labels."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = []
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            idx = f"{i:08d}"
            name = f"{idx[:5]}/img-mean-std-{idx}.npy"
            mean = rng.normal(size=(4, resolution, resolution)) * 4 + np.array([5.81, 3.25, 0.12, -2.15])[:, None, None]
            std = rng.uniform(0.05, 0.3, size=(4, resolution, resolution))
            buf = io.BytesIO()
            np.save(buf, np.concatenate([mean, std]).astype(np.float32))
            zf.writestr(name, buf.getvalue())
            entries.append([name, int(rng.integers(label_dim))] if labels else None)
        zf.writestr("dataset.json", json.dumps({"labels": entries if labels else None}))
    return path


def make_img512_refs(path: str | Path, fid_dim: int, dino_dim: int, seed: int = 0) -> Path:
    """A plain pickle shaped like EDM2's img512.pkl: {fid: {mu, sigma}, fd_dinov2: {mu, sigma}}."""
    rng = np.random.default_rng(seed)

    def stats(d):
        a = rng.normal(size=(d, d))
        return {"mu": rng.normal(size=d).astype(np.float64), "sigma": (a @ a.T / d).astype(np.float64)}

    path = Path(path)
    path.write_bytes(pickle.dumps({"fid": stats(fid_dim), "fd_dinov2": stats(dino_dim)}))
    return path


# -- the CI preset's assets (config/ci-edm2.yaml) --------------------------------------------------

CI_DIR = "assets/ci-edm2"
# The tiny EDM2 teacher of config/ci-edm2.yaml: 8x8x4 latents (16x16 pixels through the tiny VAE),
# 10 classes; network.kwargs there must match.
CI_TEACHER = dict(img_resolution=8, img_channels=4, label_dim=10, use_fp16=False, model_channels=16,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=16, dropout=0.0)


def make_ci_edm2_assets(folder: str | Path = CI_DIR, seed: int = 0) -> Path:
    """Everything config/ci-edm2.yaml fetches, made locally and deterministically in `folder`."""
    from sida.eval.features import save_random_dinov2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    teacher = EDM2Precond(**CI_TEACHER)
    with torch.no_grad():  # zero-initialised gains would make the teacher the identity map
        for p in teacher.parameters():
            if p.ndim == 0:
                p.fill_(0.3)
    (folder / "edm2-img512-tiny.pkl").write_bytes(make_edm2_pickle(teacher))
    make_tiny_vae_folder(folder / "vae", seed=seed)
    make_encoded_zip(folder / "latents.zip", n=64, resolution=8, label_dim=10, seed=seed)
    save_random_dinov2(folder / "dinov2_vits14_pretrain.pth", "vits14", seed=seed)
    make_img512_refs(folder / "img512.pkl", fid_dim=16, dino_dim=384, seed=seed)
    return folder


if __name__ == "__main__":  # python -m tests.edm2_assets [FOLDER]: the assets of config/ci-edm2.yaml
    print(make_ci_edm2_assets(sys.argv[1] if len(sys.argv) > 1 else CI_DIR))
