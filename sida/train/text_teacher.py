"""Training the text-to-image testbed's teacher: a pixel-space diffusers `UNet2DConditionModel`
conditioned on CLIP text embeddings of digit captions, with Stable Diffusion's own objective.

SD's recipe: t uniform over a `DDPMScheduler`'s 1000 integer steps, x_t = sqrt(abar_t) x +
sqrt(1 - abar_t) eps, loss = mean-squared error of the predicted eps; the caption is empty with
probability `empty_ratio` (the unconditional branch of classifier-free guidance). Optimiser,
learning-rate ramp, EMA, gradient accumulation and checkpointed state are `TeacherLoop`'s; this
class changes only what one micro-batch's loss is.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..io.text_encoder import TextEncoder
from ..io.data import ImageDataset
from ..io.digits_text import caption_bank, draw_caption_indices
from ..nets.build import autocast
from ..run.dist import DistInfo
from .draws import slot_generator
from .teacher import TeacherLoop

TRAIN_STEPS = 1000  # Stable Diffusion's DDPM step count


def text_unet(cfg: dict) -> torch.nn.Module:
    """The teacher's `UNet2DConditionModel` from `teacher.unet`, `teacher.text.width` and `data`
    (random init from torch's global RNG, which the stage seeds)."""
    from diffusers import UNet2DConditionModel

    u, data = cfg["teacher"]["unet"], cfg["data"]
    down = list(u["down_block_types"])
    if len(down) != len(u["channels"]):
        raise ConfigError(f"teacher.unet.down_block_types has {len(down)} entries but teacher.unet.channels "
                          f"{len(u['channels'])}: give one block type per resolution level")
    if data["resolution"] % 2 ** (len(down) - 1):
        raise ConfigError(f"data.resolution {data['resolution']} cannot be halved {len(down) - 1} times: "
                          f"use fewer teacher.unet levels")
    bad = [c for c in u["channels"] if c % u["norm_groups"]]
    if bad:
        raise ConfigError(f"teacher.unet.norm_groups {u['norm_groups']} does not divide the channel count {bad[0]}: "
                          f"pick norm_groups that divides every entry of teacher.unet.channels")
    up = [b.replace("Down", "Up") for b in reversed(down)]  # the decoder mirrors the encoder
    return UNet2DConditionModel(
        sample_size=data["resolution"], in_channels=data["channels"], out_channels=data["channels"],
        block_out_channels=tuple(u["channels"]), down_block_types=tuple(down), up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=u["layers_per_block"],
        cross_attention_dim=cfg["teacher"]["text"]["width"], attention_head_dim=u["head_dim"],
        norm_num_groups=u["norm_groups"],
        # pooled_text: diffusers' "text" addition embedding (attention pooling of the caption
        # added to the time embedding), a global path for the caption beside cross-attention.
        addition_embed_type="text" if u["pooled_text"] else None,
        addition_embed_type_num_heads=cfg["teacher"]["text"]["heads"])


def ddpm_scheduler(beta_schedule: str):
    """The training scheduler: 1000 steps, epsilon prediction, x0 clipped to [-1, 1] when
    sampling (pixel data), SD's `steps_offset` 1."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TRAIN_STEPS, beta_schedule=beta_schedule, prediction_type="epsilon",
                         clip_sample=True, steps_offset=1)


def check_text_data(cfg: dict) -> None:
    """The testbed's captions name digits: its data must be the digits with their 10 labels."""
    data = cfg["data"]
    if data["kind"] != "digits" or data["label_dim"] != 10:
        raise ConfigError(f"teacher.source train_text captions scikit-learn's digits: set data.kind digits and "
                          f"data.label_dim 10 (got kind {data['kind']}, label_dim {data['label_dim']})")


class TextTeacherLoop(TeacherLoop):
    """One SD-objective iteration per `step` (TeacherLoop's step, accumulation and state).

    The frozen text encoder runs once, on the caption bank (`sida.io.digits_text`): a batch's
    conditions are rows of that table, picked by caption indices drawn from the slot's data
    stream after its dataset indices.
    """

    def __init__(self, cfg: dict, unet: torch.nn.Module, dataset: ImageDataset, info: DistInfo, tokenizer,
                 text_encoder: torch.nn.Module, gens: dict[str, torch.Generator] | None = None, seed: int = 0) -> None:
        super().__init__(cfg, unet, dataset, info, gens=gens, seed=seed)
        text = self.t["text"]
        self.num_templates = len(text["templates"])
        self.empty_ratio = text["empty_ratio"]
        captions, _ = caption_bank(text["templates"])
        self.bank = TextEncoder(tokenizer, text_encoder).encode(captions).to(self.device)
        self.scheduler = ddpm_scheduler(self.t["beta_schedule"])
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)

    def micro_loss(self, r: int) -> torch.Tensor:
        """Per-sample eps-prediction MSE [micro] of accumulation round `r`."""
        data_gen = slot_generator(self.gens, "data", r)
        idx = torch.randint(len(self.dataset), (self.micro,), generator=data_gen)
        x, labels = self.dataset.get_batch(idx)
        caps = draw_caption_indices(labels.argmax(dim=1), self.num_templates, self.empty_ratio, data_gen)
        x, cond = x.to(self.device), self.bank[caps.to(self.device)]
        g = slot_generator(self.gens, "noise", r)
        t = torch.randint(TRAIN_STEPS, (self.micro,), generator=g, device=self.device)
        eps = torch.randn(x.shape, generator=g, device=self.device)
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x + (1 - abar).sqrt() * eps
        with autocast(self.device, self.t["precision"]):
            pred = self.net(x_t, t, encoder_hidden_states=cond).sample
        return (pred.float() - eps).square().mean(dim=(1, 2, 3))
