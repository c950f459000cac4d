"""`parallel: fsdp` in the distillation loop and stage, on the CPU with gloo.

Two FSDP processes run a few iterations of a tiny warm-up / SiD / SiDA run through
`DistillLoop` and end where one DDP process running the same global batch ends (every draw
belongs to a micro-batch slot: 2 processes x 2 rounds of 4 draw what 1 process x 4 rounds of 4
draws), stats included. The stage runs are killed (kill -9) and signalled (one rank) and resume
bit-exactly; a sharded checkpoint of another config and a one-process fsdp run are refused in
one line. This file doubles as the loop worker: `torchrun ... tests/test_fsdp_loop.py OUT`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import PYTHON, REPO, baseline_runs, env, error_lines, run_command, run_module, tiny_config  # noqa: E402
from test_signals import TORCHRUN, _assert_same_outputs, _config as signals_config  # noqa: E402

STEPS = 4  # iterations of 16: mixed's warm-up, SiD and two SiDA; a baseline's warm-up and three of its own


def _loop_config(parallel: str) -> dict:
    cfg = tiny_config(batch_per_proc=4, parallel=parallel)
    cfg["distill"]["runs"]["mixed"]["phases"] = [{"kind": "warmup", "kimg": 0.016}, {"kind": "sid", "kimg": 0.016},
                                                 {"kind": "sida", "kimg": 0.032}]
    cfg["distill"]["runs"].update(baseline_runs(iters=(1, STEPS - 1)))  # DMD2 / ADD heads: sharded too
    return cfg


def _whole_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    from sida.io.sharded_checkpoint import consolidated_state_dict
    from sida.train.sharding import is_sharded

    if is_sharded(net):
        return consolidated_state_dict(net)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def worker(out: Path, run: str) -> None:
    """STEPS iterations of the tiny `run`, FSDP under torchrun (2 processes) or DDP (1); rank 0
    saves the networks' whole weights and every rank's stats."""
    from sida.io.data import open_dataset
    from sida.nets.build import network_from_config
    from sida.run import dist
    from sida.run.config import run_config, validate
    from sida.train.loop import DistillLoop
    from sida.train.nets import init_nets

    info = dist.init("cpu", 1)
    cfg = validate(_loop_config("fsdp" if info.world_size > 1 else "ddp"))
    torch.manual_seed(0)
    teacher = network_from_config(cfg).requires_grad_(False)
    rc = run_config(cfg, run)
    loop = DistillLoop(rc, init_nets(teacher, rc["dropout"]), open_dataset(cfg["data"]), info, seed=0)
    stats = []
    for _ in range(STEPS):
        stats.append({k: float(v) for k, v in loop.step().items()})
        loop.nimg += loop.batch
    nets = {name: _whole_state(getattr(loop.nets, name)) for name in ("G", "G_ema", "fake", "head", "teacher")
            if getattr(loop.nets, name) is not None}
    every = dist.gather_objects(stats)
    if info.is_main:
        torch.save({"nets": nets, "stats": every, "sharded": loop.mesh is not None}, out / f"loop{info.world_size}.pt")
    dist.shutdown()


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    res = subprocess.run(["timeout", "-k", "10", str(timeout), *cmd], cwd=REPO, env=env(), capture_output=True,
                         text=True, timeout=timeout + 30)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _fsdp_equals_ddp(tmp_path: Path, run: str) -> None:
    from sida.train.methods.base import is_count

    torchrun = shutil.which("torchrun", path=str(Path(PYTHON).parent)) or "torchrun"
    _run([torchrun, "--standalone", "--nproc-per-node", "2", str(Path(__file__)), str(tmp_path), run])
    _run([PYTHON, str(Path(__file__)), str(tmp_path), run])
    two, one = torch.load(tmp_path / "loop2.pt"), torch.load(tmp_path / "loop1.pt")
    assert two["sharded"] and not one["sharded"]
    assert two["nets"].keys() == one["nets"].keys() and ("head" in one["nets"]) == (run != "mixed")
    for name in two["nets"]:
        for key, a in two["nets"][name].items():
            torch.testing.assert_close(a, one["nets"][name][key], rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
    # the generator moved from the teacher it started as (the comparison can fail)
    start = one["nets"]["teacher"]
    assert any(not torch.allclose(a, start[k], rtol=1e-4, atol=1e-5) for k, a in one["nets"]["G"].items())
    # stats: each process's are means over its half of the batch (their mean is the whole
    # batch's) or counts over it (their sum); non-finite counts are already the job's
    ranks, (single,) = two["stats"], one["stats"]
    assert len(single) == STEPS and any("nonfinite_g" in stats for stats in single)  # a generator update
    for step in range(STEPS):
        assert ranks[0][step].keys() == single[step].keys()
        for k, v in single[step].items():
            a, b = ranks[0][step][k], ranks[1][step][k]
            both = a if k.startswith("nonfinite") else a + b if is_count(k) else (a + b) / 2
            assert both == pytest.approx(v, rel=1e-4, abs=1e-5), (step, k)


def test_two_fsdp_processes_equal_one_ddp_process(tmp_path):
    """Warm-up, SiD and SiDA (the fake score's gradients clipped by value)."""
    _fsdp_equals_ddp(tmp_path, "mixed")


@pytest.mark.slow  # two more torchrun jobs each (~80 s of wall time on a shared 2-core machine)
@pytest.mark.parametrize("run", ["dmd2", "add"])
def test_two_fsdp_processes_equal_one_ddp_process_with_a_head(tmp_path, run):
    """DMD2 (AdamW, lr warm-up, clipping by norm, critic ratio 2, no EMA) and ADD (its heads, R1)."""
    _fsdp_equals_ddp(tmp_path, run)


def test_a_checkpoint_moves_its_slot_streams_to_another_process_count(tmp_path):
    """Slot k * rounds + r of the old split is the same slot of the new one; another slot count
    is refused in one line."""
    from sida.errors import CheckpointError
    from sida.train.checkpointer import slot_rng

    from sida.train.draws import make_generators

    def names(rounds: int) -> list[str]:  # a process's generators, as the loop makes them
        return list(make_generators(0, 0, torch.device("cpu"), rounds))

    def slot(k: int, name: str) -> str:  # a stand-in state naming its kind and global slot (2 rounds)
        kind, _, r = name.partition("/")
        return f"{kind}{2 * k + int(r or 0)}"

    # 2 processes x 2 rounds
    rngs = [{"gens": {n: slot(k, n) for n in names(2)}, "torch": f"torch{k}"} for k in range(2)]
    assert slot_rng(rngs, 1, 2, names(2), tmp_path) is rngs[1]
    four = [slot_rng(rngs, k, 4, names(1), tmp_path) for k in range(4)]
    assert [s["gens"] for s in four] == [{"noise": f"noise{k}", "data": f"data{k}"} for k in range(4)]
    assert [s["torch"] for s in four] == ["torch0", "torch0", "torch1", "torch1"]
    one = slot_rng(rngs, 0, 1, names(4), tmp_path)["gens"]
    assert one == {"noise": "noise0", "data": "data0", **{f"{kind}/{r}": f"{kind}{r}" for r in (1, 2, 3)
                                                          for kind in ("noise", "data")}}
    with pytest.raises(CheckpointError, match=r"has 4 micro-batch slots \(2 processes x 2 rounds\), this run has 3: "
                                              r"resume with 2 processes, or set batch_per_proc") as e:
        slot_rng(rngs, 0, 3, names(1), tmp_path)
    assert "\n" not in str(e.value)


# -- the stage: kill -9, a signal to one rank, bad input ------------------------------------------

@pytest.fixture(scope="module")
def stage(tmp_path_factory, stage_inputs):
    """The config, teacher and an uninterrupted 2-process FSDP run of the signal tests' stage run
    (warm-up, SiD, SiDA with dropout and augmentation: 10 iterations of 16, checkpoints every 2,
    the in-training monitor on: network.pt is its best generator), sharded."""
    d = tmp_path_factory.mktemp("fsdp-stage")
    cfg = signals_config()
    cfg["distill"]["parallel"] = "fsdp"
    cfg["results_dir"] = str(d / "results")  # the monitor's classifier and reference, made once
    config, teacher = stage_inputs(d, cfg)
    args = ["stages.distill", "--config", str(config), "--run", "mixed", "--teacher", str(teacher), "--out"]
    res = run_command([*TORCHRUN, *args, str(d / "ref")])
    assert res.returncode == 0 and "8 x 1 rounds x 2 processes" in res.stderr, res.stderr[-3000:]
    return {"args": args, "ref": d / "ref", "dir": d}


@pytest.mark.slow  # three 2-process stage runs (~2 min of wall time on a shared 2-core machine)
def test_fsdp_stage_killed_resumes_bit_exactly_and_refuses_another_config(stage, tmp_path):
    out = tmp_path / "out"
    # kill -9 of rank 1 after iteration 5 (its last checkpoint at 4): torchrun ends both
    res = run_command([*TORCHRUN, *stage["args"], str(out)], SIDA_KILL_AT="iteration:5", SIDA_KILL_RANK="1")
    assert res.returncode != 0 and (out / "work" / "state" / "meta.json").is_file(), res.stderr[-3000:]
    assert not (out / "network.pt").exists()
    # the sharded checkpoint of this config, resumed under another: one line naming the fix
    res = run_command([*TORCHRUN, *stage["args"], str(out), "--set", "seed=4"])
    errors = error_lines(res.stderr)
    assert res.returncode != 0 and errors, res.stderr[-3000:]
    assert all(re.search(r"sharded checkpoint .*state was written with another config .*restore that config, or "
                         r"delete .* to start this stage over", line) for line in errors), errors
    res = run_command([*TORCHRUN, *stage["args"], str(out)])
    assert res.returncode == 0 and "resuming from" in res.stderr and "at 0.06 kimg" in res.stderr, res.stderr[-3000:]
    _assert_same_outputs(stage["ref"], out)


@pytest.mark.slow  # two 2-process stage runs
def test_fsdp_stage_signal_to_one_rank_checkpoints_and_resumes(stage, tmp_path):
    out = tmp_path / "out"
    res = run_command([*TORCHRUN, *stage["args"], str(out)], SIDA_KILL_AT="iteration:3", SIDA_KILL_SIGNAL="USR1",
                      SIDA_KILL_RANK="1")
    assert res.returncode == 75, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if "stopped: " in line]
    assert len(lines) == 2 and all("stopped by" in line and "at 0.048 kimg" in line for line in lines), res.stderr
    assert "[rank 1] received SIGUSR1" in res.stderr and "error:" not in res.stderr
    res = run_command([*TORCHRUN, *stage["args"], str(out)])
    assert res.returncode == 0 and "resuming" in res.stderr, res.stderr[-3000:]
    _assert_same_outputs(stage["ref"], out)


def test_fsdp_with_one_process_is_refused_at_stage_level(tmp_path, stage_inputs):
    config, teacher = stage_inputs(tmp_path, tiny_config(parallel="fsdp"))
    res = run_module("stages.distill", "--config", str(config), "--run", "warmup", "--teacher", str(teacher),
                     "--out", str(tmp_path / "out"))
    assert res.returncode != 0
    assert [line for line in res.stderr.splitlines() if line.strip()][-1:] == error_lines(res.stderr)[-1:]
    (line,) = error_lines(res.stderr)
    assert re.search(r"parallel: fsdp shards the networks over processes, but this run has 1 process\(es\): "
                     r"set parallel: ddp, or launch 2 or more processes", line), res.stderr[-3000:]


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
