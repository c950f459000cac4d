"""Text-to-image networks where sampling and evaluation speak class labels.

A text network takes prompt embeddings [n, L, D] where a class-conditional one takes one-hot
labels. On class-labelled data (the digits text testbed) `ClassPrompts` gives each class the
prompt of a template ("a handwritten {n}"), encoded once, so the evaluation's seeds, balanced
labels, class counts and class-balanced reference work unchanged, and the share of samples the
digit classifier assigns to their prompt's class is the prompt-alignment score. `GuidedDenoiser`
lets EDM's samplers run a text teacher with classifier-free guidance.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..nets.guidance import guided
from .sampling import GenerateFn

Encode = Callable[[Sequence[str]], torch.Tensor]

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def class_prompt(template: str, label: int) -> str:
    """The prompt of class `label`: `{n}` is its numeral, `{w}` its number word (digits)."""
    word = NUMBER_WORDS[label] if label < len(NUMBER_WORDS) else str(label)
    return template.format(n=label, w=word)


class ClassPrompts:
    """One-hot class labels [n, K] -> the embeddings of their classes' prompts [n, L, D]."""

    def __init__(self, template: str, num_classes: int, encode: Encode) -> None:
        self.prompts = [class_prompt(template, k) for k in range(num_classes)]
        with torch.no_grad():
            self.embeddings = encode(self.prompts).float()

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embeddings.to(labels.device)[labels.argmax(dim=1)]


def text_generate(generate: GenerateFn, prompts: ClassPrompts) -> GenerateFn:
    """`generate(z, embeddings)` as `generate(z, one-hot labels)`."""
    return lambda z, labels: generate(z, prompts(labels))


class GuidedDenoiser(torch.nn.Module):
    """A text denoiser under classifier-free guidance at `scale` (D_u + scale (D_c - D_u)), with
    the network's own attributes, so EDM's samplers run it as they run any denoiser."""

    def __init__(self, net: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.net, self.scale = net, float(scale)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        return guided(self.net, x, sigma, cond, self.scale)


def prompt_alignment(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of samples whose most probable class (the classifier's `probs` [n, K]) is their
    prompt's class (one-hot `labels` [n, K] or class indices [n])."""
    target = labels.argmax(dim=1) if labels.ndim == 2 else labels
    return float((torch.as_tensor(probs).argmax(dim=1) == target.to(torch.as_tensor(probs).device)).float().mean())
