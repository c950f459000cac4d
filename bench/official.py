"""The official SiD / SiDA iteration, re-stated: the reference of the equivalence test of our
loop (tests/test_compare.py), and nothing else. It is no speed yardstick: it ran 1.2-1.4x slower
than the authors' own loop (issue 33), so `bench.compare` times their code itself
(bench.authors_iteration).

Re-stated from the algorithm and from the order and number of network calls in the authors' loop
(github.com/mingyuanzhou/SiD, branch `sida`: sida_training/sida_training_loop.py with the losses
of sida_training/sida_loss.py; SiD without the discriminator is the same loop with `use_gan`
off); nothing is copied. One iteration, per accumulation round:

1. fake-score update (f_psi in train mode, its parameters trainable):
   x_g = G(sigma_init z1) without grad; sigma = exp(P_mean + P_std N); n = sigma N;
   f_psi(x_g + n) -> (denoised, logits_fake)      [one call, encoder + decoder]
   f_psi(real + n) -> logits_real                 [a second call, encoder only; SiDA]
   NaN masks of the outputs, L_psi + L_D, backward, `.item()` of the losses; then the
   gradients' NaN/inf replaced, clipped by value at 1 (SiDA), Adam step, grads set to None.
2. generator update (G in train mode; teacher and f_psi frozen):
   x_g = G(sigma_init z2) with grad; t ~ U[0, tmax/1000]; x_t = x_g + sigma_t N;
   teacher(x_t); f_psi(x_t) -> (denoised, logits)  [encoder + decoder; decoder only for SiD]
   NaN masks, L_sid (+ L_adv), backward through both into G, `.item()`; NaN/inf replaced,
   Adam step, grads set to None.
3. EMA of G (lerp of every parameter).

The networks are evaluated as EDM's layers compute them (NVlabs/edm training/networks.py, which
the SiD code imports), re-stated in `edm_forward` over our modules' own parameters: up/down
sampling as depthwise (transposed) convolutions with the FIR filter, bias added after the
convolution, attention as two einsums around a float32 softmax, NCHW, fp32. Same weights, so our
loop and this one can be compared output for output (tests/test_compare.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from sida.nets.blocks import UNetBlock
from sida.nets.layers import Conv2d, GroupNorm, Linear
from sida.nets.networks import SongUNet
from sida.nets.sampler import sid_sigma_t
from sida.train.nets import Nets

# ---------------------------------------------------------------------------------------------
# EDM's layer computation over our modules' parameters.


def _linear(m: Linear, x: torch.Tensor) -> torch.Tensor:
    x = x @ m.weight.t()
    return x.add_(m.bias) if m.bias is not None else x


def _conv(m: Conv2d, x: torch.Tensor) -> torch.Tensor:
    """EDM's Conv2d: FIR resampling as a depthwise (transposed) convolution, bias added last."""
    w, b, f = m.weight, m.bias, m.resample_filter
    w_pad = w.shape[-1] // 2 if w is not None else 0
    f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
    if m.fused_resample and m.down and w is not None:
        x = F.conv2d(x, w, padding=w_pad + f_pad)
        x = F.conv2d(x, f.repeat(m.out_channels, 1, 1, 1), groups=m.out_channels, stride=2)
    elif m.fused_resample and m.up and w is not None:
        x = F.conv_transpose2d(x, (4 * f).repeat(m.in_channels, 1, 1, 1), groups=m.in_channels, stride=2,
                               padding=max(f_pad - w_pad, 0))
        x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
    else:
        if m.up:
            x = F.conv_transpose2d(x, (4 * f).repeat(m.in_channels, 1, 1, 1), groups=m.in_channels, stride=2,
                                   padding=f_pad)
        if m.down:
            x = F.conv2d(x, f.repeat(m.in_channels, 1, 1, 1), groups=m.in_channels, stride=2, padding=f_pad)
        if w is not None:
            x = F.conv2d(x, w, padding=w_pad)
    return x.add_(b.reshape(1, -1, 1, 1)) if b is not None else x


def _norm(m: GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)


def _attention(blk: UNetBlock, x: torch.Tensor) -> torch.Tensor:
    """Single-scale dot-product attention with q, k, v interleaved per channel in the qkv output."""
    B, C, H, W = x.shape
    heads = blk.num_heads
    q, k, v = _conv(blk.qkv, _norm(blk.norm2, x)).reshape(B * heads, C // heads, 3, H * W).unbind(2)
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(C // heads)).softmax(dim=2)
    a = torch.einsum("nqk,nck->ncq", w, v)
    return _conv(blk.proj, a.reshape(B, C, H, W)).add_(x) * blk.skip_scale


def _block(blk: UNetBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    orig = x
    x = _conv(blk.conv0, F.silu(_norm(blk.norm0, x)))
    params = _linear(blk.affine, emb).unsqueeze(2).unsqueeze(3)
    if blk.adaptive_scale:
        scale, shift = params.chunk(chunks=2, dim=1)
        x = F.silu(torch.addcmul(shift, _norm(blk.norm1, x), scale + 1))
    else:
        x = F.silu(_norm(blk.norm1, x.add_(params)))
    x = _conv(blk.conv1, F.dropout(x, p=blk.dropout, training=blk.training))
    x = x.add_(_conv(blk.skip, orig) if blk.skip is not None else orig) * blk.skip_scale
    return _attention(blk, x) if blk.num_heads else x


def _embedding(net: SongUNet, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
    pe = net.map_noise
    if not hasattr(pe, "max_positions"):
        raise ValueError("the re-stated EDM network covers the positional noise embedding (DDPM++) only")
    half = pe.num_channels // 2
    freqs = torch.arange(half, dtype=torch.float32, device=noise_labels.device)
    freqs = (1 / pe.max_positions) ** (freqs / (half - (1 if pe.endpoint else 0)))
    e = torch.outer(noise_labels, freqs)
    emb = torch.cat([e.cos(), e.sin()], dim=1)
    emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # DDPM++ takes [sin, cos]
    if net.map_label is not None:
        emb = emb + _linear(net.map_label, class_labels * math.sqrt(net.map_label.in_features))
    if net.map_augment is not None:  # the authors pass zero augment labels when not augmenting
        emb = emb + _linear(net.map_augment, torch.zeros([emb.shape[0], net.map_augment.in_features], device=emb.device))
    emb = F.silu(_linear(net.map_layer0, emb))
    return F.silu(_linear(net.map_layer1, emb))


def _songunet(net: SongUNet, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
              return_flag: str):
    """EDM's DDPM++ forward with SiDA's return flags; the 'encoder' pass keeps no skips."""
    if any("aux" in name for name in net.enc):
        raise ValueError("the re-stated EDM network covers the standard encoder (DDPM++) only")
    emb = _embedding(net, noise_labels, class_labels)
    skips = []
    for block in net.enc.values():
        x = _block(block, x, emb) if isinstance(block, UNetBlock) else _conv(block, x)
        if return_flag != "encoder":
            skips.append(x)
    logits = x.mean(dim=1, keepdim=True)
    if return_flag == "encoder":
        return logits
    out = tmp = None
    for name, block in net.dec.items():
        if "aux_up" in name:
            out = _conv(block, out)
        elif "aux_norm" in name:
            tmp = _norm(block, x)
        elif "aux_conv" in name:
            tmp = _conv(block, F.silu(tmp))
            out = tmp if out is None else tmp + out
        else:
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = _block(block, x, emb)
    return out if return_flag == "decoder" else (out, logits)


def edm_forward(net: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, class_labels: Optional[torch.Tensor],
                return_flag: str = "decoder"):
    """EDM-preconditioned denoiser D(x; sigma) of an `EDMPrecond` SongUNet, as EDM computes it.

    `sigma` is [B] or [B,1,1,1]. Returns D(x), the encoder logits, or both (SiDA's flags).
    """
    sd = net.sigma_data
    sigma = sigma.float().reshape(-1, 1, 1, 1)
    labels = None if net.label_dim == 0 else class_labels.float().reshape(-1, net.label_dim)
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    out = _songunet(net.model, c_in * x.float(), c_noise.flatten(), labels, return_flag)
    if return_flag == "encoder":
        return out
    F_x, logits = (out, None) if return_flag == "decoder" else out
    D_x = c_skip * x + c_out * F_x
    return D_x if logits is None else (D_x, logits)


# ---------------------------------------------------------------------------------------------
# The official iteration.


@dataclass
class Draws:
    """Every random draw of one iteration (one accumulation round), in the authors' order."""

    real: Optional[torch.Tensor]   # real images of the fake-score step (SiDA), [-1, 1]
    labels_fake: torch.Tensor      # labels of the fake-score step ([B, 0] when unconditional)
    z_fake: torch.Tensor           # N(0, I) latents of the fake-score step's x_g
    sigma_normal: torch.Tensor     # N(0, 1) [B,1,1,1]: sigma = exp(P_mean + P_std * this)
    noise_fake: torch.Tensor       # N(0, I): n = sigma * this
    labels_gen: torch.Tensor       # labels of the generator step
    z_gen: torch.Tensor            # N(0, I) latents of the generator step's x_g
    t_gen: torch.Tensor            # U[0, 1) [B,1,1,1]: t = this * tmax / 1000
    noise_gen: torch.Tensor        # N(0, I): x_t = x_g + sigma_t * this


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _nan_rows(*tensors: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        mask = mask | torch.isnan(t).flatten(start_dim=1).any(dim=1)
    return mask


class OfficialIteration:
    """One official SiD (`discriminator=False`) or SiDA adversarial-phase iteration per `step`.

    `rc` holds the run settings of `sida.train.loop.DistillLoop` (sigma_init, tmax, alpha,
    lambda_sid, lambda_adv, lambda_d, P_mean, P_std, batch, lr_g, lr_fake, adam_eps,
    ema_halflife_kimg, ema_rampup_ratio, fake_clip). One process, one accumulation round.
    """

    def __init__(self, rc: dict, nets: Nets, dataset=None, discriminator: bool = True, seed: int = 0) -> None:
        self.rc, self.nets, self.dataset, self.discriminator = rc, nets, dataset, discriminator
        self.batch = rc["batch"]
        t = nets.teacher
        self.img_shape = (t.img_channels, t.img_resolution, t.img_resolution)
        self.label_dim = t.label_dim
        self.sigma_data = t.sigma_data
        self.device = next(t.parameters()).device
        t.eval().requires_grad_(False)
        nets.G_ema.eval().requires_grad_(False)
        nets.G.eval().requires_grad_(False)
        nets.fake.eval().requires_grad_(False)
        betas = (0.0, 0.999)
        self.opt_f = torch.optim.Adam(nets.fake.parameters(), lr=rc["lr_fake"], betas=betas, eps=rc["adam_eps"])
        self.opt_g = torch.optim.Adam(nets.G.parameters(), lr=rc["lr_g"], betas=betas, eps=rc["adam_eps"])
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.data_gen = torch.Generator().manual_seed(seed + 1)
        self.nimg = 0

    def _data(self, n: int) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """A batch of real images and their labels, as the authors' data iterator yields one."""
        if self.dataset is None:
            labels = torch.zeros([n, self.label_dim])
            if self.label_dim:
                labels[torch.arange(n), torch.randint(self.label_dim, (n,), generator=self.data_gen)] = 1
            return None, labels.to(self.device)
        x, labels = self.dataset.get_batch(torch.randint(len(self.dataset), (n,), generator=self.data_gen))
        return x.to(self.device), labels.to(self.device)

    def draw(self) -> Draws:
        """Fresh draws in the authors' order (the fake-score step's, then the generator step's)."""
        B, shape = self.batch, (self.batch, *self.img_shape)
        kw = dict(generator=self.gen, device=self.device)
        real, labels_fake = self._data(B)
        z_fake = torch.randn(shape, **kw)
        sigma_normal = torch.randn([B, 1, 1, 1], **kw)
        noise_fake = torch.randn(shape, **kw)
        _, labels_gen = self._data(B)  # the generator step reads a data batch for its labels
        z_gen = torch.randn(shape, **kw)
        t_gen = torch.rand([B, 1, 1, 1], **kw)
        noise_gen = torch.randn(shape, **kw)
        return Draws(real if self.discriminator else None, labels_fake, z_fake, sigma_normal, noise_fake,
                     labels_gen, z_gen, t_gen, noise_gen)

    def _x_g(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = self.rc["sigma_init"]
        return edm_forward(self.nets.G, s * z, torch.full([z.shape[0], 1, 1, 1], s, device=z.device), labels)

    @staticmethod
    def _finish_grads(params, clip: Optional[float]) -> None:
        for p in params:
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        if clip is not None:
            torch.nn.utils.clip_grad_value_(params, clip)

    def fake_step(self, d: Draws) -> dict[str, float]:
        nets, rc, B = self.nets, self.rc, self.batch
        fake = nets.fake.train().requires_grad_(True)
        self.opt_f.zero_grad(set_to_none=True)
        with torch.no_grad():
            x_g = self._x_g(d.z_fake, d.labels_fake)
        sigma = (d.sigma_normal * rc["P_std"] + rc["P_mean"]).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        n = d.noise_fake * sigma
        out = {}
        if self.discriminator:
            y_fake, logit_fake = edm_forward(fake, x_g + n, sigma, d.labels_fake, "encoder_decoder")
            with torch.no_grad():  # computed by the authors' loss and left unused
                (x_g - y_fake).abs().float().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5)
            logit_real = edm_forward(fake, d.real + n, sigma, d.labels_fake, "encoder")
            keep = ~_nan_rows(x_g, y_fake, logit_fake, logit_real)
            if not keep.all():
                x_g, y_fake, weight = x_g[keep], y_fake[keep], weight[keep]
                logit_fake, logit_real = logit_fake[keep], logit_real[keep]
            l_d = (weight * (_bce(logit_real, 1.0) + _bce(logit_fake, 0.0)) / 2).sum()
            loss_d = l_d * (rc["lambda_d"] / B)
        else:
            y_fake = edm_forward(fake, x_g + n, sigma, d.labels_fake)
            keep = ~_nan_rows(x_g, y_fake)
            if not keep.all():
                x_g, y_fake, weight = x_g[keep], y_fake[keep], weight[keep]
            l_d = loss_d = None
        loss = (weight * (y_fake - x_g) ** 2).sum() / B
        (loss + loss_d if loss_d is not None else loss).backward()
        out["loss_fake"] = loss.item()
        if l_d is not None:
            out["loss_d"] = l_d.item() / B
        fake.eval().requires_grad_(False)
        self._finish_grads(list(fake.parameters()), rc["fake_clip"] if self.discriminator else None)
        self.opt_f.step()
        self.opt_f.zero_grad(set_to_none=True)
        return out

    def generator_step(self, d: Draws) -> dict[str, float]:
        nets, rc, B = self.nets, self.rc, self.batch
        G = nets.G.train().requires_grad_(True)
        self.opt_g.zero_grad(set_to_none=True)
        x_g = self._x_g(d.z_gen, d.labels_gen)
        sigma = sid_sigma_t(d.t_gen * rc["tmax"] / 1000)
        x_t = x_g + d.noise_gen * sigma
        y_real = edm_forward(nets.teacher, x_t, sigma, d.labels_gen)
        if self.discriminator:
            y_fake, logits = edm_forward(nets.fake, x_t, sigma, d.labels_gen, "encoder_decoder")
        else:
            y_fake, logits = edm_forward(nets.fake, x_t, sigma, d.labels_gen), None
        keep = ~_nan_rows(x_g, y_real, y_fake)
        if not keep.all():
            x_g, y_real, y_fake = x_g[keep], y_real[keep], y_fake[keep]
        with torch.no_grad():
            wf = (x_g - y_real).abs().float().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5)
        l_sid = ((y_real - y_fake) * ((y_real - x_g) - rc["alpha"] * (y_real - y_fake)) / wf).sum()
        loss = l_sid * (rc["lambda_sid"] / B)
        out = {"loss_g_sid": l_sid.item() / B}
        if self.discriminator:
            l_adv = _bce(logits.clamp(-10, 10), 1.0) / wf
            l_adv = (l_adv.mean(dim=[1, 2, 3], keepdim=True) * math.prod(self.img_shape)).sum()
            (0.5 * loss + 0.5 * l_adv * (rc["lambda_adv"] / B)).backward()
            out["loss_g_adv"] = l_adv.item() / B
        else:
            loss.backward()
        G.eval().requires_grad_(False)
        self._finish_grads(list(G.parameters()), None)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        return out

    @torch.no_grad()
    def ema(self) -> None:
        halflife = self.rc["ema_halflife_kimg"] * 1000
        if self.rc["ema_rampup_ratio"] is not None:
            halflife = min(halflife, self.nimg * self.rc["ema_rampup_ratio"])
        beta = 0.5 ** (self.batch / max(halflife, 1e-8))
        for p_ema, p in zip(self.nets.G_ema.parameters(), self.nets.G.parameters()):
            p_ema.lerp_(p.detach(), 1 - beta)

    def step(self, draws: Optional[Draws] = None) -> dict[str, float]:
        """One iteration on `draws` (fresh ones from `draw` when None); returns the losses."""
        d = draws if draws is not None else self.draw()
        out = self.fake_step(d)
        out.update(self.generator_step(d))
        self.ema()  # the authors' ramp-up reads the image count before this iteration's
        self.nimg += self.batch
        return out
