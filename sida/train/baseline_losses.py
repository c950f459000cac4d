"""Losses of the baselines, DMD / DMD2 and ADD, as pure functions of tensors (those of EDM, SiD and
SiDA are in `sida.train.losses`).

References: DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation", and its public
code tianweiy/DMD2 main/edm/edm_guidance.py), ADD (Sauer et al. 2023, "Adversarial Diffusion
Distillation", eq. 2-5), StyleGAN-T (Sauer et al. 2023) for the hinge-loss heads, R1 (Mescheder
et al. 2018). GAN losses return one value per sample ([B]): the mean over that sample's logits
(one logit for DMD2's head, one per token and head for ADD's), so the loop's sum / batch is the
batch mean, as in both codebases.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .losses import pixel_count, sid_weight_factor

ADD_WEIGHTINGS = ("exponential", "alpha_bar", "sds")


def dmd_gradient(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor) -> torch.Tensor:
    """DMD's per-pixel generator gradient g = (y_fake - y_real) / mean_pixels |x_g - y_real|.

    y_real = f_phi(x_t), y_fake = f_psi(x_t) at x_t = x_g + sigma eps (DMD2 draws sigma on the
    grid indices 20..980). This is DMD2's ((x_g - y_real) - (x_g - y_fake)) / weight_factor; the
    normaliser is SiD's `sid_weight_factor` (no gradient), which also clips it at 1e-5 where DMD2
    instead passes the quotient through nan_to_num: they differ only when mean |x_g - y_real| <
    1e-5. No gradient flows through g.
    """
    with torch.no_grad():
        return (y_fake.float() - y_real.float()) / sid_weight_factor(x_g, y_real)


def dmd_generator_loss(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor) -> torch.Tensor:
    """Per-pixel DMD loss 0.5 (x_g - sg(x_g - g))^2 with g = `dmd_gradient` (DMD2's
    compute_distribution_matching_loss); its value is 0.5 g^2 and its gradient w.r.t. x_g is g.

    Summed over pixels it is the per-sample loss 0.5 ||x_g - sg(x_g - g)||^2. DMD2's published
    scalar is the mean over batch *and* pixels (F.mse_loss): sum / (B C H W); the objective
    helpers below keep that convention where DMD2's weights are used.

    Relation to SiD: with y_real and y_fake detached (no gradient through x_t into the
    networks), d/dx_g of the per-pixel SiD loss (`sid_generator_loss`) is
    -(y_real - y_fake) / weight_factor = g for *every* alpha (alpha multiplies
    (y_real - y_fake)^2, which has no explicit x_g), so the two gradients are equal, factor 1
    per pixel. The objectives differ in scale: SiD's generator objective is
    lambda_sid * sum / B, DMD2's is sum / (B C H W): DMD2 = SiD / (lambda_sid C H W).
    At alpha = 1/2 the SiD loss is 0.5 (||y_real - x_g||^2 - ||y_fake - x_g||^2) / weight_factor.
    SiD's loop does not detach the denoisers (gradients also pass through x_t), and then the
    gradients differ: for Gaussian denoisers of equal covariance SiD's is (1 - c(sigma)) g.
    """
    g = dmd_gradient(y_real, y_fake, x_g)
    x = x_g.float()
    return 0.5 * (x - (x - g).detach()) ** 2


def ns_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN generator loss softplus(-D(x_g)) = -log sigmoid(D(x_g)), per sample [B]
    (DMD2's gen_cls_loss)."""
    return F.softplus(-logits_fake.float()).flatten(1).mean(dim=1)


def ns_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN discriminator loss softplus(D(fake)) + softplus(-D(real)), per sample
    pair [B] (DMD2's guidance_cls_loss: the sum of the two BCE terms, not their average)."""
    return (F.softplus(logits_fake.float()).flatten(1).mean(dim=1)
            + F.softplus(-logits_real.float()).flatten(1).mean(dim=1))


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge GAN generator loss -D(x_hat), per sample [B] (ADD eq. 3, StyleGAN-T)."""
    return -logits_fake.float().flatten(1).mean(dim=1)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge GAN discriminator loss max(0, 1 - D(real)) + max(0, 1 + D(fake)), per sample pair [B]
    (ADD eq. 4 without its R1 term)."""
    return (F.relu(1 - logits_real.float()).flatten(1).mean(dim=1)
            + F.relu(1 + logits_fake.float()).flatten(1).mean(dim=1))


def r1_penalty(logits: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """R1 = ||grad_inputs sum(logits)||^2 per sample [B], summed over every input tensor.

    ADD applies R1 not to the pixels but to the inputs of its discriminator heads (the frozen
    feature network's outputs for *real* images): pass those (with requires_grad) as `inputs`.
    The gradient of the sum over the batch gives each sample its own gradient because the heads
    never mix samples (GroupNorm, not batch statistics). The graph is kept (create_graph) so the
    penalty trains the heads. For a linear head logit_n = w . f_n on N tokens the result is
    N ||w||^2. The objective multiplies it by gamma (ADD: 1e-5; we read ADD's "gamma R1" without
    the 1/2 of Mescheder et al.'s gamma/2 convention).
    """
    grads = torch.autograd.grad(logits.float().sum(), list(inputs), create_graph=True)
    return sum(g.float().square().flatten(1).sum(dim=1) for g in grads)


def add_distill_weight(sigma: torch.Tensor, kind: str = "exponential") -> torch.Tensor:
    """ADD's distillation weighting c(t) in EDM's sigma (ADD Section 3.2, "exponential weighting
    c(t) = alpha_bar_t, higher noise levels contribute less", or SDS weighting):

    - "alpha_bar": c = alpha_bar_t = 1 / (1 + sigma^2), the paper's formula with alpha_bar the
      cumulative product of the VP schedule (x_VP = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps,
      sigma^2 = (1 - alpha_bar) / alpha_bar). For a diffusers teacher, whose sigmas are its discrete
      steps' sigma_k, this is exactly its scheduler's alphas_cumprod[k].
    - "exponential": c = alpha_t = sqrt(alpha_bar_t) = 1 / sqrt(1 + sigma^2), the VP signal scale:
      our earlier reading, kept as the schema default so the embedded digits ADD run stays as measured
      (it decays more slowly than the paper's alpha_bar_t).
    - "sds": the c that makes the gradient of c ||x_hat - sg(D(x_hat_t))||^2 equal to the SDS
      gradient w(t) (eps_hat - eps) (Poole et al. 2022): eps_hat - eps = (alpha_t / sigma_t^VP)
      (x_hat - D), so c = w(t) alpha_t / (2 sigma_t^VP); with DreamFusion's w(t) = (sigma_t^VP)^2
      this is alpha_t sigma_t^VP / 2 = sigma / (2 (1 + sigma^2)).
    """
    sigma = torch.as_tensor(sigma).float()
    if kind == "exponential":
        return 1 / (1 + sigma ** 2).sqrt()
    if kind == "alpha_bar":
        return 1 / (1 + sigma ** 2)
    if kind == "sds":
        return sigma / (2 * (1 + sigma ** 2))
    raise ValueError(f"ADD weighting must be one of {ADD_WEIGHTINGS}, got {kind!r}")


def add_distill_loss(x_hat: torch.Tensor, teacher_denoised: torch.Tensor,
                     weight: torch.Tensor | float) -> torch.Tensor:
    """Per-pixel ADD distillation loss c(t) (x_hat - sg(D_teacher(sg(x_hat) + sigma_t eps'; sigma_t)))^2
    (ADD eq. 5 with d = squared L2). `teacher_denoised` is detached here; `weight` is
    `add_distill_weight(sigma_t)` ([B,1,1,1]). Gradient w.r.t. x_hat: 2 c (x_hat - D).
    """
    return weight * (x_hat.float() - teacher_denoised.detach().float()) ** 2


def dmd2_generator_objective(l_dm: torch.Tensor, l_gan: torch.Tensor | None, batch_total: int,
                             lambda_gan: float = 3e-3) -> torch.Tensor:
    """DMD2's generator scalar for one micro-batch: mean(L_dm) + lambda_gan * mean(L_gan).

    `l_dm` is the per-pixel `dmd_generator_loss` ([B,C,H,W]), averaged over pixels as DMD2's
    F.mse_loss does, `l_gan` the per-sample `ns_generator_loss` ([B]) or None (the `dmd` ablation).
    Divided by `batch_total` (per-process batch x accumulation rounds) like `sid_generator_objective`.
    Published weight: lambda_gan = 3e-3 (DMD2 ImageNet-64 script, --gen_cls_loss_weight).
    """
    out = l_dm.sum() / (batch_total * pixel_count(l_dm.shape))
    if l_gan is not None:
        out = out + l_gan.sum() * (lambda_gan / batch_total)
    return out


def dmd2_critic_objective(l_fake: torch.Tensor, l_cls: torch.Tensor | None, batch_total: int,
                          lambda_cls: float = 1e-2) -> torch.Tensor:
    """DMD2's fake-score (+classifier) scalar for one micro-batch: mean(L_fake) + lambda_cls * mean(L_cls).

    `l_fake` is the per-pixel `edm_denoising_loss` (DMD2's weights 1/sigma^2 + 1/sd^2 are EDM's
    lambda(sigma)), averaged over pixels as DMD2 does; `l_cls` the per-sample
    `ns_discriminator_loss` ([B]) or None. Published weight: lambda_cls = 1e-2 (--cls_loss_weight).
    """
    out = l_fake.sum() / (batch_total * pixel_count(l_fake.shape))
    if l_cls is not None:
        out = out + l_cls.sum() * (lambda_cls / batch_total)
    return out


def add_generator_objective(l_adv: torch.Tensor | None, l_distill: torch.Tensor, batch_total: int,
                            lambda_distill: float = 2.5) -> torch.Tensor:
    """ADD's student scalar for one micro-batch: mean(L_adv) + lambda * mean(L_distill) (ADD eq. 2,
    lambda = 2.5). `l_adv` is the per-sample `hinge_generator_loss` ([B]) or None (distillation
    only), `l_distill` the per-pixel `add_distill_loss`, averaged over pixels (ADD does not say
    sum or mean; the mean keeps lambda independent of the resolution: our reading).
    """
    out = l_distill.sum() * (lambda_distill / (batch_total * pixel_count(l_distill.shape)))
    if l_adv is not None:
        out = out + l_adv.sum() / batch_total
    return out


def add_discriminator_objective(l_hinge: torch.Tensor, r1: torch.Tensor | None, batch_total: int,
                                gamma: float = 1e-5) -> torch.Tensor:
    """ADD's discriminator-heads scalar for one micro-batch: mean(hinge) + gamma * mean(R1) (ADD
    eq. 4, gamma = 1e-5). `l_hinge` from `hinge_discriminator_loss`, `r1` from `r1_penalty` on the
    real images' head inputs ([B] each), or None to skip the penalty."""
    out = l_hinge.sum() / batch_total
    if r1 is not None:
        out = out + r1.sum() * (gamma / batch_total)
    return out
