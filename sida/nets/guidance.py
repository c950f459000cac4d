"""Classifier-free guidance of a text-conditioned denoiser (SiD-LSG's guidance, in EDM's x0 form).

SiD-LSG guides in epsilon space, eps_u + kappa (eps_c - eps_u), with eps_u the prediction for the
empty prompt "". Our denoiser is D = c_skip x + c_out F with coefficients that depend on x and
sigma only, the same for both halves, so guiding D is the same thing:
    D_u + kappa (D_c - D_u) = c_skip x + c_out (F_u + kappa (F_c - F_u)),
i.e. the x0 of the guided UNet output, for every prediction type (epsilon, v, sample).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .precond import Output
from .sampler import _unwrap

__all__ = ["guided"]


def guided(net: Any, x: torch.Tensor, sigma: Any, cond: Optional[torch.Tensor], scale: float,
           return_flag: str = "decoder") -> Output:
    """D_u + scale (D_c - D_u) of a text denoiser (a `DiffusersTextPrecond`, possibly DDP-wrapped),
    D_u for `net.uncond`, as ONE batched pass of 2n (uncond first); scale 1 is a plain call.

    return_flag "decoder": the guided denoised batch; "encoder_decoder": (guided denoised, the
    conditional half's logits). Guidance combines denoised outputs only, so the encoder flags are
    refused (call `net` itself for them).
    """
    if return_flag not in ("decoder", "encoder_decoder"):
        raise ValueError(f"guided: return_flag must be 'decoder' or 'encoder_decoder', got {return_flag!r}: "
                         f"call the network itself for encoder outputs")
    if float(scale) == 1.0:
        return net(x, sigma, cond, return_flag=return_flag)
    n = x.shape[0]
    inner = _unwrap(net)
    uncond = inner.uncond.to(x.device).expand(n, -1, -1)
    cond = inner.condition(cond, n, x.device)
    s = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1).expand(n, 1, 1, 1)
    out = net(torch.cat([x, x]), torch.cat([s, s]), torch.cat([uncond, cond]), return_flag=return_flag)
    d, logits = (out, None) if return_flag == "decoder" else out
    d_u, d_c = d.chunk(2)
    d = d_u + float(scale) * (d_c - d_u)
    return d if logits is None else (d, logits[n:])
