"""Losses of EDM, SiD and SiDA as pure functions of tensors (no networks inside); those of the
baselines (DMD, DMD2, ADD) are in `sida.train.baseline_losses`.

Notation as in the papers: x_g generator output, y_real = f_phi(x_t) the teacher's denoised
estimate, y_fake = f_psi(x_t) the fake score's, sigma the noise level, sd = sigma_data.
Every function returns per-sample or per-pixel terms; the loop sums them and divides by the
batch, so gradient accumulation and several processes give the same gradient as one big batch.

References: EDM (Karras et al. 2022, eq. 2 and Table 1 "loss weighting"), SiD (Zhou et al.
2024, "Score identity Distillation", eq. 8-10 and Algorithm 1), SiDA (Zhou et al. 2025,
"Adversarial Score identity Distillation", eq. 6-8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHT_FACTOR_MIN = 1e-5
ADV_LOGIT_CLAMP = 10.0


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2 (EDM Table 1)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def epsilon_loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """1 / sigma^2: the weight that makes ||D - x||^2 the epsilon-MSE ||eps_hat - eps||^2 of a
    diffusers teacher (eps_hat - eps = (x - D) / sigma). SiD-LSG trains its fake score with it; its
    v-prediction loss ||v_hat - v||^2 snr / (snr + 1) reduces to the same weight (docs/design.md)."""
    return sigma ** -2


def loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5, weighting: str = "edm") -> torch.Tensor:
    """The fake score's loss weight: EDM's lambda(sigma) ("edm") or 1 / sigma^2 ("epsilon")."""
    if weighting == "epsilon":
        return epsilon_loss_weight(sigma)
    if weighting != "edm":
        raise ValueError(f"weighting must be 'edm' or 'epsilon', got {weighting!r}")
    return edm_loss_weight(sigma, sigma_data)


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


def pixel_count(image_shape: tuple[int, ...] | torch.Size) -> int:
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
    out = bce / weight_factor * pixel_count(image_shape)
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
                     sigma_data: float = 0.5, logvar: torch.Tensor | None = None, weighting: str = "edm"
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The fake-score step's terms with NaN samples dropped, as the official loss does:
    (per-pixel L_psi, per-sample L_D or None, keep [B]). `x` is the (augmented) clean image the
    fake score denoises; a sample is dropped when x, its denoised estimate or (discriminator)
    either logit map holds a NaN. `weighting` (`loss_weight`): EDM's lambda(sigma), or 1/sigma^2
    for SiD-LSG's epsilon-MSE. With `logvar` (EDM2's uncertainty head of the fake score,
    [B,1,1,1]) L_psi is EDM2's (w/e^logvar)||.||^2 + logvar and L_D is divided by e^logvar."""
    keep = nan_free(x, denoised, logits_fake, logits_real)
    x, denoised, logits_fake, logits_real = zero_dropped(keep, x, denoised, logits_fake, logits_real)
    weight = loss_weight(sigma, sigma_data, weighting)
    if logvar is None:
        l_fake = weight * (denoised - x) ** 2
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
