"""Captions for scikit-learn's digits: the text side of the CPU text-to-image testbed.

A template is a string with one `{n}` (the numeral, "7") or `{w}` (the word, "seven"); a
digit's captions are every template filled in. The teacher trains on a *caption bank*: index 0
is the empty caption "" (the unconditional branch of classifier-free guidance), index
1 + d * T + j is template j for digit d, so a caption's digit is known from its index and the
bank can be encoded once (the text encoder is frozen).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..errors import ConfigError, DataError
from .atomic import atomic_write_text

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

DEFAULT_TEMPLATES = ("a handwritten {n}", "the digit {w}", "a picture of the number {n}", "{w}", "{n}",
                     "a handwritten digit {w}", "the number {w}", "an image of a {n}")


def check_templates(templates: Sequence[str]) -> list[str]:
    """The templates as a list; ConfigError unless each holds exactly one `{n}` or `{w}`."""
    out = list(templates)
    if not out:
        raise ConfigError("teacher.text.templates is empty: give at least one caption template with {n} or {w}")
    for t in out:
        rest = t.replace("{n}", "").replace("{w}", "") if isinstance(t, str) else "{"
        if "{" in rest or "}" in rest or t.count("{n}") + t.count("{w}") != 1:
            raise ConfigError(f"caption template {t!r} must hold exactly one {{n}} (numeral) or {{w}} (word) "
                              f"and no other braces")
    return out


def caption(template: str, digit: int) -> str:
    """`template` filled in for `digit` ("a handwritten {n}", 7 -> "a handwritten 7")."""
    return template.format(n=digit, w=NUMBER_WORDS[digit])


def caption_bank(templates: Sequence[str]) -> tuple[list[str], list[int]]:
    """(captions, their digits): "" (digit -1) first, then every template for digit 0, 1, ..."""
    templates = check_templates(templates)
    captions, digits = [""], [-1]
    for d in range(10):
        for t in templates:
            captions.append(caption(t, d))
            digits.append(d)
    return captions, digits


def draw_caption_indices(digits: torch.Tensor, num_templates: int, empty_ratio: float,
                         generator: torch.Generator) -> torch.Tensor:
    """Bank indices of training captions for `digits` [n] (int): a uniform template per sample,
    replaced by the empty caption with probability `empty_ratio`. Two draws per call, both
    from `generator` (the loop's per-slot data stream)."""
    n = digits.shape[0]
    template = torch.randint(num_templates, (n,), generator=generator)
    empty = torch.rand(n, generator=generator) < empty_ratio
    idx = 1 + digits.long() * num_templates + template
    return torch.where(empty, torch.zeros_like(idx), idx)


def prompt_set(num: int, templates: Sequence[str]) -> tuple[list[str], list[int]]:
    """`num` evaluation prompts with their digits: digits cycle 0..9 (balanced), templates cycle
    once per ten prompts, so every (digit, template) pair appears before any repeats."""
    templates = check_templates(templates)
    digits = [i % 10 for i in range(num)]
    return [caption(templates[(i // 10) % len(templates)], d) for i, d in enumerate(digits)], digits


def digit_of_caption(text: str, templates: Sequence[str]) -> int:
    """The digit a caption made from `templates` names (DataError if it is none of them)."""
    captions, digits = caption_bank(templates)
    try:
        d = digits[captions.index(text)]
    except ValueError:
        d = -1
    if d < 0:
        raise DataError(f"prompt {text!r} is not a caption of the digit templates: use prompts written by "
                        f"sida.io.digits_text.write_prompts with the same templates")
    return d


def write_prompts(path: str | Path, prompts: Sequence[str]) -> Path:
    """A prompts file for the distillation config: one prompt a line (atomic)."""
    bad = [p for p in prompts if "\n" in p or not p.strip()]
    if bad:
        raise DataError(f"prompt {bad[0]!r} cannot be one line of a prompts file: prompts must be non-empty "
                        f"and hold no newline")
    atomic_write_text(path, "".join(p + "\n" for p in prompts))
    return Path(path)

