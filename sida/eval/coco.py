"""Zero-shot COCO evaluation of text-to-image generators: the protocol's pieces.

GigaGAN's evaluation (github.com/mingukkang/GigaGAN, evaluation/), which SiD-LSG
(``evaluate_SiD_t2i_coco256.sh``) and DMD2 (``main/coco_eval``) run:

- **prompts**: 30,000 COCO-2014 val captions, DMD2's ``captions_coco14_test`` (one caption per
  line; the same list as a pickle on the hub). Sample ``i`` gets caption ``i mod N`` (DMD2 draws
  them in file order, one per sample): evaluation seed ``i`` -> caption ``i mod N``, so a run of
  30,000 seeds from 0 uses every caption once, in order. `read_captions` also reads a COCO
  annotations ``.json`` (one caption per image: the lowest annotation id, images by id), for the
  COCO-2017 5k protocol of ADD's paper.
- **images**: every image, real and generated, is centre-cropped to a square on its long edge
  (torchvision's ``center_crop`` rounding) and resized to 256 px with PIL's Lanczos filter
  (`prepare_image`); then clean-fid's Inception in "clean" mode (PIL-bicubic resize to 299,
  `sida.eval.features.InceptionExtractor(mode="clean")`) gives the features.
- **reference**: every image of COCO-2014 val (``val2014/``, 40,504 images; GigaGAN and DMD2
  point clean-fid at the whole folder), prepared the same way. No published statistics file
  exists for this protocol, so `reference_stats` computes them once from a folder or zip and
  caches them atomically, keyed by the file list, the extractor's weights and the resolution.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import AssetError, ConfigError, DataError, brief_reason, require_file
from ..io.assets import sha256_file
from ..io.atomic import atomic_write
from ..io.npz import load_npz
from .clip_score import to_uint8_images
from .features import Extractor
from .metrics import feature_stats
from .refstats import Reference

__all__ = ["Protocol", "PROTOCOLS", "get_protocol", "read_captions", "caption_index", "prompts_for_seeds",
           "center_crop_box", "prepare_image", "prepare_images", "list_reference_images", "reference_stats"]


@dataclass(frozen=True)
class Protocol:
    """A named zero-shot protocol: its image size, sample count, and what its files are."""

    name: str
    resolution: int
    num_samples: int
    captions: str
    images: str


PROTOCOLS = {
    "coco2014-30k": Protocol("coco2014-30k", 256, 30_000, "DMD2's captions_coco14_test (30,000 COCO-2014 val captions)",
                             "COCO-2014 val, val2014/ (40,504 images)"),
    "coco2017-5k": Protocol("coco2017-5k", 256, 5_000, "captions_val2017.json (one caption per image)",
                            "COCO-2017 val, val2017/ (5,000 images)"),
}

#: clean-fid's image extensions (it lists a folder recursively with these).
IMAGE_EXTENSIONS = frozenset({"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"})


def get_protocol(name: str) -> Protocol:
    """The protocol called `name`, or a one-line ConfigError listing the known ones."""
    if name not in PROTOCOLS:
        raise ConfigError(f"evaluate.coco.protocol: unknown protocol '{name}' (known: {', '.join(PROTOCOLS)})")
    return PROTOCOLS[name]


# --------------------------------------------------------------------------------------------
# Captions

class _NoGlobalsUnpickler(pickle.Unpickler):
    """A list of strings pickles without any global: refusing every global runs no code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it references {module}.{name}, a list of strings does not")


def _coco_annotations(raw: object, path: Path) -> list[str]:
    """One caption per image of a COCO captions annotations file: the lowest annotation id,
    images in ascending id (the file's order is not the protocol's)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("annotations"), list):
        raise DataError(f"captions file {path} is JSON but not COCO captions annotations (no 'annotations' list)")
    first: dict[int, tuple[int, str]] = {}
    for a in raw["annotations"]:
        if not isinstance(a, dict) or not {"image_id", "id", "caption"} <= set(a):
            raise DataError(f"captions file {path}: an annotation lacks image_id, id or caption")
        if a["image_id"] not in first or a["id"] < first[a["image_id"]][0]:
            first[a["image_id"]] = (a["id"], a["caption"])
    return [first[i][1].strip() for i in sorted(first)]


def read_captions(path: str | Path, asset: str = "captions") -> list[str]:
    """The prompts of a captions file, in protocol order.

    ``.txt``: one caption per line, stripped, blank lines skipped (as DMD2 reads it); ``.pkl``:
    a pickled list of strings (DMD2's hub copy; read without running code); ``.json``: COCO
    captions annotations (`_coco_annotations`). Errors are one line naming the file and the fix.
    """
    path = Path(path)
    fix = f"run the fetch stage (an asset of kind captions named '{asset}') or set evaluate.prompts to the file"
    require_file(path, "captions file", AssetError, fix)
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif suffix in (".pkl", ".pickle"):
            with open(path, "rb") as f:
                captions = _NoGlobalsUnpickler(f).load()
        elif suffix == ".json":
            captions = _coco_annotations(json.loads(path.read_text(encoding="utf-8")), path)
        else:
            raise DataError(f"captions file {path}: unknown format '{suffix}' (.txt one caption per line, .pkl a "
                            f"list of strings, or COCO annotations .json)")
    except (DataError, OSError):
        raise
    except Exception as exc:  # UnicodeDecodeError, JSONDecodeError, UnpicklingError, EOFError, ...
        raise DataError(f"captions file {path} cannot be read as {suffix} ({brief_reason(exc)}): download it "
                        f"again or fix evaluate.prompts") from None
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise DataError(f"captions file {path} does not hold a list of strings")
    if not captions:
        raise DataError(f"captions file {path} holds no captions")
    return captions


def caption_index(seed: int, num_captions: int) -> int:
    """The caption of evaluation seed `seed`: ``seed mod N``, so seeds 0..N-1 take every caption
    once, in file order (DMD2's order)."""
    return seed % num_captions


def prompts_for_seeds(captions: list[str], seeds: range | list[int]) -> list[str]:
    """The prompt of every seed, in order."""
    return [captions[caption_index(s, len(captions))] for s in seeds]


# --------------------------------------------------------------------------------------------
# Images

def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred square on the short side, rounded as
    torchvision's ``center_crop`` rounds (Python's round, half to even), which GigaGAN uses."""
    s = min(width, height)
    left, top = int(round((width - s) / 2.0)), int(round((height - s) / 2.0))
    return left, top, left + s, top + s


def prepare_image(img, resolution: int) -> np.ndarray:
    """A PIL image -> uint8 [resolution, resolution, 3]: RGB, centre crop to a square, Lanczos
    resize (PIL), as the protocol does to real and generated images alike."""
    from PIL import Image

    img = img.convert("RGB")
    img = img.crop(center_crop_box(*img.size))
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def prepare_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Generated images (uint8 NCHW, or [-1, 1] float quantised as saved) -> uint8 NCHW at the
    protocol's resolution, prepared as `prepare_image` (on the host)."""
    from PIL import Image

    u8 = to_uint8_images(images).cpu()
    if u8.shape[1] == 1:
        u8 = u8.repeat(1, 3, 1, 1)
    out = [prepare_image(Image.fromarray(np.ascontiguousarray(a)), resolution) for a in u8.permute(0, 2, 3, 1).numpy()]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _is_image(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def list_reference_images(path: str | Path) -> list[tuple[str, int]]:
    """(name, size in bytes) of every image in a folder (recursively, as clean-fid lists it) or a
    zip, sorted by name; a one-line AssetError when there is none or the path is missing."""
    path = Path(path)
    fix = "run the fetch stage (an asset of kind images) or set evaluate.coco.images to the folder or zip"
    if not path.exists():
        raise AssetError(f"reference images {path} do not exist: {fix}")
    if path.is_dir():
        files = [(p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*")
                 if p.is_file() and _is_image(p.name)]
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            files = [(i.filename, i.file_size) for i in z.infolist() if not i.is_dir() and _is_image(i.filename)]
    else:
        raise AssetError(f"reference images {path} are neither a folder nor a zip: {fix}")
    if not files:
        raise AssetError(f"reference images {path} hold no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): {fix}")
    return sorted(files)


def _prepared_batches(path: Path, names: list[str], resolution: int, batch: int,
                      workers: int) -> Iterator[torch.Tensor]:
    """uint8 NCHW batches of the prepared reference images (decoded and resized in threads: PIL
    releases the GIL for both)."""
    from PIL import Image

    zf = zipfile.ZipFile(path) if path.is_file() else None

    def load(name: str) -> np.ndarray:
        try:
            if zf is not None:
                with zf.open(name) as f:
                    return prepare_image(Image.open(f), resolution)
            with Image.open(path / name) as im:
                return prepare_image(im, resolution)
        except Exception as exc:
            raise DataError(f"reference image {name} in {path} cannot be read ({brief_reason(exc)}): "
                            f"replace the file or download the images again") from None

    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for i in range(0, len(names), batch):
                arrays = list(pool.map(load, names[i:i + batch]))
                yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    finally:
        if zf is not None:
            zf.close()


def _check_extractor(extractor: Extractor) -> None:
    if extractor.name != "inception" or extractor.mode != "clean":
        raise ConfigError(f"the zero-shot COCO FID uses clean-fid's Inception in clean mode, not {extractor.name} "
                          f"({extractor.mode}): set evaluate.extractor: inception and evaluate.inception_mode: clean")


def reference_stats(images: str | Path, extractor: Extractor, resolution: int, cache_dir: str | Path,
                    batch: int = 250, workers: int = 8) -> Reference:
    """FID reference statistics of every image under `images` (folder or zip), prepared at
    `resolution` and passed through `extractor` (clean-mode Inception), cached atomically in
    `cache_dir` by a key of (file names and sizes, extractor weights and mode, resolution).

    Runs on the calling process only: under torchrun call it on the main rank and let the others
    wait at a barrier (40,504 images take minutes on one GPU, once).
    """
    _check_extractor(extractor)
    images = Path(images)
    files = list_reference_images(images)
    key = json.dumps({"files": files, "extractor": extractor.sha256, "mode": extractor.mode,
                      "resolution": resolution}, sort_keys=True)
    path = Path(cache_dir) / f"refstats-coco-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if not path.is_file():
        device = next(extractor.parameters(), torch.empty(0)).device
        feats = [extractor(b.to(device))[0].cpu() for b in
                 _prepared_batches(images, [n for n, _ in files], resolution, batch, workers)]
        mu, sigma = feature_stats(torch.cat(feats))
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, num_images=len(files), resolution=resolution,
                     extractor_sha256=extractor.sha256)
    z = load_npz(path, "COCO reference cache", "delete it and rerun (it is recomputed)")
    return Reference(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), "coco", str(path),
                     sha256_file(path), int(z["num_images"]), int(z["resolution"]))
