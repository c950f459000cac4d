"""ADD (Sauer et al. 2023, arXiv 2311.17042): phases `warmup`, `add`.

Per slot the iteration draws real images with their conditions (class labels, or a text teacher's
prompt embeddings), the student level (one of the run's generation sigmas: `add_student_steps`,
for a diffusers teacher its discrete timesteps 999/749/499/249) and its noise: the student
denoises x_s = x0 + sigma_s eps. The student goes first, on its turn: lambda_distill L_distill
(the teacher denoises the re-noised, detached output at a sigma on `add_distill_index_range`, or
at a diffusers teacher's timesteps `timestep_range`, without gradient) plus, with
`discriminator: add`, the hinge adversarial term through the frozen feature network and the
trainable heads. The heads then train on the real images and the student's detached outputs of
the same batch (hinge loss, gamma R1 on the heads' inputs). ADD trains no fake score: the critic
is the heads alone, and an `add` run with `discriminator: none` has no critic.

The heads' projection conditioning: class labels on class-conditional teachers; on text teachers
ADD's c_text (the prompt's CLIP text embedding, `text_embedding`) and c_img (the DINOv2 class
token of the slot's *real* image, no gradient), concatenated, each chosen by `add_conditioning`
(the paper's ablation). A latent teacher's images reach DINOv2 through its VAE decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ...errors import ConfigError
from ...nets.heads import ADDHeads, add_heads_for
from ..baseline_losses import (add_discriminator_objective, add_distill_loss, add_distill_weight,
                               add_generator_objective, hinge_discriminator_loss, hinge_generator_loss, r1_penalty)
from .base import Method, Settings, Slot, Stats, disc_accuracy

Net = Callable[..., torch.Tensor]
ADD_CONDITIONINGS = ("text", "image")


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


def add_logits(features: Net, heads: Net, x: torch.Tensor, labels: Optional[torch.Tensor],
               cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ADD's discriminator logits [B, sum_k N_k] of images x: frozen features (given the teacher's
    `labels`, which a teacher-encoder feature network reads), trainable heads projected on `cond`
    (None: on the labels, the class projection; unprojected heads read neither). Gradients reach x
    (the student's adversarial loss) and the heads' parameters."""
    return heads(features(x, labels), labels if cond is None else cond)


def real_features(features: Net, x0: torch.Tensor, labels: Optional[torch.Tensor],
                  class_token: bool) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """The frozen features of real images x0 (the heads' inputs, no gradient) and, with
    `class_token`, DINOv2's class token of the same forward pass (ADD's c_img): one decode and one
    ViT pass per real image and iteration."""
    with torch.no_grad():
        if class_token:
            return features.with_class_token(x0)
        return features(x0, labels), None


def add_real_logits_with_r1(heads: Net, feats: Sequence[torch.Tensor], labels: Optional[torch.Tensor],
                            cond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, sum N_k], R1 [B]) of real images from their frozen features (`real_features`),
    R1 taken on the heads' inputs (ADD Section 3.2), not on the pixels, the condition or the
    heads' parameters; `cond` as in `add_logits`."""
    feats = [f.detach().requires_grad_(True) for f in feats]
    logits = heads(feats, labels if cond is None else cond)
    return logits, r1_penalty(logits, feats)


def text_embedding(cond: torch.Tensor, teacher: torch.nn.Module) -> torch.Tensor:
    """ADD's c_text [B, P] from a text teacher's prompt condition (ours: the paper says only "a CLIP
    text embedding"): SDXL's pooled, projected embedding of its second encoder (the packed
    condition's last row); for SD 1.x / 2.x and the digits testbed, whose condition is the CLIP text
    model's last hidden state [B, L, D], its mean over the L tokens (the pooled end-of-text token
    would need the token ids, which the data do not keep)."""
    pooled_dim = getattr(teacher, "pooled_dim", None)
    if pooled_dim:
        from ...nets.diffusers_sdxl import unpack_sdxl_condition

        return unpack_sdxl_condition(cond, int(pooled_dim))[1].float()
    return cond.float().mean(dim=1)


def text_embedding_dim(teacher: torch.nn.Module) -> int:
    """The width of `text_embedding` for `teacher`."""
    return int(getattr(teacher, "pooled_dim", None) or teacher.cond_shape[1])


def head_condition(parts: Optional[Sequence[str]], labels: Optional[torch.Tensor], c_img: Optional[torch.Tensor],
                   teacher: torch.nn.Module) -> Optional[torch.Tensor]:
    """What ADD's heads are projected on for one slot: the class labels (`parts` None), or the
    concatenation of c_text (`text`) and c_img (`image`: the DINOv2 class token of the real
    images, `real_features`) in that order; None when `parts` is empty (unconditional heads)."""
    if parts is None:
        return labels
    vecs = []
    if "text" in parts:
        vecs.append(text_embedding(labels, teacher))
    if "image" in parts:
        vecs.append(c_img)
    return torch.cat(vecs, dim=1) if vecs else None


@dataclass(frozen=True)
class ADDSettings(Settings):
    add_features: dict
    add_cmap_dim: int
    add_conditioning: list[str] | None
    add_distill_index_range: list[int]
    add_weighting: str
    lambda_distill: float
    r1_gamma: float
    timestep_range: list[int] | None  # diffusers teachers: distillation sigma_k of timesteps k ~ U[lo, hi)


class ADD(Method):
    name = "add"
    generator_first = True
    Settings = ADDSettings

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.text = hasattr(self.nets.teacher, "uncond")
        self.parts = self._conditioning()

    def _conditioning(self) -> Optional[tuple[str, ...]]:
        """The heads' conditioning parts on a text teacher (default ADD's text and image), None
        (class labels) on a class-conditional one; one line for a setting that cannot apply."""
        s = self.settings
        if not self.text:
            if s.add_conditioning is not None:
                raise ConfigError(f"distill.add_conditioning {s.add_conditioning}: text and image conditioning need a "
                                  f"text-to-image teacher (this one is class-conditional: class projection); drop it")
            return None
        parts = tuple(ADD_CONDITIONINGS if s.add_conditioning is None else s.add_conditioning)
        if self.disc == "add" and "image" in parts and s.add_features["kind"] != "dinov2":
            raise ConfigError("distill.add_conditioning: image conditioning is the DINOv2 class token of the real "
                              "image: set add_features.kind: dinov2, or drop image from add_conditioning")
        if s.timestep_range is None and hasattr(self.nets.teacher, "log_sigmas"):
            raise ConfigError("distill.timestep_range: ADD on a diffusers text teacher draws the distillation "
                              "timestep on its scheduler: set it, e.g. [0, 1000]")
        return tuple(p for p in ADD_CONDITIONINGS if p in parts)

    def _features(self, device: torch.device) -> torch.nn.Module:
        """The frozen feature network (`add_features`): the teacher's encoder or DINOv2, which
        reads a latent teacher's images through its VAE decoder."""
        from ...nets.heads import TeacherFeatures
        from ...nets.vit import DINOv2Features, PixelDecoder, build_dinov2

        spec, teacher = self.settings.add_features, self.nets.teacher
        if spec["kind"] == "teacher_encoder":
            return TeacherFeatures(teacher, spec["sigma"])
        decoder = None
        if self.text:
            from ...io.text_run import vae_of

            vae = vae_of(teacher, device)
            decoder = None if vae is None else PixelDecoder(vae.vae, vae.scaling_factor)
        return DINOv2Features(build_dinov2(spec["arch"], spec["weights"]), spec["layers"], decoder)

    def build_head(self, seed: int, img_shape: tuple[int, int, int], label_dim: int, device: torch.device) -> None:
        """ADD's heads on a frozen feature network (`discriminator: add`), projected on the class
        labels or on [c_text, c_img]."""
        nets = self.nets
        if self.disc != "add":
            nets.head = None
            return
        if nets.features is None:
            nets.features = self._features(device).to(device)
        if not isinstance(nets.head, ADDHeads):
            cond_dim = None
            if self.parts is not None:
                cond_dim = ((text_embedding_dim(nets.teacher) if "text" in self.parts else 0)
                            + (nets.features.embed_dim if "image" in self.parts else 0))
            nets.head = add_heads_for(nets.features, img_shape, 0 if self.text else label_dim,
                                      self.settings.add_cmap_dim, seed, device, cond_dim)

    def critic_nets(self) -> list[torch.nn.Module]:
        return [] if self.nets.head is None else [self.nets.head]

    def slot(self, r: int) -> Slot:
        d, nets = self.draws, self.nets
        x0, labels = d.real(d.micro, r)
        sigma_s = add_student_sigma(d.randint(len(self.gen_sigmas), (d.micro,), r), self.gen_sigmas)
        slot = {"x0": x0, "labels": labels, "cond": None, "x_s": x0 + sigma_s * d.randn(x0.shape, r),
                "sigma_s": sigma_s}
        if nets.head is not None:  # the real images' features (and c_img) once, for the heads' turn
            with d.autocast():
                slot["real_feats"], c_img = real_features(nets.features, x0, labels,
                                                          self.parts is not None and "image" in self.parts)
            slot["cond"] = head_condition(self.parts, labels, c_img, nets.teacher)
        return slot

    def _distill_sigma(self, r: int) -> torch.Tensor:
        s = self.settings
        if s.timestep_range is not None:  # a diffusers teacher's (`check_text_settings`)
            return self.draws.timestep_sigma(self.nets.teacher.log_sigmas, *s.timestep_range, r)
        return self.draws.grid_sigma(*s.add_distill_index_range, r)

    def generator_loss(self, kind: str, slot: Slot, r: int) -> tuple[torch.Tensor, Stats]:
        """lambda_distill L_distill (+ the hinge adversarial term with heads) of the student's
        output on the noised real image; keeps the detached output in the slot for the heads."""
        d, nets, s, labels = self.draws, self.nets, self.settings, slot["labels"]
        adv = nets.head is not None
        with d.autocast():
            x_hat = nets.G(slot["x_s"], slot["sigma_s"].flatten(), labels).float()
            sigma_t = self._distill_sigma(r)
            l_dist = add_distill_term(nets.teacher, x_hat, sigma_t, d.randn(x_hat.shape, r), labels,
                                      s.add_weighting)
            l_adv = (hinge_generator_loss(add_logits(nets.features, nets.head, x_hat, labels, slot["cond"]))
                     if adv else None)
        slot["x_g"] = x_hat.detach()
        stats = {"loss_g_distill": l_dist.mean(dim=(1, 2, 3)).sum()}
        if adv:
            stats["loss_g_adv"] = l_adv.sum()
        return add_generator_objective(l_adv, l_dist, d.total, s.lambda_distill), stats

    def critic_loss(self, slot: Slot, r: int) -> tuple[torch.Tensor, Stats]:
        """Hinge loss of the heads on real images vs the detached student outputs, + gamma R1 on
        the real images' head inputs (the frozen features)."""
        d, nets, labels, cond = self.draws, self.nets, slot["labels"], slot["cond"]
        gamma = self.settings.r1_gamma
        x_hat = self.generated(slot, lambda: nets.G(slot["x_s"], slot["sigma_s"].flatten(), labels))
        with d.autocast():
            if gamma > 0:
                logits_real, r1 = add_real_logits_with_r1(nets.head, slot["real_feats"], labels, cond)
            else:
                logits_real, r1 = nets.head(slot["real_feats"], labels if cond is None else cond), None
            logits_fake = add_logits(nets.features, nets.head, x_hat, labels, cond)
            l_hinge = hinge_discriminator_loss(logits_real, logits_fake)
        stats = {"loss_d": l_hinge.sum(), **disc_accuracy(logits_real, logits_fake)}
        if r1 is not None:
            stats["r1"] = r1.sum()
        return add_discriminator_objective(l_hinge, r1, d.total, gamma), stats
