"""Kill-and-resume is bit-exact, and a broken checkpoint or teacher file is a one-line error.

The resume tests run the real stage commands: an uninterrupted run gives network A; the same
command in another out dir is SIGKILLed once its first checkpoint `work/state.pt` exists and
then rerun, which must say "resuming" and end with a network B bit-identical to A (every
tensor `torch.equal`). G and the fake score train with dropout, so this also checks that torch's
global RNG (not only the loop's generators) is restored; the fake score's inputs are augmented,
so the augmentation draws must resume exactly too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import (PYTHON, REPO, assert_state_dicts_equal, baseline_runs, env, error_lines, files_under,  # noqa: E402
                     run_module, tiny_config)

RUN = "mixed"  # warmup -> sid -> sida with a discriminator: every kind of step is checkpointed
BASELINE_RUNS = baseline_runs()  # dmd2 and add, 8 iterations of 16 each (helpers.py)


def _resume_config() -> dict:
    # Dropout (torch's global RNG) on G and the fake score, and augmented fake-score inputs (the
    # loop's per-slot streams): both must come back exactly on resume.
    cfg = tiny_config(dropout=0.1, augment=0.5)
    cfg["network"]["kwargs"]["augment_dim"] = 9
    cfg["distill"]["runs"][RUN]["phases"] = [{"kind": "warmup", "kimg": 0.032}, {"kind": "sid", "kimg": 0.032},
                                             {"kind": "sida", "kimg": 0.096}]  # 10 iterations of 16
    cfg["distill"]["runs"].update(BASELINE_RUNS)
    cfg["teacher"].update(kimg=0.128, snapshot_kimg=0.032, tick_kimg=0.032)  # 8 iterations of 16
    return cfg


def _kill_after_first_checkpoint(cmd: list[str], out: Path, timeout: float = 120) -> None:
    state = out / "work" / "state.pt"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while not state.exists():
            assert proc.poll() is None, f"finished before its first checkpoint: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert state.exists()
    assert not (out / "network.pt").exists(), "the run completed before it was killed: make it longer"


def _kill_resume_compare(tmp_path: Path, module: str, args: list[str], state_keys: list[str]) -> str:
    a, b = tmp_path / "a", tmp_path / "b"
    res_a = run_module(module, *args, "--out", str(a), timeout=240)
    assert res_a.returncode == 0, res_a.stderr[-3000:]
    _kill_after_first_checkpoint([PYTHON, "-m", module, *args, "--out", str(b)], b)
    res_b = run_module(module, *args, "--out", str(b), timeout=240)
    assert res_b.returncode == 0, res_b.stderr[-3000:]
    assert "resuming" in res_b.stderr, res_b.stderr[-3000:]
    assert "resuming" not in res_a.stderr
    from sida.io import checkpoints

    net_a = torch.load(a / "network.pt", weights_only=True)
    net_b = torch.load(b / "network.pt", weights_only=True)
    assert_state_dicts_equal(net_a["state_dict"], net_b["state_dict"])
    for key in state_keys:  # the final training state too (distill: G, G_ema and the fake score)
        sa, sb = checkpoints.load_state(a / "state.pt"), checkpoints.load_state(b / "state.pt")
        assert_state_dicts_equal(sa[key]["state_dict"], sb[key]["state_dict"])
    assert not (b / "work").exists(), "the work dir is cleared once the outputs are written"
    return res_b.stderr


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory, stage_inputs):
    d = tmp_path_factory.mktemp("resume")
    cfg = _resume_config()
    config, teacher = stage_inputs(d, cfg)
    return {"dir": d, "config": config, "teacher": teacher}


@pytest.mark.slow
@pytest.mark.parametrize("run", [RUN, *BASELINE_RUNS])
def test_distill_kill_and_resume_is_bit_exact(resume_setup, tmp_path, run):
    args = ["--config", str(resume_setup["config"]), "--run", run, "--teacher", str(resume_setup["teacher"])]
    _kill_resume_compare(tmp_path, "stages.distill", args, ["G", "G_ema", "fake"] + (["head"] if run != RUN else []))


@pytest.mark.slow
def test_teacher_kill_and_resume_is_bit_exact(resume_setup, tmp_path):
    _kill_resume_compare(tmp_path, "stages.teacher", ["--config", str(resume_setup["config"])], [])


@pytest.mark.slow
def test_resume_the_wrong_run_is_refused_not_mixed(resume_setup, tmp_path):
    """A checkpoint written under another config is refused (config hash), not silently mixed."""
    args = ["--config", str(resume_setup["config"]), "--run", RUN, "--teacher", str(resume_setup["teacher"])]
    out = tmp_path / "out"
    _kill_after_first_checkpoint([PYTHON, "-m", "stages.distill", *args, "--out", str(out)], out)
    before = files_under(out)
    res = run_module("stages.distill", *args, "--set", "distill.lr_g=0.001", "--out", str(out))
    assert res.returncode == 1
    errs = error_lines(res.stderr)
    assert len(errs) == 1 and "another config" in errs[0] and str(out / "work") in errs[0], res.stderr
    assert files_under(out) == before


# -- broken files: one `error:` line, exit 1, nothing else touched (in-process: fast) ---------------

@pytest.fixture()
def fast_setup(tmp_path, stage_inputs):
    cfg = _resume_config()
    config, teacher = stage_inputs(tmp_path, cfg)
    return {"config": config, "teacher": teacher}


def _broken_state(out: Path, content: bytes) -> Path:
    work = out / "work"
    work.mkdir(parents=True)
    (work / "state.pt").write_bytes(content)
    (work / "metrics.jsonl").write_text('{"kimg": 0.032}\n')
    (out / "keep.txt").write_text("other output")
    return work / "state.pt"


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_corrupt_or_truncated_checkpoint_is_one_error_line(fast_setup, tmp_path, kind, stage_here):
    from sida.io import checkpoints

    if kind == "random":
        content = os.urandom(4096)
    else:
        full = tmp_path / "full.pt"
        checkpoints.save_state(full, {"G": {"w": torch.randn(2000)}, "nimg": 32, "meta": {"stage": "x"}})
        data = full.read_bytes()
        content = data[: len(data) // 2]
    out = tmp_path / "out"
    state = _broken_state(out, content)
    before = files_under(out)
    code, err = stage_here("stages.distill", ["--config", str(fast_setup["config"]), "--run", RUN, "--teacher",
                                              str(fast_setup["teacher"]), "--out", str(out)])
    assert code == 1
    errs = error_lines(err)
    assert len(errs) == 1, err
    assert str(state) in errs[0], errs[0]
    assert "delete" in errs[0], errs[0]  # the fix: delete it (the stage then starts over)
    assert "Traceback" not in err
    assert files_under(out) == before  # the broken checkpoint and every other file untouched


def test_corrupt_teacher_file_is_one_error_line(fast_setup, tmp_path, stage_here):
    bad = tmp_path / "teacher-bad.pt"
    bad.write_bytes(os.urandom(2048))
    code, err = stage_here("stages.distill", ["--config", str(fast_setup["config"]), "--run", RUN, "--teacher",
                                              str(bad), "--out", str(tmp_path / "out")])
    assert code == 1
    errs = error_lines(err)
    assert len(errs) == 1 and str(bad) in errs[0], err
    assert "Traceback" not in err
    # a missing teacher too
    code, err = stage_here("stages.distill", ["--config", str(fast_setup["config"]), "--run", RUN, "--teacher",
                                              str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out")])
    errs = error_lines(err)
    assert code == 1 and len(errs) == 1 and "nope.pt" in errs[0] and "does not exist" in errs[0], err
