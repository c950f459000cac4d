"""Basic layers of the EDM-family UNets (SongUNet: DDPM++/NCSN++, DhariwalUNet: ADM): linear,
convolution with FIR resampling, group norm, noise-level embeddings (the residual block and
attention built from them are in `sida.nets.blocks`).

Parameter and buffer names and shapes follow NVlabs' EDM ``training/networks.py`` so that
published EDM weights load with ``load_state_dict(strict=True)``; the code is our own.

Conventions kept from EDM because the published weights depend on them:
- ``Linear.weight`` is ``[out, in]``, ``Conv2d.weight`` is ``[out, in, k, k]``; a conv with
  ``kernel=0`` has no weight/bias and only resamples.
- ``Conv2d`` registers the (normalised, outer-product) FIR ``resample_filter`` as a persistent buffer
  when it up- or downsamples, so those buffers appear in the state dict.
- Weights are cast to the activation dtype inside ``forward`` (the fp16 path keeps fp32 masters).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "weight_init", "Linear", "Conv2d", "GroupNorm", "PositionalEmbedding", "FourierEmbedding", "memory_format_of",
]


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """EDM's unified initialiser.

    xavier_uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out));  xavier_normal: N(0, 2/(fan_in+fan_out));
    kaiming_uniform: U(-a, a), a = sqrt(3 / fan_in);             kaiming_normal: N(0, 1/fan_in).
    """
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"Invalid init mode {mode!r}")


class Linear(torch.nn.Module):
    """Fully connected layer y = x W^T + b with EDM initialisation (weight scaled by init_weight,
    bias drawn from the same law scaled by init_bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        kw = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **kw) * init_weight)
        if bias:
            self.bias = torch.nn.Parameter(weight_init([out_features], **kw) * init_bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Cast weights to the activation dtype (fp16 path keeps fp32 master weights, as in EDM).
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), b)


def _repeat2x2(x: torch.Tensor) -> torch.Tensor:
    """Each pixel of an NCHW tensor repeated over a 2x2 block (nearest-neighbour 2x upsampling).
    Two `repeat_interleave` copies beat one copy of the 6-d broadcast view [n, c, h, 2, w, 2]
    by 1.6-1.75x on the CPU at every UNet shape measured ([64, 64, 4, 4] to [32, 32, 32, 32],
    one thread, AVX2 AMD EPYC, 2026-12-07, `bench.compare --profile` names the copies);
    values identical (copies)."""
    return x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)


class _BoxUp2(torch.autograd.Function):
    """Nearest-neighbour 2x upsampling of an NCHW tensor.

    Same values as ``F.interpolate(x, scale_factor=2, mode="nearest")``, but the forward is
    `_repeat2x2`: ATen's NCHW nearest kernel is ~3-10x slower on the CPU (measured on
    [32, 64, 16, 16]: 2.9 ms vs 0.95 ms, and much worse under load). The backward is ATen's own.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.in_size = tuple(x.shape)
        return _repeat2x2(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        n, c, h, w = ctx.in_size
        return torch.ops.aten.upsample_nearest2d_backward(g, [2 * h, 2 * w], [n, c, h, w], 2.0, 2.0)


class _BoxDown2(torch.autograd.Function):
    """2x2 average pooling of an NCHW tensor with even H, W: bit-identical to ``F.avg_pool2d(x, 2)``
    (same summation order, exact division by 4) from four strided views, ~2x faster than ATen's
    NCHW pooling kernel on the CPU. The backward spreads g / 4 over each 2x2 window (what
    ATen's pooling backward computes, bit for bit) and keeps no activation alive."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :, 0::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 0::2] + x[:, :, 1::2, 1::2]) * 0.25

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return _repeat2x2(g * 0.25)


def _eager() -> bool:
    """False while torch.compile traces: the hand-fused autograd functions below then give way
    to plain ops, which the compiler fuses (and recomputes) itself."""
    return not torch.compiler.is_compiling()


def _nchw_fast_path(x: torch.Tensor) -> bool:
    """The hand-written resamplers are for plain NCHW fp32 CPU tensors; channels-last tensors
    (whose ATen kernels are already fast), other dtypes (autocast's dtype policy stays ATen's)
    and other devices use ATen directly."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.is_contiguous()
            and _eager())


def _is_box2(resample_filter: Sequence[float]) -> bool:
    """True for the 2-tap box filter [a, a]: resampling is then exactly 2x2 average pooling /
    nearest-neighbour upsampling, which we run with the cheaper native ops."""
    f = [float(v) for v in resample_filter]
    return len(f) == 2 and f[0] == f[1] and f[0] != 0


class Conv2d(torch.nn.Module):
    """2D convolution with optional FIR up/downsampling (EDM's ``Conv2d``).

    Downsampling: depthwise conv with the normalised filter f f^T / (sum f)^2, stride 2.
    Upsampling: depthwise transposed conv with 4 f f^T / (sum f)^2, stride 2.
    ``fused_resample`` applies the 3x3 weight before (down) / after (up) the resampling with
    the padding EDM uses (only NCSN++'s ``aux_residual`` uses it).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        assert not (up and down)
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        kw = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        if kernel:
            self.weight = torch.nn.Parameter(
                weight_init([out_channels, in_channels, kernel, kernel], **kw) * init_weight)
        else:
            self.register_parameter("weight", None)
        if kernel and bias:
            self.bias = torch.nn.Parameter(weight_init([out_channels], **kw) * init_bias)
        else:
            self.register_parameter("bias", None)
        f = torch.as_tensor([float(v) for v in resample_filter], dtype=torch.float32)
        f = torch.outer(f, f).unsqueeze(0).unsqueeze(1) / f.sum().square()  # [1, 1, k, k], sums to 1
        self.register_buffer("resample_filter", f if (up or down) else None)
        self._box2 = _is_box2(resample_filter)

    def _down(self, x: torch.Tensor, f: torch.Tensor, pad: int) -> torch.Tensor:
        if self._box2:  # == depthwise conv with [[.25,.25],[.25,.25]], stride 2
            if _nchw_fast_path(x) and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0:
                return _BoxDown2.apply(x)
            return F.avg_pool2d(x, 2)
        c = x.shape[1]
        return F.conv2d(x, f.expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)

    def _up(self, x: torch.Tensor, f: torch.Tensor, pad: int) -> torch.Tensor:
        if self._box2:  # == conv_transpose with 4*box/4
            if _nchw_fast_path(x):
                return _BoxUp2.apply(x)
            return F.interpolate(x, scale_factor=2, mode="nearest")
        c = x.shape[1]
        return F.conv_transpose2d(x, (f * 4).expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            # EDM's padding split: the FIR filter's padding beyond the 3x3's, and vice versa.
            c = x.shape[1]
            x = F.conv_transpose2d(x, (f * 4).expand(c, 1, -1, -1), groups=c, stride=2,
                                   padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, b, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            c = x.shape[1]
            x = F.conv2d(x, f.expand(c, 1, -1, -1), groups=c, stride=2)
            if b is not None:
                x = x + b.reshape(1, -1, 1, 1)
        else:
            if self.up:
                x = self._up(x, f, f_pad)
            if self.down:
                x = self._down(x, f, f_pad)
            if w is not None:
                if _keeps_no_input(x, self.weight, self.bias):
                    x = _InputGradConv2d.apply(x, w, b, w_pad)
                else:
                    x = F.conv2d(x, w, b, padding=w_pad)  # bias fused into the conv
        return x


class GroupNorm(torch.nn.Module):
    """Group normalisation with num_groups = min(num_groups, C // min_channels_per_group)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)

    def forward_silu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(self(x)), the pair every UNet block opens with, fused: under autograd only `x`
        and the group statistics are kept for the backward (which recomputes the normalised
        tensor), instead of x, the normalised tensor and the SiLU output; without autograd the
        SiLU runs in place on the normalised tensor."""
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or b.requires_grad) and _eager():
            return _GroupNormSiLU.apply(x, w, b, self.num_groups, self.eps)
        return F.silu(F.group_norm(x, self.num_groups, w, b, self.eps), inplace=True)


def _group_norm_sizes(x: torch.Tensor) -> tuple[int, int, int]:
    n, c = x.shape[0], x.shape[1]
    return n, c, x.numel() // max(n * c, 1)


class _GroupNormSiLU(torch.autograd.Function):
    """silu(group_norm(x)) keeping x, mean and rstd only (see `GroupNorm.forward_silu`).

    Forward: ATen's group norm, then SiLU in place on its output. Backward: the normalised
    tensor recomputed from x and the saved statistics, ATen's SiLU backward on it, then ATen's
    group-norm backward: the unfused pair's kernels plus one elementwise pass, so the gradients
    agree to float rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        n, c, hw = _group_norm_sizes(x)
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.eps = groups, eps
        return F.silu(y, inplace=True)

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        n, c, hw = _group_norm_sizes(x)
        # The normalised tensor again, as ATen's kernel forms it (x * scale + shift per sample
        # and channel), from the saved statistics: one elementwise pass, no reduction. The
        # per-group statistics broadcast over their channels as [n, groups, c / groups] views
        # (no repeat_interleave copies: fewer small ops, the same products).
        scale = rstd.unsqueeze(-1) * weight.view(ctx.groups, -1)
        shift = bias.view(ctx.groups, -1) - mean.unsqueeze(-1) * scale
        y = torch.addcmul(shift.view(n, c, 1, 1).to(x.dtype), x, scale.view(n, c, 1, 1).to(x.dtype))
        g = torch.ops.aten.silu_backward(g, y).contiguous(memory_format=memory_format_of(x))
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            g, x, mean, rstd, weight, n, c, hw, ctx.groups, list(ctx.needs_input_grad[:3]))
        return gx, gw, gb, None, None


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor stored that way, else contiguous: the layout a gradient
    or an output should keep so the next kernel does not copy it back."""
    return torch.channels_last if (x.dim() == 4 and not x.is_contiguous()
                                   and x.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format


def _keeps_no_input(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """A convolution whose weight is frozen but whose input needs a gradient (the teacher and the
    fake score inside SiD's generator step) needs no saved activation."""
    return (torch.is_grad_enabled() and x.requires_grad and not weight.requires_grad
            and (bias is None or not bias.requires_grad) and _eager())


class _InputGradConv2d(torch.autograd.Function):
    """conv2d(x, w, b) with a frozen weight, keeping no activation for the backward.

    ATen's convolution saves its input for the weight gradient even when no weight gradient is
    wanted. The input gradient, the only one needed here, depends on the input's shape and
    layout alone, so the backward calls ATen's own convolution backward (same kernel, same
    result) with an unread, never-touched placeholder of that shape in the input's place.
    """

    @staticmethod
    def forward(ctx, x, w, b, padding: int):
        y = F.conv2d(x, w, b, padding=padding)
        ctx.save_for_backward(w)
        ctx.padding, ctx.x_dtype = padding, x.dtype
        ctx.x_size, ctx.x_stride = x.shape, x.stride()
        return y

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        like = torch.empty_strided(ctx.x_size, ctx.x_stride, dtype=g.dtype, device=g.device)
        p = ctx.padding
        gx = torch.ops.aten.convolution_backward(g, like, w.to(g.dtype), None, [1, 1], [p, p], [1, 1], False,
                                                 [0, 0], 1, [True, False, False])[0]
        return gx.to(ctx.x_dtype), None, None, None




class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding [cos(x w_j), sin(x w_j)], w_j = (1/max_positions)^(j / (n/2 - endpoint))."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (freqs / (half - (1 if self.endpoint else 0)))
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2 pi x f), sin(2 pi x f)], f ~ N(0, scale^2) (buffer ``freqs``)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
