"""The EDM UNets' residual block (`UNetBlock`, with optional up/downsampling and multi-head
self-attention) and EDM's attention, built from the layers of `sida.nets.layers`.

Parameter names and shapes follow NVlabs' EDM ``training/networks.py`` (published weights load
with ``strict=True``). ``UNetBlock`` stores q, k, v interleaved per channel in the ``qkv`` conv
output (layout ``[B, heads, C/heads, 3, H*W]``), and attention scales logits by
``1/sqrt(C/heads)``, as EDM does.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .layers import Conv2d, GroupNorm, Linear, memory_format_of

__all__ = ["attention", "UNetBlock"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Self-attention in EDM's channel-first layout.

    q, k, v: [N, heads, c, L]. Returns a[n,h,:,i] = sum_j softmax_j(q_i . k_j / sqrt(c)) v_j,
    shape [N, heads, c, L]. SDPA's default scale is 1/sqrt(c) (c = last dim of its inputs), which
    is exactly EDM's einsum formulation.
    """
    a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    return a.transpose(-1, -2)


class UNetBlock(torch.nn.Module):
    """Residual block with optional up/downsampling and self-attention (union of DDPM++, NCSN++
    and ADM blocks, as EDM's ``UNetBlock``)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: Optional[int] = None,
                 channels_per_head: int = 64, dropout: float = 0, skip_scale: float = 1,
                 eps: float = 1e-5, resample_filter: Sequence[float] = (1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True,
                 init: Optional[dict] = None, init_zero: Optional[dict] = None,
                 init_attn: Optional[dict] = None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            # 1x1 projection when channels change or when asked to; otherwise a pure resampler.
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # In-place adds/scalings below only touch fresh conv outputs, which no backward reads
        # (a conv saves its input and weight): same values, fewer full-size temporaries.
        orig = x
        x = self.conv0(self.norm0.forward_silu(x))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = self.norm1.forward_silu(x.add_(params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig).mul_(self.skip_scale)

        if self.num_heads:
            x = self.proj(self._attention(self.qkv(self.norm2(x)), x)).add_(x).mul_(self.skip_scale)
        return x

    def _attention(self, qkv: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention of the ``qkv`` conv output, returned shaped like ``like`` and
        channels-last when it is (otherwise NCHW order; with one head a transposed view whose
        strides are channels-last's, so the proj convolution and the layers after it run
        channels-last kernels: making it NCHW, one more copy, ran no faster on an AVX2 CPU, 2026-12-07).

        EDM's layout: qkv channels are [heads, C/heads, 3] (q, k, v interleaved per channel),
        scale 1/sqrt(C/heads); `attention` states it in that layout. Here one copy regroups the
        three into [3, B, heads, H*W, C/heads] with unit-stride channels, the layout SDPA's
        fused (flash) CPU kernel takes, instead of strided views that send SDPA to its unfused
        math path (bmm + softmax with a materialised H*W x H*W matrix). A channels-last `qkv` is
        regrouped from its own memory order ([B, H, W, 3C]), so the forward and the backward make
        one copy each, where a reshape of its NCHW view made two (a copy to NCHW, then the
        regrouping) and handed the qkv convolution's backward an NCHW gradient to copy back.
        `unbind` instead of three index selections: its backward stacks the three gradients into
        one tensor instead of zero-filling and summing three full-size ones.
        """
        B, C, H, W = like.shape
        heads = self.num_heads
        if memory_format_of(qkv) is torch.channels_last:
            qkv = qkv.permute(0, 2, 3, 1).reshape(B, H * W, heads, C // heads, 3).permute(4, 0, 2, 1, 3)
        else:
            qkv = qkv.reshape(B, heads, C // heads, 3, H * W).permute(3, 0, 1, 4, 2)
        q, k, v = qkv.contiguous().unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads]
        if like.is_contiguous(memory_format=torch.channels_last):
            return a.permute(0, 2, 1, 3).reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous(
                memory_format=torch.channels_last)
        return a.permute(0, 1, 3, 2).reshape(B, C, H, W)
