"""Captioned image sets: a folder with captions.jsonl and WebDataset shards give the same images
(centre crop and resize checked by hand) and captions; the encoded-image cache is reused, rebuilt
for other files or another encoder, and a damaged one is named; bad inputs give one line."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import webdataset as wds

from sida.errors import DataError
from sida.io.captioned import CACHE_FILE, CaptionedImages, FolderSource, ShardSource, center_crop
from sida.io.prompts import open_text_dataset
from tests.test_prompts import CountingEncoder, fake_encode

A, B = (10, 20, 30), (250, 240, 230)
MID = tuple((a + b) // 2 for a, b in zip(A, B))  # (130, 130, 130): exact, no rounding


def _two_colour(width: int, height: int, split: int, vertical: bool = False) -> np.ndarray:
    """uint8 HWC: colour A before column (or row) `split`, B from it on."""
    arr = np.empty([height, width, 3], dtype=np.uint8)
    arr[...] = B
    if vertical:
        arr[:split] = A
    else:
        arr[:, :split] = A
    return arr


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# A 32x16 image, A up to column 14: two box halvings (short side 16 -> 8 -> 4 = the target) average
# 4x4 blocks, so 8x4 blocks of columns [0-3], [4-7], ..., block 3 (columns 12-15) half A half B;
# the centre crop keeps blocks 2..5: A, (A+B)/2, B, B on every row.
# A 4x8 image, A in rows 0-2: no resize, the crop keeps rows 2..5: A, B, B, B.
IMAGES = {"wide.png": _two_colour(32, 16, 14), "tall.png": _two_colour(4, 8, 3, vertical=True),
          "flat.png": np.full([4, 4, 3], 77, dtype=np.uint8)}
CAPTIONS = {"wide.png": "a wide picture ", "tall.png": "a tall one", "flat.png": "\u00e9t\u00e9 grey"}


def _expected() -> torch.Tensor:
    """The three images after crop and resize, by hand (see above), in [-1, 1], NCHW."""
    wide = [[A, MID, B, B]] * 4  # rows of pixels
    tall = [[c] * 4 for c in (A, B, B, B)]
    flat = [[(77, 77, 77)] * 4] * 4
    return torch.tensor([wide, tall, flat], dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1


def write_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, arr in IMAGES.items():
        sub = "sub/" if name == "tall.png" else ""
        (root / sub).mkdir(exist_ok=True)
        (root / (sub + name)).write_bytes(_png(arr))
        lines.append(json.dumps({"file": sub + name, "caption": CAPTIONS[name]}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n\n")
    return root


def write_shards(root: Path) -> str:
    """Two shards: the first two images (captions as .txt, then .json), then the third."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(IMAGES)
    for shard, part in enumerate((names[:2], names[2:])):
        with wds.TarWriter(str(root / f"{shard:06d}.tar")) as tar:
            for k, name in enumerate(part):
                cap = {"txt": CAPTIONS[name]} if k % 2 == 0 else {"json": {"caption": CAPTIONS[name], "url": "x"}}
                tar.write({"__key__": f"s{shard}/{name[:-4]}", "png": _png(IMAGES[name]), **cap})
    return str(root / "{000000..000001}.tar")


class CountingImages:
    """The identity image encoder, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def _open(source, cache_dir=None, encoder=None, encoder_id="identity", encode=fake_encode, **kw) -> CaptionedImages:
    return CaptionedImages(source, encode, encoder or CountingImages(), encoder_id, resolution=4, channels=3,
                           cache_dir=cache_dir, **kw)


def _one_line(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_center_crop_by_hand():
    expect = _expected()
    for k, name in enumerate(IMAGES):
        got = center_crop(PIL.Image.fromarray(IMAGES[name]), 4)
        got = torch.tensor(np.array(got), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1
        assert torch.equal(got, expect[k]), name


def test_folder_and_shards_agree(tmp_path, capsys):
    folder = _open(FolderSource(write_folder(tmp_path / "imgs")), batch=1, progress_every=2)
    err = capsys.readouterr().err
    assert "encoded 2/3 images" in err and err.strip().endswith("encoded 3 images")
    text = CountingEncoder()
    shards = _open(ShardSource(write_shards(tmp_path / "shards")), encode=text)
    assert text.calls == []  # captions are encoded when first asked for
    expect_captions = [c.rstrip() for c in CAPTIONS.values()]
    for ds in (folder, shards):
        assert len(ds) == 3 and ds.label_dim == 0
        x, cond = ds.get_batch(torch.arange(3))
        assert x.dtype == torch.float32 and torch.equal(x, _expected())
        assert ds.prompts([0, 1, 2]) == expect_captions
        assert torch.equal(cond, fake_encode(expect_captions).float())
        assert torch.equal(ds.labels([2, 2]), cond[[2, 2]])
    assert text.calls == [expect_captions]  # once, whatever was drawn: kept per index
    with pytest.raises(DataError, match="index out of range"):
        folder.get_batch([3])


def test_opened_from_config_with_a_latent_encoder(tmp_path):
    """data.image_resolution is what images are cropped to; encode_images makes data.resolution."""
    pool = lambda x: torch.nn.functional.avg_pool2d(x, 2)  # noqa: E731  (a stand-in "VAE", factor 2)
    cfg = {"kind": "captioned_images", "path": str(write_folder(tmp_path / "imgs")), "resolution": 2,
           "channels": 3, "image_resolution": 4, "label_dim": 0}
    ds = open_text_dataset(cfg, fake_encode, encode_images=pool, cache_dir=tmp_path / "cache", encoder_id="pool2")
    assert torch.equal(ds.get_batch([0, 1, 2])[0], pool(_expected()))
    assert (tmp_path / "cache" / CACHE_FILE).is_file()
    cfg.update(channels=1, resolution=4, image_resolution=None)  # grey pixel teachers: images in L mode
    grey = open_text_dataset(cfg, fake_encode).get_batch([2])[0]
    assert torch.equal(grey, torch.full([1, 1, 4, 4], 77.0) / 127.5 - 1)
    cfg.update(channels=4, resolution=2, image_resolution=4)
    with pytest.raises(DataError) as info:
        open_text_dataset(cfg, fake_encode, encode_images=pool, encoder_id="pool2")
    assert "into [3, 3, 2, 2], but data.channels and data.resolution need [3, 4, 2, 2]" in _one_line(info)


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_cache_reused_and_rebuilt(tmp_path, kind):
    if kind == "folder":
        make = lambda: FolderSource(tmp_path / "src")  # noqa: E731
        write_folder(tmp_path / "src")
        changed = tmp_path / "src" / "flat.png"
    else:
        pattern = write_shards(tmp_path / "src")
        make = lambda: ShardSource(pattern)  # noqa: E731
        changed = tmp_path / "src" / "000001.tar"
    cache = tmp_path / "cache"
    first = CountingImages()
    x0 = _open(make(), cache, first).get_batch([0, 1, 2])[0]
    assert first.calls == 1 and (cache / CACHE_FILE).is_file()
    again = CountingImages()
    ds = _open(make(), cache, again)
    assert again.calls == 0 and torch.equal(ds.get_batch([0, 1, 2])[0], x0)  # read back, not encoded
    assert ds.prompts([2]) == [CAPTIONS["flat.png"]]
    # Another encoder: rebuilt, not mixed in.
    other = CountingImages()
    _open(make(), cache, other, encoder_id="vae-2")
    assert other.calls == 1
    # A source file changes (content and mtime): rebuilt, and the new content is what comes back.
    IMAGES["flat.png"][:] = 200
    try:
        if kind == "folder":
            changed.write_bytes(_png(IMAGES["flat.png"]))
        else:
            write_shards(tmp_path / "src")
        st = changed.stat()
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        fresh = CountingImages()
        x1 = _open(make(), cache, fresh, encoder_id="vae-2").get_batch([2])[0]
        assert fresh.calls == 1 and torch.equal(x1, torch.full([1, 3, 4, 4], 200.0) / 127.5 - 1)
    finally:
        IMAGES["flat.png"][:] = 77


def test_corrupt_cache_named(tmp_path):
    source = FolderSource(write_folder(tmp_path / "imgs"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_FILE).write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError) as info:
        _open(source, tmp_path / "cache")
    assert f"{CACHE_FILE} cannot be read" in _one_line(info) and "delete it" in str(info.value)
    np.savez(tmp_path / "cache" / CACHE_FILE, something=np.zeros(2))
    with pytest.raises(DataError, match="is corrupt .*: delete it"):
        _open(source, tmp_path / "cache")


def test_folder_errors(tmp_path):
    root = write_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match="does not exist: check data.path"):
        FolderSource(tmp_path / "nope")
    with (root / "captions.jsonl").open("a") as f:
        f.write('{"file": "missing.png", "caption": "x"}\n')
    with pytest.raises(DataError) as info:
        FolderSource(root)
    assert "captions.jsonl line 5: image missing.png does not exist" in _one_line(info)
    assert "add it or remove the line" in str(info.value)
    (root / "captions.jsonl").write_text('{"file": "wide.png"}\n')
    with pytest.raises(DataError, match='line 1 is not an object with "file" and "caption" strings'):
        FolderSource(root)
    (root / "captions.jsonl").write_text("\n")
    with pytest.raises(DataError, match="lists no image"):
        FolderSource(root)
    (root / "captions.jsonl").unlink()
    with pytest.raises(DataError, match="captions.jsonl does not exist: write captions.jsonl into data.path"):
        FolderSource(root)
    (root / "captions.jsonl").write_text('{"file": "bad.png", "caption": "x"}\n')
    (root / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError) as info:
        _open(FolderSource(root))
    assert "image bad.png cannot be decoded" in _one_line(info)


def test_shard_errors(tmp_path):
    pattern = write_shards(tmp_path / "shards")
    with pytest.raises(DataError) as info:
        ShardSource(pattern.replace("000001", "000003"))
    assert "000002.tar of data.shards" in _one_line(info) and "(2 of 4 missing)" in str(info.value)
    with wds.TarWriter(str(tmp_path / "shards" / "000001.tar")) as tar:
        tar.write({"__key__": "nocap", "png": _png(IMAGES["flat.png"])})
    with pytest.raises(DataError) as info:
        _open(ShardSource(pattern))
    assert "000001.tar sample nocap has no caption (.txt or .json)" in _one_line(info)
    with wds.TarWriter(str(tmp_path / "shards" / "000001.tar")) as tar:
        tar.write({"__key__": "noimg", "txt": "a caption"})
    with pytest.raises(DataError, match="sample noimg has no image"):
        _open(ShardSource(pattern))
    (tmp_path / "shards" / "000001.tar").write_bytes(os.urandom(1024))
    with pytest.raises(DataError) as info:
        _open(ShardSource(pattern))
    assert "000001.tar cannot be read (invalid header): the tar is damaged" in _one_line(info)
