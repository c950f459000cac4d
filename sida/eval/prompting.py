"""Text-to-image networks where sampling and evaluation speak class labels.

A text network takes prompt embeddings [n, L, D] where a class-conditional one takes one-hot
labels. On class-labelled evaluation data (the digits text testbed: `evaluate.data`) each class
gets the prompt of `evaluate.class_prompt` ("a handwritten {n}"), so the evaluation's seeds,
balanced labels, class counts and class-balanced reference work unchanged, and the share of
samples the digit classifier assigns to their prompt's class is the prompt-alignment score.
`GuidedDenoiser` lets EDM's samplers run a text teacher under classifier-free guidance.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import ConfigError
from ..run.config import with_data_of
from ..io.digits_text import caption
from ..nets.guidance import guided
from .sampling import make_generate

Encode = Callable[[Sequence[str]], torch.Tensor]


class ClassPrompts:
    """One-hot class labels [n, K] -> the embeddings of the K classes' prompts [n, L, D] (also a
    sample grid's rows: one prompt a row)."""

    def __init__(self, prompts: Sequence[str], encode: Encode) -> None:
        self.prompts = list(prompts)
        with torch.no_grad():
            self.embeddings = encode(self.prompts).float()

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embeddings.to(labels.device)[labels.argmax(dim=1)]


def class_prompts(cfg: dict, net: torch.nn.Module, device: torch.device | str) -> ClassPrompts:
    """The class prompts of an evaluation of text network `net` on class-labelled data."""
    from ..io.text_run import text_encoder_of

    label_dim, template = cfg["data"]["label_dim"], cfg["evaluate"]["class_prompt"]
    if label_dim == 0 or template is None:
        raise ConfigError("a text-to-image network is evaluated on class-labelled data with a prompt per class: set "
                          "evaluate.data (e.g. {kind: digits, resolution: 8, channels: 1, label_dim: 10}) and "
                          "evaluate.class_prompt (e.g. 'a handwritten {n}')")
    return ClassPrompts([caption(template, k) for k in range(label_dim)], text_encoder_of(net, device).encode)


def grid_prompts(cfg: dict, net: torch.nn.Module, dataset, device: torch.device | str) -> ClassPrompts:
    """A text run's sample-grid rows: the class prompts when the evaluation has them, else the first
    `distill.grid_size` prompts of the run's prompt set."""
    from ..io.text_run import text_encoder_of

    ev = with_data_of(cfg, "evaluate")
    if ev["data"]["label_dim"] > 0 and ev["evaluate"]["class_prompt"] is not None:
        return class_prompts(ev, net, device)
    rows = dataset.prompts(list(range(min(len(dataset), cfg["distill"]["grid_size"]))))
    return ClassPrompts(rows, text_encoder_of(net, device).encode)


def check_text_network(net: torch.nn.Module, cfg: dict, path: str, decode: Callable | None) -> tuple[int, int, int]:
    """(resolution, channels, label_dim) of the images a text network makes (decoded by `decode`,
    its VAE, when it works in latent space), which must be the evaluation data's."""
    from ..errors import DataError

    z = torch.zeros([1, net.img_channels, net.img_resolution, net.img_resolution],
                    device=next(net.parameters()).device)
    shape = tuple(z.shape[1:]) if decode is None else tuple(decode(z).shape[1:])
    d = cfg["data"]
    if (shape[1], shape[0]) != (d["resolution"], d["channels"]):
        raise DataError(f"network {path} makes {shape[1]}x{shape[2]}x{shape[0]} images but the evaluation data is "
                        f"{d['resolution']}x{d['resolution']}x{d['channels']}: set evaluate.data to images of that shape")
    return int(shape[1]), int(shape[0]), int(d["label_dim"])


def text_sampler(net: torch.nn.Module, kind: str, cfg: dict, decode: Callable | None,
                 steps: int) -> tuple[torch.nn.Module, Callable, int]:
    """(the network as sampled, generate(z, prompt embeddings), NFE) of a text network: the
    teacher under classifier-free guidance at `evaluate.teacher_guidance`, its NFE doubled (each
    guided step runs the network on the prompt and on the empty prompt)."""
    scale = cfg["evaluate"]["teacher_guidance"]
    if kind == "teacher":
        net = GuidedDenoiser(net, scale)
    generate, nfe = make_generate(net, kind, cfg, decode, steps)
    return net, generate, nfe * 2 if kind == "teacher" and scale != 1 else nfe


def text_generate(generate: Callable, prompts: ClassPrompts) -> Callable:
    """`generate(z, embeddings)` as `generate(z, one-hot labels)`."""
    return lambda z, labels: generate(z, prompts(labels))


class GuidedDenoiser(torch.nn.Module):
    """A text denoiser under classifier-free guidance at `scale`, with the network's own
    attributes, so EDM's samplers run it as they run any denoiser."""

    def __init__(self, net: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.net, self.scale = net, float(scale)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None, **_) -> torch.Tensor:
        return guided(self.net, x, sigma, cond, self.scale)
