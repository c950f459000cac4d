"""SiD, SiDA and SiD2A (Zhou et al. 2024, 2025): phases `warmup`, `sid`, `sida`.

Critic (every iteration, docs/design.md step 1): the fake score f_psi learns the generator's
detached samples with EDM's denoising loss at log-normal sigmas; a run with `discriminator: sida`
also trains SiDA's discriminator (logits from f_psi's encoder) on noisy real vs noisy generated
images. The fake score sees augmented inputs (`augment`), generated and real images augmented
independently. Generator (step 2): lambda_sid L_sid through the frozen teacher and fake score at
SiD's sigma_t; `sida` phases minimise 0.5 lambda_sid L_sid + 0.5 lambda_adv L_adv. EDM2 teachers
(`logvar`): the fake score's uncertainty weights the losses. SiD2A is a SiDA run whose generator
starts from a SiD generator (`init_generator`). Samples holding a NaN are dropped from the losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...nets.guidance import guided
from ...nets.sampler import lognormal_sigma, sid_sigma_t
from ..losses import sid_critic_objective, sid_critic_terms, sid_generator_objective, sid_generator_terms
from .base import Method, Settings, Slot, Stats, disc_accuracy


def fake_forward(fake: torch.nn.Module, x_fake: torch.Tensor, x_real: torch.Tensor | None,
                 sigma: torch.Tensor, labels: torch.Tensor, sida_disc: bool,
                 augment_labels: tuple[torch.Tensor, torch.Tensor | None] | None = None):
    """f_psi on noisy fakes (denoised + logits) and, for SiDA's discriminator, on noisy reals (logits).

    Both encoder passes run as one batched pass: the network decodes only the fake half
    (`decode_first`), so the real images cost an encoder pass and nothing more.
    `augment_labels`: (fake's, real's or None) augmentation labels, None when not augmenting.
    Returns (denoised_fake, logits_fake | None, logits_real | None).
    """
    aug_fake, aug_real = augment_labels if augment_labels is not None else (None, None)
    if not sida_disc:
        return fake(x_fake, sigma, labels, augment_labels=aug_fake), None, None
    b = x_fake.shape[0]
    x = torch.cat([x_fake, x_real])
    aug = None if aug_fake is None else torch.cat([aug_fake, aug_real])
    denoised, logits = fake(x, torch.cat([sigma, sigma]), torch.cat([labels, labels]), augment_labels=aug,
                            return_flag="encoder_decoder", decode_first=b)
    return denoised, logits[:b], logits[b:]


@dataclass(frozen=True)
class SiDSettings(Settings):
    alpha: float
    lambda_sid: float
    lambda_adv: float
    lambda_d: float
    P_mean: float
    P_std: float
    tmax: float
    logvar: bool
    guidance_fake_train: float
    guidance_fake: float
    guidance_teacher: float
    empty_prompt_ratio: float
    timestep_range: list[int] | None


def guided_fake_forward(fake: torch.nn.Module, x_fake: torch.Tensor, x_real: torch.Tensor | None,
                        sigma: torch.Tensor, labels: torch.Tensor, sida_disc: bool, scale: float):
    """`fake_forward` of a text fake score trained under guidance (SiD-LSG's kappa1): the denoised
    fakes are guided; SiDA's logits are the conditional encoder's, real and fake in one pass."""
    denoised = guided(fake, x_fake, sigma, labels, scale)
    if not sida_disc:
        return denoised, None, None
    b = x_fake.shape[0]
    logits = fake(torch.cat([x_fake, x_real]), torch.cat([sigma, sigma]), torch.cat([labels, labels]),
                  return_flag="encoder")
    return denoised, logits[:b], logits[b:]


class SiD(Method):
    name = "sid"
    Settings = SiDSettings

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        self.sida_disc = self.disc == "sida"  # SiDA's discriminator: the critic's logits on real images
        # Text teachers (SiD-LSG): the empty prompt replaces a share of the fake score's prompts
        # whenever the fake score is guided (kappa1 or kappa2 not 1).
        guided_fake = s.guidance_fake_train != 1 or s.guidance_fake != 1
        self.empty_ratio = s.empty_prompt_ratio if guided_fake and self.draws.text else 0.0
        # SiD-LSG's noise levels: sigma_k of integer timesteps in [lo, hi), fake score weighted 1/sigma^2.
        self.weighting = "edm" if s.timestep_range is None else "epsilon"

    def _critic_sigma(self, r: int) -> torch.Tensor:
        d, s = self.draws, self.settings
        if s.timestep_range is not None:
            return d.timestep_sigma(self.nets.teacher.log_sigmas, *s.timestep_range, r)
        return lognormal_sigma(d.randn([d.micro, 1, 1, 1], r), s.P_mean, s.P_std)

    def _generator_sigma(self, r: int) -> torch.Tensor:
        d, s = self.draws, self.settings
        if s.timestep_range is not None:
            return d.timestep_sigma(self.nets.teacher.log_sigmas, *s.timestep_range, r)
        t = d.rand([d.micro, 1, 1, 1], r)
        return sid_sigma_t(t * s.tmax / 1000)

    def critic_loss(self, slot: Slot, r: int) -> tuple[torch.Tensor, Stats]:
        """Fake-score (+SiDA discriminator) loss on x_g.detach() at sigma ~ exp(N(P_mean, P_std))."""
        d, s, fake = self.draws, self.settings, self.nets.fake
        real, labels = d.real(d.micro, r) if self.sida_disc else (None, d.labels(d.micro, r))
        if self.empty_ratio > 0:
            labels = d.drop_prompts(labels, fake.uncond, self.empty_ratio, r)
        with torch.no_grad(), d.autocast():
            x_g = self.generate(labels, r)
        # Generated and real images are augmented independently (the official loss calls the
        # pipe on each); both then get the same sigma and noise.
        x_g, aug_fake = d.augment(x_g.float(), r)
        aug_real = None
        if real is not None:
            real, aug_real = d.augment(real, r)
        sigma = self._critic_sigma(r)
        n = d.randn(x_g.shape, r) * sigma
        x_real = None if real is None else real + n
        with d.autocast():
            if s.guidance_fake_train != 1:
                denoised, logits_fake, logits_real = guided_fake_forward(
                    fake, x_g + n, x_real, sigma.flatten(), labels, self.sida_disc, s.guidance_fake_train)
            else:
                denoised, logits_fake, logits_real = fake_forward(
                    fake, x_g + n, x_real, sigma.flatten(), labels, self.sida_disc,
                    augment_labels=None if aug_fake is None else (aug_fake, aug_real))
        logvar = fake.logvar(sigma) if s.logvar else None  # EDM2: u(sigma), a function of sigma only
        l_fake, l_d, keep = sid_critic_terms(denoised.float(), x_g, sigma, logits_fake, logits_real, self.sigma_data,
                                             logvar, self.weighting)
        stats = {"loss_fake": l_fake.sum(), "dropped_fake": (~keep).sum()}
        if self.sida_disc:
            stats["loss_d"] = l_d.sum()
            stats.update(disc_accuracy(logits_real, logits_fake))
        return sid_critic_objective(l_fake, l_d, d.total, s.lambda_d), stats

    def generator_loss(self, kind: str, slot: Slot, r: int) -> tuple[torch.Tensor, Stats]:
        """lambda_sid L_sid (`sid`) or 0.5 lambda_sid L_sid + 0.5 lambda_adv L_adv (`sida`) at
        x_t = x_g + sigma_t eps, through the frozen teacher and fake score."""
        d, s, nets = self.draws, self.settings, self.nets
        adversarial = kind == "sida"
        labels = d.labels(d.micro, r)
        with d.autocast():
            x_g = self.generate(labels, r).float()
            sigma_t = self._generator_sigma(r)
            x_t = x_g + sigma_t * d.randn(x_g.shape, r)
            y_real = guided(nets.teacher, x_t, sigma_t.flatten(), labels, s.guidance_teacher)
            if adversarial:
                y_fake, logits = guided(nets.fake, x_t, sigma_t.flatten(), labels, s.guidance_fake, "encoder_decoder")
            else:
                y_fake, logits = guided(nets.fake, x_t, sigma_t.flatten(), labels, s.guidance_fake), None
        logvar = None
        if s.logvar:
            with torch.no_grad():  # the fake score is frozen here: a constant weight
                logvar = nets.fake.logvar(sigma_t)
        l_sid, l_adv, keep = sid_generator_terms(y_real.float(), y_fake.float(), x_g, s.alpha, logits, logvar)
        stats = {"loss_g_sid": l_sid.sum(), "dropped_g": (~keep).sum()}
        if adversarial:
            stats["loss_g_adv"] = l_adv.sum()
        loss = sid_generator_objective(l_sid, l_adv, s.lambda_sid, s.lambda_adv, d.total, adversarial)
        return loss, stats
