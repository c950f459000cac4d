"""CLIP score of text-to-image samples: the cosine between a CLIP model's image and text embeddings.

`ClipScorer` is an open_clip model (ViT-g-14 by default, as SiD-LSG and DMD2 report) with its own
evaluation preprocessing, frozen on a device, whose weights come from a LOCAL file only (the fetch
stage's asset of kind ``clip``): nothing here downloads.

The protocol is GigaGAN's evaluation script (github.com/mingukkang/GigaGAN, evaluation/), which
SiD-LSG's ``evaluate_SiD_t2i_coco256.sh`` and DMD2's ``main/coco_eval`` run with ViT-g-14
(laion2b_s12b_b42k): each sample, already centre-cropped and resized to the protocol's 256 px
(`sida.eval.coco.prepare_images`), goes through open_clip's evaluation transform (bicubic resize
of the shorter side to the model's input size, centre crop, ImageNet-CLIP mean/std); each prompt
is prefixed with "A photo depicts " (Hessel et al. 2021, arXiv:2104.08718) and tokenised with
CLIP's BPE (77 tokens, truncated with the end token kept); the score of a sample is the raw
cosine of the two embeddings, and the reported number is its mean over the samples (about 0.3
for Stable Diffusion 1.5 and its one-step students).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AssetError, ConfigError, DataError, brief_reason, require_file
from ..io.assets import sha256_file
from ..io.images import quantize

__all__ = ["ClipScorer", "GIGAGAN_PREFIX", "to_uint8_images"]

#: The prefix GigaGAN's (so SiD-LSG's and DMD2's) CLIP score puts before every caption.
GIGAGAN_PREFIX = "A photo depicts "


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW as given, or [-1, 1] float NCHW quantised as our PNGs are saved (`quantize`),
    so a score of tensors equals the score of the saved files."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"images must be NCHW with 1 or 3 channels, not shape {list(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise DataError(f"images must be uint8 or float in [-1, 1], not {images.dtype}")
    return quantize(images)


def _weights_format_problem(path: Path) -> str | None:
    """Why `path` cannot be a weights file, from its first and last bytes (a torn download, an
    HTML error page saved under the file's name), or None: torch.save's zip archive (its
    directory sits at the end) or safetensors (a length-prefixed JSON header)."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            ok = 0 < n <= path.stat().st_size - 8 and f.read(1) == b"{"
        return None if ok else "not a safetensors file"
    return None if zipfile.is_zipfile(path) else "not a torch.save zip archive: torn or not a weights file"


class ClipScorer(torch.nn.Module):
    """Per-sample CLIP score (raw cosine) of images against their prompts.

    `score(images, prompts)` returns cos(e_img, e_txt) per sample, where e_img and e_txt are the
    L2-normalised outputs of the model's `encode_image` (on the preprocessed image) and
    `encode_text` (on the tokenised ``prefix + prompt``). This is the number SiD-LSG, DMD2 and
    GigaGAN report (e.g. 0.313). Other papers (torchmetrics' CLIPScore, Hessel et al.'s CLIP-S
    without the 2.5 weight) report ``100 * max(cos, 0)``: the same samples give 31.3 there; the
    two agree up to that factor whenever the cosine is positive, which it is for any sensible
    image and caption. Compare numbers only with the same CLIP model, weights and prefix.
    """

    def __init__(self, model_name: str, weights_file: str | Path, device: torch.device | str = "cpu",
                 prefix: str = GIGAGAN_PREFIX, asset: str = "clip") -> None:
        super().__init__()
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        path = Path(weights_file)
        fix = (f"run the fetch stage (an asset of kind clip named '{asset}') or set evaluate.clip.weights to "
               f"the {model_name} weights file")
        require_file(path, "CLIP weights", AssetError, fix)
        if open_clip.get_model_config(model_name) is None:
            raise ConfigError(f"evaluate.clip.model: open_clip has no model '{model_name}' (e.g. ViT-g-14, "
                              f"ViT-B-32; see open_clip.list_models())")
        problem = _weights_format_problem(path)
        if problem:  # before building the model: ViT-g-14 alone takes a minute on a CPU
            raise AssetError(f"CLIP weights {path} cannot be loaded into {model_name} ({problem}): {fix}")
        # No `pretrained` tag: open_clip would download; the weights come from our local file.
        model = open_clip.create_model(model_name, pretrained=None, pretrained_text=False)
        try:
            open_clip.load_checkpoint(model, str(path), strict=True)
        except Exception as exc:  # a torn download, another model's weights, an HTML page saved as .bin
            raise AssetError(f"CLIP weights {path} cannot be loaded into {model_name} ({brief_reason(exc)}): "
                             f"{fix}") from None
        self.model = model.to(device).eval().requires_grad_(False)
        # The model's own evaluation transform (what open_clip.create_model_and_transforms returns).
        self.preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name, self.prefix, self.path = model_name, prefix, str(path)
        self.sha256 = sha256_file(path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def info(self) -> dict:
        """JSON-able description recorded with every CLIP score."""
        return {"model": self.model_name, "path": self.path, "sha256": self.sha256, "prefix": self.prefix,
                "score": "raw cosine (mean over samples)"}

    def pixel_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The model's input: each uint8 image through open_clip's evaluation transform (PIL, on the
        host: its bicubic resize is PIL's, as in the published scores)."""
        from PIL import Image

        u8 = to_uint8_images(images).cpu()
        if u8.shape[1] == 1:
            u8 = u8.repeat(1, 3, 1, 1)
        arrays = u8.permute(0, 2, 3, 1).numpy()
        return torch.stack([self.preprocess(Image.fromarray(np.ascontiguousarray(a))) for a in arrays])

    def tokens(self, prompts: list[str]) -> torch.Tensor:
        """Token ids of ``prefix + prompt`` (77 per prompt for CLIP models)."""
        return self.tokenizer([self.prefix + p for p in prompts])

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-sample raw cosine [N] (float32, on the host) of images (uint8 NCHW or [-1, 1] float)
        and their prompts."""
        if isinstance(prompts, str) or len(prompts) != len(images):
            raise DataError(f"CLIP score needs one prompt per image: {len(images)} images, "
                            f"{1 if isinstance(prompts, str) else len(prompts)} prompts")
        img = self.model.encode_image(self.pixel_inputs(images).to(self.device))
        txt = self.model.encode_text(self.tokens(list(prompts)).to(self.device))
        return (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1).cpu()
