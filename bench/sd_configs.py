"""The public configs of the Stable Diffusion networks the text presets distill, written out so the
memory bench (bench/memory.py) builds them with no download: the values of the hub repositories'
config.json files (diffusers / transformers keys; defaults left out), as published at
huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 (runwayml/stable-diffusion-v1-5's mirror;
unet/, vae/, text_encoder/config.json), huggingface.co/stabilityai/stable-diffusion-2-1-base and
huggingface.co/stabilityai/stable-diffusion-xl-base-1.0 (unet/, text_encoder/, text_encoder_2/, vae/).
Cross-checked against third-party copies of the same files (docs/memory.md names them)."""

from __future__ import annotations

_SD_BLOCKS = {
    "in_channels": 4, "out_channels": 4, "sample_size": 64, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False, "mid_block_scale_factor": 1,
}

# AutoencoderKL (vae/config.json), the same in both pipelines but for sample_size (SD 2.1-base's 768)
VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "act_fn": "silu", "norm_num_groups": 32, "sample_size": 512,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# CLIPTextModel of openai/clip-vit-large-patch14 (SD 1.5's text_encoder/config.json, SDXL's text_encoder/)
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}

CONFIGS = {
    "sd15": {
        "hub": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "unet": {**_SD_BLOCKS, "attention_head_dim": 8, "cross_attention_dim": 768},
        "text_encoder": CLIP_L,
        "vae": VAE,
    },
    "sd21base": {
        "hub": "stabilityai/stable-diffusion-2-1-base",
        "unet": {**_SD_BLOCKS, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                 "use_linear_projection": True},
        # OpenCLIP ViT-H/14's text tower as a CLIPTextModel, its last layer dropped (23 of 24 layers)
        "text_encoder": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                         "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
                         "projection_dim": 512},
        "vae": VAE,
    },
    "sdxl": {
        "hub": "stabilityai/stable-diffusion-xl-base-1.0",
        "unet": {"in_channels": 4, "out_channels": 4, "sample_size": 128, "layers_per_block": 2,
                 "block_out_channels": [320, 640, 1280],
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                 "cross_attention_dim": 2048, "use_linear_projection": True,
                 "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": 2816, "act_fn": "silu", "norm_num_groups": 32,
                 "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0},
        "text_encoder": CLIP_L,
        # CLIPTextModelWithProjection of OpenCLIP ViT-bigG/14's text tower (text_encoder_2/config.json)
        "text_encoder_2": {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
                           "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77,
                           "hidden_act": "gelu", "projection_dim": 1280},
        "vae": {**VAE, "sample_size": 1024, "scaling_factor": 0.13025},
    },
}
