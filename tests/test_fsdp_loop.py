"""`parallel: fsdp` in the distillation loop and stage, on the CPU with gloo.

Two FSDP processes run a few iterations of a tiny warm-up / SiD / SiDA run through
`DistillLoop` and end where one DDP process running the same global batch ends (every draw
belongs to a micro-batch slot: 2 processes x 2 rounds of 4 draw what 1 process x 4 rounds of 4
draws), stats included. The stage runs are killed (kill -9) and signalled (one rank) and resume
bit-exactly; a sharded checkpoint of another config and a one-process fsdp run are refused in
one line. This file doubles as the loop worker: `torchrun ... tests/test_fsdp_loop.py OUT`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import PYTHON, REPO, env, tiny_config  # noqa: E402

STEPS = 4  # warm-up, SiD, then two SiDA iterations of 16


def _loop_config(parallel: str) -> dict:
    cfg = tiny_config(batch_per_proc=4, parallel=parallel)
    cfg["distill"]["runs"]["mixed"]["phases"] = [{"kind": "warmup", "kimg": 0.016}, {"kind": "sid", "kimg": 0.016},
                                                 {"kind": "sida", "kimg": 0.032}]
    return cfg


def _whole_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    from sida.io.sharded_checkpoint import consolidated_state_dict
    from sida.train.sharding import is_sharded

    return consolidated_state_dict(net) if is_sharded(net) else {k: v.detach().clone() for k, v in net.state_dict().items()}


def worker(out: Path) -> None:
    """STEPS iterations of the tiny mixed run, FSDP under torchrun (2 processes) or DDP (1);
    rank 0 saves the networks' whole weights and every rank's stats."""
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
    rc = run_config(cfg, "mixed")
    loop = DistillLoop(rc, init_nets(teacher, rc["dropout"]), open_dataset(cfg["data"]), info, seed=0)
    stats = []
    for _ in range(STEPS):
        stats.append({k: float(v) for k, v in loop.step().items()})
        loop.nimg += loop.batch
    nets = {name: _whole_state(getattr(loop.nets, name)) for name in ("G", "G_ema", "fake", "teacher")}
    every = dist.gather_objects(stats)
    if info.is_main:
        torch.save({"nets": nets, "stats": every, "sharded": loop.mesh is not None}, out / f"loop{info.world_size}.pt")
    dist.shutdown()


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    res = subprocess.run(["timeout", "-k", "10", str(timeout), *cmd], cwd=REPO, env=env(), capture_output=True,
                         text=True, timeout=timeout + 30)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_two_fsdp_processes_equal_one_ddp_process(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(PYTHON).parent)) or "torchrun"
    _run([torchrun, "--standalone", "--nproc-per-node", "2", str(Path(__file__)), str(tmp_path)])
    _run([PYTHON, str(Path(__file__)), str(tmp_path)])
    two, one = torch.load(tmp_path / "loop2.pt"), torch.load(tmp_path / "loop1.pt")
    assert two["sharded"] and not one["sharded"]
    for name in ("G", "G_ema", "fake"):
        for key, a in two["nets"][name].items():
            torch.testing.assert_close(a, one["nets"][name][key], rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
    # the generator moved from the teacher it started as (the comparison can fail)
    start = one["nets"]["teacher"]
    assert any(not torch.allclose(a, start[k], rtol=1e-4, atol=1e-5) for k, a in one["nets"]["G"].items())
    # stats: each process's are means over its half of the batch; their mean is the whole batch's
    ranks, (single,) = two["stats"], one["stats"]
    assert len(single) == STEPS and {"nonfinite_g", "nonfinite_fake"} <= set(single[-1])
    for step in range(STEPS):
        assert ranks[0][step].keys() == single[step].keys()
        for k, v in single[step].items():
            mean = (ranks[0][step][k] + ranks[1][step][k]) / 2 if not k.startswith("nonfinite") else ranks[0][step][k]
            assert mean == pytest.approx(v, rel=1e-4, abs=1e-5), (step, k)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
