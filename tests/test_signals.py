"""Stopping on a signal (sida.run.signals): SIGTERM, SIGUSR1 and SIGINT make a training stage
finish the iteration in progress, write its checkpoint and exit 75; a rerun resumes bit-exactly.
An evaluation keeps its finished runs; a rerun after a signal or a kill gives the same
metrics.json without recomputing them.

Signals are sent at seeded random points: at an iteration chosen by the seed (the
`SIDA_KILL_AT=iteration:N` hook with `SIDA_KILL_SIGNAL`), and from outside at a seeded random
time. The stops land between snapshots and inside ticks, so the resumed tick accumulators, the
snapshot schedule and the in-training evaluation (on here: `network.pt` is its best generator)
are checked too.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import PYTHON, REPO, assert_same_run, env, run_command  # noqa: E402
from test_resume import RUN, _resume_config  # noqa: E402

SIGNALS = ("TERM", "USR1", "INT")
TORCHRUN = [PYTHON, "-m", "sida.run.torchrun", "--standalone", "--nproc-per-node", "2", "-m", "--"]


def _config() -> dict:
    cfg = _resume_config()  # 10 iterations of 16 over warmup, sid and sida; ticks and snapshots every 2
    cfg["evaluate"] = {"labels": "balanced", "batch": 50, "classifier": {"epochs": 1},
                       "during_training": {"every_kimg": 0.048, "num_samples": 100}}
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory, stage_inputs):
    d = tmp_path_factory.mktemp("signals")
    cfg = _config()
    cfg["results_dir"] = str(d / "results")  # the monitor's classifier and reference, made once
    config, teacher = stage_inputs(d, cfg)
    return {"dir": d, "config": config, "teacher": teacher, "refs": {}, "seconds": {}}


def _distill_args(setup, out: Path) -> list[str]:
    return ["-m", "stages.distill", "--config", str(setup["config"]), "--run", RUN, "--teacher",
            str(setup["teacher"]), "--out", str(out)]


def _popen(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    """`cmd` started and read up to the stage's first line (its handlers are installed by then):
    the process and that line."""
    proc = _popen(cmd)
    first = ""
    while not first.startswith(f"{RUN}:"):
        first = proc.stderr.readline()
        assert first or proc.poll() is None, "the stage ended before it started"
    return proc, first


def _reference(setup, name: str, cmd) -> Path:
    """An uninterrupted run's out dir (made once per module); for a run that prints `RUN:` lines,
    `setup["seconds"][name]` is how long it ran after the first, so that signals from outside can
    be timed to land inside a run."""
    if name not in setup["refs"]:
        out = setup["dir"] / f"ref-{name}"
        proc, first_seen, lines = _popen(cmd(out)), None, []
        for line in proc.stderr:
            if first_seen is None and line.startswith(f"{RUN}:"):
                first_seen = time.monotonic()
            lines.append(line)
        proc.wait(timeout=300)
        assert proc.returncode == 0, "".join(lines)[-3000:]
        setup["refs"][name] = out
        if first_seen is not None:
            setup["seconds"][name] = time.monotonic() - first_seen
    return setup["refs"][name]


def _assert_same_outputs(a: Path, b: Path) -> None:
    """As uninterrupted, to the byte of the network file, and no work dir left behind."""
    assert_same_run(a, b, ["G", "G_ema", "fake"])
    assert (a / "network.pt").read_bytes() == (b / "network.pt").read_bytes()
    assert not (b / "work").exists()


def _assert_stopped(res: subprocess.CompletedProcess, sig: str) -> float:
    """The stage exited 75 after writing its checkpoint; the image count it stopped at."""
    assert res.returncode == 75, res.stderr[-3000:]
    m = re.search(rf"stopped by SIG{sig} at ([0-9.]+) kimg: checkpoint \S+ written", res.stderr)
    assert m, res.stderr[-3000:]
    assert "error:" not in res.stderr
    return float(m.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_distill_signal_at_a_random_iteration_resumes_bit_exactly(setup, tmp_path, seed):
    rng = random.Random(seed)
    ref = _reference(setup, "distill", lambda out: [PYTHON, *_distill_args(setup, out)])
    out = tmp_path / "out"
    stops = 2 if seed == 0 else 1  # seed 0 is stopped twice: a resumed run stops and resumes again
    for _ in range(stops):
        sig = rng.choice(SIGNALS)
        res = run_command([PYTHON, *_distill_args(setup, out)], SIDA_KILL_AT=f"iteration:{rng.randint(1, 4)}",
                   SIDA_KILL_SIGNAL=sig)
        _assert_stopped(res, sig)
        assert (out / "work" / "state.pt").is_file() and not (out / "network.pt").exists()
    res = run_command([PYTHON, *_distill_args(setup, out)])
    assert res.returncode == 0 and "resuming" in res.stderr, res.stderr[-3000:]
    _assert_same_outputs(ref, out)


@pytest.mark.slow
def test_distill_signals_at_random_times_from_outside(setup, tmp_path):
    """Real asynchronous signals (seeded delays after the stage has started): wherever they land
    (iterations, ticks, the in-training evaluation, checkpoint writes), every run exits 75 or
    finishes, and the end result is the uninterrupted one."""
    rng = random.Random(7)
    ref = _reference(setup, "distill", lambda out: [PYTHON, *_distill_args(setup, out)])
    # Delays are drawn within the first 60 % of the uninterrupted run's length after its first line,
    # so the first signal always lands inside training (a fixed range let a fast machine finish
    # first, and the test then checked nothing); later, shorter resumed runs may finish first.
    seconds = setup["seconds"]["distill"]
    out = tmp_path / "out"
    stopped = 0
    for attempt in range(4):  # up to three signals, then it runs to the end
        proc, first = _start([PYTHON, *_distill_args(setup, out)])
        delay = rng.uniform(0.0, 0.6 * seconds)
        time.sleep(delay)
        sig = rng.choice(SIGNALS)
        if proc.poll() is None and attempt < 3:
            proc.send_signal(getattr(signal, f"SIG{sig}"))
        err = first + proc.stderr.read()
        proc.wait(timeout=300)
        assert proc.returncode in (0, 75), err[-3000:]
        if proc.returncode == 75:
            _assert_stopped(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), sig)
            stopped += 1
        else:
            assert attempt > 0, f"SIG{sig} {delay:.2f} s after the first line (of a {seconds:.2f} s run) did not stop it"
            break
    else:
        pytest.fail("the run did not finish unsignalled")
    assert stopped >= 1
    _assert_same_outputs(ref, out)


@pytest.mark.slow
def test_second_signal_during_the_checkpoint_write_corrupts_nothing(setup, tmp_path):
    """SIGTERM at iteration 3, then SIGUSR1 again while that checkpoint's temporary file is complete
    but not yet in place (the 2nd write of state.pt: the 1st is iteration 2's snapshot)."""
    ref = _reference(setup, "distill", lambda out: [PYTHON, *_distill_args(setup, out)])
    out = tmp_path / "out"
    res = run_command([PYTHON, *_distill_args(setup, out)], SIDA_KILL_AT="iteration:3,write:state.pt:2",
               SIDA_KILL_SIGNAL="TERM")
    assert _assert_stopped(res, "TERM") == 0.048
    assert "received SIGTERM again: already stopping" in res.stderr
    assert [p.name for p in (out / "work").iterdir() if p.name.startswith(".")] == []  # no temporary left
    res = run_command([PYTHON, *_distill_args(setup, out)])
    assert res.returncode == 0 and "resuming from" in res.stderr and "0.05 kimg" in res.stderr, res.stderr[-3000:]
    _assert_same_outputs(ref, out)


@pytest.mark.slow
def test_signal_after_the_last_iteration_lets_the_stage_finish(setup, tmp_path):
    """SIGTERM while the final network.pt is being written: the outputs are complete, the stage
    exits 0 (a failed job would get them deleted) and they are the uninterrupted run's."""
    ref = _reference(setup, "distill", lambda out: [PYTHON, *_distill_args(setup, out)])
    out = tmp_path / "out"
    res = run_command([PYTHON, *_distill_args(setup, out)], SIDA_KILL_AT="write:network.pt", SIDA_KILL_SIGNAL="TERM")
    assert res.returncode == 0 and "received SIGTERM" in res.stderr, res.stderr[-3000:]
    _assert_same_outputs(ref, out)


@pytest.mark.slow
def test_teacher_signal_resumes_bit_exactly(setup, tmp_path):
    args = ["-m", "stages.teacher", "--config", str(setup["config"])]
    ref = _reference(setup, "teacher", lambda out: [PYTHON, *args, "--out", str(out)])
    out = tmp_path / "out"
    res = run_command([PYTHON, *args, "--out", str(out)], SIDA_KILL_AT="iteration:3", SIDA_KILL_SIGNAL="USR1")
    assert _assert_stopped(res, "USR1") == 0.048  # iteration 3 of 16: between snapshots
    res = run_command([PYTHON, *args, "--out", str(out)])
    assert res.returncode == 0 and "resuming" in res.stderr, res.stderr[-3000:]
    assert (ref / "network.pt").read_bytes() == (out / "network.pt").read_bytes()


@pytest.mark.slow
def test_signal_to_one_rank_or_to_the_launcher_stops_both_ranks(setup, tmp_path):
    """Two gloo processes under sida.run.torchrun. SIGUSR1 to rank 1 alone: both ranks stop after
    the same iteration (the flag's all-reduce) and the launcher exits 75. Then SIGTERM to the
    launcher alone (it passes it on). The end result is the uninterrupted 2-process run's."""
    cmd = lambda out: [*TORCHRUN, *_distill_args(setup, out)[1:]]  # noqa: E731
    ref = _reference(setup, "distill-2", cmd)
    out = tmp_path / "out"
    res = run_command(cmd(out), SIDA_KILL_AT="iteration:2", SIDA_KILL_SIGNAL="USR1", SIDA_KILL_RANK="1")
    assert res.returncode == 75, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if "stopped: " in line]
    assert len(lines) == 2 and all("stopped by" in line and "at 0.032 kimg" in line for line in lines), res.stderr
    assert "[rank 1] received SIGUSR1" in res.stderr and "error:" not in res.stderr
    proc = subprocess.Popen(cmd(out), cwd=REPO, env={**env(), "SIDA_SLOW_ITER": "0.5"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while "resuming" not in proc.stderr.readline():
        assert proc.poll() is None, "the second run ended before resuming"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)  # the launcher only
    err = proc.stderr.read()
    proc.wait(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "launcher: passed SIGTERM on to the workers" in err and err.count("stopped: ") == 2, err[-3000:]
    res = run_command(cmd(out))
    assert res.returncode == 0 and "resuming" in res.stderr, res.stderr[-3000:]
    _assert_same_outputs(ref, out)


# -- evaluation ---------------------------------------------------------------------------------

def _evaluate_cmd(setup, out: Path) -> list[str]:
    sets = ["evaluate.num_runs=3", "evaluate.num_samples=60", "evaluate.batch=20", "evaluate.labels=balanced",
            "evaluate.pr_max_samples=64", "evaluate.during_training.num_samples=100"]
    return [PYTHON, "-m", "stages.evaluate", "--config", str(setup["config"]), "--network", str(setup["teacher"]),
            "--kind", "generator", "--name", "g", "--out", str(out / "metrics.json"),
            *[a for s in sets for a in ("--set", s)]]


def _metrics(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    m.pop("elapsed_s")
    return m


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_evaluation_resumes_per_run_after_a_signal_or_a_kill(setup, tmp_path, seed):
    rng = random.Random(seed)
    ref = _reference(setup, "evaluate", lambda out: _evaluate_cmd(setup, out))
    out = tmp_path / "out"
    finished = rng.randint(1, 2)
    sig = rng.choice(SIGNALS + ("KILL",))
    res = run_command(_evaluate_cmd(setup, out), SIDA_KILL_AT=f"eval-run:{finished}", SIDA_KILL_SIGNAL=sig)
    assert res.returncode == (-signal.SIGKILL if sig == "KILL" else 75), res.stderr[-3000:]
    assert not (out / "metrics.json").exists()
    assert len(list((out / "work").glob("metrics.run*.pt"))) == finished
    res = run_command(_evaluate_cmd(setup, out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("(kept from ") == finished  # finished runs are not computed again
    assert _metrics(ref) == _metrics(out)
    assert not (out / "work").exists()


def test_stop_flag_alone_and_a_changed_evaluation_is_not_mixed(tmp_path):
    """World of one: the flag is the local request. A kept run is keyed by what its numbers
    depend on: other settings do not find it."""
    import numpy as np

    from sida.eval.runstore import RunStore
    from sida.run import dist, signals

    info = dist.init("cpu")
    before = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    try:
        signals.reset()
        signals.install()
        assert signals.stop_agreed() is False
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one is only noted
        assert signals.requested() == "SIGUSR1" and signals.stop_agreed() is True
    finally:
        signals.reset()
        for s, h in before.items():
            signal.signal(s, h)
    keep = RunStore(tmp_path, "metrics", {"cfg": "a"}, info)
    keep.save(0, {"fd": 1.5}, np.ones([2, 3], np.float32))
    scores, head = keep.load(0)
    assert scores == {"fd": 1.5} and head.shape == (2, 3)
    assert RunStore(tmp_path, "metrics", {"cfg": "b"}, info).load(0) is None
    RunStore.clear_kept(tmp_path, "metrics")
    assert not tmp_path.exists()


# -- the workflow's SLURM jobs --------------------------------------------------------------------

def test_slurm_jobs_ask_for_the_early_signal(snakemake, tmp_path):
    """Training and evaluation jobs get `--signal=TERM@<slurm.signal_seconds>` (default 300);
    0 turns it off; a negative lead time is one error line."""
    import yaml

    base = yaml.safe_load((REPO / "config" / "ci-short.yaml").read_text())

    def resources(**slurm) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump({**base, **({"slurm": slurm} if slurm else {})}, sort_keys=False))
        r = snakemake("-n", configfile=path)
        blocks = {m.group(1): m.group(2) for m in re.finditer(r"^rule (\w+):\n((?:    .*\n)+)", r.stdout, re.M)}
        return r, blocks

    r, blocks = resources()
    assert r.returncode == 0 and {"teacher", "warmup", "sida", "evaluate", "report"} <= blocks.keys(), r.stdout[-3000:]
    for rule, block in blocks.items():
        assert ("slurm_extra=--signal=TERM@300" in block) == (rule not in ("report", "all")), (rule, block)
    r, blocks = resources(signal_seconds=0)
    assert r.returncode == 0 and blocks and not [b for b in blocks.values() if "--signal" in b]
    r, _ = resources(signal_seconds=-5)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error:") and "signal_seconds" in last, r.stderr[-2000:]
