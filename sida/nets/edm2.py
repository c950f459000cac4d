"""EDM2's magnitude-preserving UNet and its preconditioner with the learned uncertainty head.

Written from Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models" (the equations cited below are that paper's) and from the layout of the published
``edm2-img512-*.pkl`` snapshots: parameter and buffer names, shapes and constructor arguments are
those of the release, so its weights load with ``load_state_dict(strict=True)``. The code is ours.

What makes the network magnitude preserving (MP):
- ``MPConv``: convolution / fully connected layer without bias whose weight is normalised to unit
  magnitude per output channel and scaled by ``gain / sqrt(fan_in)`` in every forward pass
  (eq. 47); *forced* weight normalisation (eq. 66) rewrites the stored weights themselves. Here
  that happens outside ``forward`` (`force_weight_norm_`, called after every optimiser step and
  at the start of a run), never inside it: the authors' in-forward version breaks autograd when
  two training-mode forwards precede one backward (SiDA's fake score). Because ``forward``
  normalises again, the stored weight's scale never reaches the output (see `force_weight_norm_`).
- ``mp_silu`` = silu / 0.596 (eq. 81), ``mp_sum`` (eq. 88) and ``mp_cat`` (eq. 103) with blend t.
- ``MPFourier``: cos(2 pi (f x + p)) * sqrt(2) with fixed random frequency/phase *buffers* (eq. 75).
- A channel of ones appended to the input, pixel norm in encoder blocks and on q/k/v,
  activations clipped to +-256, an output gain (``out_gain``) and per-block embedding gains that
  start at 0.

``EDM2UNet.forward(..., return_flag)`` and ``EDM2Precond`` (in `sida.nets.precond`, with EDM's
other preconditioners) follow SongUNet/DhariwalUNet (`sida.nets.networks`): 'decoder' -> F(x); 'encoder' -> SiDA's discriminator logits, the channel
mean of the last encoder block's output ([B,1,8,8] for 64x64 latents); 'encoder_decoder' -> both
from one pass; ``decode_first=b`` decodes only the first b samples.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .networks import Output, _check_flag, _decoder_inputs, _finish

__all__ = ["normalize", "mp_silu", "mp_sum", "mp_cat", "resample", "MPFourier", "MPConv", "Block", "EDM2UNet",
           "force_weight_norm_", "has_mp_weights", "EDM2_IMG512_CHANNELS", "edm2_img512_kwargs"]

NORM_EPS = 1e-4
SILU_SCALE = 0.596      # E[silu(x)^2]^(1/2) for x ~ N(0, 1) (eq. 81)
CLIP_ACT = 256

# Base channels of the published ImageNet-512 sizes (EDM2 Table 2 / the release's presets).
EDM2_IMG512_CHANNELS = {"xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}


def normalize(x: torch.Tensor, dim: Optional[Sequence[int] | int] = None, eps: float = NORM_EPS) -> torch.Tensor:
    """x scaled to unit *magnitude* (RMS 1) over `dim` (default: all but the first):
    x / (eps + ||x|| / sqrt(n)), n = number of elements per normalised slice. Norm in fp32."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / max(x.numel(), 1)))  # eps + ||x|| / sqrt(n)
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU: silu(x) / 0.596 (eq. 81)."""
    return F.silu(x) / SILU_SCALE


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2): unit-magnitude blend of unit-magnitude inputs (eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation that keeps unit magnitude and gives b the share t of it (eq. 103):
    [w_a a, w_b b], w_a = C (1 - t) / sqrt(N_a), w_b = C t / sqrt(N_b),
    C = sqrt((N_a + N_b) / ((1 - t)^2 + t^2))."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c * (1 - t) / math.sqrt(na)), b * (c * t / math.sqrt(nb))], dim=dim)


def resample(x: torch.Tensor, mode: str = "keep", f: Sequence[float] = (1, 1)) -> torch.Tensor:
    """2x down- ('down') or upsampling ('up') with the separable FIR filter f (box [1,1] by default),
    applied per channel; 'keep' returns x. Upsampling multiplies the filter by 4 so a constant
    image keeps its value."""
    if mode == "keep":
        return x
    if mode not in ("down", "up"):
        raise ValueError(f"resample mode must be keep, down or up, not {mode!r}")
    k = torch.as_tensor(np.asarray(f, dtype=np.float32), device=x.device)
    k = k / k.sum()
    k = torch.outer(k, k)[None, None].to(x.dtype)
    c, pad = x.shape[1], (len(f) - 1) // 2
    if mode == "down":
        return F.conv2d(x, k.tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    return F.conv_transpose2d(x, (k * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))


class MPFourier(torch.nn.Module):
    """Fourier features sqrt(2) cos(x f + p) with fixed random f = 2 pi N(0, bandwidth^2) and
    p = 2 pi U[0, 1) kept as buffers (part of the state dict; eq. 75)."""

    def __init__(self, num_channels: int, bandwidth: float = 1) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (kernel [k, k]) or fully connected layer (kernel []),
    no bias. Weight [out, in, *kernel]; used as normalize(w) * gain / sqrt(fan_in) (eq. 47)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        w = normalize(self.weight.to(torch.float32))
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))

    @torch.no_grad()
    def force_normalize_(self) -> None:
        """Forced weight normalisation (eq. 66): store normalize(w) in place of w."""
        self.weight.copy_(normalize(self.weight.to(torch.float32)))


class Block(torch.nn.Module):
    """Encoder ('enc') or decoder ('dec') block with optional self-attention (EDM2 Figure 21).

    enc: [resample] -> [1x1 conv_skip if channels change] -> pixel norm -> x;
    dec: [resample] -> x, conv_skip applied to x only where the branches join.
    residual branch: conv_res0(mp_silu(x)) * (1 + emb_linear(emb, gain=emb_gain)) -> mp_silu ->
    dropout -> conv_res1; joined by mp_sum(t=res_balance); attention joined by mp_sum(t=attn_balance).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[int] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: Optional[float] = CLIP_ACT) -> None:
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', not {flavor!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # The qkv output is laid out [B, heads, C/heads, 3, H*W] (the published weights' order);
        # q, k, v are pixel-normalised over the per-head channels.
        qkv = normalize(self.attn_qkv(x).reshape(b, self.num_heads, -1, 3, h * w), dim=2)
        q, k, v = (t.transpose(2, 3) for t in qkv.unbind(3))  # [B, heads, HW, C/heads]
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C/heads)) v
        return self.attn_proj(y.transpose(2, 3).reshape(b, c, h, w))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode, self.resample_filter)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(torch.nn.Module):
    """EDM2's UNet (Figure 21), with SiDA's encoder/decoder return option.

    Channels per level: model_channels * channel_mult; noise embedding width model_channels *
    channel_mult_noise (default: the first level's), embedding width model_channels *
    channel_mult_emb (default: the widest level's). Extra keyword arguments go to every `Block`
    (dropout, channels_per_head, res_balance, attn_balance, clip_act, resample_filter).
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: Optional[int] = None,
                 channel_mult_emb: Optional[int] = None, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (16, 8), label_balance: float = 0.5,
                 concat_balance: float = 0.5, **block_kwargs: Any) -> None:
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1  # + the constant-ones channel
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, channels, kernel=[3, 3])
                cout = channels
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down",
                                                      **block_kwargs)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = Block(cout, channels, cemb, flavor="enc",
                                                            attention=res in attn_resolutions, **block_kwargs)
                cout = channels

        self.dec = torch.nn.ModuleDict()
        skips = [blk.out_channels for blk in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up",
                                                    **block_kwargs)
            for idx in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{idx}"] = Block(cout + skips.pop(), channels, cemb, flavor="dec",
                                                            attention=res in attn_resolutions, **block_kwargs)
                cout = channels
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
                augment_labels: Optional[torch.Tensor] = None, return_flag: str = "decoder",
                decode_first: Optional[int] = None) -> Output:
        """F(x) and/or the discriminator logits; `augment_labels` is accepted and ignored (EDM2
        has no augmentation embedding), so the preconditioners call every UNet alike."""
        _check_flag(return_flag)
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            # sqrt(label_dim) gives a one-hot row unit magnitude.
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)

        def decoder() -> torch.Tensor:
            h, emb_d, skips_d = _decoder_inputs(x, emb, skips, decode_first)
            for name, block in self.dec.items():
                if "block" in name:
                    h = mp_cat(h, skips_d.pop(), t=self.concat_balance)
                h = block(h, emb_d)
            return self.out_conv(h, gain=self.out_gain)

        return _finish(x, decoder, return_flag)


def has_mp_weights(net: torch.nn.Module) -> bool:
    """True when `net` contains magnitude-preserving layers (an EDM2 network)."""
    return any(isinstance(m, MPConv) for m in net.modules())


@torch.no_grad()
def force_weight_norm_(net: torch.nn.Module) -> int:
    """Forced weight normalisation of every `MPConv` in `net`, in place; returns how many.

    Called after each optimiser step and when a run starts, instead of inside ``forward``.
    It leaves the network's function unchanged up to the eps of `normalize`: ``forward`` uses
    normalize(w), and normalize(normalize(w)) = w / (r + eps r + eps^2) versus
    normalize(w) = w / (r + eps) (r = ||w|| / sqrt(fan_in) per output channel), a relative
    difference eps |1 - r - eps| / (r + eps), i.e. ~1e-8 once weights are near unit magnitude.
    It is also what the authors' in-forward version computes in training mode (there the fp32
    weight is overwritten first and then normalised again), so the sequence of weights and
    outputs is the same, without an in-place write inside the autograd graph.
    """
    count = 0
    for m in net.modules():
        if isinstance(m, MPConv):
            m.force_normalize_()
            count += 1
    return count


def edm2_img512_kwargs(size: str, logvar: bool = True) -> dict:
    """Constructor kwargs of the published ImageNet-512 EDM2 network of `size` (xs .. xxl):
    64x64x4 latents, 1000 classes, dropout 0 for XS/S and 0.1 otherwise."""
    size = size.lower()
    if size not in EDM2_IMG512_CHANNELS:
        raise ValueError(f"unknown EDM2 size {size!r} (known: {', '.join(EDM2_IMG512_CHANNELS)})")
    return dict(img_resolution=64, img_channels=4, label_dim=1000, use_fp16=True, logvar=logvar,
                model_channels=EDM2_IMG512_CHANNELS[size], dropout=0.0 if size in ("xs", "s") else 0.1)
