"""The stage command lines: help works, and user mistakes are one `error:` line with exit status 1,
caught before any work starts and before anything is written to --out."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import error_lines, run_module, tiny_config, write_config, write_teacher  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("cli") / "teacher.pt")


def _one_error(err: str) -> str:
    errs = error_lines(err)
    assert len(errs) == 1, err
    assert "Traceback" not in err
    return errs[0]


# -- real processes ------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["stages.distill", "stages.teacher"])
def test_help(module):
    res = run_module(module, "--help", timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--config" in res.stdout and "--out" in res.stdout and "--set" in res.stdout
    if module == "stages.distill":
        assert "--run" in res.stdout and "--teacher" in res.stdout and "--init" in res.stdout


def test_bad_config_rejected_by_the_real_command_before_any_work(tmp_path, teacher):
    cfg = tiny_config()
    cfg["distill"]["batch"] = "sixteen"
    path = write_config(tmp_path / "cfg.yaml", cfg)
    out = tmp_path / "out"
    t0 = time.time()
    res = run_module("stages.distill", "--config", str(path), "--run", "warmup", "--teacher", str(teacher),
                     "--out", str(out), timeout=60)
    elapsed = time.time() - t0
    assert res.returncode == 1, res.stderr
    line = _one_error(res.stderr)
    assert "distill.batch" in line and "sixteen" in line, line
    assert not out.exists()
    assert elapsed < 30, elapsed  # the import of torch, then straight out (no training)


# -- in process (fast) ---------------------------------------------------------------------------

BAD_CONFIGS = [
    # (mutation of the raw config, key path that the message must name, another word it must contain)
    (lambda c: c["distill"].update(batch="sixteen"), "distill.batch", "sixteen"),
    (lambda c: c["distill"].update(lr_g=-1.0), "distill.lr_g", "-1.0"),
    (lambda c: c.update(threads="two"), "threads", "two"),
    (lambda c: c["distill"].update(bogus=1), "distill", "bogus"),
    (lambda c: c["distill"]["runs"]["warmup"].update(fast=True), "distill.runs.warmup", "fast"),
    (lambda c: c["distill"]["runs"]["sid"]["phases"][0].update(kind="sidx"), "distill.runs.sid.phases.0.kind",
     "sidx"),
    (lambda c: c.update(extra_section={}), "<top level>", "extra_section"),
]


@pytest.mark.parametrize("mutate,key,word", BAD_CONFIGS, ids=[b[1] + "-" + b[2] for b in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_key(tmp_path, teacher, mutate, key, word, stage_here):
    cfg = copy.deepcopy(tiny_config())
    mutate(cfg)
    path = write_config(tmp_path / "cfg.yaml", cfg)
    out = tmp_path / "out"
    code, err = stage_here("stages.distill", ["--config", str(path), "--run", "warmup", "--teacher", str(teacher),
                                              "--out", str(out)])
    assert code == 1
    line = _one_error(err)
    assert f"{key}:" in line and word in line, line
    assert not out.exists()


def test_bad_override_is_one_line(tmp_path, teacher, stage_here):
    path = write_config(tmp_path / "cfg.yaml", tiny_config())
    out = tmp_path / "out"
    code, err = stage_here("stages.distill", ["--config", str(path), "--run", "warmup", "--teacher", str(teacher),
                                              "--out", str(out), "--set", "distill.alpha=high"])
    assert code == 1
    line = _one_error(err)
    assert "distill.alpha" in line and "high" in line, line
    assert not out.exists()


def test_unknown_run_and_missing_config(tmp_path, teacher, stage_here):
    path = write_config(tmp_path / "cfg.yaml", tiny_config())
    out = tmp_path / "out"
    code, err = stage_here("stages.distill", ["--config", str(path), "--run", "nosuch", "--teacher", str(teacher),
                                              "--out", str(out)])
    line = _one_error(err)
    assert code == 1 and "nosuch" in line and "warmup" in line, line
    code, err = stage_here("stages.distill", ["--config", str(tmp_path / "none.yaml"), "--run", "warmup", "--teacher",
                                              str(teacher)])
    line = _one_error(err)
    assert code == 1 and "none.yaml" in line, line
    assert not out.exists()


def test_run_that_needs_init_without_it(tmp_path, teacher, stage_here):
    path = write_config(tmp_path / "cfg.yaml", tiny_config())
    out = tmp_path / "out"
    code, err = stage_here("stages.distill", ["--config", str(path), "--run", "sid", "--teacher", str(teacher), "--out",
                                              str(out)])
    assert code == 1
    line = _one_error(err)
    assert "--init" in line and "warmup" in line and "state.pt" in line, line
    assert not out.exists()


def test_teacher_of_the_wrong_shape_names_both(tmp_path, stage_here):
    big = tiny_config()
    big["data"]["resolution"] = 16
    wrong = write_teacher(tmp_path / "teacher16.pt", big)
    path = write_config(tmp_path / "cfg.yaml", tiny_config())
    out = tmp_path / "out"
    code, err = stage_here("stages.distill", ["--config", str(path), "--run", "warmup", "--teacher", str(wrong),
                                              "--out", str(out)])
    assert code == 1
    line = _one_error(err)
    assert "16x16" in line and "8x8" in line and str(wrong) in line, line
    assert not (out / "network.pt").exists() and not (out / "work" / "state.pt").exists()
