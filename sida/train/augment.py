"""Geometric augmentation of the fake score's inputs, with EDM's 9 augmentation labels.

The SiD/SiDA authors train the fake score f_psi on augmented images: their launch scripts build
EDM's augmentation pipe with probability p (`--augment`, 0.12 for CIFAR-10, 0.15 for FFHQ/AFHQv2)
and the enable multipliers xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
and feed the pipe's label vector to the network's `augment_dim = 9` embedding (the published EDM
teachers were trained the same way, so the labels must mean what they meant there).

Written here from the published description (EDM, Karras et al. 2022, Appendix F.2 "augmentation
regularization", which reuses the geometric pipeline of StyleGAN2-ADA, Karras et al. 2020,
Appendix B), not from NVIDIA's code:

- Pixel blitting first: x-flip and y-flip. Each is *eligible* with probability multiplier * p and,
  when eligible, applied with probability 1/2 (its label is the 0/1 flip); with xflip = 1e8 every
  image is eligible, so x-flips happen with probability 1/2 whatever p is.
- Then one geometric transform per image, each component applied with probability p:
  isotropic scaling by 2^(0.2 w), w ~ N(0, 1); rotation by an angle w ~ U(-pi, pi); anisotropic
  scaling by 2^(0.2 w) along an axis rotated by r (r ~ U(-pi, pi) with probability 1/2, else 0) and
  by its inverse across it; translation by (w_x W, w_y H) * 0.125, w ~ N(0, I_2).
  The transform is executed as in ADA: reflect-pad, upsample 2x with the orthogonal sym6 wavelet
  low-pass filter, resample the inverse map bilinearly, filter and decimate back.
- Labels, 9 per image, in this order (zero where a component was not applied):
  [xflip, yflip, w_scale, cos(angle) - 1, sin(angle), w_aniso cos r, w_aniso sin r, w_tx, w_ty].

Coordinates: x to the right, y down, origin at the image centre ((W-1)/2, (H-1)/2). The matrix
built below maps *output* coordinates to *input* coordinates: out(p) = in(G_inv p), with
G_inv = S(1/s) R(angle) A T(-t): translate first, then anisotropic scaling, rotation, scaling.
Every random draw comes from the generator the caller passes (the loop's per-slot stream), so a
run stays reproducible and resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AUGMENT_DIM = 9

# Symlet 6 (Daubechies' least-asymmetric wavelet, 12 taps): the decomposition low-pass filter as
# tabulated e.g. by PyWavelets, `pywt.Wavelet("sym6").dec_lo`. Orthonormal: sum h^2 = 1 and
# sum_k h[k] h[k + 2j] = 0 for j != 0, which makes "upsample with h, then filter with h and
# decimate" the identity (tests/test_augment.py checks both facts).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
# Upsampled sample m sits at padded-input position (m - _DELAY) / 2. 5 is the filter's effective
# delay (h * h peaks at tap 10) and the alignment ADA's pipeline uses; it keeps the output grid
# symmetric about the image centre, so a quarter turn maps samples onto samples. (sym6 is only
# nearly symmetric: a transform that mirrors an axis is exact to about 1% on smooth images.)
_DELAY = 5.0

# The launch scripts' AugmentPipe(p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
# translate_frac=1); the remaining constants are EDM's AugmentPipe defaults.
OFFICIAL_MULTIPLIERS = dict(xflip=1e8, yflip=1.0, scale=1.0, rotate_frac=1.0, aniso=1.0, translate_frac=1.0)
SCALE_STD = 0.2           # log2 std of isotropic scaling
ROTATE_MAX = 1.0          # fraction of a half-turn: angles in (-pi, pi)
ANISO_STD = 0.2           # log2 std of anisotropic scaling
ANISO_ROTATE_PROB = 0.5   # probability that the anisotropy axis is rotated
TRANSLATE_STD = 0.125     # std of translation, relative to the image size


def _gate(prob: float, shape, g: torch.Generator, device) -> torch.Tensor:
    """Bernoulli(min(prob, 1)) mask drawn from `g`."""
    return torch.rand(shape, generator=g, device=device) < prob


def _rot(theta: torch.Tensor) -> torch.Tensor:
    """[N, 3, 3] rotation matrices [[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]]."""
    c, s = theta.cos(), theta.sin()
    out = torch.zeros(*theta.shape, 3, 3, device=theta.device, dtype=theta.dtype)
    out[..., 0, 0], out[..., 0, 1], out[..., 1, 0], out[..., 1, 1], out[..., 2, 2] = c, -s, s, c, 1
    return out


def _diag(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(*sx.shape, 3, 3, device=sx.device, dtype=sx.dtype)
    out[..., 0, 0], out[..., 1, 1], out[..., 2, 2] = sx, sy, 1
    return out


def _shift(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    out = torch.eye(3, device=tx.device, dtype=tx.dtype).repeat(*tx.shape, 1, 1)
    out[..., 0, 2], out[..., 1, 2] = tx, ty
    return out


@dataclass
class Params:
    """Per-image augmentation parameters (all [N]; zero / False where a component is off)."""

    xflip: torch.Tensor     # bool
    yflip: torch.Tensor     # bool
    w_scale: torch.Tensor   # isotropic scale 2^(SCALE_STD w)
    angle: torch.Tensor     # rotation angle, radians
    w_aniso: torch.Tensor   # anisotropic scale 2^(ANISO_STD w) along the axis at angle r
    r: torch.Tensor
    tx: torch.Tensor        # translation in units of TRANSLATE_STD * width
    ty: torch.Tensor        # ... and TRANSLATE_STD * height

    def labels(self) -> torch.Tensor:
        """EDM's 9 augmentation labels [N, 9] (layout in the module notes)."""
        return torch.stack([self.xflip.float(), self.yflip.float(), self.w_scale, self.angle.cos() - 1,
                            self.angle.sin(), self.w_aniso * self.r.cos(), self.w_aniso * self.r.sin(),
                            self.tx, self.ty], dim=1)

    def matrix(self, height: int, width: int) -> torch.Tensor:
        """G_inv [N, 3, 3]: output -> input centred pixel coordinates of the geometric part."""
        s = torch.exp2(self.w_scale * SCALE_STD)
        a = torch.exp2(self.w_aniso * ANISO_STD)
        return (_diag(1 / s, 1 / s) @ _rot(self.angle) @ _rot(-self.r) @ _diag(1 / a, a) @ _rot(self.r)
                @ _shift(-self.tx * width * TRANSLATE_STD, -self.ty * height * TRANSLATE_STD))


def draw(n: int, p: float, g: torch.Generator, device, multipliers: dict[str, float] | None = None) -> Params:
    """Random parameters of `n` images from generator `g` (on `device`)."""
    m = dict(OFFICIAL_MULTIPLIERS, **(multipliers or {}))
    f32 = dict(device=device, dtype=torch.float32)
    zero = torch.zeros([n], **f32)

    def flip(mult: float) -> torch.Tensor:  # eligible with prob. mult * p, then a fair coin
        return (torch.randint(2, [n], generator=g, device=device) == 1) & _gate(mult * p, [n], g, device)

    def gated(mult: float, value: torch.Tensor) -> torch.Tensor:
        return torch.where(_gate(mult * p, [n], g, device), value, torch.zeros_like(value))

    xflip, yflip = flip(m["xflip"]), flip(m["yflip"])
    w_scale = gated(m["scale"], torch.randn([n], generator=g, **f32))
    angle = gated(m["rotate_frac"], (torch.rand([n], generator=g, **f32) * 2 - 1) * (math.pi * ROTATE_MAX))
    w_aniso = gated(m["aniso"], torch.randn([n], generator=g, **f32))
    r = (torch.rand([n], generator=g, **f32) * 2 - 1) * math.pi
    r = torch.where(_gate(ANISO_ROTATE_PROB, [n], g, device), r, zero)
    t = gated(m["translate_frac"], torch.randn([2, n], generator=g, **f32))  # one gate for both axes
    return Params(xflip, yflip, w_scale, angle, w_aniso, r, t[0], t[1])


def _filter_1d(x: torch.Tensor, taps: torch.Tensor, dim: int, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """Depthwise correlation of [N, C, H, W] with `taps` along `dim` (2 = H, 3 = W)."""
    c = x.shape[1]
    k = taps.reshape(1, 1, -1, 1) if dim == 2 else taps.reshape(1, 1, 1, -1)
    st = (stride, 1) if dim == 2 else (1, stride)
    pad = (padding, 0) if dim == 2 else (0, padding)
    return F.conv2d(x, k.expand(c, 1, *k.shape[2:]), stride=st, padding=pad, groups=c)


def _upsample2(x: torch.Tensor, dim: int, h: torch.Tensor) -> torch.Tensor:
    """u[m] = sum_k x[k] h[m - 2k] along `dim`: zero insertion, then full convolution with h.
    Length n -> 2n + 10 (12 taps)."""
    n = x.shape[dim]
    z = torch.stack([x, torch.zeros_like(x)], dim=dim + 1).flatten(dim, dim + 1).narrow(dim, 0, 2 * n - 1)
    return _filter_1d(z, h.flip(0), dim, padding=len(h) - 1)


def warp(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """out(p) = images(G_inv p) per image, through the 2x-oversampled sym6 pipeline.

    Reflect padding of W-1 / H-1 pixels (the most torch allows) supplies the content a transform
    pulls in from outside the frame; beyond it the image is zero. The identity and integer
    translations are exact (orthonormal filter, samples on the grid).
    """
    n, c, height, width = images.shape
    x = images.float()
    h = torch.tensor(SYM6, dtype=torch.float32, device=x.device)
    px, py = width - 1, height - 1
    up = F.pad(x, [px, px, py, py], mode="reflect") if (px or py) else x
    up = _upsample2(_upsample2(up, 3, h), 2, h)  # [N, C, 2(H + 2py) + 10, 2(W + 2px) + 10]
    lh, lw = up.shape[2], up.shape[3]

    # Output samples m = 2p, ..., 2p + 2W + 9 (what decimating to the W cropped pixels needs),
    # in centred coordinates of the original image.
    def coords(size: int, pad: int) -> torch.Tensor:
        m = torch.arange(2 * pad, 2 * pad + 2 * size + 10, device=x.device, dtype=torch.float32)
        return (m - _DELAY) / 2 - pad - (size - 1) / 2

    yy, xx = torch.meshgrid(coords(height, py), coords(width, px), indexing="ij")
    pts = torch.stack([xx, yy, torch.ones_like(xx)], dim=-1).reshape(-1, 3)   # [P, 3]
    src = pts @ g_inv.float().transpose(1, 2)                                  # [N, P, 3]
    mx = 2 * (src[..., 0] + (width - 1) / 2 + px) + _DELAY
    my = 2 * (src[..., 1] + (height - 1) / 2 + py) + _DELAY
    grid = torch.stack([2 * mx / (lw - 1) - 1, 2 * my / (lh - 1) - 1], dim=-1)
    grid = grid.reshape(n, 2 * height + 10, 2 * width + 10, 2)
    v = F.grid_sample(up, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    v = _filter_1d(_filter_1d(v, h, 3, stride=2), h, 2, stride=2)
    return v.to(images.dtype)


class AugmentPipe:
    """EDM's augmentation pipe as the SiD/SiDA launch scripts configure it (see the module notes).

    `pipe(images, g)` -> (augmented images, labels [N, 9]); p = 0 returns the images unchanged
    with zero labels and draws nothing.
    """

    def __init__(self, p: float, multipliers: dict[str, float] | None = None) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"augmentation probability must be in [0, 1], not {p}")
        unknown = set(multipliers or {}) - set(OFFICIAL_MULTIPLIERS)
        if unknown:
            raise ValueError(f"unknown augmentation(s) {sorted(unknown)}; known: {sorted(OFFICIAL_MULTIPLIERS)}")
        self.p = float(p)
        self.multipliers = dict(OFFICIAL_MULTIPLIERS, **(multipliers or {}))

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, height, width = images.shape
        if self.p == 0:
            return images, images.new_zeros([n, AUGMENT_DIM], dtype=torch.float32)
        prm = draw(n, self.p, g, images.device, self.multipliers)
        images = torch.where(prm.xflip.view(n, 1, 1, 1), images.flip(3), images)
        images = torch.where(prm.yflip.view(n, 1, 1, 1), images.flip(2), images)
        return warp(images, prm.matrix(height, width)), prm.labels()
