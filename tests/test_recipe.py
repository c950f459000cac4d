"""The distillation loop runs the authors' recipe (issue 9), checked on tiny networks on the CPU:
the preset's dropout on G and the fake score (not the teacher's), the generator's Adam beta1 and
the fp16 eps, fake-score clipping in every phase of a discriminator run, augmented fake-score
inputs with their 9 labels (the generator step never augments), labels drawn from the dataset's
label distribution, NaN samples dropped and gradients through nan_to_num, and EDM's fp16 path
(and bf16 autocast) running on the CPU."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import tiny_config  # noqa: E402

from sida.errors import ConfigError
from sida.nets.build import network_from_config
from sida.nets.blocks import UNetBlock
from sida.nets.layers import Conv2d
from sida.nets.precond import EDMPrecond
from sida.run import dist
from sida.run.config import load_config, run_config, validate
from sida.train.loop import DistillLoop
from sida.train.nets import init_nets
from sida.train.updates import sync_gradients

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
B = 8


class SkewedDataset:
    """An in-memory labelled dataset whose classes have very unequal sizes."""

    def __init__(self, counts: list[int], res: int = 8, channels: int = 1) -> None:
        self.classes = torch.cat([torch.full([c], k) for k, c in enumerate(counts)])
        self.label_dim = len(counts)
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(len(self.classes), channels, res, res, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.classes)

    def labels(self, idx) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.classes[torch.as_tensor(idx)], self.label_dim).float()

    def get_batch(self, idx, generator=None):
        idx = torch.as_tensor(idx)
        return self.images[idx], self.labels(idx)


def _cfg(augment_dim: int = 0, **distill) -> dict:
    cfg = tiny_config(**distill)
    if augment_dim:
        cfg["network"]["kwargs"]["augment_dim"] = augment_dim
    return validate(cfg)


def _teacher(cfg: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = network_from_config(cfg)
    with torch.no_grad():  # ordinary numbers (EDM's init leaves the output convs at ~1e-5)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _loop(cfg: dict, run: str = "mixed", dataset=None, teacher=None, **rc_over) -> DistillLoop:
    info = dist.init("cpu", 0)
    rc = run_config(cfg, run)
    rc.update(batch=B, **rc_over)
    teacher = teacher if teacher is not None else _teacher(cfg)
    nets = init_nets(teacher, rc["dropout"])
    if dataset is None and (rc["discriminator"] or teacher.label_dim):
        dataset = SkewedDataset([B] * teacher.label_dim if teacher.label_dim else [4 * B])
    return DistillLoop(rc, nets, dataset, info, seed=1)


def _dropouts(net: torch.nn.Module) -> set[float]:
    return {m.dropout for m in net.modules() if isinstance(m, UNetBlock)}


# -- dropout on the generator and the fake score ------------------------------------------------------

@pytest.mark.parametrize("run", ["sid", "sida", "sid2a"])
def test_afhqv2_preset_generator_has_the_preset_dropout_not_the_teachers(run):
    """The AFHQv2 teacher was trained with dropout 0.25; the authors distil with --dropout 0.05 on
    G and the fake score. The preset's network at a tiny size (its dropout kept) stands in."""
    cfg = load_config(CONFIG_DIR / "afhqv2-64.yaml")
    assert cfg["network"]["kwargs"]["dropout"] == 0.25
    small = copy.deepcopy(cfg)
    small["data"].update(resolution=8)
    small["network"]["kwargs"].update(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    teacher = network_from_config(small)
    rc = run_config(cfg, run)
    assert rc["dropout"] == 0.05
    init_gen = None
    if rc["init_generator"]:  # SiD2A: the SiD generator, here built with yet another rate
        init_gen = network_from_config(small, dropout=0.25)
    nets = init_nets(teacher, rc["dropout"], init_generator=init_gen)
    assert _dropouts(teacher) == {0.25}
    for name in ("G", "G_ema", "fake"):
        net = getattr(nets, name)
        assert _dropouts(net) == {0.05}, name
        assert net.init_kwargs["dropout"] == 0.05, name  # and so in the network files it writes
    src = init_gen if init_gen is not None else teacher
    for k, v in src.state_dict().items():  # same weights, only the rate changed
        assert torch.equal(nets.G.state_dict()[k], v), k


def test_null_dropout_keeps_the_rate_the_networks_have():
    cfg = _cfg()
    teacher = network_from_config(cfg, dropout=0.2)
    nets = init_nets(teacher, None)
    assert _dropouts(nets.G) == _dropouts(nets.fake) == {0.2}


def test_generator_trains_in_train_mode_and_fake_score_in_its_own_step():
    cfg = _cfg(dropout=0.3)
    loop = _loop(cfg)
    loop.nimg = loop.phases[1].end_nimg  # the sida phase
    seen = []
    for name in ("teacher", "G", "fake"):
        getattr(loop.nets, name).register_forward_hook(
            lambda m, a, o, name=name: seen.append((name, m.training)))
    loop.critic_update()
    assert ("G", False) in seen and ("fake", True) in seen and ("teacher", True) not in seen
    seen.clear()
    loop.generator_update("sida")
    assert set(seen) == {("G", True), ("teacher", False), ("fake", False)}
    assert _dropouts(loop.nets.G) == {0.3}


# -- optimisers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision,eps", [("fp32", 1e-8), ("fp16", 1e-6), ("bf16", 1e-8)])
def test_adam_betas_and_eps(precision, eps):
    loop = _loop(_cfg(beta1_g=0.9, precision=precision))
    assert loop.opt_g.param_groups[0]["betas"] == (0.9, 0.999)
    assert loop.opt_critic.param_groups[0]["betas"] == (0.0, 0.999)
    assert loop.opt_g.param_groups[0]["eps"] == eps == loop.opt_critic.param_groups[0]["eps"]
    assert loop.opt_g.defaults["fused"] and loop.opt_critic.defaults["fused"]  # the faster step (bench.step)
    # an explicit eps is kept
    assert _loop(_cfg(precision=precision, adam_eps=3e-7)).opt_g.param_groups[0]["eps"] == 3e-7


# -- fake-score clipping ----------------------------------------------------------------------------

def _applied_fake_grad_peak(loop) -> list[float]:
    """The largest fake-score gradient entry each optimiser step applies (the loop frees the
    gradients right after the step, so they are read as the step sees them)."""
    peaks, step = [], loop.opt_critic.step

    def wrapped(*a, **k):
        peaks.append(max(p.grad.abs().max().item() for p in loop.critic_params if p.grad is not None))
        return step(*a, **k)
    loop.opt_critic.step = wrapped
    return peaks


def test_fake_clip_in_every_phase_of_a_discriminator_run_and_never_without():
    clip = 1e-6  # far below the gradients' size, so clipping shows in every entry
    loop = _loop(_cfg(fake_clip=clip))
    peaks = _applied_fake_grad_peak(loop)
    assert [p.kind for p in loop.phases] == ["warmup", "sid", "sida"]
    for phase in loop.phases:
        loop.nimg = phase.end_nimg - loop.batch
        assert loop.phase().kind == phase.kind
        loop.step()
        assert peaks[-1] <= clip, (phase.kind, peaks[-1])
    assert len(peaks) == 3
    sid = _loop(_cfg(fake_clip=clip), run="sid")
    sid_peaks = _applied_fake_grad_peak(sid)
    sid.step()
    assert sid_peaks[-1] > 100 * clip


# -- labels ----------------------------------------------------------------------------------------

def test_labels_follow_the_datasets_class_frequencies():
    cfg = _cfg()
    counts = [70, 20, 10, 0, 0, 0, 0, 0, 0, 0]
    loop = _loop(cfg, run="sid", dataset=SkewedDataset(counts))
    freq = loop.draws.labels(20000, 0).mean(dim=0)
    torch.testing.assert_close(freq, torch.tensor(counts) / 100.0, rtol=0, atol=0.015)
    # the discriminator's real images come with their own labels, from the same distribution
    _, labels = _loop(cfg, dataset=SkewedDataset(counts)).draws.real(4000, 0)
    torch.testing.assert_close(labels.mean(dim=0), torch.tensor(counts) / 100.0, rtol=0, atol=0.03)
    # without a dataset (analytic tests, benchmarks): uniform over the classes
    info = dist.init("cpu", 0)
    teacher = _teacher(cfg)
    bare = DistillLoop(run_config(cfg, "sid"), init_nets(teacher, None), None, info, seed=1)
    assert (bare.draws.labels(20000, 0).mean(dim=0) - 0.1).abs().max() < 0.015


# -- augmentation of the fake score's inputs ----------------------------------------------------------

def _record_augment_labels(net: torch.nn.Module, log: list) -> None:
    net.register_forward_pre_hook(lambda m, a, kw: log.append(kw.get("augment_labels")), with_kwargs=True)


def test_fake_score_sees_augmented_inputs_with_labels_and_the_generator_step_does_not():
    cfg = _cfg(augment_dim=9, augment=0.5)
    loop = _loop(cfg)
    loop.nimg = loop.phases[1].end_nimg  # sida: every network is called
    fake_log, teacher_log, g_log = [], [], []
    _record_augment_labels(loop.nets.fake, fake_log)
    _record_augment_labels(loop.nets.teacher, teacher_log)
    _record_augment_labels(loop.nets.G, g_log)
    loop.critic_update()
    (labels,) = fake_log
    assert labels.shape == (2 * B, 9)  # fakes, then reals, in one batched pass
    assert set(labels[:, 0].tolist()) <= {0.0, 1.0}
    assert not torch.equal(labels[:B], labels[B:])  # drawn independently for fakes and reals
    assert labels[:, 2:].abs().sum() > 0
    assert g_log == [None]  # the generator is called with zero augment labels
    fake_log.clear(), g_log.clear()
    loop.generator_update("sida")
    assert fake_log == [None] and teacher_log == [None] and g_log == [None]


def test_augmentation_is_drawn_from_the_loops_streams():
    """Same seed, same run: identical fake-score updates; the global RNG plays no part (dropout 0)."""
    cfg = _cfg(augment_dim=9, augment=0.5)
    teacher = _teacher(cfg)
    a, b = _loop(cfg, teacher=teacher), _loop(cfg, teacher=teacher)
    torch.manual_seed(123)
    a.step()
    torch.manual_seed(456)
    b.step()
    for pa, pb in zip(a.critic_params, b.critic_params):
        assert torch.equal(pa, pb)
    # and augmentation changes the update (the test can fail)
    c = _loop(_cfg(augment_dim=9), teacher=teacher)
    c.step()
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.critic_params, c.critic_params))


def test_augment_needs_augment_labels_in_the_network():
    with pytest.raises(ConfigError, match="augment_dim"):
        _loop(_cfg(augment=0.1))


# -- non-finite values --------------------------------------------------------------------------------

def test_nan_sample_is_dropped_in_the_generator_step():
    loop = _loop(_cfg(), run="sid")
    teacher = loop.nets.teacher
    orig = teacher.forward

    def poisoned(x, sigma, labels=None, **kw):
        out = orig(x, sigma, labels, **kw)
        out[0] = float("nan")  # sample 0 of every micro-batch
        return out

    teacher.forward = poisoned
    stats = loop.generator_update("sid")
    assert stats["dropped_g"].item() == 1
    assert torch.isfinite(stats["loss_g_sid"])
    assert all(torch.isfinite(p).all() for p in loop.g_params)
    stats = loop.critic_update()
    assert stats["dropped_fake"].item() == 0 and stats["nonfinite_fake"].item() == 0


def test_stats_are_divided_by_the_process_batch_once_and_counts_are_not():
    from sida.train.methods.base import disc_accuracy

    loop = _loop(_cfg(batch_per_proc=B // 2), run="sid")  # two accumulation rounds of B / 2
    w = loop.critic_params[0]

    def objective(slot, r):  # slot r reports the sums 6 + r (a loss) and 1 + r (a count)
        return (w * 0).sum(), {"loss_fake": torch.tensor(6.0 + r), "dropped_fake": torch.tensor(1 + r)}

    loop.method.critic_loss = objective
    stats = loop.critic_update()
    assert loop.rounds == 2 and stats["loss_fake"].item() == pytest.approx(13 / B)
    assert stats["dropped_fake"].item() == 3 and stats["nonfinite_fake"].item() == 0
    # accuracy as a sum over samples of each one's share of correct logits (here 3/4 and 0)
    real = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0]).reshape(2, 1, 2, 2)
    acc = disc_accuracy(real, torch.full_like(real, -1.0))
    assert acc["d_acc_real"].item() == pytest.approx(0.75) and acc["d_acc_fake"].item() == 2.0


def test_sync_gradients_is_nan_to_num_and_counts():
    dist.init("cpu", 0)
    p = torch.nn.Parameter(torch.zeros(5))
    p.grad = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.0, -3.0])
    assert sync_gradients([p]).item() == 3
    assert p.grad.tolist() == [0.0, 1e5, -1e5, 2.0, -3.0]


# -- precision ---------------------------------------------------------------------------------------

def _conv_output_dtypes(net: torch.nn.Module) -> set:
    """Filled, as the network runs, with the dtypes its weighted convolutions compute in."""
    seen = set()
    for m in net.modules():
        if isinstance(m, Conv2d) and m.weight is not None:
            m.register_forward_hook(lambda mod, a, o: seen.add(o.dtype))
    return seen


def test_edm_fp16_path_runs_on_the_cpu():
    cfg = _cfg()
    net = _teacher(cfg).eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 1.0, 5.0, 40.0])
    labels = torch.nn.functional.one_hot(torch.arange(4), 10).float()
    with torch.no_grad():
        ref = net(x, sigma, labels)
    assert net.unet_dtype(x.device) == torch.float32  # EDM's rule: use_fp16 only acts on CUDA
    seen = _conv_output_dtypes(net)
    net.compute_dtype = torch.float16
    out = net(x, sigma, labels)
    assert seen == {torch.float16}  # every conv of the UNet ran in fp16
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    out.square().sum().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)  # fp32 masters
    assert all(p.dtype == torch.float32 for p in net.parameters())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_distill_loop_low_precision_paths_on_the_cpu(precision):
    cfg = _cfg(augment_dim=9, augment=0.3, precision=precision)
    loop = _loop(cfg)
    nets = loop.nets
    want = torch.float16 if precision == "fp16" else torch.float32
    for name in ("teacher", "G", "G_ema", "fake"):
        assert getattr(nets, name).compute_dtype == want, name
    for name in ("G", "G_ema", "fake"):  # marked like the official networks built with --fp16
        assert getattr(nets, name).init_kwargs["use_fp16"] is (precision == "fp16"), name
    seen = _conv_output_dtypes(nets.fake)
    emb = set()  # EDM's fp16 path keeps the noise/label embedding in fp32; autocast does not
    nets.fake.model.map_layer0.register_forward_hook(lambda m, a, o: emb.add(o.dtype))
    for phase in loop.phases:
        loop.nimg = phase.end_nimg - loop.batch
        stats = loop.step()
        for k, v in stats.items():
            assert torch.isfinite(v).all(), (phase.kind, k)
    assert seen == {torch.float16 if precision == "fp16" else torch.bfloat16}
    assert emb == {torch.float32 if precision == "fp16" else torch.bfloat16}
    for net in (nets.G, nets.fake):
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())


def test_fp32_runs_a_teacher_published_with_use_fp16_in_fp32():
    cfg = _cfg()
    teacher = EDMPrecond(**{**_teacher(cfg).init_kwargs, "use_fp16": True})
    loop = _loop(cfg, teacher=teacher)
    assert teacher.compute_dtype == torch.float32 and teacher.use_fp16  # the teacher's own flag untouched
    assert loop.nets.G.init_kwargs["use_fp16"] is False


@pytest.mark.parametrize("bf16_instructions", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_is_one_warning_line(monkeypatch, bf16_instructions):
    from sida.train.run_checks import precision_warning

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16_instructions)
    line = precision_warning("bf16", torch.device("cpu"))
    if bf16_instructions:
        assert line is None
    else:
        assert line.startswith("warning: distill.precision bf16") and "precision: fp32" in line and "\n" not in line
    assert precision_warning("fp32", torch.device("cpu")) is None
    assert precision_warning("bf16", torch.device("cuda")) is None  # GPUs: autocast bf16 is their fast path
