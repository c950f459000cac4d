"""ADD (Sauer et al. 2023): phases `warmup`, `add`.

Per slot the iteration draws real images with their labels, the student level (one of the run's
generation sigmas) and its noise: the student denoises x_s = x0 + sigma_s eps. The student goes
first, on its turn: lambda_distill L_distill (the teacher denoises the re-noised, detached output
at a sigma on `add_distill_index_range`, without gradient) plus, with `discriminator: add`, the
hinge adversarial term through the frozen feature network and the trainable heads. The heads
then train on the real images and the student's detached outputs of the same batch (hinge loss,
gamma R1 on the heads' inputs). ADD trains no fake score: the critic is the heads alone, and an
`add` run with `discriminator: none` has no critic (the distillation term alone trains the student).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ...nets.heads import ADDHeads, add_heads_for
from ..baseline_losses import (add_discriminator_objective, add_distill_loss, add_distill_weight,
                               add_generator_objective, hinge_discriminator_loss, hinge_generator_loss, r1_penalty)
from .base import Method, Settings, Slot, Stats, disc_accuracy

Net = Callable[..., torch.Tensor]


def add_student_sigma(level: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """The student noise level of each sample from its drawn level index (0..N-1) -> [B,1,1,1]."""
    table = torch.tensor([float(s) for s in sigmas], dtype=torch.float32, device=level.device)
    return table[level.reshape(-1)].reshape(-1, 1, 1, 1)


def add_distill_term(teacher: Net, x_hat: torch.Tensor, sigma_t: torch.Tensor, eps: torch.Tensor,
                     labels: Optional[torch.Tensor], weighting: str = "exponential") -> torch.Tensor:
    """Per-pixel ADD distillation loss: the teacher denoises sg(x_hat) + sigma_t eps without
    gradient, the student output is pulled towards it with weight c(sigma_t) (ADD eq. 5)."""
    with torch.no_grad():
        target = teacher(x_hat.detach() + sigma_t * eps, sigma_t.reshape(-1), labels)
    return add_distill_loss(x_hat, target, add_distill_weight(sigma_t, weighting))


def add_logits(features: Net, heads: Net, x: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """ADD's discriminator logits [B, sum_k N_k] of images x: frozen features, trainable heads.
    Gradients reach x (the student's adversarial loss) and the heads' parameters."""
    return heads(features(x, labels), labels)


def add_real_logits_with_r1(features: Net, heads: Net, x0: torch.Tensor,
                            labels: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, sum N_k], R1 [B]) of real images, R1 taken on the heads' inputs (the frozen
    features of x0, ADD Section 3.2), not on the pixels and not on the heads' parameters."""
    with torch.no_grad():
        feats = [f.detach() for f in features(x0, labels)]
    feats = [f.requires_grad_(True) for f in feats]
    logits = heads(feats, labels)
    return logits, r1_penalty(logits, feats)


@dataclass(frozen=True)
class ADDSettings(Settings):
    add_features: dict
    add_cmap_dim: int
    add_distill_index_range: list[int]
    add_weighting: str
    lambda_distill: float
    r1_gamma: float


class ADD(Method):
    name = "add"
    generator_first = True
    Settings = ADDSettings

    def build_head(self, seed: int, img_shape: tuple[int, int, int], label_dim: int, device: torch.device) -> None:
        """ADD's heads on a frozen feature network (`discriminator: add`): the teacher's encoder or
        DINOv2 (`add_features`)."""
        nets, s = self.nets, self.settings
        if self.disc != "add":
            nets.head = None
            return
        if nets.features is None:
            from ...nets.heads import TeacherFeatures
            from ...nets.vit import DINOv2Features, build_dinov2

            spec = s.add_features
            nets.features = (TeacherFeatures(nets.teacher, spec["sigma"]) if spec["kind"] == "teacher_encoder" else
                             DINOv2Features(build_dinov2(spec["arch"], spec["weights"]), spec["layers"]))
            nets.features.to(device)
        if not isinstance(nets.head, ADDHeads):
            nets.head = add_heads_for(nets.features, img_shape, label_dim, s.add_cmap_dim, seed, device)

    def critic_nets(self) -> list[torch.nn.Module]:
        return [] if self.nets.head is None else [self.nets.head]

    def slot(self, r: int) -> Slot:
        d = self.draws
        x0, labels = d.real(d.micro, r)
        sigma_s = add_student_sigma(d.randint(len(self.gen_sigmas), (d.micro,), r), self.gen_sigmas)
        return {"x0": x0, "labels": labels, "x_s": x0 + sigma_s * d.randn(x0.shape, r), "sigma_s": sigma_s}

    def generator_loss(self, kind: str, slot: Slot, r: int) -> tuple[torch.Tensor, Stats]:
        """lambda_distill L_distill (+ the hinge adversarial term with heads) of the student's
        output on the noised real image; keeps the detached output in the slot for the heads."""
        d, nets, s, labels = self.draws, self.nets, self.settings, slot["labels"]
        adv = nets.head is not None
        with d.autocast():
            x_hat = nets.G(slot["x_s"], slot["sigma_s"].flatten(), labels).float()
            sigma_t = d.grid_sigma(*s.add_distill_index_range, r)
            l_dist = add_distill_term(nets.teacher, x_hat, sigma_t, d.randn(x_hat.shape, r), labels,
                                      s.add_weighting)
            l_adv = hinge_generator_loss(add_logits(nets.features, nets.head, x_hat, labels)) if adv else None
        slot["x_g"] = x_hat.detach()
        stats = {"loss_g_distill": l_dist.mean(dim=(1, 2, 3)).sum()}
        if adv:
            stats["loss_g_adv"] = l_adv.sum()
        return add_generator_objective(l_adv, l_dist, d.total, s.lambda_distill), stats

    def critic_loss(self, slot: Slot, r: int) -> tuple[torch.Tensor, Stats]:
        """Hinge loss of the heads on real images vs the detached student outputs, + gamma R1 on
        the real images' head inputs (the frozen features)."""
        d, nets, x0, labels = self.draws, self.nets, slot["x0"], slot["labels"]
        gamma = self.settings.r1_gamma
        x_hat = self.generated(slot, lambda: nets.G(slot["x_s"], slot["sigma_s"].flatten(), labels))
        with d.autocast():
            if gamma > 0:
                logits_real, r1 = add_real_logits_with_r1(nets.features, nets.head, x0, labels)
            else:
                logits_real, r1 = add_logits(nets.features, nets.head, x0, labels), None
            logits_fake = add_logits(nets.features, nets.head, x_hat, labels)
            l_hinge = hinge_discriminator_loss(logits_real, logits_fake)
        stats = {"loss_d": l_hinge.sum(), **disc_accuracy(logits_real, logits_fake)}
        if r1 is not None:
            stats["r1"] = r1.sum()
        return add_discriminator_objective(l_hinge, r1, d.total, gamma), stats
