"""The harness around the authors' code (bench.authors, bench.authors_sida): its bad-input errors
are one line each, and our monitor leaves the random streams of their loop where it found them.

The comparison itself needs their code, which is never in this repository (docs/authors-code.md);
the tests that run their loop look for a checkout at $SIDA_AUTHORS_REPO (default
/work/exp/authors/SiD) and are skipped without one.
"""

from __future__ import annotations

import argparse
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import bench.authors_sida as authors_sida
from bench.authors import AUTHORS_COMMIT, check_checkout, isolated_rng, to_ours
from bench.step import MemoryDataset, build_teacher
from tests.helpers import AUTHORS_REPO, needs_authors


def _git_repo(path: Path) -> None:
    (path / "sida_training").mkdir(parents=True)
    (path / "sida_training" / "sida_training_loop.py").write_text("")
    subprocess.run(["git", "init", "-q", "-b", "sida", str(path)], check=True)
    subprocess.run(["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)


def test_missing_or_wrong_checkout_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exc:
        check_checkout(tmp_path / "nowhere")
    assert str(exc.value).startswith("error: --authors-repo") and "does not exist" in str(exc.value)
    assert "git clone https://github.com/mingyuanzhou/SiD" in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        check_checkout(tmp_path)  # a folder, but not their repository
    assert "sida_training/sida_training_loop.py" in str(exc.value) and "\n" not in str(exc.value)


def test_another_commit_is_refused(tmp_path):
    _git_repo(tmp_path)  # their layout, their branch name, another commit
    with pytest.raises(SystemExit) as exc:
        check_checkout(tmp_path)
    msg = str(exc.value)
    assert f"not the authors' commit {AUTHORS_COMMIT}" in msg and f"checkout {AUTHORS_COMMIT}" in msg
    assert "\n" not in msg


def test_missing_teacher_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(authors_sida, "load_checkout", lambda repo: AUTHORS_COMMIT)
    with pytest.raises(SystemExit) as exc:
        authors_sida.main(["--authors-repo", str(tmp_path), "--teacher", str(tmp_path / "none.pt"),
                           "--out", str(tmp_path / "o")])
    assert "--teacher" in str(exc.value) and "does not exist" in str(exc.value)


def test_settings_their_loop_cannot_carry_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(authors_sida, "load_checkout", lambda repo: AUTHORS_COMMIT)
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"")  # refused before it is read
    argv = ["--authors-repo", str(tmp_path), "--teacher", str(teacher), "--out", str(tmp_path / "o")]
    for setting in ("distill.augment=0.12", "distill.precision=bf16", "distill.grad_clip=1.0",
                    "distill.lr_warmup_kimg=1", "distill.critic_ratio=2", "distill.optimizer=adamw",
                    "distill.runs.sida.fake_clip=10"):
        with pytest.raises(SystemExit) as exc:
            authors_sida.main([*argv, "--set", setting])
        msg = str(exc.value)
        key = setting.split("=")[0].split(".")[-1]
        assert msg.startswith("error: the authors' loop cannot carry") and f".{key}=" in msg and "\n" not in msg


def _small_net() -> torch.nn.Module:
    args = argparse.Namespace(res=8, channels=1, model_channels=16, channel_mult="1,2", num_blocks=1, attn_res="0",
                              label_dim=10, batch=8)
    return build_teacher(args)


def _streams() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_monitor_leaves_the_random_streams_alone(tmp_path):
    like = _small_net()
    rc = {"batch": 64, "tick_kimg": 0.064, "phases": [{"kind": "sida", "kimg": 1}]}

    def fd(net: torch.nn.Module) -> float:  # draws from all three global generators, as sampling may
        torch.randn(3), np.random.rand(), random.random()
        return float(net(torch.randn(2, 1, 8, 8), torch.ones(2), torch.eye(10)[:2]).detach().square().mean())

    mon = authors_sida.Monitor(fd, rc, like, tmp_path, lambda nimg: "sida", every_nimg=64)
    before = _streams()
    mon(64, None, like, None)  # an evaluation point: converts G_ema and scores it
    assert (tmp_path / "metrics.jsonl").read_text().count('"fd"') == 1
    assert _same(before, _streams())
    # The conversion alone draws initial weights: outside isolated_rng it would move their stream.
    to_ours(like, like)
    assert not _same(before, _streams())


def _their_iterations(convert: bool, n: int = 2) -> tuple:
    """The global random state and G after `n` iterations of their SiDA loop (bench.authors_iteration),
    with our conversion of their EMA generator (as Monitor makes it) after every iteration or not."""
    from bench.authors_iteration import AuthorsIteration
    from bench.step import run_config

    args = argparse.Namespace(batch=8, phase="sida", channels_last=False)
    it = AuthorsIteration(AUTHORS_REPO, run_config(args), _small_net(), MemoryDataset(32, 1, 8, 10), True)
    like = _small_net()
    for _ in range(n):
        it.step()
        if convert:
            with isolated_rng():
                to_ours(it.holds()[2], like)
    return _streams(), [p.detach().clone() for p in it.holds()[1].parameters()]


@needs_authors
def test_their_loop_runs_the_same_with_and_without_the_monitor():
    torch.set_num_threads(1)
    quiet, g_quiet = _their_iterations(convert=False)
    watched, g_watched = _their_iterations(convert=True)
    assert _same(quiet, watched)
    assert all(torch.equal(a, b) for a, b in zip(g_quiet, g_watched))
