"""Feature extractors for sample-quality metrics, run in batches on the device.

Every extractor takes uint8 images [N, C, H, W] (quantised exactly as saved PNGs would be, as in
EDM's fid.py) and returns `(features [N, D] float32, probs [N, K] or None)`:

- `InceptionExtractor`: the TorchScript Inception-v3 that EDM's fid.py and clean-fid use
  (`inception-2015-12-05.pt`), loaded from a LOCAL file named in the config: never downloaded
  here (clean-fid would fetch it into a fixed temp path). Modes as clean-fid names them:
  `legacy_tensorflow` (the network resizes inside, TF-style: EDM's numbers) and `clean`
  (PIL-equivalent bicubic resize to 299 on the device, then the same layers). Class probabilities
  for the Inception Score come from the output layer without its bias, as StyleGAN2-ADA does.
- `DINOv2Extractor`: FD-DINOv2 as EDM2 computes it (class token of DINOv2 ViT-L/14 at 224x224,
  bicubic antialiased resize, ImageNet normalisation) with timm's ViT and the original checkpoint
  (a local file; the position embedding resampled once as the original does per forward).
- `DigitsClassifierExtractor`: the small CNN of `sida.eval.digits_classifier`, for the embedded
  default where nothing may be downloaded. Features: its penultimate layer ("FD (digits
  classifier)", not FID); probs: its softmax (so IS works). Trained deterministically once and
  cached by a hash of its recipe; the hash of its weights is recorded with every metric.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import AssetError, CheckpointError, ConfigError, brief_reason
from ..io.assets import sha256_file
from ..io.atomic import atomic_save_torch
# DINOv2's builder lives with the networks (ADD's discriminator uses it too).
from ..nets.vit import DINOV2_ARCHS, DINOV2_RESOLUTION, build_dinov2, imagenet_normalize
from ..run.config import resolve_extractor_name
from .digits_classifier import CLASSIFIER_RECIPE, DigitsCNN, train_digits_classifier

__all__ = ["Extractor", "InceptionExtractor", "DigitsClassifierExtractor", "build_extractor",
           "load_or_train_digits_classifier", "state_dict_sha256", "make_random_inception_file",
           "INCEPTION_URL", "inception_weights_path", "cache_dir", "DINOv2Extractor", "dinov2_preprocess",
           "save_random_dinov2", "dinov2_weights_path"]

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"


def state_dict_sha256(sd: dict) -> str:
    """sha256 over a state dict's names and raw tensor bytes (sorted): equal weights, equal hash."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def cache_dir(cfg: dict) -> Path:
    """Where evaluation caches (classifier, reference statistics) live for this experiment."""
    return Path(cfg["results_dir"]) / cfg["experiment"] / "evaluate" / "cache"


def inception_weights_path(cfg: dict) -> Path:
    """The local Inception weights file (`evaluate.inception_weights`, default from results_dir)."""
    p = cfg["evaluate"]["inception_weights"]
    return Path(p) if p else Path(cfg["results_dir"]) / "assets" / INCEPTION_FILE


class Extractor(torch.nn.Module):
    """Common interface: `forward(uint8 images NCHW) -> (features, probs | None)`.

    Attributes: `name` (config name), `mode` (recorded in metrics), `label` (how the report names
    the Fréchet distance), `metric_key` ('fid' or 'fd'), `feature_dim`, `sha256` (of the weights),
    `resolution`/`channels` it requires (None = any), `info` (extra facts for metrics.json).
    """

    name: str = ""
    mode: str = ""
    label: str = ""
    metric_key: str = "fd"
    feature_dim: int = 0
    sha256: str = ""
    resolution: int | None = None
    channels: int | None = None
    has_probs: bool = False

    @property
    def info(self) -> dict:
        """JSON-able description recorded with every metric."""
        return {"name": self.name, "mode": self.mode, "label": self.label, "feature_dim": self.feature_dim,
                "sha256": self.sha256}

    def check_images(self, resolution: int, channels: int, what: str) -> None:
        """Raise a one-line DataError if images of this shape cannot go through the extractor."""
        if self.resolution is not None and resolution != self.resolution:
            raise AssetError(f"{what} has resolution {resolution} but the {self.name} extractor needs "
                             f"{self.resolution}x{self.resolution}: use evaluate.extractor: inception for this data")
        if self.channels is not None and channels != self.channels:
            raise AssetError(f"{what} has {channels} channels but the {self.name} extractor needs {self.channels}: "
                             f"use evaluate.extractor: inception for this data")


# --------------------------------------------------------------------------------------------
# Inception (local TorchScript file)


class InceptionExtractor(Extractor):
    """EDM / clean-fid Inception-v3 from a local TorchScript file, batched on the device."""

    name = "inception"
    metric_key = "fid"
    label = "FID"
    feature_dim = 2048

    def __init__(self, path: str | Path, mode: str = "legacy_tensorflow", device: torch.device | str = "cpu") -> None:
        super().__init__()
        path = Path(path)
        if mode not in ("legacy_tensorflow", "clean"):
            raise ConfigError(f"evaluate.inception_mode: unknown mode '{mode}' (legacy_tensorflow or clean)")
        if not path.is_file():
            raise AssetError(f"Inception weights {path} do not exist: run the fetch stage, or download "
                             f"{INCEPTION_URL} to that path (or set evaluate.inception_weights)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still works
                self.base = torch.jit.load(str(path), map_location=torch.device(device)).eval()
        except Exception as exc:  # a torn download, an HTML error page saved as .pt, ...
            first = brief_reason(exc)
            raise CheckpointError(f"Inception weights {path} cannot be loaded ({first}): delete the file and "
                                  f"fetch {INCEPTION_URL} again") from None
        self.mode = mode
        self.sha256 = sha256_file(path)
        self.path = str(path)
        out = getattr(self.base, "output", None)
        # StyleGAN2-ADA's IS uses softmax(features @ W^T) without the output bias.
        self.has_probs = out is not None and hasattr(out, "weight")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = images.to(torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)  # grayscale -> RGB, as EDM's fid.py
        if self.mode == "legacy_tensorflow":
            feats = self.base(x, return_features=True)
        else:
            # clean-fid's "clean" resize is PIL bicubic on float images; torch's antialiased bicubic
            # uses PIL's kernel (a = -0.5) and support, so this matches without a numpy round trip.
            x = F.interpolate(x, size=(299, 299), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0, 255)
            feats = self.base.layers((x - 128) / 128)
        feats = feats.reshape(x.shape[0], -1).to(torch.float32)
        probs = None
        if self.has_probs:
            probs = torch.softmax(F.linear(feats, self.base.output.weight.to(feats.dtype)), dim=1)
        return feats, probs

    @property
    def info(self) -> dict:
        return {**super().info, "path": self.path}


class _InceptionStandIn(torch.nn.Module):
    """The Inception-v3 trunk (torchvision's structure, random weights) behind the interface of
    `inception-2015-12-05.pt`: `layers`, `output`, forward(img, return_features, ...)."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        m = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
        names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                 "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]
        self.layers = torch.nn.Sequential(*[getattr(m, n) for n in names], torch.nn.Flatten())
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = F.interpolate(img.to(torch.float32), size=(299, 299), mode="bilinear", align_corners=False)
        f = self.layers((x - 128) / 128).view(x.shape[0], 2048)
        if return_features:
            return f
        if no_output_bias:
            return torch.softmax(F.linear(f, self.output.weight), 1)
        return torch.softmax(self.output(f), 1)


def make_random_inception_file(path: str | Path, seed: int = 0) -> Path:
    """Write a TorchScript Inception-v3 with random weights and the real file's interface.

    For offline tests and the benchmark only: speed and code paths are those of the real network,
    the numbers are not FIDs. BatchNorm statistics are set from one batch of noise images so that
    activations keep unit scale (with untrained running stats they overflow float32).
    """
    torch.manual_seed(seed)
    m = _InceptionStandIn()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None  # cumulative average: one batch sets the running stats exactly
    m.train()
    g = torch.Generator().manual_seed(seed)
    # Noise and blocky (upscaled 8x8) images: BatchNorm statistics that suit both keep the
    # features of smooth, low-resolution images at a sane scale too.
    calib = torch.cat([torch.rand(4, 3, 64, 64, generator=g),
                       F.interpolate(torch.rand(4, 3, 8, 8, generator=g), size=(64, 64), mode="nearest")])
    with torch.no_grad():
        m(calib * 255, return_features=True)
    m.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(m)
        tmp = path.with_name(path.name + ".tmp")
        scripted.save(str(tmp))
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------
# DINOv2 (FD-DINOv2, EDM2's second metric): timm's ViT with the original checkpoint's weights

def dinov2_preprocess(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> DINOv2 input: bicubic antialiased resize to 224x224 (on the float
    values, EDM2's 'torch' resize mode), /255, ImageNet mean/std normalisation."""
    x = images_u8.to(torch.float32)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(DINOV2_RESOLUTION, DINOV2_RESOLUTION), mode="bicubic", antialias=True)
    return imagenet_normalize(x / 255)


def save_random_dinov2(path: str | Path, arch: str = "vits14", seed: int = 0) -> Path:
    """A DINOv2 checkpoint in the original layout (518px position grid, mask token) with random
    weights: for offline tests and CI only, the numbers are not FD-DINOv2s."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(DINOV2_ARCHS[arch][0], pretrained=False, num_classes=0)  # 518x518: 37x37 grid
    sd = dict(model.state_dict(), mask_token=torch.zeros(1, model.embed_dim))
    atomic_save_torch(sd, path)
    return Path(path)


class DINOv2Extractor(Extractor):
    """FD-DINOv2 features: the class token of DINOv2 (ViT-L/14 by default), 224 bicubic antialiased
    inputs with ImageNet normalisation, as EDM2's calculate_metrics.py."""

    name = "dinov2"
    metric_key = "fd_dinov2"
    label = "FD-DINOv2"
    has_probs = False

    def __init__(self, arch: str = "vitl14", weights: str | Path | None = None,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.model = build_dinov2(arch, weights).to(device)
        self.arch = arch
        self.mode = f"dinov2_{arch}"
        self.feature_dim = DINOV2_ARCHS[arch][1]
        self.path = str(weights) if weights is not None else None
        self.sha256 = sha256_file(weights) if weights is not None else state_dict_sha256(self.model.state_dict())

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model(dinov2_preprocess(images)).to(torch.float32), None

    @property
    def info(self) -> dict:
        return {**super().info, "arch": self.arch, "path": self.path}


def dinov2_weights_path(cfg: dict) -> Path:
    """`evaluate.dinov2_weights`, default the fetch stage's <results>/<experiment>/fetch/dinov2_<arch>.pth."""
    p = cfg["evaluate"].get("dinov2_weights")
    arch = cfg["evaluate"].get("dinov2_arch", "vitl14")
    return Path(p) if p else Path(cfg["results_dir"]) / cfg["experiment"] / "fetch" / f"dinov2_{arch}.pth"


# --------------------------------------------------------------------------------------------
# The digits classifier (embedded default)
# (the network and its training: sida.eval.digits_classifier)


class DigitsClassifierExtractor(Extractor):
    """FD features from the digits CNN's penultimate layer; its softmax for the Inception Score."""

    name = "digits_classifier"
    mode = "digits_classifier"
    label = "FD (digits classifier)"
    metric_key = "fd"
    feature_dim = DigitsCNN.feature_dim
    resolution = 8
    channels = 1
    has_probs = True

    def __init__(self, net: DigitsCNN, test_accuracy: float, path: str | None = None) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.sha256 = state_dict_sha256(net.state_dict())
        self.test_accuracy = test_accuracy
        self.path = path

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats, logits = self.net(images.to(torch.float32) / 127.5 - 1)
        return feats, torch.softmax(logits, dim=1)

    @property
    def info(self) -> dict:
        return {**super().info, "test_accuracy": self.test_accuracy, "path": self.path}


def load_or_train_digits_classifier(directory: str | Path, seed: int = 0, epochs: int = 30,
                                    device: torch.device | str = "cpu") -> DigitsClassifierExtractor:
    """The cached digits classifier for (recipe, seed, epochs), training and caching it first if needed.

    The cache file name carries a hash of the recipe; the file stores the weights' sha256, which
    is checked on load so a damaged cache is never used silently.
    """
    recipe = dict(CLASSIFIER_RECIPE, seed=seed, epochs=epochs)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(directory) / f"digits_classifier-{key}.pt"
    if path.is_file():
        try:
            rec = torch.load(path, map_location="cpu", weights_only=True)
            net = DigitsCNN()
            net.load_state_dict(rec["state_dict"])
        except Exception:
            raise CheckpointError(f"cached digits classifier {path} is unreadable: delete it and rerun "
                                  f"(it is retrained in seconds)") from None
        if state_dict_sha256(net.state_dict()) != rec.get("sha256"):
            raise CheckpointError(f"cached digits classifier {path} fails its hash check: delete it and rerun")
        acc = float(rec["test_accuracy"])
    else:
        net, acc = train_digits_classifier(seed, epochs)
        atomic_save_torch({"state_dict": net.state_dict(), "sha256": state_dict_sha256(net.state_dict()),
                           "test_accuracy": acc, "recipe": json.dumps(recipe)}, path)
    return DigitsClassifierExtractor(net, acc, str(path)).to(device)


def build_extractor(cfg: dict, device: torch.device | str = "cpu") -> Extractor:
    """The feature extractor the config asks for, on `device` (trains/caches the classifier)."""
    ev = cfg["evaluate"]
    name = resolve_extractor_name(cfg)
    if name == "inception":
        return InceptionExtractor(inception_weights_path(cfg), ev["inception_mode"], device)
    if name == "dinov2":
        return DINOv2Extractor(ev.get("dinov2_arch", "vitl14"), dinov2_weights_path(cfg), device)
    if name == "digits_classifier":
        c = ev["classifier"]
        return load_or_train_digits_classifier(cache_dir(cfg), c["seed"], c["epochs"], device)
    raise ConfigError(f"evaluate.extractor: unknown extractor '{name}' (auto, inception, digits_classifier)")
