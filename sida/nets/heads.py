"""Discriminator heads of the DMD2 and ADD baselines, and the frozen feature network ADD's heads read.

- ``DMD2Head``: DMD2's classifier on the fake score's bottleneck (tianweiy/DMD2,
  main/edm/edm_guidance.py `cls_pred_branch`): conv 4x4 stride 2 (padding 1), GroupNorm, SiLU,
  conv k x k stride k, GroupNorm, SiLU, conv 1x1 -> one logit; every conv keeps the bottleneck's
  width (768 = 192 x 4 for ImageNet-64's ADM, 32 groups). DMD2 writes k = 4 for its 8x8
  bottleneck; here k = H / 2 for an H x H bottleneck, so 8x8 is DMD2's head exactly and 4x4 (the
  embedded digits' bottleneck) or 2x2 also end at 1x1. Groups: min(32, C // 4) (32 for C = 768
  as in DMD2; at least 4 channels per group, since the second GroupNorm sees a 1x1 map and a
  group of one channel would normalise every value to 0).
- ``FeatureHead`` / ``ADDHeads``: ADD's discriminator heads, in StyleGAN-T's design (1-D convs
  over the feature tokens: a 1x1 block, a residual kernel-9 circular block, a 1x1 output conv, and
  projection conditioning logit = <cls(h), cmap(c)> / sqrt(cmap_dim), c the class labels or, on
  text teachers, ADD's [c_text, c_img] built by `sida.train.methods.add`), with GroupNorm in place of
  StyleGAN-T's batch statistics (so a sample's logits do not depend on its batch-mates and a
  split batch gives the same result) and without spectral normalisation (its power iteration
  updates a buffer on every training forward, so the state would depend on how many micro-
  batches a step has: 2 processes would no longer equal 1 process with 2 accumulation rounds).
- ``TeacherFeatures``: the default frozen feature network of ADD, the teacher's own encoder at a
  fixed noise level (nothing to download, no overlap with the evaluation's feature network).

ADD's heads accept any feature network returning a list of feature maps [B, C, H, W] (a conv
net) or token sequences [B, N, C] (a ViT such as DINOv2); `as_tokens` brings both to [B, C, N].
Size the heads with `probe_features`.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch

__all__ = ["DMD2Head", "FeatureHead", "ADDHeads", "TeacherFeatures", "as_tokens", "probe_features",
           "num_groups", "seeded", "HEAD_CLASSES", "head_record", "head_from_record", "dmd2_head_for",
           "add_heads_for"]

FeatureNet = Callable[[torch.Tensor, Optional[torch.Tensor]], List[torch.Tensor]]


def num_groups(channels: int, max_groups: int = 32, min_per_group: int = 4) -> int:
    """GroupNorm group count: min(32, C // 4), lowered until it divides C (at least 1)."""
    g = max(1, min(max_groups, channels // min_per_group))
    while channels % g:
        g -= 1
    return g


def seeded(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """Build a module with torch's default initialisers drawing from a private seed, so every
    process of a run builds the same head without touching the global RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class DMD2Head(torch.nn.Module):
    """DMD2's classifier head: bottleneck [B, C, H, H] -> one logit per sample [B, 1]."""

    def __init__(self, channels: int, resolution: int) -> None:
        super().__init__()
        if resolution < 2 or resolution % 2:
            raise ValueError(f"DMD2's head needs an even bottleneck resolution >= 2, got {resolution}")
        k = resolution // 2
        g = num_groups(channels)
        self.channels, self.resolution = channels, resolution
        self.init_kwargs = {"channels": int(channels), "resolution": int(resolution)}
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1),  # H -> H/2
            torch.nn.GroupNorm(g, channels),
            torch.nn.SiLU(),
            torch.nn.Conv2d(channels, channels, kernel_size=k, stride=k, padding=0),  # H/2 -> 1
            torch.nn.GroupNorm(g, channels),
            torch.nn.SiLU(),
            torch.nn.Conv2d(channels, 1, kernel_size=1),
        )

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        if tuple(bottleneck.shape[1:]) != (self.channels, self.resolution, self.resolution):
            raise ValueError(f"DMD2Head built for [B, {self.channels}, {self.resolution}, {self.resolution}], "
                             f"got {list(bottleneck.shape)}")
        return self.net(bottleneck.float()).flatten(1)


def as_tokens(feature: torch.Tensor) -> torch.Tensor:
    """A feature map [B, C, H, W] (row-major tokens) or a token sequence [B, N, C] as [B, C, N]."""
    if feature.ndim == 4:
        return feature.flatten(2)
    if feature.ndim == 3:
        return feature.transpose(1, 2)
    raise ValueError(f"features must be [B, C, H, W] maps or [B, N, C] tokens, got shape {list(feature.shape)}")


def _block(channels: int, kernel: int) -> torch.nn.Sequential:
    """StyleGAN-T's head block: conv1d (circular padding), normalisation, LeakyReLU(0.2)."""
    return torch.nn.Sequential(
        torch.nn.Conv1d(channels, channels, kernel_size=kernel, padding=kernel // 2, padding_mode="circular"),
        torch.nn.GroupNorm(num_groups(channels), channels),
        torch.nn.LeakyReLU(0.2),
    )


class FeatureHead(torch.nn.Module):
    """One ADD/StyleGAN-T discriminator head on [B, C, N] tokens -> per-token logits [B, N].

    Body: 1x1 block, then h = (h + block_k(h)) / sqrt(2) with a circular kernel-k conv (k = 9, or
    the largest odd k <= N for short sequences). Output: a 1x1 conv to 1 channel, or, with
    `label_dim` > 0, to `cmap_dim` channels projected on cmap(c) = Linear(labels):
    logit_n = <cls(h)_n, cmap(c)> / sqrt(cmap_dim) (Miyato & Koyama's projection); the body never
    sees the label.
    """

    def __init__(self, channels: int, tokens: int, label_dim: int = 0, cmap_dim: int = 64, kernel: int = 9) -> None:
        super().__init__()
        k = max(1, min(kernel, tokens if tokens % 2 else tokens - 1))
        self.channels, self.tokens, self.label_dim, self.cmap_dim = channels, tokens, label_dim, cmap_dim
        self.block_in = _block(channels, 1)
        self.block_res = _block(channels, k)
        self.cls = torch.nn.Conv1d(channels, cmap_dim if label_dim else 1, kernel_size=1)
        self.cmapper = torch.nn.Linear(label_dim, cmap_dim) if label_dim else None

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The label-free part: [B, C, N] -> [B, C, N]."""
        h = self.block_in(x.float())
        return (h + self.block_res(h)) / math.sqrt(2)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.cls(self.body(x))
        if self.cmapper is None:
            return out[:, 0]
        if labels is None:
            raise ValueError("a conditional head needs class labels")
        cmap = self.cmapper(labels.float().reshape(x.shape[0], self.label_dim))
        return (out * cmap[:, :, None]).sum(dim=1) / math.sqrt(self.cmap_dim)


class ADDHeads(torch.nn.Module):
    """ADD's trainable discriminator: one `FeatureHead` per feature level; logits of all heads
    concatenated per sample, [B, sum_k N_k]. The frozen feature network is *not* part of this
    module (its weights stay out of the heads' optimiser and checkpoint state)."""

    def __init__(self, channels: Sequence[int], tokens: Sequence[int], label_dim: int = 0,
                 cmap_dim: int = 64, kernel: int = 9) -> None:
        super().__init__()
        if len(channels) != len(tokens) or not channels:
            raise ValueError(f"one channel count and one token count per feature level, got {channels}, {tokens}")
        self.init_kwargs = {"channels": [int(c) for c in channels], "tokens": [int(n) for n in tokens],
                            "label_dim": int(label_dim), "cmap_dim": int(cmap_dim), "kernel": int(kernel)}
        self.heads = torch.nn.ModuleList(FeatureHead(c, n, label_dim, cmap_dim, kernel)
                                         for c, n in zip(channels, tokens))

    def forward(self, features: Sequence[torch.Tensor], labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"{len(self.heads)} heads but {len(features)} feature levels")
        return torch.cat([head(as_tokens(f), labels) for head, f in zip(self.heads, features)], dim=1)


class TeacherFeatures(torch.nn.Module):
    """The frozen teacher's encoder as ADD's feature network: x -> per-level feature maps.

    Calls teacher(x, sigma, labels, return_flag='encoder_features') on the *clean* image with the
    fixed noise level `sigma` (nothing random: a fixed noise level means the network's noise
    conditioning, not added noise). `levels` picks feature levels (default all, the bottleneck
    last). Labels are passed to a conditional teacher unless `use_labels` is False. Gradients
    flow to the input (the generator's adversarial loss needs them), never to the teacher's
    weights, and the teacher stays in eval mode whatever `.train()` says.
    """

    def __init__(self, teacher: torch.nn.Module, sigma: float = 0.5, levels: Optional[Sequence[int]] = None,
                 use_labels: bool = True) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.sigma = float(sigma)
        self.levels = None if levels is None else [int(i) for i in levels]
        self.use_labels = use_labels

    def train(self, mode: bool = True) -> "TeacherFeatures":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        sigma = torch.full([x.shape[0]], self.sigma, device=x.device, dtype=torch.float32)
        feats = self.teacher(x, sigma, labels if self.use_labels else None, return_flag="encoder_features")
        return feats if self.levels is None else [feats[i] for i in self.levels]


@torch.no_grad()
def probe_features(features: FeatureNet, image_shape: Sequence[int], label_dim: int = 0,
                   device: torch.device | str = "cpu") -> tuple[list[int], list[int]]:
    """(channels, tokens) of each level a feature network returns for one image of `image_shape`
    (C, H, W): what `ADDHeads` needs to be built."""
    x = torch.zeros([2, *image_shape], device=device)
    labels = torch.zeros([2, label_dim], device=device) if label_dim else None
    toks = [as_tokens(f) for f in features(x, labels)]
    return [int(t.shape[1]) for t in toks], [int(t.shape[2]) for t in toks]


HEAD_CLASSES = {"DMD2Head": DMD2Head, "ADDHeads": ADDHeads}


def head_record(head: torch.nn.Module) -> dict:
    """Class name, constructor kwargs and weights of a head, as stored in training states."""
    return {"class": type(head).__name__, "kwargs": dict(head.init_kwargs),
            "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}}


def head_from_record(rec: dict) -> torch.nn.Module:
    """Rebuild a head from `head_record` output (strict load)."""
    head = HEAD_CLASSES[rec["class"]](**rec["kwargs"])
    head.load_state_dict(rec["state_dict"], strict=True)
    return head


@torch.no_grad()
def dmd2_head_for(fake: torch.nn.Module, image_shape: Sequence[int], label_dim: int, seed: int,
                  device: torch.device | str = "cpu") -> DMD2Head:
    """DMD2's head sized for the fake score's bottleneck, with weights drawn from `seed`."""
    x = torch.zeros([1, *image_shape], device=device)
    labels = torch.zeros([1, label_dim], device=device) if label_dim else None
    was_training = fake.training
    fake.eval()  # no dropout draws from the global RNG (a resumed run replays it)
    rep = fake(x, torch.ones([1], device=device), labels, return_flag="encoder_features")[-1]
    fake.train(was_training)
    return seeded(lambda: DMD2Head(int(rep.shape[1]), int(rep.shape[-1])), seed).to(device)


def add_heads_for(features: FeatureNet, image_shape: Sequence[int], label_dim: int, cmap_dim: int, seed: int,
                  device: torch.device | str = "cpu", cond_dim: Optional[int] = None) -> ADDHeads:
    """ADD's heads sized for every level of a feature network, with weights drawn from `seed`.
    `label_dim`: the class labels the feature network is probed with; `cond_dim`: the width of
    the vector the heads are projected on (default `label_dim`: class projection; a text run's
    [c_text, c_img])."""
    channels, tokens = probe_features(features, image_shape, label_dim, device)
    width = label_dim if cond_dim is None else cond_dim
    return seeded(lambda: ADDHeads(channels, tokens, width, cmap_dim), seed).to(device)
