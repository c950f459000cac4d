"""Classifier-free guidance of a text-conditioned denoiser, in EDM's x0 terms.

SiD-LSG guides in epsilon space, eps_u + k (eps_c - eps_u), with eps_u at the empty prompt. For
one x and sigma, x0 = c_skip x + c_out F is affine in the network output F with the same
coefficients for both branches, so guiding x0 gives exactly the same result:
D_u + k (D_c - D_u) = c_skip x + c_out (F_u + k (F_c - F_u)).
"""

from __future__ import annotations

from typing import Any

import torch


def guided(net: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, scale: float,
           return_flag: str = "decoder") -> Any:
    """D_u + scale (D_c - D_u) at the network's empty-prompt embedding `net.uncond`, as one batched
    pass of 2n; scale 1 is a plain call. With return_flag "encoder_decoder": (guided denoised, the
    conditional half's logits)."""
    if scale == 1:
        return net(x, sigma, cond, return_flag=return_flag)
    n = x.shape[0]
    uncond = net.uncond.to(cond.dtype).expand(n, *cond.shape[1:])
    out = net(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, uncond]), return_flag=return_flag)
    denoised, logits = out if return_flag == "encoder_decoder" else (out, None)
    d_c, d_u = denoised[:n], denoised[n:]
    result = d_u + scale * (d_c - d_u)
    return (result, logits[:n]) if return_flag == "encoder_decoder" else result
