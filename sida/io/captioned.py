"""Captioned image sets, the real data of SiDA / SiD2A text-to-image runs: images encoded once.

Sources:
- a folder with ``captions.jsonl``: one ``{"file": "relative/path.png", "caption": "..."}`` a line;
- WebDataset tar shards (how LAION subsets come): ``{key}.jpg|jpeg|png|webp`` with ``{key}.txt``
  or ``{key}.json`` (its "caption", else "prompt") in the same tar, read with `webdataset`;
  ``data.shards`` is a brace pattern such as ``data/{000000..000009}.tar``.

Every image is centre-cropped and resized as ADM / EDM2 prepare ImageNet (halvings with a box
filter while the short side is at least twice the target, one bicubic resize to it, then the centre
square), mapped to [-1, 1] and passed once through ``encode_images`` (the VAE encoder x scaling
factor for latent teachers, the identity for pixel teachers). The results and the captions are
cached in ``<cache_dir>/captioned_images.npz``, keyed by the source files' paths, sizes and mtimes,
the sizes and the caller's ``encoder_id``: a cache made from other files or by another encoder is
rebuilt, never mixed in. The cache is held in memory (a 64x64x4 latent is 64 kB).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import PIL.Image
import torch

from ..errors import DataError, FileSystemError, describe_os_error, is_os_failure
from .atomic import atomic_write
from .npz import load_npz
from .prompts import (DEFAULT_CACHE_LIMIT, Encode, TextConditioned, caption_of, index_list, jsonl_records,
                      read_text)

CAPTIONS_FILE = "captions.jsonl"
CACHE_FILE = "captioned_images.npz"
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_CACHE_FIX = "delete it; the next run encodes the images again"

Item = tuple[str, bytes, str]  # (name for messages, encoded image file, caption)


class FolderSource:
    """Images of a folder listed with their captions in its ``captions.jsonl``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"captioned image folder {self.root} does not exist: check data.path")
        jsonl = self.root / CAPTIONS_FILE
        fix = f'write {CAPTIONS_FILE} into data.path, one {{"file": ..., "caption": ...}} object a line'
        self._entries: list[tuple[str, str]] = []
        for line, obj in jsonl_records(read_text(jsonl, "captions file", fix), jsonl):
            if not (isinstance(obj, dict) and isinstance(obj.get("file"), str)
                    and isinstance(obj.get("caption"), str)):
                raise DataError(f'{jsonl} line {line} is not an object with "file" and "caption" strings: fix '
                                f'that line')
            if not (self.root / obj["file"]).is_file():
                raise DataError(f"{jsonl} line {line}: image {obj['file']} does not exist in {self.root}: add it or "
                                f"remove the line")
            self._entries.append((obj["file"], obj["caption"]))
        if not self._entries:
            raise DataError(f"captions file {jsonl} lists no image: {fix}")
        self.name, self.total = str(self.root), len(self._entries)
        self.files = [jsonl, *(self.root / f for f, _ in self._entries)]

    def items(self) -> Iterator[Item]:
        for file, caption in self._entries:
            try:
                data = (self.root / file).read_bytes()
            except OSError as exc:  # e.g. removed while it was encoded
                raise FileSystemError(describe_os_error(exc, self.root / file, "read")) from None
            yield file, data, caption


class ShardSource:
    """WebDataset tar shards named by a brace pattern, read in pattern order, samples in tar order."""

    def __init__(self, pattern: str) -> None:
        from webdataset.shardlists import expand_urls

        urls = expand_urls(pattern)
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise DataError(f"shard {missing[0]} of data.shards {pattern} does not exist ({len(missing)} of "
                            f"{len(urls)} missing): fix the pattern or fetch the shards")
        self.name, self.total = pattern, None  # the sample count is known only after reading
        self.files = [Path(u) for u in urls]

    def items(self) -> Iterator[Item]:
        import webdataset as wds

        for shard in self.files:
            # One shard at a time, so a damaged one is named; no node/worker split: every rank
            # reads every sample, in order, as indices address them.
            samples = wds.WebDataset([str(shard)], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                     empty_check=False)
            try:
                for sample in samples:
                    yield _shard_item(sample, f"shard {shard} sample {sample['__key__']}")
            except (tarfile.TarError, OSError, ValueError) as exc:
                if is_os_failure(exc):
                    raise FileSystemError(describe_os_error(exc, shard, "read")) from None
                # webdataset re-raises with (message, stream, url) as the arguments: the message only
                why = exc.args[0] if exc.args and isinstance(exc.args[0], str) else type(exc).__name__
                raise DataError(f"shard {shard} cannot be read ({why}): the tar is damaged, fetch it again") from None


def _shard_item(sample: dict, where: str) -> Item:
    ext = next((e for e in SHARD_IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise DataError(f"{where} has no image (.{', .'.join(SHARD_IMAGE_EXTS)}): add it or remove the sample")
    try:
        if "txt" in sample:
            caption = sample["txt"].decode("utf-8")
        elif "json" in sample:
            caption = caption_of(json.loads(sample["json"]), f"{where} .json")
        else:
            raise DataError(f"{where} has no caption (.txt or .json): add one or remove the sample")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: the caption is not UTF-8 JSON or text ({type(exc).__name__}): rewrite it") from None
    return f"{sample['__key__']}.{ext}", sample[ext], caption


def center_crop(image: PIL.Image.Image, size: int) -> np.ndarray:
    """ADM's / EDM2's ``center_crop_arr``: box halvings while the short side is >= 2 size, a bicubic
    resize of the short side to `size`, then the centre square, as uint8 HW or HWC."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=PIL.Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=PIL.Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def _pixels(data: bytes, name: str, where: str, size: int, mode: str) -> np.ndarray:
    """One image file's bytes -> uint8 [C, size, size]."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as im:
            arr = center_crop(im.convert(mode), size)
    except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises for damaged files
        raise DataError(f"{where}: image {name} cannot be decoded ({type(exc).__name__}): replace or remove "
                        f"it") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def cache_key(files: list[Path], sizes: dict[str, int], encoder_id: str) -> str:
    """sha256 of the source files' absolute paths, sizes and mtimes, the sizes and the encoder."""
    stats = []
    for f in files:
        try:
            st = f.stat()
        except OSError as exc:  # removed since it was listed
            raise FileSystemError(describe_os_error(exc, f, "read")) from None
        stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"files": stats, "sizes": sizes, "encoder": encoder_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _load_cache(path: Path, key: str) -> tuple[torch.Tensor, list[str]] | None:
    """The cached (encoded images, captions), or None when there is none or it has another key."""
    if not path.exists():
        return None
    arrays = load_npz(path, "captioned-image cache", _CACHE_FIX)
    try:
        if str(arrays["key"]) != key:
            print(f"captioned images: {path} was made from other files or by another encoder: encoding again",
                  file=sys.stderr, flush=True)
            return None
        x, captions = arrays["x"], json.loads(arrays["captions"].tobytes().decode("utf-8"))
        if x.dtype != np.float32 or x.ndim != 4 or not isinstance(captions, list) or len(captions) != len(x):
            raise ValueError("inconsistent arrays")
    except (KeyError, ValueError, UnicodeDecodeError):
        raise DataError(f"captioned-image cache {path} is corrupt (its arrays do not match): {_CACHE_FIX}") from None
    return torch.from_numpy(x), captions


def _save_cache(path: Path, key: str, x: torch.Tensor, captions: list[str]) -> None:
    # Captions as one UTF-8 JSON byte string: a numpy unicode array pads every one to the longest.
    blob = np.frombuffer(json.dumps(captions).encode("utf-8"), dtype=np.uint8)
    with atomic_write(path, suffix=".npz") as tmp:
        np.savez(tmp, key=np.array(key), x=x.numpy(), captions=blob)


class CaptionedImages(TextConditioned):
    """Encoded images with their captions (see the module docstring); conditions are the encoded
    captions [n, L, D], kept per index like `sida.io.prompts.PromptDataset`'s."""

    def __init__(self, source: FolderSource | ShardSource, encode: Encode,
                 encode_images: Callable[[torch.Tensor], torch.Tensor] | None, encoder_id: str,
                 resolution: int, channels: int, image_resolution: int | None = None,
                 cache_dir: str | Path | None = None, cache_limit: int = DEFAULT_CACHE_LIMIT,
                 batch: int = 32, progress_every: int = 1000) -> None:
        self.resolution, self.channels = int(resolution), int(channels)
        self.image_resolution = int(image_resolution or resolution)
        self._encode_images = encode_images if encode_images is not None else (lambda x: x)
        self._batch, self._every = int(batch), int(progress_every)
        sizes = {"resolution": self.resolution, "channels": self.channels, "image_resolution": self.image_resolution}
        key = cache_key(source.files, sizes, encoder_id)
        path = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
        loaded = _load_cache(path, key) if path is not None else None
        if loaded is None:
            loaded = self._encode_all(source)
            if path is not None:
                _save_cache(path, key, *loaded)
        self._x, captions = loaded
        super().__init__(source.name, captions, encode, cache_limit)

    def _encode_all(self, source: FolderSource | ShardSource) -> tuple[torch.Tensor, list[str]]:
        mode = "L" if self.channels == 1 else "RGB"  # 4 (latent) channels come from RGB images
        out: list[torch.Tensor] = []
        captions: list[str] = []
        pending: list[np.ndarray] = []
        of = f"/{source.total}" if source.total else ""
        for name, data, caption in source.items():
            pending.append(_pixels(data, name, source.name, self.image_resolution, mode))
            captions.append(caption.rstrip())
            if len(pending) == self._batch:
                out.append(self._encode_batch(pending))
                pending = []
                if len(captions) // self._every > (len(captions) - self._batch) // self._every:
                    print(f"captioned images: {source.name}: encoded {len(captions)}{of} images", file=sys.stderr,
                          flush=True)
        if pending:
            out.append(self._encode_batch(pending))
        if not captions:
            raise DataError(f"{source.name} holds no sample: check data.shards")
        print(f"captioned images: {source.name}: encoded {len(captions)} images", file=sys.stderr, flush=True)
        return torch.cat(out), captions

    def _encode_batch(self, pixels: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(pixels)).to(torch.float32) / 127.5 - 1
        with torch.no_grad():
            z = self._encode_images(x)
        want = [len(pixels), self.channels, self.resolution, self.resolution]
        if list(z.shape) != want:
            raise DataError(f"encode_images turned {len(pixels)} images of {self.image_resolution}x"
                            f"{self.image_resolution} into {list(z.shape)}, but data.channels and data.resolution "
                            f"need {want}: fix data.channels / data.resolution / data.image_resolution")
        return z.detach().to(torch.float32).cpu()

    def get_batch(self, indices: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoded images float32 [n, C, H, W], encoded captions [n, L, D]); nothing is random."""
        idx = index_list(indices, len(self), self.name)
        return self._x[torch.as_tensor(idx, dtype=torch.int64)], self._embed(idx)

    def __repr__(self) -> str:
        return (f"CaptionedImages({self.name}, {len(self)} images, {self.channels}x{self.resolution}x"
                f"{self.resolution}, cached captions={self._embed.cached})")
