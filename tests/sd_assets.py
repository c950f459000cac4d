"""Tiny random Stable Diffusion pipelines made in the tests (nothing is downloaded): a
UNet2DConditionModel with cross-attention, a CLIPTextModel with a CLIPTokenizer over a small
byte-level vocabulary made here, a DDPMScheduler with SD's scaled-linear betas and, unless
`vae=False` (a pixel-space text pipeline, the digits testbed), an AutoencoderKL (16x16 RGB images
<-> 4x8x8 latents). Saved by `StableDiffusionPipeline.save_pretrained`, the layout of SD 1.5/2.1.
`make_tiny_sdxl_pipeline`: the same for SDXL (two text encoders, the second with a projection, a
UNet with SDXL's "text_time" addition embedding), saved by `StableDiffusionXLPipeline`.

    python -m tests.sd_assets FOLDER [PREDICTION_TYPE] [--no-vae] [--sdxl]
"""

from __future__ import annotations

import sys
from pathlib import Path

MAX_TOKENS = 16  # the tokenizer's model_max_length = the text encoder's positions (SD: 77)
HIDDEN = 32  # the text encoder's width = the UNet's cross_attention_dim (SD 1.5: 768)
# SDXL's widths, tiny: text_encoder 16 + text_encoder_2 32 = cross_attention_dim 48 (768 + 1280 =
# 2048); the pooled projection 24 (1280) + 6 time ids x 4 (x 256) = the add_embedding's input 48 (2816).
XL_HIDDEN, XL_POOLED, XL_TIME_DIM = (16, 32), 24, 4


def tiny_unet_config(channels: int) -> dict:
    """Two levels, cross-attention in the first level and the mid block (SD's block types)."""
    return dict(sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1,
                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=HIDDEN,
                attention_head_dim=4, norm_num_groups=8)


def _tiny_vocab() -> tuple[dict, list]:
    """(vocab, merges) of a byte-level BPE like CLIP's: every byte's character alone and
    word-final (with "</w>"), the two special tokens, and a few merges so that words are not only
    single characters."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "g</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def _text_model(tokenizer, hidden: int, projection_dim: int | None = None):
    """A random 2-layer CLIP text model over `tokenizer` (with a projection: SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, projection_dim=projection_dim or 512)
    return (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(config).eval()


def _scheduler(prediction_type: str):
    import diffusers

    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", prediction_type=prediction_type, steps_offset=1,
                                   clip_sample=False)


def _tiny_vae(levels: int = 2, out_channels: int = 3, scaling_factor: float = 0.18215):
    import diffusers

    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=out_channels, latent_channels=4, block_out_channels=(8, 16)[:levels],
        layers_per_block=1, norm_num_groups=4, sample_size=8 * levels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, scaling_factor=scaling_factor)


def _spread_output(unet) -> None:
    import torch

    with torch.no_grad():
        for p in unet.conv_out.parameters():
            p.normal_(0, 0.3)


def make_tiny_sd_pipeline(prediction_type: str = "epsilon", vae: bool = True, seed: int = 0, digits: bool = False):
    """A `StableDiffusionPipeline` of tiny random parts (eval mode); the output layers' weights are
    drawn with std 0.3 so that the prediction is not near zero (a test would pass trivially).
    `digits`: a VAE of one level that encodes 8x8 RGB images to 4x8x8 latents and decodes them to
    8x8 grey images, the digits classifier's input (the end-to-end DAG scores its samples)."""
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**tiny_unet_config(4 if vae else 1))
    _spread_output(unet)
    autoencoder = _tiny_vae(1, 1) if digits and vae else _tiny_vae() if vae else None
    tokenizer = CLIPTokenizer(*_tiny_vocab(), model_max_length=MAX_TOKENS)
    pipe = diffusers.StableDiffusionPipeline(vae=autoencoder, text_encoder=_text_model(tokenizer, HIDDEN),
                                             tokenizer=tokenizer, unet=unet.eval(), scheduler=_scheduler(prediction_type),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    return pipe


def make_tiny_sdxl_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A `StableDiffusionXLPipeline` of tiny random parts (eval mode): 16x16 images <-> 4x8x8
    latents, so its time ids are (16, 16, 0, 0, 16, 16); the second tokenizer pads with "!" and the
    VAE's scaling factor is 0.13025, as SDXL's."""
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**dict(
        tiny_unet_config(4), cross_attention_dim=sum(XL_HIDDEN), addition_embed_type="text_time",
        addition_time_embed_dim=XL_TIME_DIM, projection_class_embeddings_input_dim=XL_POOLED + 6 * XL_TIME_DIM))
    _spread_output(unet)
    tokenizer = CLIPTokenizer(*_tiny_vocab(), model_max_length=MAX_TOKENS)
    tokenizer_2 = CLIPTokenizer(*_tiny_vocab(), model_max_length=MAX_TOKENS, pad_token="!")
    return diffusers.StableDiffusionXLPipeline(
        vae=_tiny_vae(scaling_factor=0.13025), text_encoder=_text_model(tokenizer, XL_HIDDEN[0]),
        text_encoder_2=_text_model(tokenizer_2, XL_HIDDEN[1], XL_POOLED), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=_scheduler(prediction_type), add_watermarker=False)


def save_tiny_sdxl_pipeline(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny SDXL pipeline (save_pretrained's layout, safetensors) into `folder`; return it."""
    folder = Path(folder)
    make_tiny_sdxl_pipeline(prediction_type, seed).save_pretrained(folder)
    return folder


def vp_batch(sched, t: int, seed: int = 0):
    """(x_vp, its EDM x, sigma) at integer timestep t of `sched` from a fixed x0 and noise [4, 4, 8, 8]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x0, n = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    abar = sched.alphas_cumprod[t]
    x_vp = abar.sqrt() * x0 + (1 - abar).sqrt() * n
    return x_vp, x_vp / abar.sqrt(), float(((1 - abar) / abar).sqrt())


def save_tiny_sd_pipeline(folder: str | Path, prediction_type: str = "epsilon", vae: bool = True,
                          seed: int = 0, digits: bool = False) -> Path:
    """Write a tiny SD pipeline (save_pretrained's layout, safetensors) into `folder`; return it."""
    folder = Path(folder)
    make_tiny_sd_pipeline(prediction_type, vae, seed, digits).save_pretrained(folder)
    return folder


def save_captioned_digits(folder: str | Path, count: int = 64) -> Path:
    """The first `count` scikit-learn digits as 8x8 RGB PNGs with `captions.jsonl` ("a handwritten
    7"), and the captions alone as `prompts.txt`: the data of the end-to-end text DAG."""
    import json

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    lines, prompts = [], []
    for i in range(count):
        pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
        Image.fromarray(pixels, "L").convert("RGB").save(folder / f"{i:04d}.png")
        prompts.append(f"a handwritten {int(digits.target[i])}")
        lines.append(json.dumps({"file": f"{i:04d}.png", "caption": prompts[-1]}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return folder


if __name__ == "__main__":
    flags = {"--no-vae", "--digits", "--sdxl"}
    args = [a for a in sys.argv[1:] if a not in flags]
    if "--sdxl" in sys.argv[1:]:
        print(save_tiny_sdxl_pipeline(args[0], *(args[1:2] or ["epsilon"])))
        sys.exit(0)
    print(save_tiny_sd_pipeline(args[0], *(args[1:2] or ["epsilon"]), vae="--no-vae" not in sys.argv[1:],
                                digits="--digits" in sys.argv[1:]))
