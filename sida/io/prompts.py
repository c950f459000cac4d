"""Prompt sets: the dataset of a data-free (SiD) text-to-image run, and the per-index embedding
cache that captioned image sets (`sida.io.captioned`) share.

`read_prompts` reads a text file (one prompt a line, UTF-8) or captions JSON: a list of strings,
a list of ``{"caption": ...}`` / ``{"prompt": ...}`` objects, COCO's captions file
(``{"annotations": [{"image_id": ..., "caption": ...}]}``, in file order), or JSON lines
(``.jsonl``, one such object or string a line). Trailing whitespace is stripped and blank prompts
are skipped everywhere. Conditions are the encoded prompts, float32 [n, L, D], made by the frozen
text encoder the caller passes as a plain callable ``encode(prompts) -> Tensor``.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..errors import ConfigError, DataError, FileSystemError, describe_os_error, require_file

if TYPE_CHECKING:
    from .captioned import CaptionedImages

Encode = Callable[[Sequence[str]], torch.Tensor]

#: Sets up to this many prompts keep their embeddings in memory (SD 1.5's 77 x 768 float32 is
#: 236 kB a prompt, so about 1 GB at the limit); larger ones (LAION) encode on every draw.
DEFAULT_CACHE_LIMIT = 4096
#: Prompts per encoder call when a cached set is encoded.
ENCODE_CHUNK = 64

_SHAPES = ('a list of strings, a list of {"caption": ...} or {"prompt": ...} objects, or COCO captions '
           '({"annotations": [{"image_id": ..., "caption": ...}]})')


def read_text(path: Path, what: str, fix: str) -> str:
    """The UTF-8 text of `path` (a leading byte-order mark dropped); one-line errors for a missing
    file, an unreadable one and bytes that are not UTF-8 (naming the line)."""
    require_file(path, what, DataError, fix)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FileSystemError(describe_os_error(exc, path, "read")) from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{what} {path} line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}): save the "
                        f"file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def jsonl_records(text: str, path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSON-lines file."""
    out = []
    for n, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {n} is not valid JSON ({exc.msg}): fix that line") from None
    return out


def caption_of(item: Any, where: str) -> str:
    """The prompt of one entry: a string, or an object's "caption" (else "prompt") string."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("caption", "prompt"):
            if isinstance(item.get(key), str):
                return item[key]
    raise DataError(f"{where} is a {type(item).__name__} without a \"caption\" or \"prompt\" string: the file "
                    f"must be {_SHAPES}; fix that entry")


def _json_prompts(text: str, path: Path) -> list[str]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"prompt file {path} is not valid JSON (line {exc.lineno}: {exc.msg}): fix it, or give a "
                        f"text file with one prompt a line") from None
    if isinstance(obj, dict) and isinstance(obj.get("annotations"), list):
        return [caption_of(a, f"{path} annotations[{i}]") for i, a in enumerate(obj["annotations"])]
    if isinstance(obj, list):
        return [caption_of(a, f"{path} [{i}]") for i, a in enumerate(obj)]
    raise DataError(f"prompt file {path} holds a JSON {type(obj).__name__}, not {_SHAPES}: convert it to one of "
                    f"these or to a text file with one prompt a line")


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text, ``.json`` or ``.jsonl`` file (see the module docstring), in file order."""
    path = Path(path)
    text = read_text(path, "prompt file", "check data.prompts")
    suffix = path.suffix.lower()
    if suffix == ".json":
        raw = _json_prompts(text, path)
    elif suffix == ".jsonl":
        raw = [caption_of(obj, f"{path} line {n}") for n, obj in jsonl_records(text, path)]
    else:
        raw = text.split("\n")
    prompts = [p for p in (r.rstrip() for r in raw) if p]
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompt (it is empty or blank): write one prompt a line, or "
                        f"point data.prompts at another file")
    return prompts


def index_list(indices: Any, size: int, name: str) -> list[int]:
    """`indices` (a tensor or sequence) as ints, each checked against a dataset of `size` items."""
    idx = torch.as_tensor(indices).reshape(-1).tolist()
    if idx and (min(idx) < 0 or max(idx) >= size):
        raise DataError(f"{name}: index out of range (dataset has {size} items)")
    return [int(i) for i in idx]


def run_encoder(encode: Encode, prompts: Sequence[str]) -> torch.Tensor:
    """`encode(prompts)` without autograd (the encoder is frozen), checked to be [n, L, D], float32."""
    with torch.no_grad():
        out = encode(list(prompts))
    if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[0] != len(prompts):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"the text encoder returned {shape} for {len(prompts)} prompts, not [n, L, D]: pass an "
                        f"encode callable that returns one embedding sequence per prompt")
    return out.detach().to(torch.float32)


class EmbeddingCache:
    """Encoded prompts by index.

    A set of at most `limit` prompts is encoded whole at the first call, in fixed chunks of
    `ENCODE_CHUNK`, and kept: an embedding then depends on its index only, not on which prompts
    happened to share its encoder batch (batched matmuls round differently), so a resumed run gets
    the same tensors as the uninterrupted one. Larger sets encode the requested batch on every
    call; the batch is the run's replayed draw, so that is reproducible too.
    """

    def __init__(self, prompts: Sequence[str], encode: Encode, limit: int = DEFAULT_CACHE_LIMIT) -> None:
        self._prompts, self._encode = prompts, encode
        self.cached = len(prompts) <= limit
        self._table: torch.Tensor | None = None

    def __call__(self, indices: list[int]) -> torch.Tensor:
        if not self.cached:
            return run_encoder(self._encode, [self._prompts[i] for i in indices])
        if self._table is None:
            chunks = [self._prompts[k:k + ENCODE_CHUNK] for k in range(0, len(self._prompts), ENCODE_CHUNK)]
            self._table = torch.cat([run_encoder(self._encode, c) for c in chunks])
        return self._table[torch.as_tensor(indices, dtype=torch.int64, device=self._table.device)]


class TextConditioned:
    """What the text datasets share: texts by index, their embeddings as the conditions.

    The loop draws indices from its slot generators (`sida.train.draws`); nothing here draws, so a
    resumed run replays its prompts.
    """

    label_dim = 0  # conditions are embedding sequences [n, L, D], not class vectors

    def __init__(self, name: str, texts: Sequence[str], encode: Encode, cache_limit: int) -> None:
        self.name = name
        self._texts = list(texts)
        self._embed = EmbeddingCache(self._texts, encode, cache_limit)

    def __len__(self) -> int:
        return len(self._texts)

    def prompts(self, indices: Any) -> list[str]:
        """The prompts (captions) at `indices`."""
        return [self._texts[i] for i in index_list(indices, len(self), self.name)]

    def labels(self, indices: Any) -> torch.Tensor:
        """The encoded prompts at `indices`, float32 [n, L, D]."""
        return self._embed(index_list(indices, len(self), self.name))


class PromptDataset(TextConditioned):
    """The dataset of a data-free text run: prompts drawn by index, conditions their embeddings.
    There are no images: `get_batch` says which kind has them."""

    def __init__(self, prompts: Sequence[str], encode: Encode, cache_limit: int = DEFAULT_CACHE_LIMIT,
                 name: str = "prompts") -> None:
        if not prompts:
            raise DataError(f"{name} holds no prompt: give data.prompts a file with at least one")
        super().__init__(name, prompts, encode, cache_limit)

    def get_batch(self, indices: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise DataError(f"{self.name} is a prompt set without images, but this run's phases need real images "
                        f"(SiDA / SiD2A): use data.kind captioned_images")

    def __repr__(self) -> str:
        return f"PromptDataset({self.name}, {len(self)} prompts, cached={self._embed.cached})"


#: `data.kind` values of text-conditioned runs (`sida.io.data.open_dataset` opens the others).
TEXT_KINDS = ("prompts", "captioned_images")


def open_text_dataset(cfg_data: dict, encode: Encode,
                      encode_images: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      cache_dir: str | Path | None = None, encoder_id: str | None = None) -> PromptDataset | CaptionedImages:
    """The dataset of a `data:` section whose kind is in `TEXT_KINDS`.

    ``prompts``: a `PromptDataset` of ``data.prompts``. ``captioned_images``: a
    `sida.io.captioned.CaptionedImages` of ``data.path`` (a folder with captions.jsonl) or
    ``data.shards`` (a brace pattern of WebDataset tars), its images passed through
    `encode_images` (None: the identity, for pixel teachers; otherwise `encoder_id` must name it,
    e.g. the VAE's folder and scaling factor, because it keys the cache in `cache_dir`).
    """
    kind = cfg_data.get("kind")
    if kind not in TEXT_KINDS:
        raise ConfigError(f"data.kind '{kind}' is not a text dataset ({', '.join(TEXT_KINDS)}): open it with "
                          f"sida.io.data.open_dataset")
    if cfg_data.get("xflip"):
        raise ConfigError(f"data.xflip does not apply to data.kind {kind} (captions may name left and right): set "
                          f"it false")
    limit = int(cfg_data.get("embed_cache", DEFAULT_CACHE_LIMIT))
    if kind == "prompts":
        if not cfg_data.get("prompts"):
            raise ConfigError("data.kind prompts needs data.prompts: a text file with one prompt a line or a "
                              "captions JSON")
        return PromptDataset(read_prompts(cfg_data["prompts"]), encode, limit, name=str(cfg_data["prompts"]))
    from .captioned import CaptionedImages, FolderSource, ShardSource  # it imports this module

    path, shards = cfg_data.get("path"), cfg_data.get("shards")
    if bool(path) == bool(shards):
        raise ConfigError("data.kind captioned_images needs exactly one of data.path (a folder with "
                          "captions.jsonl) and data.shards (a brace pattern of tar shards): set one")
    if encode_images is not None and not encoder_id:
        raise ConfigError("open_text_dataset: encode_images needs an encoder_id naming it (e.g. the VAE's folder "
                          "and scaling factor), so its cache is never taken for another encoder's")
    source = FolderSource(path) if path else ShardSource(shards)
    return CaptionedImages(source, encode, encode_images, encoder_id or "identity",
                           resolution=int(cfg_data.get("resolution", 8)), channels=int(cfg_data.get("channels", 1)),
                           image_resolution=cfg_data.get("image_resolution"), cache_dir=cache_dir, cache_limit=limit)
