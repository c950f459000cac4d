"""Prompt sets: every file format read to its exact list, one-line errors for bad files, and the
PromptDataset's draws and embedding cache (a fake deterministic text encoder stands in for CLIP)."""

from __future__ import annotations

import json
from typing import Sequence

import pytest
import torch

from sida.errors import ConfigError, DataError
from sida.io.prompts import PromptDataset, open_text_dataset, read_prompts
from sida.run.config import validate
from sida.train.draws import Draws, capture_rng, make_generators, restore_rng


def fake_encode(prompts: Sequence[str]) -> torch.Tensor:
    """[n, 4, 3]: character codes hashed into position (j % 4) and bucket (code % 3), weighted by
    position, so every prompt gets its own tensor and a prompt's tensor never depends on its batch."""
    out = torch.zeros(len(prompts), 4, 3, dtype=torch.float64)  # float64: the dataset makes float32
    for i, p in enumerate(prompts):
        for j, ch in enumerate(p):
            out[i, j % 4, ord(ch) % 3] += 1 + j
    return out


class CountingEncoder:
    """`fake_encode`, recording the prompt lists it was called with."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        self.calls.append(list(prompts))
        return fake_encode(prompts)


def _one_line(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_fake_encoder_by_hand():
    # "ab": a (97 % 3 = 1) at position 0 weighs 1, b (98 % 3 = 2) at position 1 weighs 2.
    expect = torch.zeros(4, 3, dtype=torch.float64)
    expect[0, 1], expect[1, 2] = 1, 2
    assert torch.equal(fake_encode(["ab"])[0], expect)


def test_text_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("a cat  \n\n  a dog\r\n   \n\u00fcber caf\u00e9\n".encode())
    assert read_prompts(path) == ["a cat", "  a dog", "\u00fcber caf\u00e9"]
    path.write_bytes(b"\xef\xbb\xbfone\ntwo")  # a byte-order mark (Windows editors) is not text
    assert read_prompts(path) == ["one", "two"]


@pytest.mark.parametrize("content, expect", [
    (["x ", "", "y"], ["x", "y"]),
    ([{"caption": "p"}, {"prompt": "q"}, {"caption": "r", "prompt": "ignored"}], ["p", "q", "r"]),
    ({"info": {}, "images": [{"id": 7}], "annotations": [{"image_id": 7, "id": 2, "caption": "A b.\n"},
                                                         {"image_id": 3, "id": 1, "caption": " c"}]},
     ["A b.", " c"]),
])
def test_json_shapes(tmp_path, content, expect):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(content))
    assert read_prompts(path) == expect


def test_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"caption": "a"}\n\n"b"\n{"prompt": "c", "x": 1}\n')
    assert read_prompts(path) == ["a", "b", "c"]


def test_bad_files(tmp_path):
    with pytest.raises(DataError) as info:
        read_prompts(tmp_path / "nope.txt")
    assert "prompt file" in _one_line(info) and "nope.txt does not exist: check data.prompts" in str(info.value)
    for name, content in (("empty.txt", b""), ("blank.txt", b" \n\n\t\n"), ("empty.json", b"[]")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError) as info:
            read_prompts(tmp_path / name)
        assert f"{name} holds no prompt" in _one_line(info) and "one prompt a line" in str(info.value)
    (tmp_path / "latin1.txt").write_bytes("ok\nna\u00efve\n".encode("latin-1"))
    with pytest.raises(DataError) as info:
        read_prompts(tmp_path / "latin1.txt")
    assert "latin1.txt line 2 is not UTF-8 text (byte 0xef)" in _one_line(info) and "iconv" in str(info.value)
    (tmp_path / "latin1.json").write_bytes('[\n"a",\n"\u00e9"]'.encode("latin-1"))
    with pytest.raises(DataError, match="latin1.json line 3 is not UTF-8"):
        read_prompts(tmp_path / "latin1.json")


@pytest.mark.parametrize("content, expect", [
    ('{"a": 1}', 'holds a JSON dict, not a list of strings'),
    ('"just one"', "holds a JSON str"),
    ('[1, "a"]', 'bad.json [0] is a int without a "caption" or "prompt" string'),
    ('{"annotations": [{"image_id": 1, "caption": 5}]}', "bad.json annotations[0] is a dict without"),
    ('[{"text": "a"}]', "[0] is a dict without"),
    ('{"a": ', "bad.json is not valid JSON (line 1"),
])
def test_bad_json(tmp_path, content, expect):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        read_prompts(path)
    assert expect in _one_line(info)
    assert "fix" in str(info.value) or "convert" in str(info.value)


def test_bad_jsonl_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('"a"\n{"caption": \n')
    with pytest.raises(DataError) as info:
        read_prompts(path)
    assert "p.jsonl line 2 is not valid JSON" in _one_line(info) and "fix that line" in str(info.value)


PROMPTS = [f"a photo of the digit {d} number {k}" for k in range(10) for d in range(10)]  # 100, all distinct


def test_prompt_dataset_cache_equals_fresh_encodes():
    enc = CountingEncoder()
    ds = PromptDataset(PROMPTS, enc)
    assert len(ds) == 100 and ds.label_dim == 0
    assert ds.prompts(torch.tensor([3, 0, 3])) == [PROMPTS[3], PROMPTS[0], PROMPTS[3]]
    assert enc.calls == []  # nothing is encoded before a condition is asked for
    y = ds.labels(torch.tensor([3, 0, 3]))
    assert y.dtype == torch.float32 and y.shape == (3, 4, 3)
    assert torch.equal(y, fake_encode([PROMPTS[3], PROMPTS[0], PROMPTS[3]]).float())
    # The whole set is encoded once in fixed chunks of 64, whatever was asked first ...
    assert enc.calls == [PROMPTS[:64], PROMPTS[64:]]
    y2 = ds.labels([99, 5])
    assert torch.equal(y2, fake_encode([PROMPTS[99], PROMPTS[5]]).float())
    assert len(enc.calls) == 2  # ... and never again


def test_prompt_dataset_large_sets_encode_each_draw():
    enc = CountingEncoder()
    ds = PromptDataset(PROMPTS, enc, cache_limit=50)
    for idx in ([7, 7, 1], [60]):
        assert torch.equal(ds.labels(idx), fake_encode([PROMPTS[i] for i in idx]).float())
    assert enc.calls == [[PROMPTS[7], PROMPTS[7], PROMPTS[1]], [PROMPTS[60]]]


def test_prompt_dataset_draws_replay():
    """The loop's slot generators draw the indices; restoring their state replays prompts and
    conditions exactly (what a resumed run relies on)."""
    ds = PromptDataset(PROMPTS, fake_encode)
    gens = make_generators(seed=3, rank=0, device=torch.device("cpu"), rounds=2)
    draws = Draws(gens, rounds=2, micro=4, device=torch.device("cpu"), dataset=ds, img_shape=(1, 8, 8),
                  label_dim=0, text=True, precision="fp32", augment=None)
    state = capture_rng(gens)
    first = [draws.indices(4, r) for r in range(2)]
    conds = [draws.labels(4, r) for r in range(2)]  # a text run's conditions: the drawn prompts' embeddings
    restore_rng(gens, state)
    again = [draws.indices(4, r) for r in range(2)]
    for a, b in zip(first, again):
        assert torch.equal(a, b) and ds.prompts(a) == ds.prompts(b) and torch.equal(ds.labels(a), ds.labels(b))
    assert not torch.equal(first[0], first[1])  # the two slots draw from their own streams
    restore_rng(gens, state)
    for r in range(2):
        draws.indices(4, r)
    assert all(torch.equal(draws.labels(4, r), c) for r, c in enumerate(conds))


def test_prompt_dataset_errors():
    ds = PromptDataset(["a", "b"], fake_encode, name="p.txt")
    with pytest.raises(DataError, match=r"p.txt: index out of range \(dataset has 2 items\)"):
        ds.labels([2])
    with pytest.raises(DataError) as info:
        ds.get_batch([0])
    assert "without images" in _one_line(info) and "data.kind captioned_images" in str(info.value)
    bad = PromptDataset(["a"], lambda p: torch.zeros(len(p), 5))
    with pytest.raises(DataError, match=r"returned \[1, 5\] for 1 prompts, not \[n, L, D\]"):
        bad.labels([0])


def test_open_text_dataset_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    ds = open_text_dataset({"kind": "prompts", "prompts": str(tmp_path / "p.txt"), "embed_cache": 1}, fake_encode)
    assert isinstance(ds, PromptDataset) and ds.prompts([1, 0]) == ["two", "one"]
    assert not ds._embed.cached  # 2 prompts > embed_cache 1
    for cfg, expect in (({"kind": "prompts"}, "needs data.prompts"),
                        ({"kind": "prompts", "prompts": "p.txt", "xflip": True}, "data.xflip does not apply"),
                        ({"kind": "digits"}, "not a text dataset"),
                        ({"kind": "captioned_images"}, "exactly one of data.path"),
                        ({"kind": "captioned_images", "path": "a", "shards": "b"}, "exactly one of data.path")):
        with pytest.raises(ConfigError) as info:
            open_text_dataset(cfg, fake_encode)
        assert expect in _one_line(info)
    with pytest.raises(ConfigError, match="needs an encoder_id"):
        open_text_dataset({"kind": "captioned_images", "path": str(tmp_path)}, fake_encode, encode_images=lambda x: x)


def test_schema_text_kinds():
    cfg = validate({"experiment": "t2i", "data": {"kind": "prompts", "prompts": "prompts.txt", "label_dim": 0,
                                                  "embed_cache": 100}})
    assert cfg["data"]["kind"] == "prompts" and cfg["data"]["prompts"] == "prompts.txt"
    cfg = validate({"experiment": "t2i", "data": {"kind": "captioned_images", "shards": "d/{0..1}.tar",
                                                  "resolution": 64, "channels": 4, "image_resolution": 512,
                                                  "label_dim": 0}})
    assert cfg["data"]["shards"] == "d/{0..1}.tar"
    # The new keys have no defaults: the data section of other kinds (a job setting, whose change
    # reruns the job) resolves exactly as before.
    keys = {"kind", "path", "resolution", "channels", "label_dim", "xflip"}
    assert set(validate({"experiment": "x"})["data"]) == keys
    with pytest.raises(ConfigError, match="data.kind"):
        validate({"experiment": "x", "data": {"kind": "laion"}})
