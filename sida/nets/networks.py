"""EDM-family UNets with SiDA's encoder/decoder return option.

``SongUNet`` (DDPM++ / NCSN++) and ``DhariwalUNet`` (ADM) have the constructor signatures,
defaults, module names and parameter shapes of NVlabs' EDM ``training/networks.py``, so published
EDM weights load with ``load_state_dict(strict=True)`` (code written independently).

``forward(x, noise_labels, class_labels, augment_labels=None, return_flag='decoder')``:
- 'decoder': the usual network output F(x) [B, out_channels, H, W];
- 'encoder': discriminator logits = channel mean of the tensor left after the encoder loop
  (the output of the last encoder block at the lowest resolution, i.e. exactly what the decoder
  receives as input), shape [B, 1, H / 2^(L-1), W / 2^(L-1)]; the decoder is not run;
- 'encoder_decoder': (decoder output, logits) from one pass;
- 'encoder_features': the encoder's per-level feature maps, a list (highest resolution first) of
  the output of each resolution level's last block, [B, C_l, H / 2^l, W / 2^l]; the last entry
  is the bottleneck the decoder starts from (DMD2's `return_bottleneck`, the input of its
  classifier head); the decoder is not run. Feature extractors of the baselines use it.
This follows the SiDA authors' implementation (logits = x.mean(dim=1, keepdim=True) after the
encoder loop); the discriminator adds no parameters.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .blocks import UNetBlock
from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding

__all__ = ["SongUNet", "DhariwalUNet", "RETURN_FLAGS"]

RETURN_FLAGS = ("decoder", "encoder", "encoder_decoder", "encoder_features")

Output = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], List[torch.Tensor]]


def _check_flag(return_flag: str) -> None:
    if return_flag not in RETURN_FLAGS:
        raise ValueError(f"return_flag must be one of {RETURN_FLAGS}, got {return_flag!r}")


def _drop_labels(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Label dropout for classifier-free guidance: zero each sample's label row with prob. p
    (training only, as in EDM)."""
    if training and p:
        keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
        labels = labels * keep.to(labels.dtype)
    return labels


def _decoder_inputs(x: torch.Tensor, emb: torch.Tensor, skips: list, decode_first: Optional[int]):
    """(encoder output, embedding, skip list) for the decoder, cut to the first samples if asked."""
    if decode_first is None:
        return x, emb, list(skips)
    b = decode_first
    return x[:b], emb[:b], [t[:b] for t in skips]


def _run_block(net: torch.nn.Module, block: UNetBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """A UNet block, or, when `net.checkpoint_blocks` is set and a graph is being built, the
    block under activation checkpointing: only its inputs are kept and its forward runs again
    in the backward (dropout draws replayed), trading compute for memory on a large generator."""
    if getattr(net, "checkpoint_blocks", False) and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, emb, use_reentrant=False)
    return block(x, emb)


def _level_features(skips: list) -> List[torch.Tensor]:
    """The last encoder output at each resolution (levels strictly halve the resolution, so the
    skip list groups by spatial size); the last one is the bottleneck."""
    out: List[torch.Tensor] = []
    for t in skips:
        if out and out[-1].shape[-1] == t.shape[-1]:
            out[-1] = t
        else:
            out.append(t)
    return out


def _finish(x_enc: torch.Tensor, run_decoder, return_flag: str) -> Output:
    """Shared tail: logits are the channel mean of the encoder output (SiDA's discriminator)."""
    logits = x_enc.mean(dim=1, keepdim=True) if return_flag != "decoder" else None
    if return_flag == "encoder":
        return logits
    out = run_decoder()
    return out if return_flag == "decoder" else (out, logits)


def _encoder_blocks(enc: torch.nn.ModuleDict, res: int, cout: int, level_channels: int,
                    num_blocks: int, attention: bool, bkw: dict) -> int:
    """Appends one encoder level's blocks (EDM's names: the published weights' state-dict keys
    depend on them and on their order); returns the level's output channels."""
    for idx in range(num_blocks):
        cin, cout = cout, level_channels
        enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **bkw)
    return cout


def _decoder_level(dec: torch.nn.ModuleDict, res: int, bottom: bool, cout: int, skips: List[int],
                   level_channels: int, num_blocks: int, attention: Callable[[int], bool],
                   bkw: dict) -> int:
    """Appends one decoder level in EDM's names and order: the two middle blocks at the lowest
    resolution (`bottom`) or an upsampling block, then num_blocks + 1 blocks each taking one skip
    (popped from `skips`, channel counts); `attention(idx)` says which blocks attend, the one
    place SongUNet and DhariwalUNet differ. Returns the level's output channels."""
    if bottom:
        dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **bkw)
        dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **bkw)
    else:
        dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **bkw)
    for idx in range(num_blocks + 1):
        cin, cout = cout + skips.pop(), level_channels
        dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention(idx), **bkw)
    return cout


class _EDMUNet(torch.nn.Module):
    """What both UNets keep of their arguments: the resolution and the conditioning sizes
    (read by the preconditioning wrappers and the samplers), and the label dropout."""

    def __init__(self, img_resolution: int, label_dim: int, augment_dim: int, label_dropout: float):
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout


class SongUNet(_EDMUNet):
    """DDPM++ (positional/standard/standard, [1,1]) and NCSN++ (fourier/residual/standard,
    [1,3,3,1], channel_mult_noise 2) UNets of Song et al., in EDM's reimplementation layout."""

    # EDM's parameters, names and defaults (its pickles rebuild the network from them), grouped
    # by topic: input/output, conditioning, width, depth, attention, regularisation, variant.
    def __init__(self, img_resolution: int, in_channels: int, out_channels: int,
                 label_dim: int = 0, augment_dim: int = 0,
                 model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0,
                 embedding_type: str = "positional", channel_mult_noise: int = 1,
                 encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1)):
        assert embedding_type in ("fourier", "positional")
        assert encoder_type in ("standard", "skip", "residual")
        assert decoder_type in ("standard", "skip")
        super().__init__(img_resolution, label_dim, augment_dim, label_dropout)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        bkw = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                   eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                   init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise (+ label, + augment) embedding -> 2-layer MLP.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **bkw)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter,
                        fused_resample=True, **init)
                    caux = cout
            cout = _encoder_blocks(self.enc, res, cout, model_channels * mult, num_blocks,
                                   res in attn_resolutions, bkw)
        skips = [blk.out_channels for name, blk in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            # SongUNet attends only in a level's last block.
            cout = _decoder_level(self.dec, res, level == len(channel_mult) - 1, cout, skips,
                                  model_channels * mult, num_blocks,
                                  lambda idx: idx == num_blocks and res in attn_resolutions, bkw)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def _embed(self, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
               augment_labels: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        # EDM's SongUNet swaps the cos/sin halves (published weights expect [sin, cos]).
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.zeros([batch, self.label_dim], device=emb.device, dtype=emb.dtype)
            tmp = _drop_labels(class_labels, self.label_dropout, self.training)
            # Scaling by sqrt(label_dim) makes a one-hot row unit-variance-like (EDM convention).
            emb = emb + self.map_label(tmp * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            # Missing augment labels == zeros (map_augment has no bias), so skipping is exact.
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
                augment_labels: Optional[torch.Tensor] = None, return_flag: str = "decoder",
                decode_first: Optional[int] = None) -> Output:
        _check_flag(return_flag)
        emb = self._embed(noise_labels, class_labels, augment_labels, x.shape[0])

        # Encoder: blocks, plus the auxiliary input pyramid for the 'skip'/'residual' encoders.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = _run_block(self, block, x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)  # a reference only; aux_skip/aux_residual overwrite the last one
        if return_flag == "encoder_features":
            return _level_features(skips)

        def decoder() -> torch.Tensor:
            # decode_first: decode only the first samples (SiDA's discriminator batches real
            # images through the encoder alongside the fakes but needs no denoised reals).
            h, emb_d, skips_d = _decoder_inputs(x, emb, skips, decode_first)
            out = None
            tmp = None
            for name, block in self.dec.items():
                if "aux_up" in name:
                    out = block(out)
                elif "aux_norm" in name:
                    tmp = block.forward_silu(h)
                elif "aux_conv" in name:
                    tmp = block(tmp)
                    out = tmp if out is None else tmp + out
                else:
                    if h.shape[1] != block.in_channels:
                        h = torch.cat([h, skips_d.pop()], dim=1)
                    h = _run_block(self, block, h, emb_d)
            return out

        return _finish(x, decoder, return_flag)


class DhariwalUNet(_EDMUNet):
    """ADM UNet of Dhariwal & Nichol, in EDM's reimplementation layout."""

    # EDM's parameters, names and defaults, grouped as SongUNet's.
    def __init__(self, img_resolution: int, in_channels: int, out_channels: int,
                 label_dim: int = 0, augment_dim: int = 0,
                 model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0):
        super().__init__(img_resolution, label_dim, augment_dim, label_dropout)
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        bkw = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                   init_zero=init_zero)

        # Mapping network.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **bkw)
            cout = _encoder_blocks(self.enc, res, cout, model_channels * mult, num_blocks,
                                   res in attn_resolutions, bkw)
        skips = [blk.out_channels for blk in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            # ADM attends in every block of an attention resolution.
            cout = _decoder_level(self.dec, res, level == len(channel_mult) - 1, cout, skips,
                                  model_channels * mult, num_blocks,
                                  lambda idx: res in attn_resolutions, bkw)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def _embed(self, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
               augment_labels: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.zeros([batch, self.label_dim], device=emb.device, dtype=emb.dtype)
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        return F.silu(emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
                augment_labels: Optional[torch.Tensor] = None, return_flag: str = "decoder",
                decode_first: Optional[int] = None) -> Output:
        _check_flag(return_flag)
        emb = self._embed(noise_labels, class_labels, augment_labels, x.shape[0])
        need_skips = return_flag != "encoder"

        skips = []
        for block in self.enc.values():
            x = _run_block(self, block, x, emb) if isinstance(block, UNetBlock) else block(x)
            if need_skips:
                skips.append(x)
        if return_flag == "encoder_features":
            return _level_features(skips)

        def decoder() -> torch.Tensor:
            h, emb_d, skips_d = _decoder_inputs(x, emb, skips, decode_first)
            for block in self.dec.values():
                if h.shape[1] != block.in_channels:
                    h = torch.cat([h, skips_d.pop()], dim=1)
                h = _run_block(self, block, h, emb_d)
            return self.out_conv(self.out_norm.forward_silu(h))

        return _finish(x, decoder, return_flag)
