"""Tiny random diffusers teachers made in the tests (nothing is downloaded): a pixel-space
UNet2DModel of 8x8 single-channel digits with its scheduler, saved in the pipeline layout
(`unet/`, `scheduler/`) that `DDPMPipeline.save_pretrained` writes.

    python -m tests.diffusers_assets FOLDER [PREDICTION_TYPE] [LABEL_DIM]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Two levels, attention in the mid block only (the SiDA encoder output): small enough that a
# forward of 64 images costs milliseconds, not seconds, on a loaded 2-core CPU.
TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 norm_num_groups=4, attention_head_dim=8)


def make_tiny_unet(prediction_type: str = "epsilon", label_dim: int = 0, seed: int = 0,
                   scheduler: str = "DDPMScheduler", out_std: float = 0.3):
    """(UNet2DModel, scheduler) with random weights; the output layer's weights drawn with std
    `out_std`, so that the prediction is neither near zero (every test would pass trivially) nor,
    for the sampler tests, so large that the ODE of an untrained network becomes stiff."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**TINY_UNET, num_class_embeds=label_dim or None)
    with torch.no_grad():
        for p in unet.conv_out.parameters():
            p.normal_(0, out_std)
    sched = getattr(diffusers, scheduler)(num_train_timesteps=1000, beta_schedule="linear",
                                          prediction_type=prediction_type, clip_sample=False)
    return unet.eval(), sched


def save_tiny_teacher(folder: str | Path, prediction_type: str = "epsilon", label_dim: int = 0,
                      seed: int = 0) -> Path:
    """Write a tiny teacher in the pipeline layout into `folder`; return it."""
    folder = Path(folder)
    unet, sched = make_tiny_unet(prediction_type, label_dim, seed)
    unet.save_pretrained(folder / "unet")
    sched.save_pretrained(folder / "scheduler")
    return folder


if __name__ == "__main__":
    args = sys.argv[1:]
    print(save_tiny_teacher(args[0], *(args[1:2] or ["epsilon"]), *[int(a) for a in args[2:3]]))
