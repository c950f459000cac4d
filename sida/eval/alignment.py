"""Prompt alignment of the digits text-to-image testbed: the CLIP score's analogue.

A prompt names a digit (`sida.io.digits_text`), so how well a sample follows its prompt is
whether the digits classifier (`sida.eval.digits_classifier`) assigns it to that digit. The
score is the share of samples whose most probable class is their prompt's digit: 0.1 is chance,
1 is every sample readable as its prompt.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import DataError


def prompt_alignment(probs: torch.Tensor, digits: Sequence[int] | torch.Tensor) -> float:
    """Share of rows of `probs` [n, classes] (probabilities or logits) whose argmax is `digits`[i]."""
    digits = torch.as_tensor(digits, dtype=torch.long)
    if probs.ndim != 2 or digits.ndim != 1 or probs.shape[0] != digits.shape[0] or probs.shape[0] == 0:
        raise DataError(f"prompt alignment needs class scores [n, classes] and n digits (n > 0), got "
                        f"{tuple(probs.shape)} and {tuple(digits.shape)}")
    if int(digits.min()) < 0 or int(digits.max()) >= probs.shape[1]:
        raise DataError(f"prompt digits must lie in 0..{probs.shape[1] - 1}, got {int(digits.min())}.."
                        f"{int(digits.max())}: empty prompts have no digit to align with")
    return float((probs.argmax(dim=1).cpu() == digits).double().mean())
