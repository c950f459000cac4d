"""The DMD / DMD2 and ADD iterations of the one distillation loop (`sida.train.distill.DistillLoop`).

`DistillLoop.step` calls `dmd_iteration` for runs of `dmd` / `dmd2` phases and `add_iteration`
for runs of `add` phases; `warmup` phases of those runs train the critic alone. Both take their
random draws from the loop's per-slot streams (`loop._real`, `loop._labels`, `loop._randn`, the
slot's `noise` generator), in a fixed order per micro-batch slot, so gradient accumulation and
several processes give the one-big-batch result and a resumed run replays every draw:

- DMD (Yin et al. 2024, DMD2's EDM code order): per slot, data: real images with their labels
  (`dmd2_head` runs; the generator is conditioned on those labels) or labels only (`dmd`);
  noise: on a generator turn z, the distribution-matching grid index and noise, and for `dmd2`
  the classifier's grid index and noise; then, for the critic, the fake-score loss's grid index
  and noise and, with the head, the real and the fake images' grid indices and noises. The
  generator goes first (every `critic_ratio`-th iteration); the critic then trains on the
  detached x_g drawn *before* the generator's step (DMD2 does not regenerate). Off-turn
  iterations draw z and generate without gradient.
- ADD (Sauer et al. 2023): per slot, data: real images with labels; noise: the student level,
  its noise, then the distillation's grid index and noise. The student update goes first (the
  adversarial term through the frozen features and the heads), then the heads train on the
  real images and the detached x_hat of the same batch (hinge loss, R1 on the heads' inputs).
  ADD trains no fake score: the critic's optimiser holds the heads only.

Every iteration counts `batch` images, whether or not it updates the generator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..nets.sampler import GRID_STEPS, sample_karras_grid_sigma
from .baselines import (add_distill_term, add_logits, add_real_logits_with_r1, add_student_sigma, dmd2_head_logits,
                        dmd_term, fake_score_term)
from .loop import slot_generator
from .losses import (add_discriminator_objective, add_generator_objective, dmd2_critic_objective,
                     dmd2_generator_objective, hinge_discriminator_loss, hinge_generator_loss, ns_discriminator_loss,
                     ns_generator_loss)

if TYPE_CHECKING:  # the loop passes itself; no import at run time (distill imports this module)
    from .distill import DistillLoop

Stats = dict[str, torch.Tensor]
WHOLE_GRID = (0, GRID_STEPS - 1)


def _grid_sigma(loop: "DistillLoop", lo: int, hi: int, r: int) -> torch.Tensor:
    """`micro` sigmas drawn on grid indices lo..hi from slot r's noise stream, [micro,1,1,1]."""
    return sample_karras_grid_sigma(loop.micro, lo, hi, generator=slot_generator(loop.gens, "noise", r),
                                    device=loop.device)


def _zeros(loop: "DistillLoop", *keys: str) -> Stats:
    return {k: torch.zeros((), device=loop.device) for k in keys}


def _freeze(*nets: torch.nn.Module | None) -> None:
    for net in nets:
        if net is not None:
            net.eval().requires_grad_(False)


def _unfreeze(*nets: torch.nn.Module | None) -> None:
    for net in nets:
        if net is not None:
            net.train().requires_grad_(True)


def _add_accuracy(stats: Stats, logits_real: torch.Tensor, logits_fake: torch.Tensor, rounds: int) -> None:
    """Add one round's discriminator accuracy to stats: the share of real logits > 0 and of fake
    logits < 0, logged separately (as the SiDA loop does: a discriminator that calls everything
    real, or fake, averages 0.5 but shows 1 and 0 here)."""
    stats["d_acc_real"] += (logits_real.detach() > 0).float().mean() / rounds
    stats["d_acc_fake"] += (logits_fake.detach() < 0).float().mean() / rounds


# -- DMD / DMD2 ------------------------------------------------------------------------------------

def dmd_iteration(loop: "DistillLoop", kind: str) -> Stats:
    """One DMD / DMD2 iteration: generator update on its turn, then the critic update."""
    gan = loop.disc == "dmd2_head"
    total = loop.micro * loop.rounds
    slots = [loop._real(loop.micro, r) if gan else (None, loop._labels(loop.micro, r)) for r in range(loop.rounds)]
    stats: Stats = {}
    if kind != "warmup" and loop.generator_turn():
        x_gs, stats = _dmd_generator_update(loop, kind, slots, total)
        loop.update_ema()
    else:
        loop.nets.G.eval()
        with torch.no_grad(), loop._autocast():
            x_gs = [loop._generate(labels, r).float() for r, (_, labels) in enumerate(slots)]
    stats.update(_dmd_critic_update(loop, slots, x_gs, total))
    return stats


def _dmd_generator_update(loop: "DistillLoop", kind: str, slots: list, total: int) -> tuple[list[torch.Tensor], Stats]:
    """Distribution matching (+ DMD2's GAN term in `dmd2` phases) through the frozen teacher, fake
    score and head; returns the detached x_g of every slot for the critic."""
    nets, rc = loop.nets, loop.rc
    nets.G.train().requires_grad_(True)
    _freeze(nets.fake, nets.head)
    loop.opt_g.zero_grad(set_to_none=True)
    gan = kind == "dmd2"
    stats = _zeros(loop, "loss_g_dm", *(["loss_g_adv"] if gan else []))
    lo, hi = rc["dm_index_range"]
    x_gs = []
    for r, (_, labels) in enumerate(slots):
        with loop._autocast():
            x_g = loop._generate(labels, r).float()
            sigma = _grid_sigma(loop, lo, hi, r)
            l_dm = dmd_term(nets.teacher, nets.fake, x_g, sigma, loop._randn(x_g.shape, r), labels)
            l_gan = None
            if gan:
                sigma_c = _grid_sigma(loop, *WHOLE_GRID, r)
                logits = dmd2_head_logits(nets.fake, nets.head, x_g, sigma_c, loop._randn(x_g.shape, r), labels)
                l_gan = ns_generator_loss(logits)
        dmd2_generator_objective(l_dm, l_gan, total, rc["lambda_gan"]).backward()
        # DMD2's logged loss: the mean over pixels (its F.mse_loss), 0.5 g^2 per pixel
        stats["loss_g_dm"] += (l_dm.detach().mean(dim=(1, 2, 3)).sum() / total)
        if gan:
            stats["loss_g_adv"] += l_gan.detach().sum() / total
        x_gs.append(x_g.detach())
    stats["nonfinite_g"] = loop.update(loop.opt_g, loop.g_params, nets.G)
    nets.G.eval().requires_grad_(False)
    return x_gs, stats


def _dmd_critic_update(loop: "DistillLoop", slots: list, x_gs: list[torch.Tensor], total: int) -> Stats:
    """The fake score's denoising loss on the detached x_g at sigmas on the whole grid, plus, with
    DMD2's head, its non-saturating classification of noisy real vs noisy generated images."""
    nets, rc = loop.nets, loop.rc
    gan = nets.head is not None
    _unfreeze(nets.fake, nets.head)
    loop.opt_f.zero_grad(set_to_none=True)
    stats = _zeros(loop, "loss_fake", *(["loss_d", "d_acc_real", "d_acc_fake"] if gan else []))
    for r, ((real, labels), x_g) in enumerate(zip(slots, x_gs)):
        sigma = _grid_sigma(loop, *WHOLE_GRID, r)
        with loop._autocast():
            l_fake = fake_score_term(nets.fake, x_g, sigma, loop._randn(x_g.shape, r), labels, loop.sigma_data)
            l_cls = None
            if gan:
                # real and generated images through one encoder pass (the head and GroupNorm
                # never mix samples), each freshly noised on the whole grid
                s_real, e_real = _grid_sigma(loop, *WHOLE_GRID, r), loop._randn(real.shape, r)
                s_fake, e_fake = _grid_sigma(loop, *WHOLE_GRID, r), loop._randn(x_g.shape, r)
                logits = dmd2_head_logits(nets.fake, nets.head, torch.cat([real, x_g]), torch.cat([s_real, s_fake]),
                                          torch.cat([e_real, e_fake]), torch.cat([labels, labels]))
                lr, lf = logits[:loop.micro], logits[loop.micro:]
                l_cls = ns_discriminator_loss(lr, lf)
        dmd2_critic_objective(l_fake, l_cls, total, rc["lambda_cls"]).backward()
        stats["loss_fake"] += l_fake.detach().mean(dim=(1, 2, 3)).sum() / total
        if gan:
            stats["loss_d"] += l_cls.detach().sum() / total
            _add_accuracy(stats, lr, lf, loop.rounds)
    stats["nonfinite_fake"] = loop.update(loop.opt_f, loop.f_params, nets.fake)
    _freeze(nets.fake, nets.head)
    return stats


# -- ADD -------------------------------------------------------------------------------------------

def add_iteration(loop: "DistillLoop", kind: str) -> Stats:
    """One ADD iteration: student update on its turn, then the discriminator heads' update."""
    nets = loop.nets
    adv = loop.disc == "add"
    total = loop.micro * loop.rounds
    slots = []
    for r in range(loop.rounds):
        x0, labels = loop._real(loop.micro, r)
        level = torch.randint(len(loop.gen_sigmas), (loop.micro,), generator=slot_generator(loop.gens, "noise", r),
                              device=loop.device)
        sigma_s = add_student_sigma(level, loop.gen_sigmas)
        slots.append((x0, labels, x0 + sigma_s * loop._randn(x0.shape, r), sigma_s))
    stats: Stats = {}
    if kind != "warmup" and loop.generator_turn():
        x_hats, stats = _add_student_update(loop, slots, total, adv)
        loop.update_ema()
    elif adv:
        nets.G.eval()
        with torch.no_grad(), loop._autocast():
            x_hats = [nets.G(x_s, sigma_s.flatten(), labels).float() for _, labels, x_s, sigma_s in slots]
    if adv:
        stats.update(_add_heads_update(loop, slots, x_hats, total))
    return stats


def _add_student_update(loop: "DistillLoop", slots: list, total: int, adv: bool) -> tuple[list[torch.Tensor], Stats]:
    """ADD's student objective lambda L_distill (+ the hinge adversarial term with heads): the
    student denoises a real image noised at its level; returns the detached x_hat per slot."""
    nets, rc = loop.nets, loop.rc
    nets.G.train().requires_grad_(True)
    _freeze(nets.head)
    loop.opt_g.zero_grad(set_to_none=True)
    stats = _zeros(loop, "loss_g_distill", *(["loss_g_adv"] if adv else []))
    lo, hi = rc["add_distill_index_range"]
    x_hats = []
    for r, (_, labels, x_s, sigma_s) in enumerate(slots):
        with loop._autocast():
            x_hat = nets.G(x_s, sigma_s.flatten(), labels).float()
            sigma_t = _grid_sigma(loop, lo, hi, r)
            l_dist = add_distill_term(nets.teacher, x_hat, sigma_t, loop._randn(x_hat.shape, r), labels,
                                      rc["add_weighting"])
            l_adv = hinge_generator_loss(add_logits(nets.features, nets.head, x_hat, labels)) if adv else None
        add_generator_objective(l_adv, l_dist, total, rc["lambda_distill"]).backward()
        stats["loss_g_distill"] += l_dist.detach().mean(dim=(1, 2, 3)).sum() / total
        if adv:
            stats["loss_g_adv"] += l_adv.detach().sum() / total
        x_hats.append(x_hat.detach())
    stats["nonfinite_g"] = loop.update(loop.opt_g, loop.g_params, nets.G)
    nets.G.eval().requires_grad_(False)
    return x_hats, stats


def _add_heads_update(loop: "DistillLoop", slots: list, x_hats: list[torch.Tensor], total: int) -> Stats:
    """Hinge loss of the heads on real images vs the detached student outputs, + gamma R1 on the
    real images' head inputs (the frozen features)."""
    nets, rc = loop.nets, loop.rc
    gamma = rc["r1_gamma"]
    _unfreeze(nets.head)
    loop.opt_f.zero_grad(set_to_none=True)
    stats = _zeros(loop, "loss_d", "d_acc_real", "d_acc_fake", *(["r1"] if gamma > 0 else []))
    for (x0, labels, _, _), x_hat in zip(slots, x_hats):
        with loop._autocast():
            if gamma > 0:
                lr, r1 = add_real_logits_with_r1(nets.features, nets.head, x0, labels)
            else:
                lr, r1 = add_logits(nets.features, nets.head, x0, labels), None
            lf = add_logits(nets.features, nets.head, x_hat, labels)
            l_hinge = hinge_discriminator_loss(lr, lf)
        add_discriminator_objective(l_hinge, r1, total, gamma).backward()
        stats["loss_d"] += l_hinge.detach().sum() / total
        _add_accuracy(stats, lr, lf, loop.rounds)
        if r1 is not None:
            stats["r1"] += r1.detach().sum() / total
    stats["nonfinite_fake"] = loop.update(loop.opt_f, loop.f_params, nets.head)
    _freeze(nets.head)
    return stats
