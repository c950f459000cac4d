"""FSDP2 building blocks (`sida.train.sharding`, `sida.io.sharded_checkpoint`) on the CPU with gloo.

Two processes (torchrun) run a few updates of a tiny SongUNet EDMPrecond G and fake score through
a frozen teacher, as the distillation loop does (critic on G's detached samples, then G through
the frozen teacher and critic, requires_grad toggled, non-finite count, clipping by value and
norm, fused Adam, EMA on G_ema), once sharded and once also with activation checkpointing; one
plain process runs the same updates on the whole batch. The sharded run writes a sharded
checkpoint, reloads it at 2 processes, and the plain process loads it at 1.

The tests that need those processes are marked slow; the rest runs in this process.
This file doubles as the worker: `torchrun ... tests/test_fsdp.py fsdp OUT` and
`python tests/test_fsdp.py plain OUT`.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import PYTHON, REPO, env, tiny_config  # noqa: E402

BATCH, STEPS, HASH = 8, 3, "cfg-a"


def _nets(seed: int = 0):
    """A Nets of separate modules: G a little off the teacher, fake = teacher, G_ema = G."""
    from sida.nets.build import network_from_config
    from sida.run.config import validate
    from sida.train.nets import Nets

    torch.manual_seed(seed)
    teacher = network_from_config(validate(tiny_config())).requires_grad_(False)
    G = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return Nets(teacher=teacher, G=G, G_ema=copy.deepcopy(G).requires_grad_(False), fake=copy.deepcopy(teacher))


def _batch(step: int, lo: int, hi: int) -> dict:
    """Rows lo:hi of step `step`'s inputs (the same full batch on every process)."""
    g = torch.Generator().manual_seed(100 + step)
    full = {"z": torch.randn([BATCH, 1, 8, 8], generator=g),
            "labels": torch.nn.functional.one_hot(torch.randint(10, (BATCH,), generator=g), 10).float(),
            "sigma": (torch.randn([BATCH], generator=g) * 1.2 - 1.2).exp(),
            "noise": torch.randn([BATCH, 1, 8, 8], generator=g)}
    return {k: v[lo:hi] for k, v in full.items()}


def _train(nets, opt_g, opt_f, sync, lo: int, hi: int) -> list[int]:
    """STEPS loop-like iterations on rows lo:hi (each loss a mean over them: averaged over
    processes, the full batch's mean). Returns the non-finite counts."""
    from sida.train.updates import ema_update

    counts = []
    for step in range(STEPS):
        b = _batch(step, lo, hi)
        s_init = torch.full([hi - lo], 2.5)
        x_sigma = b["sigma"].view(-1, 1, 1, 1)
        # critic: the fake score's denoising loss on G's detached samples
        nets.fake.train().requires_grad_(True)
        nets.G.eval()
        with torch.no_grad():
            x_g = nets.G(2.5 * b["z"], s_init, b["labels"])
        loss = ((nets.fake(x_g + x_sigma * b["noise"], b["sigma"], b["labels"]) - x_g) ** 2).mean()
        loss.backward()
        params_f = list(nets.fake.parameters())
        counts.append(int(sync(params_f)))
        torch.nn.utils.clip_grad_value_(params_f, 0.05)
        opt_f.step()
        opt_f.zero_grad(set_to_none=True)
        nets.fake.requires_grad_(False)
        # generator: through the frozen teacher and fake score (SiD's form)
        nets.G.train().requires_grad_(True)
        x_g = nets.G(2.5 * b["z"], s_init, b["labels"])
        x_t = x_g + x_sigma * b["noise"]
        y_real = nets.teacher(x_t, b["sigma"], b["labels"])
        y_fake = nets.fake(x_t, b["sigma"], b["labels"])
        ((y_real - y_fake) * (y_fake - x_g)).mean().backward()
        params_g = list(nets.G.parameters())
        counts.append(int(sync(params_g)))
        torch.nn.utils.clip_grad_norm_(params_g, 1.0)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        nets.G.eval().requires_grad_(False)
        ema_update(nets.G_ema, nets.G, (step + 1) * BATCH, BATCH, 0.05, None)
    return counts


def _optimizers(nets):
    from sida.train.updates import make_optimizer

    return (make_optimizer(nets.G.parameters(), "adam", 1e-4, (0.0, 0.999)),
            make_optimizer(nets.fake.parameters(), "adam", 1e-4, (0.0, 0.999)))


def _entries(nets, opt_g, opt_f):
    return {"G": (nets.G, opt_g), "G_ema": (nets.G_ema, None),
            "critic": (torch.nn.ModuleDict({"fake": nets.fake}), opt_f)}


def _full_state(nets, opt_g, opt_f) -> dict:
    """Every network's and optimiser's full state (rank 0; a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = {}
    for name, (module, opt) in _entries(nets, opt_g, opt_f).items():
        if opt is None:
            out[name] = get_model_state_dict(module, options=full)
        else:
            out[name], out[f"opt_{name}"] = get_state_dict(module, opt, options=full)
    return out


def _text_precond():
    """A tiny SD-like DiffusersTextPrecond (UNet2DConditionModel blocks) and prompt embeddings."""
    from sida.nets.diffusers_text import DiffusersTextPrecond
    from sd_assets import HIDDEN, MAX_TOKENS, tiny_unet_config

    torch.manual_seed(0)
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0).tolist()
    net = DiffusersTextPrecond(tiny_unet_config(1), alphas, cond_shape=(MAX_TOKENS, HIDDEN), img_resolution=8,
                               img_channels=1)
    return net, torch.randn([BATCH, MAX_TOKENS, HIDDEN], generator=torch.Generator().manual_seed(5))


def _edm2_precond():
    """A tiny EDM2Precond whose 0-dim gains (which FSDP leaves whole) are off zero (at zero no
    gradient would reach the rest), and class labels."""
    from sida.nets.precond import EDM2Precond

    torch.manual_seed(0)
    net = EDM2Precond(img_resolution=8, img_channels=1, label_dim=10, use_fp16=False, model_channels=8,
                      channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5 if p.ndim == 0 else 0.0)
    return net, _batch(0, 0, BATCH)["labels"]


def _gradient_parity(plain: torch.nn.Module, cond: torch.Tensor, mesh, rows: tuple[int, int]) -> tuple[float, int, float]:
    """(largest difference between the sharded network's gradient on half the batch, synchronised,
    and the plain one's on the whole batch; the non-finite count after an inf in rank 1's shard of
    the first parameter; the sharded peak's difference from the plain one). The plain network
    runs on every process (no collectives)."""
    from torch.distributed.tensor import DTensor

    from sida.train.sharding import mixed_precision, shard_network, sharded_peak, sync_sharded_gradients

    sharded = shard_network(copy.deepcopy(plain), mesh, mixed_precision("fp32"))
    b = _batch(0, 0, BATCH)
    for net, (lo, hi) in ((plain, (0, BATCH)), (sharded, rows)):
        net(b["z"][lo:hi], b["sigma"][lo:hi], cond[lo:hi]).square().mean().backward()
    group = mesh.get_group()
    assert sync_sharded_gradients(sharded.parameters(), group) == 0
    full = {k: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            for k, p in sharded.named_parameters() if p.grad is not None}
    ref = {k: p.grad for k, p in plain.named_parameters() if p.grad is not None}  # (EDM2's logvar gets none)
    assert full.keys() == ref.keys()
    diff = max((full[k] - v).abs().max().item() for k, v in ref.items())
    # an inf in a whole (0-dim) gradient where there is one, else in a shard
    first = next((p for p in sharded.parameters() if p.ndim == 0), next(iter(sharded.parameters())))
    grad = first.grad.to_local() if isinstance(first.grad, DTensor) else first.grad
    if mesh.get_rank() == 1:
        grad.view(-1)[0] = float("inf")
    bad = int(sync_sharded_gradients(sharded.parameters(), group))
    peak = max(p.detach().abs().max().item() for p in plain.parameters())
    return diff, bad, abs(sharded_peak(sharded.parameters(), group).item() - peak)


def _fsdp_worker(out: Path) -> None:
    from sida.io.sharded_checkpoint import load_sharded, save_sharded
    from sida.run import dist
    from sida.train.sharding import consolidated_network, fsdp_mesh, shard_networks, sync_sharded_gradients

    info = dist.init("cpu", 1)
    mesh = fsdp_mesh(info.device, info.world_size)
    group = mesh.get_group()
    half = BATCH // info.world_size
    rows = (info.rank * half, (info.rank + 1) * half)
    results = {}
    for ac in (False, True):
        nets = _nets()
        shard_networks(nets, mesh, "fp32", activation_checkpointing=ac)
        opt_g, opt_f = _optimizers(nets)
        counts = _train(nets, opt_g, opt_f, lambda p: sync_sharded_gradients(p, group), *rows)
        results[ac] = _full_state(nets, opt_g, opt_f)
    results["counts"] = counts
    # a NaN in rank 0's shard, an inf in rank 1's: the job's count on every process, each replaced
    G = nets.G
    local = next(p for p in G.parameters() if p.to_local().numel())
    for p in G.parameters():
        p.grad = torch.zeros_like(p)
    local.grad.to_local().view(-1)[0] = float("nan") if info.rank == 0 else float("inf")
    results["nonfinite"] = dist.gather_objects(int(sync_sharded_gradients(G.parameters(), group)))
    results["replaced"] = dist.gather_objects(local.grad.to_local().view(-1)[0].item())
    # export: the consolidated network computes what the sharded one does
    x, sigma, labels = 2.5 * _batch(0, 0, 2)["z"], torch.full([2], 2.5), _batch(0, 0, 2)["labels"]
    with torch.no_grad():
        sharded_out = nets.G_ema(x, sigma, labels)
    plain = consolidated_network(nets.G_ema)
    if info.is_main:
        with torch.no_grad():
            results["export"] = (type(plain).__name__, (plain(x, sigma, labels) - sharded_out).abs().max().item())
    # bf16: the blocks gather bf16 parameters, gradients come back fp32, G's output stays near fp32's
    low = _nets()
    shard_networks(low, mesh, "bf16")
    gathered = []
    low.G.model.enc["8x8_block0"].register_forward_pre_hook(lambda m, i: gathered.append(m.conv0.weight.dtype))
    with torch.autocast("cpu", torch.bfloat16):
        low_out = low.G(x, sigma, labels)
    low_out.square().mean().backward()
    with torch.no_grad():
        ref_out = _nets().G(x, sigma, labels)  # the same weights, unsharded, fp32
    results["bf16"] = (gathered, {p.grad.dtype for p in low.G.parameters()},
                       ((low_out.float() - ref_out).abs().max() / ref_out.abs().max()).item())
    results["edm2"] = _gradient_parity(*_edm2_precond(), mesh, rows)
    results["text"] = _gradient_parity(*_text_precond(), mesh, rows)
    # checkpoint at 2, reload at 2 into differently initialised networks
    save_sharded(out / "ckpt", _entries(nets, opt_g, opt_f), {"nimg": STEPS * BATCH},
                 {"config_hash": HASH, "stage": "test", "nimg": STEPS * BATCH}, group)
    fresh = _nets(seed=1)
    shard_networks(fresh, mesh, "fp32")
    fopt_g, fopt_f = _optimizers(fresh)
    extra, meta = load_sharded(out / "ckpt", _entries(fresh, fopt_g, fopt_f), HASH, group)
    results["reloaded"] = _full_state(fresh, fopt_g, fopt_f)
    results["extra"], results["meta"] = extra, meta
    if info.is_main:
        torch.save(results, out / "fsdp.pt")
    dist.shutdown()


def _plain_worker(out: Path) -> None:
    from sida.io.sharded_checkpoint import load_sharded, save_sharded
    from sida.run import dist
    from sida.train.updates import sync_gradients

    dist.init("cpu", 1)
    nets = _nets()
    opt_g, opt_f = _optimizers(nets)
    _train(nets, opt_g, opt_f, sync_gradients, 0, BATCH)
    results = {"trained": _full_state(nets, opt_g, opt_f)}
    fresh = _nets(seed=1)
    fopt_g, fopt_f = _optimizers(fresh)
    load_sharded(out / "ckpt", _entries(fresh, fopt_g, fopt_f), HASH)
    results["loaded"] = _full_state(fresh, fopt_g, fopt_f)
    # optimisers that have not stepped: saving leaves them without state, and so does loading
    early = _nets()
    eopt_g, eopt_f = _optimizers(early)
    save_sharded(out / "early", _entries(early, eopt_g, eopt_f), {}, {"config_hash": HASH})
    load_sharded(out / "early", _entries(early, eopt_g, eopt_f), HASH)
    results["early_states"] = (len(eopt_g.state), len(eopt_f.state))
    torch.save(results, out / "plain.pt")
    dist.shutdown()


def _flat(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, list):
            out.update(_flat(dict(enumerate(v)), f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def _assert_close(a: dict, b: dict, atol: float) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys() and len(fa) > 100
    for k in fa:
        diff = (fa[k].float() - fb[k].float()).abs().max().item() if fa[k].numel() else 0.0
        assert diff <= atol, f"{k}: max diff {diff}"


def _run(args: list[str]) -> None:
    res = subprocess.run(["timeout", "-k", "10", "240", *args], cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=270)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict, Path]:
    out = tmp_path_factory.mktemp("fsdp")
    torchrun = shutil.which("torchrun", path=str(Path(PYTHON).parent)) or "torchrun"
    _run([torchrun, "--standalone", "--nproc-per-node", "2", str(Path(__file__)), "fsdp", str(out)])
    _run([PYTHON, str(Path(__file__)), "plain", str(out)])
    return torch.load(out / "fsdp.pt"), torch.load(out / "plain.pt"), out


@pytest.mark.slow  # two torchrun jobs: ~40 s of CPU, more wall time on a shared machine
def test_two_sharded_processes_equal_one_plain_process(runs):
    fsdp, plain, _ = runs
    _assert_close(fsdp[False], plain["trained"], atol=1e-5)
    # activation checkpointing recomputes the same blocks: the same updates
    _assert_close(fsdp[True], fsdp[False], atol=1e-6)
    # the updates moved the networks (the comparison can fail)
    _, start = _nets(), _nets().G.state_dict()
    assert max((start[k] - v).abs().max().item() for k, v in plain["trained"]["G"].items()) > 1e-4
    assert fsdp["counts"] == [0] * (2 * STEPS)
    for net in ("edm2", "text"):  # EDM2's 0-dim gains; diffusers' UNet2DConditionModel blocks
        grad_diff, bad, peak_diff = fsdp[net]
        assert grad_diff <= 1e-6 and bad == 1 and peak_diff == 0, (net, fsdp[net])
    gathered, grad_dtypes, rel = fsdp["bf16"]
    assert gathered == [torch.bfloat16] and grad_dtypes == {torch.float32} and 0 < rel < 0.05
    assert fsdp["nonfinite"] == [2, 2] and fsdp["replaced"] == [0.0, 1e5]


@pytest.mark.slow  # two torchrun jobs: ~40 s of CPU, more wall time on a shared machine
def test_sharded_checkpoint_reloads_at_two_and_one_process(runs):
    fsdp, plain, out = runs
    _assert_close(fsdp["reloaded"], fsdp[False], atol=0)
    _assert_close(plain["loaded"], fsdp[False], atol=0)
    assert fsdp["extra"] == {"nimg": STEPS * BATCH}
    assert fsdp["meta"]["world_size"] == 2 and fsdp["meta"]["config_hash"] == HASH
    assert sorted(p.name for p in out.iterdir() if "ckpt" in p.name) == ["ckpt"]  # no temporary left
    assert plain["early_states"] == (0, 0)


def test_a_save_cut_between_its_renames_leaves_the_previous_state(tmp_path):
    from sida.io.sharded_checkpoint import sharded_state_dir

    (tmp_path / ".state.old").mkdir()
    assert sharded_state_dir(tmp_path / "state") == tmp_path / ".state.old"
    (tmp_path / "state").mkdir()
    assert sharded_state_dir(tmp_path / "state") == tmp_path / "state"


@pytest.mark.slow  # two torchrun jobs: ~40 s of CPU, more wall time on a shared machine
def test_consolidated_network_is_the_plain_network(runs):
    name, diff = runs[0]["export"]
    assert name == "EDMPrecond" and diff <= 1e-6


def test_bad_sharded_checkpoints_are_refused_in_one_line(tmp_path):
    """Refused on meta.json alone, before any process reads a shard."""
    import json

    from sida.errors import CheckpointError
    from sida.io.sharded_checkpoint import SHARDED_FORMAT, load_sharded

    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({"format": SHARDED_FORMAT, "config_hash": "cfg-b", "world_size": 2}))
    with pytest.raises(CheckpointError, match=r"written with another config .*restore that config, or delete") as e:
        load_sharded(other, {}, HASH)
    assert "\n" not in str(e.value)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is incomplete \(no meta.json.*delete .* to start the stage over"):
        load_sharded(partial, {}, HASH)
    assert load_sharded(tmp_path / "none", {}, HASH) is None


def test_fsdp_with_one_process_is_refused():
    from sida.errors import ConfigError
    from sida.train.sharding import check_fsdp

    with pytest.raises(ConfigError, match=r"parallel: fsdp .* this run has 1 process\(es\): set parallel: ddp"):
        check_fsdp(1)
    check_fsdp(2)


def test_blocks_rule_finds_the_unet_blocks():
    from diffusers import UNet2DConditionModel

    from sida.nets.blocks import UNetBlock
    from sida.nets.edm2 import Block
    from sida.nets.precond import EDM2Precond
    from sida.train.sharding import blocks
    from sd_assets import tiny_unet_config

    def unet_blocks(unet, cls):  # our UNets: the enc / dec entries that take (x, emb)
        return [m for m in [*unet.enc.values(), *unet.dec.values()] if isinstance(m, cls)]

    song = _nets().G
    assert blocks(song) == unet_blocks(song.model, UNetBlock) and len(blocks(song)) == 10
    edm2 = EDM2Precond(img_resolution=8, img_channels=1, label_dim=0, use_fp16=False, model_channels=8,
                       channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    assert blocks(edm2) == unet_blocks(edm2.unet, Block) and len(blocks(edm2)) == 10
    unet = UNet2DConditionModel(**tiny_unet_config(4))
    assert blocks(unet) == [*unet.down_blocks, *unet.up_blocks, unet.mid_block]


if __name__ == "__main__":
    {"fsdp": _fsdp_worker, "plain": _plain_worker}[sys.argv[1]](Path(sys.argv[2]))

