"""A CLIP tokenizer with the real CLIP vocabulary and a small frozen CLIP text encoder, built
without downloads: the text side of the CPU text-to-image testbed (`sida.io.digits_text`).

The vocabulary is derived from the BPE merges file open_clip ships
(`open_clip/bpe_simple_vocab_16e6.txt.gz`) exactly as CLIP builds it: the 256 byte-unicode
symbols, their `</w>` (end of word) forms, one entry per merge, then `<|startoftext|>` (49406)
and `<|endoftext|>` (49407): 49408 ids, the ids of every published CLIP text tower. The text
encoder is a transformers `CLIPTextModel` from a config (random init from a fixed seed); the
condition a UNet sees is its `last_hidden_state` [n, max_length, width], as in Stable Diffusion.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from ..errors import AssetError, ConfigError
from .atomic import atomic_write_json, atomic_write_text

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
# CLIP keeps the first 49152 - 256 - 2 merges of the file (its line 0 is a version header).
NUM_MERGES = 49152 - 256 - 2


def _bpe_file() -> Path:
    try:
        from open_clip.tokenizer import default_bpe
    except ImportError:
        raise AssetError("open_clip is not installed: it ships the CLIP BPE vocabulary (pip install "
                         "open_clip_torch)") from None
    return Path(default_bpe())


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's token -> id table and its merges ("a b" strings, in rank order)."""
    from open_clip.tokenizer import bytes_to_unicode

    path = _bpe_file()
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except OSError as exc:
        raise AssetError(f"CLIP BPE vocabulary {path} is unreadable ({exc}): reinstall open_clip_torch") from None
    merges = lines[1:1 + NUM_MERGES]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise AssetError(f"CLIP BPE vocabulary {path} gives {len(vocab)} tokens, not {VOCAB_SIZE}: "
                         f"reinstall open_clip_torch")
    return vocab, merges


def write_clip_tokenizer(directory: str | Path, max_length: int) -> Path:
    """Write a `CLIPTokenizer` folder (vocab.json, merges.txt, tokenizer_config.json) whose
    `model_max_length` is `max_length`; returns the folder."""
    directory = Path(directory)
    vocab, merges = clip_vocab_and_merges()
    atomic_write_text(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(directory / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    # Padding with <|endoftext|>, as Stable Diffusion 1.x's tokenizer pads.
    atomic_write_json(directory / "tokenizer_config.json",
                      {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS,
                       "eos_token": EOS, "pad_token": EOS, "unk_token": EOS})
    return directory


def clip_tokenizer(max_length: int):
    """The `CLIPTokenizer` `write_clip_tokenizer` writes, built in memory."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=max_length)


def load_clip_tokenizer(directory: str | Path):
    """The `CLIPTokenizer` of a folder written by `write_clip_tokenizer` (or any CLIP tokenizer folder)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(directory))


def make_text_encoder(width: int, layers: int, heads: int, max_length: int, seed: int):
    """A frozen `CLIPTextModel` with CLIP's vocabulary and special ids, random weights from `seed`
    (the global RNG is left where it was)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if width % heads:
        raise ConfigError(f"teacher.text.heads {heads} does not divide teacher.text.width {width}: pick heads "
                          f"that divide the width")
    config = CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=4 * width,
                            projection_dim=width, num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=max_length, bos_token_id=VOCAB_SIZE - 2,
                            eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return model.eval().requires_grad_(False)
