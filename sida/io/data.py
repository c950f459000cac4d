"""Image datasets behind one interface: `open_dataset(cfg) -> ImageDataset`.

Kinds (``cfg['kind']``):
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; no download), kept in
  memory as one tensor so a batch is a single tensor index. Larger resolutions are nearest-
  neighbour upscales (a multiple of 8), 3 channels repeat the grey channel.
- ``edm_zip``: a zip in EDM's ``dataset_tool.py`` layout (PNG files plus ``dataset.json`` whose
  ``labels`` is ``[[name, label], ...]`` or null), decoded lazily; the zip handle is opened per
  process so DataLoader workers and torchrun ranks never share one.
- ``folder``: a directory of PNG/JPG files (searched recursively) with an optional
  ``dataset.json`` in the same format.
- ``edm2_latents``: EDM2's encoded dataset (``dataset_tool.py encode``): a zip of per-image float32
  ``.npy`` arrays [2C, R, R] (C posterior means, then C stds of the Stable Diffusion VAE) plus
  ``dataset.json`` labels. Read lazily, one file per item (the ImageNet one is 168 GB); a batch is
  a fresh draw of *final* latents, (mean + N(0,1) std) * scale + bias (`sida.io.latents`), from the
  caller's generator. Data-free runs only read the labels.

Images come back as float32 NCHW in [-1, 1]; labels as one-hot float32 [N, label_dim] ([N, 0]
when the config is unconditional). ``xflip`` doubles the dataset with mirrored copies, indexed
like EDM (index i >= n is image i - n flipped).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import DataError, FileSystemError, describe_os_error

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
KINDS = ("digits", "edm_zip", "folder", "edm2_latents")


class ImageDataset:
    """Base class: index bookkeeping, xflip and label handling shared by all kinds.

    Subclasses set ``name``, ``_num_raw`` and ``_raw_labels`` (None or an array: int class indices
    [n] or float vectors [n, L]) and implement `_raw_uint8(raw_indices) -> uint8 NHWC`.
    """

    name: str = "dataset"

    def __init__(self, resolution: int, channels: int, label_dim: int, xflip: bool) -> None:
        self.resolution = int(resolution)
        self.channels = int(channels)
        self.label_dim = int(label_dim)
        self.xflip = bool(xflip)
        self._num_raw = 0
        self._raw_labels: np.ndarray | None = None
        self._onehot: torch.Tensor | None = None

    # -- subclass hooks ------------------------------------------------------------------------
    def _raw_uint8(self, raw: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._num_raw * (2 if self.xflip else 1)

    def _split(self, indices: Any) -> tuple[np.ndarray, np.ndarray]:
        """(raw image index, flip flag) per requested index, with a bounds check."""
        idx = torch.as_tensor(indices).reshape(-1).cpu().numpy().astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(f"{self.name}: index out of range (dataset has {len(self)} images)")
        return idx % self._num_raw if self._num_raw else idx, idx >= self._num_raw

    def _finish_labels(self) -> None:
        """Check dataset labels against the configured label_dim; precompute one-hot rows."""
        n, want = self._num_raw, self.label_dim
        if want == 0:  # unconditional use of any dataset is fine: labels are dropped
            self._onehot = torch.zeros([n, 0], dtype=torch.float32)
            return
        lab = self._raw_labels
        if lab is None:
            raise DataError(f"{self.name} has no labels but the config expects label_dim={want}: set "
                            f"data.label_dim: 0 or use a labelled dataset")
        if lab.ndim == 1:
            if lab.size and (lab.min() < 0 or lab.max() >= want):
                raise DataError(f"{self.name} has class labels up to {int(lab.max())} but the config "
                                f"expects label_dim={want}: fix data.label_dim")
            self._onehot = torch.nn.functional.one_hot(torch.as_tensor(lab, dtype=torch.int64),
                                                       want).to(torch.float32)
        else:
            if lab.shape[1] != want:
                raise DataError(f"{self.name} has {lab.shape[1]}-dimensional labels but the config expects "
                                f"label_dim={want}: fix data.label_dim")
            self._onehot = torch.as_tensor(lab, dtype=torch.float32)

    def uint8_images(self, indices: Any) -> np.ndarray:
        """Images as uint8 NHWC numpy (mirrored where the index is an xflip copy)."""
        raw, flip = self._split(indices)
        imgs = self._raw_uint8(raw)
        if flip.any():
            imgs = imgs.copy()
            imgs[flip] = imgs[flip][:, :, ::-1, :]
        return imgs

    def labels(self, indices: Any) -> torch.Tensor:
        """One-hot (or float) labels, float32 [N, label_dim]."""
        raw, _ = self._split(indices)
        assert self._onehot is not None
        return self._onehot[torch.as_tensor(raw)]

    def get_batch(self, indices: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float32 NCHW in [-1, 1], labels float32 [N, label_dim]) for `indices`.
        `generator` is used by datasets whose items are random draws (EDM2 latents)."""
        imgs = torch.from_numpy(np.ascontiguousarray(self.uint8_images(indices)))
        x = imgs.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1
        return x, self.labels(indices)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name}, {len(self)} images, {self.resolution}x{self.resolution}x"
                f"{self.channels}, label_dim={self.label_dim}, xflip={self.xflip})")


class DigitsDataset(ImageDataset):
    """scikit-learn's 8x8 digits, in memory; values 0..16 map to [-1, 1] as x / 8 - 1."""

    def __init__(self, resolution: int = 8, channels: int = 1, label_dim: int = 10, xflip: bool = False) -> None:
        super().__init__(resolution, channels, label_dim, xflip)
        self.name = "digits"
        if resolution % 8 != 0 or resolution < 8:
            raise DataError(f"digits are 8x8: data.resolution must be a multiple of 8, not {resolution}")
        if channels not in (1, 3):
            raise DataError(f"digits: data.channels must be 1 or 3, not {channels}")
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        d = load_digits()
        x = torch.as_tensor(d.images, dtype=torch.float32)  # [n, 8, 8], values 0..16
        rep = resolution // 8
        x = x.repeat_interleave(rep, 1).repeat_interleave(rep, 2)[:, None].repeat(1, channels, 1, 1)
        self._images = x / 8 - 1  # [n, C, H, W] in [-1, 1]
        self._num_raw = x.shape[0]
        self._raw_labels = np.asarray(d.target, dtype=np.int64)
        self._finish_labels()

    def get_batch(self, indices: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One tensor index into the in-memory images (flipped copies mirrored along W)."""
        raw, flip = self._split(indices)
        x = self._images[torch.as_tensor(raw)]
        if flip.any():
            f = torch.as_tensor(flip)
            x[f] = x[f].flip(3)
        return x, self._onehot[torch.as_tensor(raw)]

    def _raw_uint8(self, raw: np.ndarray) -> np.ndarray:
        x = self._images[torch.as_tensor(raw)]
        return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _decode(data: bytes, name: str, where: str) -> np.ndarray:
    """PNG/JPG bytes -> uint8 HWC array; 'P'/'LA'/'RGBA'/... are converted to L or RGB."""
    import PIL.Image

    try:
        with PIL.Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "RGB"):
                im = im.convert("L" if im.mode in ("1", "I", "I;16", "F", "LA") else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # PIL raises many types for corrupt data
        raise DataError(f"{where}: image {name} cannot be decoded ({type(exc).__name__}): the dataset "
                        f"is corrupt, recreate it") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _parse_labels(meta: Any, names: Sequence[str], where: str) -> np.ndarray | None:
    """Labels from a dataset.json dict, ordered like `names` (EDM dataset_tool format)."""
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DataError(f"{where}: dataset.json must be an object with a 'labels' entry")
    labels = meta["labels"]
    if labels is None:
        return None
    try:
        table = {str(k).replace("\\", "/"): v for k, v in labels}
        values = [table[n] for n in names]
    except KeyError as exc:
        raise DataError(f"{where}: dataset.json has no label for image {exc.args[0]}") from None
    except (TypeError, ValueError):
        raise DataError(f"{where}: dataset.json 'labels' must be a list of [name, label] pairs") from None
    arr = np.asarray(values)
    if arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if arr.ndim == 2 and np.issubdtype(arr.dtype, np.number):
        return arr.astype(np.float32)
    raise DataError(f"{where}: dataset.json labels must be integers or equal-length number lists")


class _FileImageDataset(ImageDataset):
    """Shared logic of zip and folder datasets: file list, labels, shape check, lazy decode."""

    def _setup(self, names: list[str], meta_json: bytes | None) -> None:
        if not names:
            raise DataError(f"{self.name} contains no images (.png/.jpg): check data.path")
        self._names = names
        self._num_raw = len(names)
        meta = None
        if meta_json is not None:
            try:
                meta = json.loads(meta_json)
            except (ValueError, UnicodeDecodeError):
                raise DataError(f"{self.name}: dataset.json is not valid JSON") from None
        self._raw_labels = _parse_labels(meta, names, self.name) if meta is not None else None
        self._finish_labels()
        self._check_shape(self._read(0), names[0])  # the first image: cheap and catches wrong paths

    def _check_shape(self, img: np.ndarray, name: str) -> None:
        h, w, c = img.shape
        r, ch = self.resolution, self.channels
        if (h, w, c) != (r, r, ch):
            raise DataError(f"dataset {self.name} has {h}x{w}x{c} images ({name}) but the config expects "
                            f"{r}x{r}x{ch}: fix data.resolution / data.channels or the path")

    def _read_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def _read(self, i: int) -> np.ndarray:
        return _decode(self._read_bytes(i), self._names[i], self.name)

    def _raw_uint8(self, raw: np.ndarray) -> np.ndarray:
        out = np.empty([len(raw), self.resolution, self.resolution, self.channels], dtype=np.uint8)
        for j, i in enumerate(raw):
            img = self._read(int(i))
            self._check_shape(img, self._names[int(i)])
            out[j] = img
        return out


class ZipDataset(_FileImageDataset):
    """EDM dataset_tool zip, read lazily; one zip handle per process."""

    _exts: tuple[str, ...] = IMAGE_EXTS  # the members that are items

    def __init__(self, path: str | Path, resolution: int, channels: int, label_dim: int = 0,
                 xflip: bool = False) -> None:
        super().__init__(resolution, channels, label_dim, xflip)
        self.path = Path(path)
        self.name = str(path)
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        if not self.path.is_file():
            raise DataError(f"dataset {self.path} does not exist: check data.path or run the fetch stage")
        try:
            zf = self._zipfile()
            files = zf.namelist()
            names = sorted(f for f in files if f.lower().endswith(self._exts))
            meta = zf.read("dataset.json") if "dataset.json" in files else None
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DataError(f"dataset {self.path} is not a readable zip ({exc}): recreate it with "
                            f"EDM's dataset_tool.py") from None
        self._setup(names, meta)

    def _zipfile(self) -> zipfile.ZipFile:
        # Reopen after fork/spawn: a ZipFile's file position must not be shared between processes.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def _read_bytes(self, i: int) -> bytes:
        try:
            return self._zipfile().read(self._names[i])
        except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
            raise DataError(f"dataset {self.path}: cannot read {self._names[i]} ({type(exc).__name__}): "
                            f"the zip is corrupt, recreate it") from None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_zip"], state["_zip_pid"] = None, -1  # handles do not cross process boundaries
        return state


class FolderDataset(_FileImageDataset):
    """A directory of image files (recursive), optional dataset.json labels."""

    def __init__(self, path: str | Path, resolution: int, channels: int, label_dim: int = 0,
                 xflip: bool = False) -> None:
        super().__init__(resolution, channels, label_dim, xflip)
        self.path = Path(path)
        self.name = str(path)
        if not self.path.is_dir():
            raise DataError(f"dataset folder {self.path} does not exist: check data.path")
        names = sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        meta_path = self.path / "dataset.json"
        self._setup(names, meta_path.read_bytes() if meta_path.is_file() else None)

    def _read_bytes(self, i: int) -> bytes:
        try:
            return (self.path / self._names[i]).read_bytes()
        except OSError as exc:  # e.g. removed while a run reads it: path, cause and fix in one line
            raise FileSystemError(describe_os_error(exc, self.path / self._names[i], "read")) from None


class EncodedLatentDataset(ZipDataset):
    """EDM2's encoded dataset: zip of float32 .npy [2C, R, R] (means, stds) + dataset.json labels."""

    _exts = (".npy",)

    def __init__(self, path: str | Path, resolution: int, channels: int, label_dim: int = 0,
                 codec: Any = None) -> None:
        from .latents import LatentCodec

        self.codec = codec if codec is not None else LatentCodec()
        super().__init__(path, resolution, channels, label_dim, xflip=False)

    def _read(self, i: int) -> np.ndarray:
        name = self._names[i]
        try:
            arr = np.load(io.BytesIO(self._read_bytes(i)), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{self.name}: {name} is not a readable .npy array ({type(exc).__name__}): the "
                            f"encoded dataset is corrupt, encode it again") from None
        return arr

    def _check_shape(self, arr: np.ndarray, name: str) -> None:
        want = (2 * self.channels, self.resolution, self.resolution)
        if arr.shape != want or arr.dtype.kind != "f":
            raise DataError(f"encoded dataset {self.name} holds {arr.dtype} arrays of shape {list(arr.shape)} ({name}) "
                            f"but data.channels {self.channels} and data.resolution {self.resolution} need float "
                            f"{list(want)} (means and stds): fix data.* or the path")

    def mean_std(self, indices: Any) -> torch.Tensor:
        """The stored posteriors [N, 2C, R, R] float32 of `indices`."""
        raw, _ = self._split(indices)
        out = np.empty([len(raw), 2 * self.channels, self.resolution, self.resolution], dtype=np.float32)
        for j, i in enumerate(raw):
            arr = self._read(int(i))
            self._check_shape(arr, self._names[int(i)])
            out[j] = arr
        return torch.from_numpy(out)

    def get_batch(self, indices: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(final latents [N, C, R, R] freshly drawn from the posteriors with `generator`, labels)."""
        return self.codec.sample_final(self.mean_std(indices), generator), self.labels(indices)

    def _raw_uint8(self, raw: np.ndarray) -> np.ndarray:
        raise DataError(f"{self.name} holds VAE latents, not images: use reference statistics from a file "
                        f"(evaluate.reference, EDM2's img512.pkl through the fetch stage)")


def open_dataset(cfg: dict, codec: Any = None) -> ImageDataset:
    """Open the dataset described by a `data:` config section (see module docstring).

    Keys: kind ('digits' | 'edm_zip' | 'folder', default 'digits'), path (zip/folder),
    resolution (default 8), channels (default 1), label_dim (default 0 = unconditional),
    xflip (default False). `codec`: the `sida.io.latents.LatentCodec` of an ``edm2_latents`` dataset
    (default: EDM2's constants). Raises `DataError` with a one-line message on any mismatch.
    """
    kind = cfg.get("kind", "digits")
    res, ch = int(cfg.get("resolution", 8)), int(cfg.get("channels", 1))
    label_dim, xflip = int(cfg.get("label_dim", 0) or 0), bool(cfg.get("xflip", False))
    if label_dim < 0:
        raise DataError(f"data.label_dim must be >= 0, not {label_dim}")
    if kind == "digits":
        return DigitsDataset(res, ch, label_dim, xflip)
    if kind not in KINDS:
        raise DataError(f"unknown data.kind '{kind}' (known: {', '.join(KINDS)})")
    path = cfg.get("path")
    if not path:
        raise DataError(f"data.kind '{kind}' needs data.path")
    if kind == "edm2_latents":
        if xflip:
            raise DataError("data.xflip does not apply to encoded latents (EDM2 trains without it): set it false")
        return EncodedLatentDataset(path, res, ch, label_dim, codec)
    cls = ZipDataset if kind == "edm_zip" else FolderDataset
    return cls(path, res, ch, label_dim, xflip)
