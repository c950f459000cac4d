"""Losses of EDM, SiD and SiDA as pure functions of tensors (no networks inside).

Notation as in the papers: x_g generator output, y_real = f_phi(x_t) the teacher's denoised
estimate, y_fake = f_psi(x_t) the fake score's, sigma the noise level, sd = sigma_data.
Every function returns per-sample or per-pixel terms; the loop sums them and divides by the
batch, so gradient accumulation and several processes give the same gradient as one big batch.

References: EDM (Karras et al. 2022, eq. 2 and Table 1 "loss weighting"), SiD (Zhou et al.
2024, "Score identity Distillation", eq. 8-10 and Algorithm 1), SiDA (Zhou et al. 2025,
"Adversarial Score identity Distillation", eq. 6-8).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

WEIGHT_FACTOR_MIN = 1e-5
ADV_LOGIT_CLAMP = 10.0


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2 (EDM Table 1)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def edm_denoising_loss(denoised: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor,
                       sigma_data: float = 0.5) -> torch.Tensor:
    """Per-pixel EDM denoising loss lambda(sigma) * ||D(x + n; sigma) - x||^2 (EDM eq. 2).

    Used to train the teacher (x = data) and the fake score f_psi (x = x_g, SiD Algorithm 1
    line "update psi"). `sigma` broadcasts against `clean` ([B,1,1,1] or a scalar).
    Returns a tensor shaped like `clean`.
    """
    return edm_loss_weight(sigma, sigma_data) * (denoised - clean) ** 2


def sid_weight_factor(x_g: torch.Tensor, y_real: torch.Tensor) -> torch.Tensor:
    """SiD's per-sample normaliser mean_pixels |x_g - y_real|, without gradient, clipped at 1e-5.

    Dividing by it makes the loss scale invariant across noise levels (SiD Section 4,
    "loss normalisation"); no gradient flows through it.
    """
    with torch.no_grad():
        dims = tuple(range(1, x_g.ndim))
        return (x_g - y_real).abs().float().mean(dim=dims, keepdim=True).clamp(min=WEIGHT_FACTOR_MIN)


def sid_generator_loss(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor,
                       alpha: float) -> torch.Tensor:
    """Per-pixel SiD generator loss (SiD eq. 10, the alpha-weighted fused loss):

        L_sid = (y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / weight_factor

    with weight_factor = mean_pixels |x_g - y_real| (no grad, clipped at 1e-5). Gradients reach
    the generator through x_g and through x_t = x_g + sigma_t * eps inside y_real and y_fake;
    the networks' own parameters must be frozen by the caller. Returns a tensor shaped like x_g.
    The loss is negative in normal operation (alpha > 1/2 subtracts more than it adds).
    """
    wf = sid_weight_factor(x_g, y_real)
    diff = y_real - y_fake
    return diff * ((y_real - x_g) - alpha * diff) / wf


def _pixel_count(image_shape: tuple[int, ...] | torch.Size) -> int:
    """C * H * W of a (C, H, W) or (B, C, H, W) shape."""
    chw = 1
    for s in tuple(image_shape)[-3:]:
        chw *= int(s)
    return chw


def _sample_mask(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`keep` [B] as a float mask broadcastable against `like` [B, ...]."""
    return keep.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _bce_mean(logits: torch.Tensor, target: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over the batch and the logit map.

    The average over the whole per-process batch is SiDA's "per-GPU batch fakeness": the
    discriminator judges how fake a batch is, not each image on its own. With `keep` [B] the
    average runs over the kept samples only (dropped ones must hold finite values).
    """
    logits = logits.float()
    if keep is None:
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))
    bce = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none")
    mask = _sample_mask(keep, bce)
    return (bce * mask).sum() / (mask.sum() * bce[0].numel()).clamp(min=1)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor,
                       weight: torch.Tensor | float = 1.0, keep: torch.Tensor | None = None) -> torch.Tensor:
    """SiDA discriminator loss (SiDA eq. 7), returned per sample as weight * (BCE_r + BCE_f) / 2.

    BCE_r = mean BCE(D(y0 + n), 1) over the per-process batch and map, BCE_f = mean
    BCE(D(x_g + n), 0) likewise; `weight` is EDM's lambda(sigma) per sample ([B,1,1,1]), as in
    the fake-score loss, so the discriminator sees the same noise-level weighting. With the
    default weight 1 the result is the scalar (BCE_r + BCE_f) / 2. With `keep` [B] the means run
    over the kept samples and dropped samples' terms are zero (see `sid_critic_terms`).
    """
    out = weight * (_bce_mean(logits_real, 1.0, keep) + _bce_mean(logits_fake, 0.0, keep)) / 2
    return out if keep is None else out * _sample_mask(keep, out)


def adversarial_generator_loss(logits_fake: torch.Tensor, weight_factor: torch.Tensor,
                               image_shape: tuple[int, ...] | torch.Size,
                               keep: torch.Tensor | None = None) -> torch.Tensor:
    """SiDA generator adversarial loss (SiDA eq. 8), per sample, on the pixel-loss scale:

        L_adv = BCE(clamp(D(x_t), -10, 10), 1) / weight_factor * (C * H * W)

    The BCE is averaged over the per-process batch and the logit map, divided by SiD's
    per-sample weight_factor ([B,1,1,1]) and multiplied by the pixel count C*H*W so that
    summing it over the batch is commensurate with summing the per-pixel SiD loss.
    `image_shape` is (C, H, W) or a full (B, C, H, W). Returns [B,1,1,1]; with `keep` [B] the
    BCE averages the kept samples and dropped samples' terms are zero.
    """
    bce = _bce_mean(logits_fake.clamp(-ADV_LOGIT_CLAMP, ADV_LOGIT_CLAMP), 1.0, keep)
    out = bce / weight_factor * _pixel_count(image_shape)
    return out if keep is None else out * _sample_mask(keep, out)


# -- non-finite samples ------------------------------------------------------------------------
# The official SiD/SiDA losses drop a sample whose images or network outputs hold a NaN from
# that loss (boolean indexing) instead of letting it poison the whole update; the gradients then
# go through nan_to_num (sida.train.updates.sync_gradients). Here the dropped samples' inputs are
# replaced by zeros and their terms zeroed, which gives the kept samples exactly the official
# terms and gradients without a host synchronisation or data-dependent shapes.

def nan_free(*tensors: torch.Tensor | None) -> torch.Tensor:
    """[B] bool: the samples with no NaN in any of `tensors` (each [B, ...]; None skipped)."""
    keep = None
    for t in tensors:
        if t is None:
            continue
        ok = ~torch.isnan(t.detach()).flatten(1).any(dim=1)
        keep = ok if keep is None else keep & ok
    return keep


def zero_dropped(keep: torch.Tensor, *tensors: torch.Tensor | None) -> tuple:
    """`tensors` with the rows of dropped samples set to zero (and no gradient through them)."""
    return tuple(None if t is None else torch.where(keep.reshape(-1, *([1] * (t.ndim - 1))), t, torch.zeros_like(t))
                 for t in tensors)


def sid_critic_terms(denoised: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                     logits_fake: torch.Tensor | None = None, logits_real: torch.Tensor | None = None,
                     sigma_data: float = 0.5, logvar: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The fake-score step's terms with NaN samples dropped, as the official loss does:
    (per-pixel L_psi, per-sample L_D or None, keep [B]). `x` is the (augmented) clean image the
    fake score denoises; a sample is dropped when x, its denoised estimate or (discriminator)
    either logit map holds a NaN. With `logvar` (EDM2's uncertainty head of the fake score,
    [B,1,1,1]) L_psi is EDM2's (w/e^logvar)||.||^2 + logvar and L_D is divided by e^logvar."""
    keep = nan_free(x, denoised, logits_fake, logits_real)
    x, denoised, logits_fake, logits_real = zero_dropped(keep, x, denoised, logits_fake, logits_real)
    weight = edm_loss_weight(sigma, sigma_data)
    if logvar is None:
        l_fake = edm_denoising_loss(denoised, x, sigma, sigma_data)
    else:
        l_fake = edm2_denoising_loss(denoised, x, sigma, logvar, sigma_data) * _sample_mask(keep, x)
        weight = uncertainty_weighted(weight, logvar)
    l_d = None
    if logits_real is not None:
        l_d = discriminator_loss(logits_real, logits_fake, weight, keep)
    return l_fake, l_d, keep


def sid_generator_terms(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, alpha: float,
                        logits: torch.Tensor | None = None, logvar: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The generator step's terms with NaN samples dropped: (per-pixel L_sid, per-sample L_adv or
    None, keep [B]). A sample is dropped when x_g, y_real or y_fake holds a NaN (as officially) or,
    in the adversarial phase, its logit map does (officially one NaN logit makes the whole
    adversarial loss NaN). With `logvar` (the frozen fake score's EDM2 uncertainty, [B,1,1,1],
    no gradient) both terms are divided by e^logvar."""
    keep = nan_free(x_g, y_real, y_fake, logits)
    x_g, y_real, y_fake, logits = zero_dropped(keep, x_g, y_real, y_fake, logits)
    l_sid = sid_generator_loss(y_real, y_fake, x_g, alpha)
    l_adv = None
    if logits is not None:
        l_adv = adversarial_generator_loss(logits, sid_weight_factor(x_g, y_real), x_g.shape, keep)
    if logvar is not None:
        l_sid = uncertainty_weighted(l_sid, logvar)
        l_adv = None if l_adv is None else uncertainty_weighted(l_adv, logvar)
    return l_sid, l_adv, keep


def sid_generator_objective(l_sid: torch.Tensor, l_adv: torch.Tensor | None, lambda_sid: float,
                            lambda_adv: float, batch_total: int, adversarial: bool) -> torch.Tensor:
    """The scalar the generator step minimises for one micro-batch (docs/design.md step 2).

    SiD phase: lambda_sid * sum(L_sid) / batch. Adversarial phase:
    0.5 * lambda_sid * sum(L_sid) / batch + 0.5 * lambda_adv * sum(L_adv) / batch.
    `batch_total` is the per-process batch times accumulation rounds, so that after the
    cross-process gradient average the result equals the global-batch mean.
    """
    sid = l_sid.sum() * (lambda_sid / batch_total)
    if not adversarial:
        return sid
    adv = l_adv.sum() * (lambda_adv / batch_total)
    return 0.5 * sid + 0.5 * adv


def sid_critic_objective(l_fake: torch.Tensor, l_d: torch.Tensor | None, batch_total: int,
                         lambda_d: float = 1.0) -> torch.Tensor:
    """The scalar the fake-score (+discriminator) step minimises for one micro-batch.

    sum(L_psi) / batch, plus lambda_d * sum(L_D) / batch when the discriminator is trained.
    """
    out = l_fake.sum() / batch_total
    if l_d is not None:
        out = out + l_d.sum() * (lambda_d / batch_total)
    return out


# -- Baselines: DMD / DMD2 and ADD ---------------------------------------------------------------
# References: DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation", and its public
# code tianweiy/DMD2 main/edm/edm_guidance.py), ADD (Sauer et al. 2023, "Adversarial Diffusion
# Distillation", eq. 2-5), StyleGAN-T (Sauer et al. 2023) for the hinge-loss heads, R1 (Mescheder
# et al. 2018). GAN losses return one value per sample ([B]): the mean over that sample's logits
# (one logit for DMD2's head, one per token and head for ADD's), so the loop's sum / batch is the
# batch mean, as in both codebases.

ADD_WEIGHTINGS = ("exponential", "sds")


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
    """ADD's distillation weighting c(t) in EDM's sigma (ADD Section 3.2):

    - "exponential": c = alpha_t, which for an EDM (variance-exploding) sigma is the
      variance-preserving alpha_t = 1 / sqrt(1 + sigma^2) (x_VP = alpha_t (x_0 + sigma eps));
      higher noise levels contribute less.
    - "sds": the c that makes the gradient of c ||x_hat - sg(D(x_hat_t))||^2 equal to the SDS
      gradient w(t) (eps_hat - eps) (Poole et al. 2022): eps_hat - eps = (alpha_t / sigma_t^VP)
      (x_hat - D), so c = w(t) alpha_t / (2 sigma_t^VP); with DreamFusion's w(t) = (sigma_t^VP)^2
      this is alpha_t sigma_t^VP / 2 = sigma / (2 (1 + sigma^2)).
    """
    sigma = torch.as_tensor(sigma).float()
    if kind == "exponential":
        return 1 / (1 + sigma ** 2).sqrt()
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
    out = l_dm.sum() / (batch_total * _pixel_count(l_dm.shape))
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
    out = l_fake.sum() / (batch_total * _pixel_count(l_fake.shape))
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
    out = l_distill.sum() * (lambda_distill / (batch_total * _pixel_count(l_distill.shape)))
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


# -- EDM2 latent space: the learned uncertainty (logvar) of the fake score ----------------------------
# With EDM2 teachers the fake score f_psi keeps EDM2's uncertainty head u(sigma) = logvar (a
# function of sigma only). The SiDA authors' EDM2 code trains it with EDM2's loss and divides the
# other losses of the iteration by e^logvar of the fake score at the same sigma.


def uncertainty_weighted(loss: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """loss / e^logvar, with logvar [B,1,1,1] broadcast over `loss` (per pixel or per sample).

    Applied to the discriminator loss (fake-score step) and to the generator's SiD and adversarial
    losses; in the generator step logvar comes from the frozen fake score, so it is a constant
    there, while in the fake-score step the head also learns from the discriminator term.
    """
    return loss / logvar.exp()


def edm2_denoising_loss(denoised: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor, logvar: torch.Tensor,
                        sigma_data: float = 0.5) -> torch.Tensor:
    """Per-pixel EDM2 loss with learned uncertainty (EDM2 eq. 21):

        (lambda(sigma) / e^logvar) * ||D(x + n; sigma) - x||^2 + logvar

    the fake score's loss in latent space. Returns a tensor shaped like `clean` (logvar is added to
    every pixel, as EDM2 sums it: C*H*W*logvar per sample).
    """
    return uncertainty_weighted(edm_denoising_loss(denoised, clean, sigma, sigma_data), logvar) + logvar
