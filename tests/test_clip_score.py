"""CLIP score (sida.eval.clip_score): a tiny open_clip model with random weights saved to a file
stands in for ViT-g-14; the score equals a hand computation from the model's encoders, the
preprocessing is checked on hand-made images, and bad inputs fail in one line."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sida.errors import AssetError, ConfigError, DataError
from sida.eval.clip_score import GIGAGAN_PREFIX, ClipScorer
from sida.io.images import quantize
from zero_shot_assets import CLIP_SIZE as SIZE, TINY_CLIP as TINY, save_tiny_clip

# open_clip's default (OpenAI) normalisation, which ViT-g-14's laion2b weights use too.
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def scorer(weights):
    return ClipScorer(TINY, weights)


def test_score_is_the_cosine_of_the_encoders(scorer):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    prompts = ["a cat on a mat", "two dogs", "a red bus in the rain"]
    got = scorer.score(images, prompts)
    # By hand: a SIZE x SIZE image is neither resized nor cropped; /255 then mean/std.
    x = (images.float() / 255 - MEAN) / STD
    import open_clip

    tokens = open_clip.tokenize([GIGAGAN_PREFIX + p for p in prompts])
    with torch.no_grad():
        a, b = scorer.model.encode_image(x), scorer.model.encode_text(tokens)
    want = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert got.shape == (3,) and torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got, F.cosine_similarity(a, b), atol=1e-5)
    # [-1, 1] floats score as their saved (quantised) PNGs
    floats = torch.rand(3, 3, SIZE, SIZE, generator=g) * 2 - 1
    assert torch.equal(scorer.score(floats, prompts), scorer.score(quantize(floats), prompts))


def test_preprocessing_on_hand_made_images(scorer):
    # 48 x 16 (W x H): the shorter side is already 16, so only the centre crop acts: columns
    # 16..31 survive, the red and blue margins do not.
    img = torch.zeros(1, 3, SIZE, 3 * SIZE, dtype=torch.uint8)
    img[0, 0, :, :SIZE] = 255
    img[0, 2, :, 2 * SIZE:] = 255
    centre = torch.arange(3 * SIZE * SIZE, dtype=torch.int64).view(3, SIZE, SIZE) % 251
    img[0, :, :, SIZE:2 * SIZE] = centre.to(torch.uint8)
    want = (centre.float() / 255 - MEAN) / STD
    assert torch.allclose(scorer.pixel_inputs(img)[0], want, atol=1e-6)
    # A constant 40 x 24 image: bicubic resize to 26 x 16 and the crop keep the colour exactly.
    const = torch.tensor([200, 30, 90], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 24, 40).contiguous()
    got = scorer.pixel_inputs(const)[0]
    want = (torch.tensor([200, 30, 90]).float().view(3, 1, 1) / 255 - MEAN) / STD
    assert got.shape == (3, SIZE, SIZE) and torch.allclose(got, want.expand(3, SIZE, SIZE), atol=1e-6)
    # grayscale is repeated to RGB
    gray = torch.full((1, 1, SIZE, SIZE), 77, dtype=torch.uint8)
    assert torch.allclose(scorer.pixel_inputs(gray), scorer.pixel_inputs(gray.repeat(1, 3, 1, 1)))


def test_prompt_prefix_and_truncation(scorer):
    plain = ClipScorer.__new__(ClipScorer)
    plain.tokenizer, plain.prefix = scorer.tokenizer, ""
    with_prefix, without = scorer.tokens(["a cat"])[0], plain.tokens(["a cat"])[0]
    n_with, n_without = int((with_prefix != 0).sum()), int((without != 0).sum())
    assert with_prefix[0] == SOT and n_with == n_without + 3  # "a photo depicts": three tokens
    assert with_prefix[n_with - 1] == EOT and torch.equal(with_prefix[4:n_with], without[1:n_without])
    long = scorer.tokens(["word " * 200])[0]
    assert long.shape == (77,) and long[-1] == EOT  # truncated, the end token kept (as GigaGAN's)


def test_safetensors_weights_score_alike(scorer, weights, tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in torch.load(weights).items()}, tmp_path / "tiny.safetensors")
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    other = ClipScorer(TINY, tmp_path / "tiny.safetensors")
    assert torch.equal(other.score(images, ["a", "b"]), scorer.score(images, ["a", "b"]))


def test_bad_inputs_one_line(scorer, weights, tmp_path):
    with pytest.raises(AssetError, match="does not exist: run the fetch stage \\(an asset of kind clip named 'clip'"):
        ClipScorer(TINY, tmp_path / "missing.bin")
    (tmp_path / "torn.bin").write_bytes(b"<html>not found</html>")
    with pytest.raises(AssetError, match="cannot be loaded into") as exc:
        ClipScorer(TINY, tmp_path / "torn.bin", asset="clip-vitg14")
    assert "\n" not in str(exc.value) and "clip-vitg14" in str(exc.value)
    torch.save({"other.weight": torch.zeros(2)}, tmp_path / "other.bin")  # readable, another model's
    with pytest.raises(AssetError, match="other.bin cannot be loaded into sida-tiny-clip \\(Error"):
        ClipScorer(TINY, tmp_path / "other.bin")
    (tmp_path / "torn.safetensors").write_bytes(b"\xff" * 8 + b"{")
    with pytest.raises(AssetError, match="not a safetensors file"):
        ClipScorer(TINY, tmp_path / "torn.safetensors")
    with pytest.raises(ConfigError, match="has no model 'ViT-nope'"):
        ClipScorer("ViT-nope", weights)
    with pytest.raises(DataError, match="one prompt per image: 2 images, 1 prompts"):
        scorer.score(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8), ["x"])
    with pytest.raises(DataError, match="uint8 or float"):
        scorer.score(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.int32), ["x"])
    assert np.isfinite(scorer.score(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), [""]).numpy()).all()
