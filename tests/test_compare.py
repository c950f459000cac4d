"""Our iteration computes what the official one computes (bench.official re-states the authors'
loop and EDM's layer arithmetic): same networks' outputs, and on the same random draws the same
losses, gradients, updated weights and EMA. Plus the side-by-side benchmark's output contract
(against the authors' own loop: those tests need their checkout, tests.helpers.AUTHORS_REPO).
No timings are asserted."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.official import Draws, OfficialIteration, edm_forward
from bench.step import MemoryDataset
from sida.nets.precond import EDMPrecond
from sida.run.dist import init as dist_init
from sida.train.loop import DistillLoop
from sida.train.nets import init_nets
from sida.train.draws import make_generators
from tests.helpers import AUTHORS_REPO, needs_authors

ROOT = Path(__file__).resolve().parents[1]
B = 6


def _teacher(label_dim: int = 10) -> EDMPrecond:
    """A tiny DDPM++ (attention at 4x4 and in the bottleneck) with every weight away from EDM's
    near-zero init, so each layer shapes the outputs and their gradients."""
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=2, label_dim=label_dim, model_type="SongUNet", model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0,
                     embedding_type="positional", channel_mult_noise=1, resample_filter=[1, 1])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval().requires_grad_(False)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 2e-4) -> None:
    """Equal up to float32 rounding accumulated through a few networks: relative to the
    largest entry, so near-zero entries do not dominate."""
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), 1e-12)
    torch.testing.assert_close(a, b, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("flag", ["decoder", "encoder", "encoder_decoder"])
def test_networks_match_edm_arithmetic(flag, channels_last):
    """Our SongUNet (fused GroupNorm+SiLU, box resamplers, SDPA, activation-free frozen convs)
    gives EDM's outputs and, with frozen weights, EDM's input gradients; with trainable weights,
    EDM's weight gradients."""
    net = _teacher()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    x = torch.randn(B, 2, 8, 8)
    sigma = torch.rand(B) * 3 + 0.1
    labels = torch.nn.functional.one_hot(torch.arange(B) % 10, 10).float()

    def both(fn, xin):
        out = fn(xin, sigma, labels, return_flag=flag) if fn is net else fn(net, xin, sigma, labels, flag)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in outs)
        return outs, loss

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (oa, la), (ob, lb) = both(net, xa), both(edm_forward, xb)
    for a, b in zip(oa, ob):
        _close(a, b, 1e-5)
    ga, = torch.autograd.grad(la, xa)
    gb, = torch.autograd.grad(lb, xb)
    _close(ga, gb, 1e-4)

    net.requires_grad_(True)
    params = [p for p in net.parameters()]
    (_, la), (_, lb) = both(net, x), both(edm_forward, x)
    ga = torch.autograd.grad(la, params, allow_unused=True)
    gb = torch.autograd.grad(lb, params, allow_unused=True)
    assert [g is None for g in ga] == [g is None for g in gb]  # the decoder's weights in 'encoder'
    _close(torch.cat([g.flatten() for g in ga if g is not None]), torch.cat([g.flatten() for g in gb if g is not None]),
           1e-4)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while `fn()` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("frozen", [True, False])
def test_graphs_keep_less_than_edm_arithmetic(frozen):
    """What the generator step's graph holds: through the frozen teacher and fake score ours
    keeps a fraction of what EDM's layers keep (no conv inputs, one tensor per GroupNorm+SiLU);
    through a trainable network (the generator, the fake-score update) still less."""
    net = _teacher().requires_grad_(not frozen)
    x = torch.randn(16, 2, 8, 8, requires_grad=frozen)
    sigma, labels = torch.rand(16) + 0.5, torch.nn.functional.one_hot(torch.arange(16) % 10, 10).float()
    ours = _saved_bytes(lambda: net(x, sigma, labels, return_flag="encoder_decoder"))
    edm = _saved_bytes(lambda: edm_forward(net, x, sigma, labels, "encoder_decoder"))
    assert ours < (0.5 if frozen else 0.9) * edm, (ours, edm)


class _Recorder:
    """Wraps a DistillLoop's draws (`loop.draws`) and its optimisers' `step` to see what it drew
    and which gradients it applied."""

    def __init__(self, loop: DistillLoop) -> None:
        self.draws: list[tuple[str, object]] = []
        self.grads: dict[str, list[torch.Tensor]] = {}
        for name in ("real", "labels", "randn", "rand"):
            orig = getattr(loop.draws, name)
            setattr(loop.draws, name, self._wrap(name, orig))
        _capture_grads(loop.opt_critic, "fake", self.grads)
        _capture_grads(loop.opt_g, "G", self.grads)

    def _wrap(self, name, fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            self.draws.append((name, out))
            return out
        return wrapped

    def as_official(self, discriminator: bool) -> Draws:
        kinds = [k for k, _ in self.draws]
        vals = [v for _, v in self.draws]
        first = "real" if discriminator else "labels"
        assert kinds == [first, "randn", "randn", "randn", "labels", "randn", "rand", "randn"], kinds
        real, labels_fake = vals[0] if discriminator else (None, vals[0])
        return Draws(real=real, labels_fake=labels_fake, z_fake=vals[1], sigma_normal=vals[2], noise_fake=vals[3],
                     labels_gen=vals[4], z_gen=vals[5], t_gen=vals[6], noise_gen=vals[7])


def _capture_grads(opt: torch.optim.Optimizer, key: str, into: dict) -> None:
    step = opt.step

    def wrapped(*a, **k):
        into[key] = [p.grad.detach().clone() for g in opt.param_groups for p in g["params"]]
        return step(*a, **k)
    opt.step = wrapped


def _rc(phase: str, channels_last: bool) -> dict:
    # adam_eps 1: with beta1 = 0, Adam's first steps are lr * g / (|g| + eps); with eps 1e-8 that
    # is lr * sign(g), which flips on gradient entries that are zero up to rounding and hides any
    # real difference. With eps above the gradients' rounding noise the update stays linear in g.
    return dict(sigma_init=2.5, tmax=800, alpha=1.2, lambda_sid=100.0, lambda_adv=0.5, lambda_d=0.7,
                P_mean=-1.2, P_std=1.2, batch=B, batch_per_proc=None, lr_g=1e-3, lr_fake=2e-3, adam_eps=1.0,
                ema_halflife_kimg=0.01, ema_rampup_ratio=None, dropout=None, fake_clip=0.5, precision="fp32",
                channels_last=channels_last, discriminator=phase == "sida",
                phases=[{"kind": phase, "kimg": 1}], init="teacher", init_generator=None)


@pytest.mark.parametrize("phase,channels_last", [("sid", False), ("sida", False), ("sida", True)])
def test_iteration_matches_official_on_the_same_draws(phase, channels_last):
    """Two iterations of our loop and of the re-stated official loop from the same networks,
    fed the same draws: the same losses, the same gradients (the fake score's after clipping),
    the same weights after Adam and the same EMA generator."""
    info = dist_init("cpu", 0)
    teacher = _teacher()
    disc = phase == "sida"
    dataset = MemoryDataset(32, 2, 8, label_dim=10, seed=1) if disc else None
    rc = _rc(phase, channels_last)
    ours = DistillLoop(rc, init_nets(copy.deepcopy(teacher), None), dataset, info, make_generators(3, 0, info.device))
    off = OfficialIteration(rc, init_nets(copy.deepcopy(teacher), None), dataset, discriminator=disc)
    off_grads: dict = {}
    _capture_grads(off.opt_f, "fake", off_grads)
    _capture_grads(off.opt_g, "G", off_grads)
    for _ in range(2):
        rec = _Recorder(ours)
        stats = ours.step()
        ours.nimg += ours.batch
        ref = off.step(rec.as_official(disc))
        keys = ["loss_fake", "loss_g_sid"] + (["loss_d", "loss_g_adv"] if disc else [])
        for k in keys:
            assert float(stats[k]) == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k
        for net in ("fake", "G"):
            a, b = torch.cat([g.flatten() for g in rec.grads[net]]), torch.cat([g.flatten() for g in off_grads[net]])
            assert float(b.abs().max()) > 0
            _close(a, b)
        for name in ("G", "fake", "G_ema"):
            a = torch.cat([p.detach().flatten() for p in getattr(ours.nets, name).parameters()])
            b = torch.cat([p.detach().flatten() for p in getattr(off.nets, name).parameters()])
            _close(a, b, 1e-5)
    if disc:  # the clip is active: it is part of what is compared
        assert float(torch.cat([g.flatten() for g in off_grads["fake"]]).abs().max()) == pytest.approx(rc["fake_clip"])


@needs_authors
def test_compare_prints_ratios_and_memory_json(tmp_path):
    out_json = tmp_path / "cmp.json"
    cmd = [sys.executable, "-m", "bench.compare", "--preset", "digits", "--phase", "sida", "--ours", "fp32,fp32-cl",
           "--res", "8", "--channels", "1", "--batch", "4", "--model-channels", "8", "--iters", "2", "--warmup", "0",
           "--threads", "1", "--json", str(out_json), "--authors-repo", str(AUTHORS_REPO)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert any("x authors" in ln for ln in lines[:-1])  # human-readable lines first
    result = json.loads(lines[-1])
    assert json.loads(out_json.read_text()) == result
    assert set(result["variants"]) == {"authors", "ours-fp32", "ours-fp32-cl"}
    for row in result["variants"].values():
        assert row["images_per_sec"] > 0 and row["speedup_vs_authors"] > 0
        if sys.platform.startswith("linux"):
            assert row["peak_memory_mb"] > 0
    assert result["variants"]["authors"]["speedup_vs_authors"] == 1.0
    one, two = result["goals"]  # issue 33's verdict: this run has no two-process variant
    assert one["procs"] == 1 and one["variant"] in ("ours-fp32", "ours-fp32-cl") and one["met"] in (True, False)
    assert two["procs"] == 2 and two["variant"] is None and two["met"] is None
    assert any(ln.startswith("goal, 1 process, fp32") for ln in lines[:-1])


def test_compare_without_the_authors_checkout_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SIDA_AUTHORS_REPO"}
    for extra in ([], ["--authors-repo", str(tmp_path / "SiD")]):
        out = subprocess.run([sys.executable, "-m", "bench.compare", *extra], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env=env)
        lines = out.stderr.strip().splitlines()
        assert out.returncode != 0 and len(lines) == 1, out.stderr
        assert "git clone https://github.com/mingyuanzhou/SiD" in lines[0]


@needs_authors
def test_compare_runs_process_variants_beside_the_authors_loop(tmp_path):
    """-p2: the benchmark re-runs itself as 2 processes; the authors' loop and the one-process
    variant run in rank 0 alone with the whole thread budget, the -p2 loop in both with half."""
    cmd = [sys.executable, "-m", "bench.compare", "--preset", "digits", "--phase", "sid", "--ours", "fp32,fp32-p2",
           "--res", "8", "--channels", "1", "--batch", "4", "--model-channels", "8", "--iters", "2", "--warmup", "0",
           "--threads", "2", "--authors-repo", str(AUTHORS_REPO)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("[bench.compare]") == 1  # rank 0 prints, rank 1 does not
    rows = json.loads(out.stdout.strip().splitlines()[-1])["variants"]
    layout = {k: (r["procs"], r["threads_per_proc"]) for k, r in rows.items()}
    assert layout == {"authors": (1, 2), "ours-fp32": (1, 2), "ours-fp32-p2": (2, 1)}
    assert all(r["images_per_sec"] > 0 for r in rows.values())
    if sys.platform.startswith("linux"):  # per process, and both processes together
        p2 = rows["ours-fp32-p2"]
        assert 0 < p2["peak_memory_mb"] < p2["peak_memory_all_procs_mb"]


@pytest.mark.parametrize("variants, message", [
    ("fp64", "error: unknown variant 'fp64'"),
    ("fp32-p0", "error: unknown variant 'fp32-p0'"),
    ("fp32-p2-p2", "error: unknown variant 'fp32-p2-p2'"),
    ("fp32-p2,bf16-p3", "error: variants ask for [2, 3] processes"),
])
def test_compare_rejects_unknown_variants(variants, message):
    out = subprocess.run([sys.executable, "-m", "bench.compare", "--ours", variants], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr


def test_generator_checkpointing_keeps_less_and_gives_the_same_gradients():
    net = _teacher().requires_grad_(True)
    net.train()
    x = torch.randn(8, 2, 8, 8)
    sigma, labels = torch.rand(8) + 0.5, torch.nn.functional.one_hot(torch.arange(8) % 10, 10).float()
    params = list(net.parameters())
    grads, kept = {}, {}
    for ckpt in (False, True):
        net.model.checkpoint_blocks = ckpt
        out = {}
        kept[ckpt] = _saved_bytes(lambda: out.setdefault("y", net(x, sigma, labels)))
        grads[ckpt] = torch.autograd.grad((out["y"] * x).sum(), params)
    assert kept[True] < 0.5 * kept[False]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b)


def test_checkpoint_generator_on_a_diffusers_unet_keeps_less_and_gives_the_same_gradients():
    """`checkpoint_generator` reaches a diffusers UNet's blocks through our adapter; a network
    without activation checkpointing (EDM2's UNet) is refused in one line."""
    from sd_assets import HIDDEN, MAX_TOKENS, tiny_unet_config
    from sida.errors import ConfigError
    from sida.nets.diffusers_text import DiffusersTextPrecond
    from sida.nets.precond import EDM2Precond
    from sida.train.nets import checkpoint_blocks

    torch.manual_seed(0)
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0).tolist()
    nets = [DiffusersTextPrecond(tiny_unet_config(1), alphas, cond_shape=(MAX_TOKENS, HIDDEN), img_resolution=8,
                                 img_channels=1) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    checkpoint_blocks(nets[1])
    x, sigma = torch.randn(4, 1, 8, 8), torch.rand(4) + 0.5
    cond = torch.randn(4, MAX_TOKENS, HIDDEN)
    grads, kept = [], []
    for net in nets:
        net.train().requires_grad_(True)
        out = {}
        kept.append(_saved_bytes(lambda: out.setdefault("y", net(x, sigma, cond))))
        grads.append(torch.autograd.grad((out["y"] * x).sum(), list(net.parameters())))
    assert kept[1] < 0.7 * kept[0]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    edm2 = EDM2Precond(img_resolution=8, img_channels=1, label_dim=0, use_fp16=False, model_channels=8,
                       channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    with pytest.raises(ConfigError, match=r"^distill\.checkpoint_generator: the generator's \w+ has no activation "
                                          r"checkpointing .*set it false$"):
        checkpoint_blocks(edm2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_compare_on_cuda_without_a_gpu_is_one_error_line():
    out = subprocess.run([sys.executable, "-m", "bench.compare", "--device", "cuda"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "error: device: cuda was requested but no CUDA device is visible: set device: cpu or auto"], out.stderr
