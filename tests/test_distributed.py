"""Several processes give the one-big-batch gradient; a real 2-process torchrun run completes.

Why not "2-process run == 1-process run with accumulation" end to end: every rank draws from its
own generators (seeded by rank), and the 1-process run draws both accumulation rounds from one,
so the two runs see different samples by design. The test therefore fixes the micro-batches and
checks what must hold for any draws: `sida.train.updates.sync_gradients` over 2 gloo processes, each on
half of a fixed batch, gives the gradient of 1 process that accumulates both halves (SiD/SiDA
objectives of the real network, incl. the per-process-batch discriminator BCE), to float
tolerance. Then the real `torchrun -m stages.distill` runs 2 processes end to end.

This file doubles as the torchrun worker: `torchrun ... tests/test_distributed.py OUT`.
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
from helpers import (run_module, REPO, baseline_runs, env, error_lines, tiny_config)  # noqa: E402

FULL = 8  # global batch; 2 halves of 4 (2 ranks x 1 round, or 1 rank x 2 rounds)


def _nets():
    from sida.run.config import validate
    from sida.nets.build import network_from_config

    cfg = validate(tiny_config())
    torch.manual_seed(0)
    teacher = network_from_config(cfg)
    G = copy.deepcopy(teacher)
    with torch.no_grad():  # a generator a little off the teacher, so the SiD loss is not zero
        for p in G.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fake = copy.deepcopy(teacher)
    teacher.requires_grad_(False)
    return teacher, G, fake


def _batch():
    """Every random input of one iteration for the full batch, identical on every rank."""
    g = torch.Generator().manual_seed(123)
    n = FULL
    return {"z": torch.randn([n, 1, 8, 8], generator=g),
            "real": torch.randn([n, 1, 8, 8], generator=g).clamp(-1, 1),
            "labels": torch.nn.functional.one_hot(torch.randint(10, (n,), generator=g), 10).float(),
            "sigma": (torch.randn([n, 1, 1, 1], generator=g) * 1.2 - 1.2).exp(),
            "noise": torch.randn([n, 1, 8, 8], generator=g),
            "t": torch.rand([n, 1, 1, 1], generator=g),
            "eps": torch.randn([n, 1, 8, 8], generator=g)}


def _accumulate(nets, halves: list[int], batch_total: int) -> None:
    """Backward of the fake-score (+discriminator) and SiDA generator objectives, one micro-batch
    per entry of `halves`, each divided by this process's batch (micro-batch x rounds, as
    DistillLoop does): the cross-process average then gives the global-batch mean."""
    from sida.train.methods.sid import fake_forward
    from sida.train.losses import (adversarial_generator_loss, discriminator_loss, edm_denoising_loss, edm_loss_weight,
                             sid_critic_objective, sid_generator_objective, sid_generator_loss, sid_weight_factor)
    from sida.nets.sampler import sid_sigma_t

    teacher, G, fake = nets
    full = _batch()
    for h in halves:
        b = {k: v[h * FULL // 2:(h + 1) * FULL // 2] for k, v in full.items()}
        m = b["z"].shape[0]
        s_init = torch.full([m], 2.5)
        # fake score + discriminator on x_g.detach()
        with torch.no_grad():
            x_g = G(2.5 * b["z"], s_init, b["labels"])
        fake.requires_grad_(True)
        n = b["noise"] * b["sigma"]
        den, logits_fake, logits_real = fake_forward(fake, x_g + n, b["real"] + n, b["sigma"].flatten(), b["labels"], True)
        l_fake = edm_denoising_loss(den, x_g, b["sigma"])
        l_d = discriminator_loss(logits_real, logits_fake, edm_loss_weight(b["sigma"]))
        sid_critic_objective(l_fake, l_d, batch_total).backward()
        # generator through the frozen teacher and fake score, adversarial phase
        fake.requires_grad_(False)
        x_g = G(2.5 * b["z"], s_init, b["labels"])
        sigma_t = sid_sigma_t(b["t"] * 0.8)
        x_t = x_g + sigma_t * b["eps"]
        y_real = teacher(x_t, sigma_t.flatten(), b["labels"])
        y_fake, logits = fake(x_t, sigma_t.flatten(), b["labels"], return_flag="encoder_decoder")
        l_sid = sid_generator_loss(y_real, y_fake, x_g, 1.2)
        l_adv = adversarial_generator_loss(logits, sid_weight_factor(x_g, y_real), x_g.shape)
        sid_generator_objective(l_sid, l_adv, 100.0, 0.01, batch_total, True).backward()


def _grads(nets) -> dict[str, torch.Tensor]:
    _, G, fake = nets
    out = {f"G.{k}": p.grad.clone() for k, p in G.named_parameters() if p.grad is not None}
    out.update({f"fake.{k}": p.grad.clone() for k, p in fake.named_parameters() if p.grad is not None})
    return out


def worker(out_dir: str) -> None:
    """One rank of the torchrun gradient test: its half of the batch, then sync_gradients."""
    from sida.run import dist
    from sida.train.updates import sync_gradients

    info = dist.init("cpu", 1)
    assert info.world_size == 2
    nets = _nets()
    _accumulate(nets, [info.rank], FULL // 2)  # 4 per process x 1 round
    params = list(nets[1].parameters()) + list(nets[2].parameters())
    bad = sync_gradients(params)
    grads = _grads(nets)
    # non-finite entries on one rank are zeroed on every rank and counted the same
    first = params[0]
    if info.rank == 1:
        first.grad.view(-1)[0] = float("nan")
    bad2 = sync_gradients(params)
    # A one-rank group (a benchmark's one-process loop inside a 2-process job): rank 0's gradients
    # are not averaged with anyone's; rank 1 takes no part.
    solo = torch.distributed.new_group([0])
    solo_kept = None
    if info.rank == 0:
        own = _nets()
        _accumulate(own, [0], FULL // 2)
        before = _grads(own)
        sync_gradients(list(own[1].parameters()) + list(own[2].parameters()), solo)
        solo_kept = all(torch.equal(v, before[k]) for k, v in _grads(own).items())
    torch.save({"grads": grads, "bad": int(bad), "bad2": int(bad2), "first_after_nan": first.grad.clone(),
                "solo_kept": solo_kept}, Path(out_dir) / f"rank{info.rank}.pt")
    dist.shutdown()


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return subprocess.run(["timeout", "-k", "10", str(int(timeout)), torchrun, "--standalone", "--nproc-per-node", "2",
                           *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout + 30)


@pytest.mark.slow
def test_two_process_gradient_equals_one_process_accumulation(tmp_path):
    res = _torchrun(str(Path(__file__)), str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")

    # one process, both halves as 2 accumulation rounds (world size 1: sync is a no-op average)
    from sida.run import dist
    from sida.train.updates import sync_gradients

    dist.init("cpu", 0)
    nets = _nets()
    _accumulate(nets, [0, 1], FULL)  # 4 per round x 2 rounds
    assert sync_gradients(list(nets[1].parameters()) + list(nets[2].parameters())) == 0
    ref = _grads(nets)

    assert r0["bad"] == r1["bad"] == 0
    assert r0["solo_kept"] is True and r1["solo_kept"] is None
    assert ref.keys() == r0["grads"].keys() == r1["grads"].keys()
    assert any(k.startswith("G.") for k in ref) and any(k.startswith("fake.") for k in ref)
    for k in ref:
        assert torch.equal(r0["grads"][k], r1["grads"][k]), f"ranks disagree on {k}"
        scale = ref[k].abs().max().item() + 1e-12
        # float32 sums in another order: tolerance relative to the tensor's largest entry
        diff = (r0["grads"][k] - ref[k]).abs().max().item()
        assert diff <= 1e-3 * scale, f"{k}: max diff {diff} (scale {scale})"
    # sanity: the halves alone differ from the full-batch gradient (the test can fail)
    half = _nets()
    _accumulate(half, [0], FULL // 2)
    assert not all((v - ref[k]).abs().max() <= 1e-3 * (ref[k].abs().max() + 1e-12) for k, v in _grads(half).items())
    # and the sum instead of the average over ranks would be off by 2
    assert not all((2 * v - ref[k]).abs().max() <= 1e-3 * (ref[k].abs().max() + 1e-12)
                   for k, v in r0["grads"].items())

    assert r0["bad2"] == r1["bad2"] == 1
    assert r0["first_after_nan"].view(-1)[0] == 0 == r1["first_after_nan"].view(-1)[0]
    assert torch.equal(r0["first_after_nan"], r1["first_after_nan"])


@pytest.mark.slow
def test_torchrun_two_process_distill_end_to_end(tmp_path, stage_inputs):
    # batch 16 = 4 per process x 2 rounds x 2 processes; augmented fake-score inputs, whose draws
    # belong to micro-batch slots like every other random draw
    cfg = tiny_config(batch_per_proc=4, augment=0.5)
    cfg["network"]["kwargs"]["augment_dim"] = 9
    cfg["distill"]["runs"]["mixed"]["phases"] = [{"kind": "warmup", "kimg": 0.016}, {"kind": "sid", "kimg": 0.016},
                                                 {"kind": "sida", "kimg": 0.032}]
    cfg_path, teacher = stage_inputs(tmp_path, cfg)
    out = tmp_path / "out"
    # `--`: torchrun matches its own options by prefix (`--run` would be "ambiguous: --run-path")
    res = _torchrun("-m", "--", "stages.distill", "--config", str(cfg_path), "--run", "mixed", "--teacher", str(teacher),
                    "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert not error_lines(res.stderr)
    assert "4 x 2 rounds x 2 processes" in res.stderr
    # rank 0 alone logs: one progress line per tick (2 ticks of 32 images), not one per rank
    progress = [line for line in res.stderr.splitlines() if line.startswith("mixed: kimg")]
    assert len(progress) == 2, res.stderr
    assert res.stderr.count("wrote ") == 1
    # rank 0 alone writes: exactly the declared outputs, the work dir cleared, no per-rank files
    names = sorted(p.name for p in out.iterdir())
    assert {"network.pt", "state.pt", "samples.png", "metrics.jsonl"} <= set(names), names
    assert "work" not in names
    assert not [n for n in names if "rank" in n or n.endswith(".tmp")], names
    from sida.io import checkpoints

    net = checkpoints.load_network(out / "network.pt")
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())
    meta = checkpoints.load_network(out / "network.pt").sida_meta
    assert meta["kimg"] == pytest.approx(0.064)

    # The same global batch in one process (4 per pass x 4 accumulation rounds) draws the same
    # micro-batches (random streams belong to micro-batch slots, not ranks), so the whole run,
    # through every phase, ends at the same generator and fake score to float tolerance.
    out1 = tmp_path / "out1"
    res1 = run_module("stages.distill", "--config", str(cfg_path), "--run", "mixed", "--teacher", str(teacher),
                      "--out", str(out1), timeout=240)
    assert res1.returncode == 0, res1.stderr[-3000:]
    assert "4 x 4 rounds x 1 processes" in res1.stderr
    two = checkpoints.load_state(out / "state.pt")
    one = checkpoints.load_state(out1 / "state.pt")
    for name in ("G", "G_ema", "fake"):
        for key, a in two[name]["state_dict"].items():
            b = one[name]["state_dict"][key]
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
    # ...and the comparison can fail: another seed gives another run.
    res2 = run_module("stages.distill", "--config", str(cfg_path), "--run", "mixed", "--teacher", str(teacher),
                      "--out", str(tmp_path / "out2"), "--set", "seed=4", timeout=240)
    assert res2.returncode == 0, res2.stderr[-3000:]
    other = checkpoints.load_state(tmp_path / "out2" / "state.pt")
    assert any(not torch.allclose(a, other["G"]["state_dict"][k], rtol=1e-4, atol=1e-5)
               for k, a in one["G"]["state_dict"].items())


@pytest.mark.slow
@pytest.mark.parametrize("run", ["dmd2", "add"])
def test_torchrun_two_process_baseline_run_equals_one_process(tmp_path, run, stage_inputs):
    """DMD2 and ADD: 2 processes x 2 rounds of 4 end where 1 process x 4 rounds of 4 ends (every
    draw belongs to a micro-batch slot; the heads normalise per sample), heads included."""
    cfg = tiny_config(batch_per_proc=4)
    cfg["distill"]["runs"] = {run: baseline_runs(iters=(1, 4))[run]}  # 5 iterations: warm-up, then 2 turns
    cfg_path, teacher = stage_inputs(tmp_path, cfg)
    args = ["stages.distill", "--config", str(cfg_path), "--run", run, "--teacher", str(teacher), "--out"]
    res = _torchrun("-m", "--", *args, str(tmp_path / "two"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4 x 2 rounds x 2 processes" in res.stderr
    res1 = run_module(*args, str(tmp_path / "one"), timeout=240)
    assert res1.returncode == 0, res1.stderr[-3000:]
    assert "4 x 4 rounds x 1 processes" in res1.stderr
    from sida.io import checkpoints

    two, one = checkpoints.load_state(tmp_path / "two" / "state.pt"), checkpoints.load_state(tmp_path / "one" / "state.pt")
    assert two["head"]["class"] == ("DMD2Head" if run == "dmd2" else "ADDHeads")
    for name in ("G", "G_ema", "fake", "head"):
        for key, a in two[name]["state_dict"].items():
            torch.testing.assert_close(a, one[name]["state_dict"][key], rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
    # the generator moved (the comparison can fail), and G_ema is the raw G without EMA (DMD2)
    start = checkpoints.load_network(teacher).state_dict()
    assert any(not torch.allclose(a, start[k]) for k, a in one["G"]["state_dict"].items())
    if run == "dmd2":
        assert all(torch.equal(a, one["G_ema"]["state_dict"][k]) for k, a in one["G"]["state_dict"].items())


if __name__ == "__main__":
    worker(sys.argv[1])
