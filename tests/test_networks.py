"""Tests for sida.nets.layers / sida.nets.networks: EDM state-dict compatibility, return_flag semantics,
label conditioning, memory formats, attention and resampling against reference formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from sida.nets import blocks, layers
from sida.nets import networks
from sida.nets.precond import EDMPrecond

from helpers import randomise_weights

# ---------------------------------------------------------------------------------------------
# Published-teacher configs (EDM train.py presets).

DDPMPP_CIFAR = dict(img_resolution=32, img_channels=3, label_dim=0, model_type="SongUNet",
                    model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16],
                    dropout=0.13, augment_dim=9, resample_filter=[1, 1], channel_mult_noise=1,
                    embedding_type="positional", encoder_type="standard", decoder_type="standard")
ADM_IMNET64 = dict(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet",
                   model_channels=192, channel_mult=[1, 2, 3, 4])
TINY = dict(img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet", model_channels=32,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], channel_mult_emb=4, dropout=0)


def _meta(cfg):
    # Build on the meta device: shapes and names without allocating ~1 GB for ADM.
    with torch.device("meta"):
        return EDMPrecond(**cfg)


def _shapes(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


# Key names / shapes derived by hand from EDM's training/networks.py for the CIFAR-10 DDPM++ net:
# emb 512 = 128*4, every block 256 = 128*2 channels, skips popped in reverse so the last decoder
# block at 32x32 concatenates the 128-channel stem output, attention (num_heads=1) only at 16x16
# (encoder blocks, decoder block{num_blocks}) and the bottleneck in0, resample_filter buffers on
# up/down convs ([1,1] -> 2x2), positional noise embedding has no buffer.
DDPMPP_KEYS = {
    "model.map_augment.weight": (128, 9),
    "model.map_layer0.weight": (512, 128),
    "model.map_layer0.bias": (512,),
    "model.map_layer1.weight": (512, 512),
    "model.enc.32x32_conv.weight": (128, 3, 3, 3),
    "model.enc.32x32_block0.norm0.weight": (128,),
    "model.enc.32x32_block0.conv0.weight": (256, 128, 3, 3),
    "model.enc.32x32_block0.affine.weight": (256, 512),
    "model.enc.32x32_block0.skip.weight": (256, 128, 1, 1),
    "model.enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
    "model.enc.16x16_down.skip.weight": (256, 256, 1, 1),
    "model.enc.16x16_down.skip.resample_filter": (1, 1, 2, 2),
    "model.enc.16x16_block0.norm2.weight": (256,),
    "model.enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
    "model.enc.16x16_block0.proj.weight": (256, 256, 1, 1),
    "model.enc.8x8_block3.conv1.weight": (256, 256, 3, 3),
    "model.dec.8x8_in0.qkv.weight": (768, 256, 1, 1),
    "model.dec.8x8_in1.conv0.weight": (256, 256, 3, 3),
    "model.dec.8x8_block0.conv0.weight": (256, 512, 3, 3),
    "model.dec.16x16_up.conv0.resample_filter": (1, 1, 2, 2),
    "model.dec.16x16_block4.qkv.weight": (768, 256, 1, 1),
    "model.dec.32x32_block4.conv0.weight": (256, 384, 3, 3),
    "model.dec.32x32_block4.skip.weight": (256, 384, 1, 1),
    "model.dec.32x32_aux_norm.weight": (256,),
    "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3),
    "model.dec.32x32_aux_conv.bias": (3,),
}
DDPMPP_ABSENT = [
    "model.map_noise.freqs",            # positional embedding: no buffer
    "model.map_label.weight",           # unconditional
    "model.map_augment.bias",           # bias=False
    "model.enc.32x32_block0.qkv.weight",  # no attention at 32x32
    "model.enc.16x16_block0.skip.weight",  # 256 -> 256, no resampling: identity skip
    "model.dec.8x8_in1.qkv.weight",
    "model.dec.16x16_block3.qkv.weight",  # decoder attention only in block{num_blocks}
    "model.dec.16x16_aux_norm.weight",   # standard decoder: output head only at level 0
    "model.enc.16x16_down.conv0.bias_missing",
]

ADM_KEYS = {
    "model.map_label.weight": (768, 1000),          # bias=False, emb 768 = 192*4
    "model.map_layer0.weight": (768, 192),
    "model.enc.64x64_conv.weight": (192, 3, 3, 3),
    "model.enc.64x64_block0.affine.weight": (384, 768),  # adaptive scale: 2*out
    "model.enc.32x32_down.skip.resample_filter": (1, 1, 2, 2),
    "model.enc.32x32_block0.qkv.weight": (1152, 384, 1, 1),
    "model.dec.8x8_in0.qkv.weight": (2304, 768, 1, 1),
    "model.out_norm.weight": (192,),
    "model.out_conv.weight": (3, 192, 3, 3),
}
ADM_ABSENT = ["model.map_noise.freqs", "model.map_augment.weight", "model.map_label.bias",
              "model.enc.32x32_down.skip.weight",  # kernel 0 skip: pure resampler
              "model.enc.64x64_block0.qkv.weight"]  # no attention at 64x64


def test_ddpmpp_cifar_state_dict_matches_edm():
    shapes = _shapes(_meta(DDPMPP_CIFAR))
    for k, shp in DDPMPP_KEYS.items():
        assert shapes.get(k) == shp, k
    for k in DDPMPP_ABSENT:
        assert k not in shapes, k
    n_params = sum(p.numel() for p in _meta(DDPMPP_CIFAR).parameters())
    assert n_params == 55_733_891  # EDM paper: 55.73M for CIFAR-10 DDPM++


def test_adm_imagenet64_state_dict_matches_edm():
    net = _meta(ADM_IMNET64)
    shapes = _shapes(net)
    for k, shp in ADM_KEYS.items():
        assert shapes.get(k) == shp, k
    for k in ADM_ABSENT:
        assert k not in shapes, k
    assert net.model.enc["32x32_block0"].num_heads == 6  # 384 / 64 channels per head
    assert sum(p.numel() for p in net.parameters()) == 295_899_267  # EDM paper: 295.90M


def test_ncsnpp_builds_with_fourier_buffer():
    cfg = dict(DDPMPP_CIFAR, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
               resample_filter=[1, 3, 3, 1])
    shapes = _shapes(_meta(cfg))
    assert shapes["model.map_noise.freqs"] == (128,)
    assert shapes["model.enc.16x16_aux_residual.weight"] == (256, 3, 3, 3)
    assert shapes["model.enc.16x16_down.conv0.resample_filter"] == (1, 1, 4, 4)


def test_strict_load_roundtrip():
    """A state dict moves every weight and buffer: after a strict load the copy computes what the
    source computes (randomised weights: the zero-initialised output layers would make both
    networks output the same zeros before the load too), and a missing key is refused."""
    torch.manual_seed(0)
    a, b = randomise_weights(EDMPrecond(**TINY)).eval(), EDMPrecond(**TINY).eval()
    x, sigma, labels = _tiny_inputs()
    sigma = sigma.abs() + 0.1
    with torch.no_grad():
        assert not torch.equal(a(x, sigma, labels), b(x, sigma, labels))
        b.load_state_dict(a.state_dict(), strict=True)
        assert torch.equal(a(x, sigma, labels), b(x, sigma, labels))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    partial = dict(a.state_dict())
    missing = partial.pop(next(iter(partial)))
    with pytest.raises(RuntimeError, match="Missing key"):
        b.load_state_dict(partial, strict=True)
    assert missing.numel() > 0


# ---------------------------------------------------------------------------------------------
# Forward semantics.

def _tiny_inputs(B=4, res=8, ch=1, label_dim=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, ch, res, res, generator=g)
    noise = torch.randn(B, generator=g)
    labels = F.one_hot(torch.randint(0, label_dim, (B,), generator=g), label_dim).float() if label_dim else None
    return x, noise, labels


UNETS = {
    "ddpmpp_tiny": lambda: networks.SongUNet(8, 1, 1, label_dim=10, model_channels=32, channel_mult=[1, 2],
                                             num_blocks=1, attn_resolutions=[4], dropout=0.0),
    "ncsnpp_tiny": lambda: networks.SongUNet(8, 2, 2, label_dim=10, augment_dim=3, model_channels=16,
                                             channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4],
                                             dropout=0.0, embedding_type="fourier", encoder_type="residual",
                                             channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    "skip_tiny": lambda: networks.SongUNet(8, 1, 1, label_dim=10, model_channels=16, channel_mult=[1, 2],
                                           num_blocks=1, attn_resolutions=[], dropout=0.0,
                                           encoder_type="skip", decoder_type="skip"),
    "adm_tiny": lambda: networks.DhariwalUNet(8, 1, 1, label_dim=10, augment_dim=3, model_channels=64,
                                              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                                              dropout=0.0),
}


def _inputs_for(net, B=4):
    ch = net.enc[next(iter(net.enc))].in_channels
    x, noise, labels = _tiny_inputs(B, 8, ch, 10)
    return x, noise, labels


@pytest.mark.parametrize("name", list(UNETS))
def test_return_flags_consistent(name):
    torch.manual_seed(0)
    net = randomise_weights(UNETS[name]()).eval()
    x, noise, labels = _inputs_for(net)
    with torch.no_grad():
        dec = net(x, noise, labels)
        enc = net(x, noise, labels, return_flag="encoder")
        both = net(x, noise, labels, return_flag="encoder_decoder")
    assert isinstance(both, tuple) and len(both) == 2
    assert torch.equal(both[0], dec) and torch.equal(both[1], enc)
    assert dec.shape == x.shape  # in_channels == out_channels in all these configs
    lowest = 8 >> (len([k for k in net.enc if k.endswith("_block0")]) - 1)
    assert enc.shape == (x.shape[0], 1, lowest, lowest)
    with pytest.raises(ValueError):
        net(x, noise, labels, return_flag="bogus")


@pytest.mark.parametrize("name", ["ddpmpp_tiny", "ncsnpp_tiny", "adm_tiny"])
def test_encoder_logits_are_channel_mean_of_decoder_input(name):
    net = randomise_weights(UNETS[name]()).eval()
    x, noise, labels = _inputs_for(net)
    seen = {}
    first_dec = net.dec[next(iter(net.dec))]

    def grab(module, args):
        seen["x"] = args[0]  # returns None: inputs unchanged

    h = first_dec.register_forward_pre_hook(grab)
    with torch.no_grad():
        _, logits = net(x, noise, labels, return_flag="encoder_decoder")
    h.remove()
    torch.testing.assert_close(logits, seen["x"].mean(dim=1, keepdim=True), rtol=0, atol=0)


def test_encoder_skips_decoder():
    net = randomise_weights(UNETS["ddpmpp_tiny"]()).eval()
    x, noise, labels = _inputs_for(net)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in net.dec.values()]
    net(x, noise, labels, return_flag="encoder")
    for h in hooks:
        h.remove()
    assert not calls


@pytest.mark.parametrize("name", ["ddpmpp_tiny", "adm_tiny"])
def test_label_dropout_only_in_training(name):
    net = UNETS[name]()
    net.label_dropout = 1.0
    randomise_weights(net)
    x, noise, labels = _inputs_for(net)
    zeros = torch.zeros_like(labels)
    with torch.no_grad():
        net.train()
        tr = net(x, noise, labels)
        tr_zero = net(x, noise, zeros)
        net.eval()
        ev = net(x, noise, labels)
        ev_zero = net(x, noise, zeros)
    torch.testing.assert_close(tr, tr_zero)       # every label dropped in training
    torch.testing.assert_close(ev_zero, tr_zero)  # (dropout=0: train == eval otherwise)
    assert not torch.allclose(ev, ev_zero)         # labels matter in eval


def test_labels_and_augment_change_output_and_none_augment_is_zero():
    net = randomise_weights(UNETS["ncsnpp_tiny"]()).eval()
    x, noise, labels = _inputs_for(net)
    with torch.no_grad():
        base = net(x, noise, labels)
        other = net(x, noise, labels.roll(1, dims=1))
        aug0 = net(x, noise, labels, augment_labels=torch.zeros(x.shape[0], 3))
        aug1 = net(x, noise, labels, augment_labels=torch.ones(x.shape[0], 3))
    assert not torch.allclose(base, other)
    torch.testing.assert_close(base, aug0)
    assert not torch.allclose(base, aug1)


@pytest.mark.parametrize("name", list(UNETS))
def test_channels_last_matches_contiguous(name):
    net = randomise_weights(UNETS[name]()).eval()
    x, noise, labels = _inputs_for(net)
    with torch.no_grad():
        ref = net(x, noise, labels, return_flag="encoder_decoder")
        net_cl = net.to(memory_format=torch.channels_last)
        out = net_cl(x.contiguous(memory_format=torch.channels_last), noise, labels,
                     return_flag="encoder_decoder")
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_backward_runs_and_reaches_all_parameters():
    net = randomise_weights(UNETS["ncsnpp_tiny"]()).train()
    x, noise, labels = _inputs_for(net)
    out, logits = net(x, noise, labels, augment_labels=torch.randn(x.shape[0], 3), return_flag="encoder_decoder")
    (out.square().mean() + logits.mean()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing


# ---------------------------------------------------------------------------------------------
# Attention and resampling against reference formulas.

def _einsum_attention(q, k, v):
    """EDM's formulation: w = softmax_k(q^T k / sqrt(c)), a = v w^T; q, k, v: [N, c, L]."""
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])).softmax(dim=2)
    return torch.einsum("nqk,nck->ncq", w, v)


def test_sdpa_attention_equals_einsum():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 20, generator=g) for _ in range(3))
    out = blocks.attention(q, k, v)
    ref = _einsum_attention(q.reshape(6, 16, 20), k.reshape(6, 16, 20), v.reshape(6, 16, 20)).reshape(2, 3, 16, 20)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unet_block_attention_matches_edm_layout():
    torch.manual_seed(0)
    blk = blocks.UNetBlock(128, 128, 32, attention=True, channels_per_head=64).eval()
    randomise_weights(blk)
    x, emb = torch.randn(2, 128, 4, 4), torch.randn(2, 32)
    with torch.no_grad():
        out = blk(x, emb)
        # Reference: EDM's residual part, then attention with qkv reshaped to [B*heads, C/heads, 3, L].
        h = blk.conv0(F.silu(blk.norm0(x)))
        scale, shift = blk.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, blk.norm1(h), scale + 1))
        h = (blk.conv1(h) + x) * blk.skip_scale
        q, k, v = blk.qkv(blk.norm2(h)).reshape(2 * 2, 64, 3, -1).unbind(2)
        a = _einsum_attention(q, k, v).reshape(h.shape)
        ref = (blk.proj(a) + h) * blk.skip_scale
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("filt", [[1, 1], [1, 3, 3, 1]])
def test_resampling_matches_fir_reference(filt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    f = torch.tensor(filt, dtype=torch.float32)
    f2 = (torch.outer(f, f) / f.sum() ** 2)[None, None]
    pad = (len(filt) - 1) // 2
    down = layers.Conv2d(4, 4, kernel=0, down=True, resample_filter=filt)
    up = layers.Conv2d(4, 4, kernel=0, up=True, resample_filter=filt)
    torch.testing.assert_close(down.resample_filter, f2)
    ref_down = F.conv2d(x, f2.tile([4, 1, 1, 1]), groups=4, stride=2, padding=pad)
    ref_up = F.conv_transpose2d(x, (4 * f2).tile([4, 1, 1, 1]), groups=4, stride=2, padding=pad)
    torch.testing.assert_close(down(x), ref_down)
    torch.testing.assert_close(up(x), ref_up)
    # Fused 3x3 conv + downsampling (NCSN++ aux_residual).
    fused = randomise_weights(layers.Conv2d(4, 6, kernel=3, down=True, resample_filter=filt, fused_resample=True))
    ref = F.conv2d(x, fused.weight, padding=1 + pad)
    ref = F.conv2d(ref, f2.tile([6, 1, 1, 1]), groups=6, stride=2) + fused.bias[None, :, None, None]
    torch.testing.assert_close(fused(x), ref)
    # Fused FIR upsampling + 3x3 conv (EDM splits the padding between the two).
    fused = randomise_weights(layers.Conv2d(4, 6, kernel=3, up=True, resample_filter=filt, fused_resample=True))
    ref = F.conv_transpose2d(x, (4 * f2).tile([4, 1, 1, 1]), groups=4, stride=2, padding=max(pad - 1, 0))
    ref = F.conv2d(ref, fused.weight, fused.bias, padding=max(1 - pad, 0))
    assert ref.shape[-1] == 16
    torch.testing.assert_close(fused(x), ref)


def test_weight_init_laws():
    torch.manual_seed(0)
    w = layers.weight_init([400, 300], "kaiming_uniform", 300, 400)
    assert w.abs().max() <= math.sqrt(3 / 300) + 1e-6
    w = layers.weight_init([400, 300], "xavier_uniform", 300, 400)
    assert w.abs().max() <= math.sqrt(6 / 700) + 1e-6
    assert abs(layers.weight_init([400, 300], "kaiming_normal", 300, 400).std() - math.sqrt(1 / 300)) < 2e-3
    with pytest.raises(ValueError):
        layers.weight_init([2], "nope", 1, 1)
    # Group counts as in EDM: min(32, C // 4).
    assert layers.GroupNorm(64).num_groups == 16 and layers.GroupNorm(256).num_groups == 32


@pytest.mark.parametrize("model_type,kw", [
    ("SongUNet", dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])),
    ("DhariwalUNet", dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])),
])
def test_decode_first_equals_separate_passes(model_type, kw):
    """The batched discriminator pass (decode only the first samples) gives exactly what a
    full encoder_decoder pass on the fakes and an encoder pass on the reals give."""
    from sida.nets.precond import EDMPrecond

    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, model_type=model_type, **kw).eval()
    x_fake, x_real = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    sigma = torch.rand(3) * 3 + 0.1
    labels = torch.nn.functional.one_hot(torch.tensor([1, 2, 3]), 10).float()
    with torch.no_grad():
        d, logits = net(torch.cat([x_fake, x_real]), torch.cat([sigma, sigma]), torch.cat([labels, labels]),
                        return_flag="encoder_decoder", decode_first=3)
        d_ref, lf_ref = net(x_fake, sigma, labels, return_flag="encoder_decoder")
        lr_ref = net(x_real, sigma, labels, return_flag="encoder")
    assert d.shape == (3, 1, 8, 8)
    torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:3], lf_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[3:], lr_ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Hand-fused and activation-free layers against the plain ops they replace.

@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_fused_group_norm_silu_matches_plain_ops(fmt):
    torch.manual_seed(0)
    gn = layers.GroupNorm(16).double()
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x = torch.randn(3, 16, 5, 5, dtype=torch.double).contiguous(memory_format=fmt).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: layers._GroupNormSiLU.apply(x, w, b, gn.num_groups, gn.eps),
                                    (x, gn.weight, gn.bias))
    y = gn.forward_silu(x)
    assert type(y.grad_fn).__name__ == "_GroupNormSiLUBackward" and y.is_contiguous(memory_format=fmt)
    ref = F.silu(gn(x))
    g = torch.randn_like(ref)
    torch.testing.assert_close(y, ref)
    for a, b in zip(torch.autograd.grad(y, (x, gn.weight, gn.bias), g),
                    torch.autograd.grad(ref, (x, gn.weight, gn.bias), g)):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # no autograd: plain ops, SiLU in place
        torch.testing.assert_close(gn.forward_silu(x), ref)


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_channels_last_matches_contiguous_and_einsum(heads):
    """The attention of a channels-last block (regrouped from its own memory order) gives what
    the NCHW block gives, bit for bit, and both match EDM's einsum formulation; so do the
    gradients, which reach the qkv convolution channels-last (no layout copy before its backward)."""
    torch.manual_seed(0)
    C, B, R = 32, 3, 4
    blk = randomise_weights(blocks.UNetBlock(C, C, 16, attention=True, num_heads=heads)).double()
    x = torch.randn(B, C, R, R, dtype=torch.double)
    qkv = blk.qkv(blk.norm2(x))

    def einsum_attention(qkv):  # EDM's layout: q, k, v interleaved per channel
        return _einsum_attention(*qkv.reshape(B * heads, C // heads, 3, R * R).unbind(2)).reshape(B, C, R, R)

    outs, grads = [], []
    for fmt in (torch.contiguous_format, torch.channels_last):
        q = qkv.detach().contiguous(memory_format=fmt).requires_grad_()
        a = blk._attention(q, x.contiguous(memory_format=fmt))
        g = torch.linspace(-1, 1, a.numel(), dtype=a.dtype).reshape(a.shape)
        (gq,) = torch.autograd.grad(a, q, g)
        if fmt is torch.channels_last:
            assert a.is_contiguous(memory_format=fmt) and gq.is_contiguous(memory_format=fmt)
        outs.append(a)
        grads.append(gq)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    q = qkv.detach().requires_grad_()
    ref = einsum_attention(q)
    torch.testing.assert_close(outs[0], ref)
    torch.testing.assert_close(grads[0], torch.autograd.grad(ref, q, g)[0])


def _saved_during(fn):
    """The tensors autograd saves for the backward while `fn()` runs, and fn's result."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_frozen_conv_keeps_no_activation_and_gives_the_input_gradient(fmt):
    torch.manual_seed(0)
    conv = randomise_weights(layers.Conv2d(8, 6, kernel=3)).requires_grad_(False).to(memory_format=fmt)
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=fmt).requires_grad_()
    saved, y = _saved_during(lambda: conv(x))
    assert all(t.data_ptr() != x.data_ptr() for t in saved)  # only the weight is kept
    assert sum(t.numel() for t in saved) == conv.weight.numel()
    ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    g = torch.randn_like(ref)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=0, atol=0)
    conv.requires_grad_(True)  # trainable weights: ATen's convolution, which saves its input
    saved, _ = _saved_during(lambda: conv(x))
    assert any(t.data_ptr() == x.data_ptr() for t in saved)


def test_box_downsampling_backward_is_avg_pool_backward_bit_for_bit():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    g = torch.randn(2, 3, 4, 4)
    down = layers.Conv2d(3, 3, kernel=0, down=True)
    saved, y = _saved_during(lambda: down(x))
    assert not saved
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(F.avg_pool2d(x, 2), x, g)[0])



def test_box_upsampling_is_nearest_upsampling_bit_for_bit():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    g = torch.randn(2, 3, 8, 10)
    up = layers.Conv2d(3, 3, kernel=0, up=True)
    y, ref = up(x), F.interpolate(x, scale_factor=2, mode="nearest")
    assert torch.equal(y, ref)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])
