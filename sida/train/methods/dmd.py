"""DMD and DMD2 (Yin et al. 2024, DMD2's EDM code order): phases `warmup`, `dmd`, `dmd2`.

Per slot the iteration draws real images with their labels (`discriminator: dmd2_head`; the
generator is conditioned on those labels) or labels only (`dmd`, data-free). The generator goes
first, on its turn (every `critic_ratio`-th iteration): distribution matching at sigmas on the grid
indices `dm_index_range`, plus in `dmd2` phases the non-saturating GAN term of the head on the
fake score's bottleneck. The critic then trains on the detached x_g drawn *before* the generator's
step (DMD2 does not regenerate; off-turn iterations generate without gradient): the fake score's
denoising loss on the whole grid and, with the head, its classification of noisy real vs noisy
generated images. Noise draws per slot: z, the DM grid index and noise, for `dmd2` the head's;
then the fake-score loss's grid index and noise and, with the head, the real and the fake images'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ...nets.guidance import guided
from ...nets.heads import DMD2Head, dmd2_head_for
from ...nets.sampler import GRID_STEPS
from ..baseline_losses import (dmd2_critic_objective, dmd2_generator_objective, dmd_generator_loss,
                               ns_discriminator_loss, ns_generator_loss)
from ..losses import loss_weight
from .base import Method, Settings, Slot, Stats, disc_accuracy

Net = Callable[..., torch.Tensor]
WHOLE_GRID = (0, GRID_STEPS - 1)


def dmd_term(teacher: Net, fake: Net, x_g: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
             labels: Optional[torch.Tensor], real_guidance: float = 1.0) -> torch.Tensor:
    """Per-pixel DMD loss at x_t = x_g + sigma eps: both denoisers run without gradient (DMD2
    evaluates them under no_grad), so the generator's gradient is exactly g on x_g. Text teachers:
    the real score is guided at `real_guidance` (DMD2's real_guidance_scale), the fake one not."""
    with torch.no_grad():
        x_t = x_g.detach() + sigma * eps
        y_real = guided(teacher, x_t, sigma.reshape(-1), labels, real_guidance)
        y_fake = fake(x_t, sigma.reshape(-1), labels)
    return dmd_generator_loss(y_real, y_fake, x_g)


def dmd_denoising_term(fake: Net, x_g: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
                       labels: Optional[torch.Tensor], sigma_data: float = 0.5, weighting: str = "edm") -> torch.Tensor:
    """Per-pixel denoising loss of DMD's fake score on the detached x_g noised at sigma: EDM's
    lambda(sigma) (DMD2's EDM compute_loss_fake: 1/sigma^2 + 1/sd^2), or for a text teacher on
    its timesteps the epsilon-MSE weight 1/sigma^2 (DMD2's SD loss on the noise)."""
    x = x_g.detach()
    denoised = fake(x + sigma * eps, sigma.reshape(-1), labels)
    return loss_weight(sigma, sigma_data, weighting) * (denoised.float() - x.float()) ** 2


def dmd2_head_logits(fake: Net, head: Net, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
                     labels: Optional[torch.Tensor]) -> torch.Tensor:
    """DMD2's classifier logits [B, 1]: the head on the fake score's bottleneck at x + sigma eps
    (freshly noised at each call; DMD2's compute_cls_logits with diffusion_gan)."""
    rep = fake(x + sigma * eps, sigma.reshape(-1), labels, return_flag="encoder_features")[-1]
    return head(rep)


@dataclass(frozen=True)
class DMDSettings(Settings):
    dm_index_range: list[int]
    lambda_gan: float
    lambda_cls: float
    guidance_teacher: float  # text teachers: the real score's guidance (DMD2's SD 1.5: 1.75)
    timestep_range: list[int] | None  # text teachers: sigma_k of timesteps k ~ U[lo, hi) (DMD2: [20, 980])


class DMD(Method):
    name = "dmd"
    generator_first = True
    Settings = DMDSettings

    def build_head(self, seed: int, img_shape: tuple[int, int, int], label_dim: int, device: torch.device) -> None:
        """DMD2's classifier head on the fake score's bottleneck (`dmd2_head` runs)."""
        if self.disc != "dmd2_head":
            self.nets.head = None
        elif not isinstance(self.nets.head, DMD2Head):
            self.nets.head = dmd2_head_for(self.nets.fake, img_shape, label_dim, seed, device)

    def _sigma(self, index_range: tuple[int, int] | list[int], r: int) -> torch.Tensor:
        """Grid sigmas on `index_range`, or a text teacher's timesteps (`timestep_range`)."""
        s = self.settings
        if s.timestep_range is not None:
            return self.draws.timestep_sigma(self.nets.teacher.log_sigmas, *s.timestep_range, r)
        return self.draws.grid_sigma(*index_range, r)

    def slot(self, r: int) -> Slot:
        d = self.draws
        real, labels = d.real(d.micro, r) if self.disc == "dmd2_head" else (None, d.labels(d.micro, r))
        return {"real": real, "labels": labels}

    def generator_loss(self, kind: str, slot: Slot, r: int) -> tuple[torch.Tensor, Stats]:
        """Distribution matching (+ DMD2's GAN term in `dmd2` phases) through the frozen teacher,
        fake score and head; keeps the detached x_g in the slot for the critic."""
        d, nets, labels = self.draws, self.nets, slot["labels"]
        gan = kind == "dmd2"
        with d.autocast():
            x_g = self.generate(labels, r).float()
            sigma = self._sigma(self.settings.dm_index_range, r)
            l_dm = dmd_term(nets.teacher, nets.fake, x_g, sigma, d.randn(x_g.shape, r), labels,
                            self.settings.guidance_teacher)
            l_gan = None
            if gan:
                sigma_c = self._sigma(WHOLE_GRID, r)
                l_gan = ns_generator_loss(dmd2_head_logits(nets.fake, nets.head, x_g, sigma_c, d.randn(x_g.shape, r),
                                                           labels))
        slot["x_g"] = x_g.detach()
        # DMD2's logged loss: the mean over pixels (its F.mse_loss), 0.5 g^2 per pixel
        stats = {"loss_g_dm": l_dm.mean(dim=(1, 2, 3)).sum()}
        if gan:
            stats["loss_g_adv"] = l_gan.sum()
        return dmd2_generator_objective(l_dm, l_gan, d.total, self.settings.lambda_gan), stats

    def critic_loss(self, slot: Slot, r: int) -> tuple[torch.Tensor, Stats]:
        """The fake score's denoising loss on the detached x_g at sigmas on the whole grid, plus,
        with DMD2's head, its non-saturating classification of noisy real vs noisy generated images."""
        d, nets, real, labels = self.draws, self.nets, slot["real"], slot["labels"]
        x_g = self.generated(slot, lambda: self.generate(labels, r))
        sigma = self._sigma(WHOLE_GRID, r)
        weighting = "edm" if self.settings.timestep_range is None else "epsilon"
        with d.autocast():
            l_fake = dmd_denoising_term(nets.fake, x_g, sigma, d.randn(x_g.shape, r), labels, self.sigma_data,
                                        weighting)
            l_cls = None
            if nets.head is not None:
                # real and generated images through one encoder pass (the head and GroupNorm
                # never mix samples), each freshly noised on the whole grid
                s_real, e_real = self._sigma(WHOLE_GRID, r), d.randn(real.shape, r)
                s_fake, e_fake = self._sigma(WHOLE_GRID, r), d.randn(x_g.shape, r)
                logits = dmd2_head_logits(nets.fake, nets.head, torch.cat([real, x_g]), torch.cat([s_real, s_fake]),
                                          torch.cat([e_real, e_fake]), torch.cat([labels, labels]))
                logits_real, logits_fake = logits[:d.micro], logits[d.micro:]
                l_cls = ns_discriminator_loss(logits_real, logits_fake)
        stats = {"loss_fake": l_fake.mean(dim=(1, 2, 3)).sum()}
        if l_cls is not None:
            stats["loss_d"] = l_cls.sum()
            stats.update(disc_accuracy(logits_real, logits_fake))
        return dmd2_critic_objective(l_fake, l_cls, d.total, self.settings.lambda_cls), stats
