"""Tracking: JSONL always, W&B offline by default, W&B failures never stop training.

One real offline W&B run is made per module (wandb starts a service process per init) and read
back from its `.wandb` record file with tests/wandb_reader.py.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import wandb_reader  # noqa: E402

from sida.run.tracking import Tracker, read_jsonl, wandb_dir, wandb_mode, wandb_run_id  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
N_TICKS = 300  # enough history to span several 32 KiB blocks of the record file


def _scalars(i: int) -> dict[str, float]:
    # Values with long binary expansions: the read-back must be exact, not approximately equal.
    return {"loss/sid": 1.0 / 3.0 + i, "loss/fake": -0.1 * i, "lr": 1e-4 * (i + 1), "grad_norm": 2.0 ** -i}


def _cfg(mode: str = "offline") -> dict:
    return {"experiment": "exp-a", "seed": 7, "description": "tracking test",
            "wandb": {"mode": mode, "project": "sida-test", "entity": None}}


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """Offline W&B with its config and cache kept out of $HOME; no inherited WANDB_MODE/DIR."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY"):
            mp.delenv(var, raising=False)
        mp.setenv("WANDB_CONFIG_DIR", str(home / "config"))
        mp.setenv("WANDB_CACHE_DIR", str(home / "cache"))
        mp.setenv("WANDB_DATA_DIR", str(home / "data"))
        mp.setenv("WANDB_SILENT", "true")
        yield mp


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, wandb_env):
    """One stage's worth of logging with W&B offline; yields what was logged and where."""
    work = tmp_path_factory.mktemp("results") / "exp-a"
    stage_dir = work / "sida" / "work"  # the layout of sida.run.runtime: results/<exp>/<run>/work/
    stage_dir.mkdir(parents=True)
    repo_wandb_before = (REPO_ROOT / "wandb").exists()
    cfg = _cfg()
    tracker = Tracker(stage_dir / "metrics.jsonl", enabled=True, cfg=cfg, stage="distill", run_name="sida")
    assert tracker.wandb_run is not None, "W&B offline run did not start"
    for i in range(N_TICKS):
        tracker.log(_scalars(i), step=0.5 * i)
    tracker.summary({"fid": 3.25, "kimg": 0.5 * (N_TICKS - 1)})
    tracker.close()
    tracker.close()  # idempotent
    runs = sorted((work / "wandb").glob("offline-run-*"))
    for run_dir in runs:
        _wait_for_exit_record(_run_file(run_dir))
    return {"cfg": cfg, "work": work, "stage_dir": stage_dir, "runs": runs,
            "repo_wandb_before": repo_wandb_before}


def _wait_for_exit_record(path: Path, timeout: float = 30.0) -> None:
    """wandb-core may still be flushing the record file when finish() returns: wait for the
    run's exit record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kinds = {r.WhichOneof("record_type") for r in wandb_reader.read_records(path)}
        except ValueError:  # a chunk still being written
            kinds = set()
        if "exit" in kinds:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path}: no exit record after {timeout} s")


def _run_file(run_dir: Path) -> Path:
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def test_offline_run_lives_in_the_work_area(offline_run):
    assert len(offline_run["runs"]) == 1
    run_dir = offline_run["runs"][0]
    assert run_dir.parent == offline_run["work"] / "wandb"  # results/<experiment>/wandb
    assert (REPO_ROOT / "wandb").exists() == offline_run["repo_wandb_before"], "wrote wandb/ at the repo root"
    assert run_dir.name.endswith(wandb_run_id(offline_run["cfg"], "distill", "sida"))


def test_wandb_record_file_holds_the_exact_scalars(offline_run):
    rows = [r for r in wandb_reader.history(_run_file(offline_run["runs"][0])) if "loss/sid" in r]
    assert len(rows) == N_TICKS
    for i, row in enumerate(rows):
        assert row["kimg"] == 0.5 * i
        for key, value in _scalars(i).items():
            assert row[key] == value, (i, key)


def test_wandb_summary(offline_run):
    run_dir = offline_run["runs"][0]
    assert wandb_reader.summary(_run_file(run_dir))["fid"] == 3.25


def test_wandb_run_metadata(offline_run):
    path = _run_file(offline_run["runs"][0])
    rec = wandb_reader.run_record(path)
    assert rec.run_id == wandb_run_id(offline_run["cfg"], "distill", "sida")
    assert (rec.run_group, rec.job_type, rec.display_name, rec.project) == ("exp-a", "distill", "sida", "sida-test")
    config = wandb_reader.config(path)
    assert config["experiment"] == "exp-a" and config["seed"] == 7


def test_jsonl_has_the_same_scalars(offline_run):
    recs = read_jsonl(offline_run["stage_dir"] / "metrics.jsonl")
    ticks = [r for r in recs if "loss/sid" in r]
    assert len(ticks) == N_TICKS
    for i, rec in enumerate(ticks):
        assert rec == {"kimg": 0.5 * i, **_scalars(i)}
    assert recs[-1]["final/fid"] == 3.25


def test_wandb_dir_is_the_experiment_directory(tmp_path):
    cfg = _cfg()
    assert wandb_dir(cfg, "results/exp-a/sida/work/metrics.jsonl") == Path("results/exp-a")
    assert wandb_dir(cfg, "elsewhere/metrics.jsonl") == Path("elsewhere")
    assert wandb_dir(None, "x/y/metrics.jsonl") == Path("x/y")


def test_run_id_is_deterministic():
    cfg = _cfg()
    rid = wandb_run_id(cfg, "distill", "sida")
    assert rid == wandb_run_id(_cfg(), "distill", "sida")
    assert rid == wandb_run_id(_cfg("online"), "distill", "sida")  # the mode is not part of the run
    assert rid != wandb_run_id(cfg, "distill", "sid")
    assert rid != wandb_run_id(cfg, "teacher")
    assert rid != wandb_run_id({**cfg, "seed": 8}, "distill", "sida")
    assert not set(rid) & set("/\\#?%: ")


def test_mode_precedence():
    assert wandb_mode({}, {}) == "offline"
    assert wandb_mode(_cfg("online"), {}) == "online"
    assert wandb_mode(_cfg("offline"), {"WANDB_MODE": "online"}) == "online"  # the environment wins
    assert wandb_mode(_cfg("online"), {"WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode(_cfg("disabled"), {"WANDB_MODE": "online"}) == "disabled"  # disabled anywhere wins
    assert wandb_mode(_cfg("online"), {"WANDB_MODE": "disabled"}) == "disabled"


def _one_warning(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("warning: W&B logging disabled: "), lines[0]
    return lines[0]


def _log_some(tracker: Tracker) -> None:
    tracker.log({"loss": 1.5}, step=0.0)
    tracker.log({"loss": 2.5}, step=1.0)
    tracker.summary({"fid": 9.0})
    tracker.close()


def test_invalid_mode_warns_once_and_jsonl_continues(tmp_path, capsys, wandb_env):
    tracker = Tracker(tmp_path / "exp" / "distill" / "metrics.jsonl", cfg=_cfg("bogus"), stage="distill")
    _log_some(tracker)
    line = _one_warning(capsys.readouterr().err)
    assert "bogus" in line
    assert [r.get("loss") for r in read_jsonl(tmp_path / "exp" / "distill" / "metrics.jsonl")][:2] == [1.5, 2.5]
    assert not list(tmp_path.rglob("wandb"))


def test_invalid_env_mode_warns(tmp_path, capsys, wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    _log_some(Tracker(tmp_path / "exp" / "s" / "m.jsonl", cfg=_cfg(), stage="s"))
    assert "WANDB_MODE" in _one_warning(capsys.readouterr().err)


def test_init_failure_warns_once(tmp_path, capsys, wandb_env, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("service unreachable\nsecond line of detail")

    monkeypatch.setattr(wandb, "init", broken_init)
    _log_some(Tracker(tmp_path / "exp" / "s" / "m.jsonl", cfg=_cfg(), stage="s"))
    assert _one_warning(capsys.readouterr().err).endswith("RuntimeError: service unreachable")
    assert len(read_jsonl(tmp_path / "exp" / "s" / "m.jsonl")) == 3


def test_wandb_not_importable_warns(tmp_path, capsys, wandb_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    _log_some(Tracker(tmp_path / "exp" / "s" / "m.jsonl", cfg=_cfg(), stage="s"))
    assert "wandb" in _one_warning(capsys.readouterr().err)  # ModuleNotFoundError: import of wandb halted


def test_failure_mid_run_warns_once_and_stops_wandb(tmp_path, capsys):
    class FlakyRun:
        def __init__(self):
            self.calls = 0
            self.finished = False

        def log(self, *a, **k):
            self.calls += 1
            raise OSError("disk full")

        def finish(self, *a, **k):
            self.finished = True

    tracker = Tracker(tmp_path / "m.jsonl", cfg=_cfg("disabled"))
    tracker.wandb_run = run = FlakyRun()
    _log_some(tracker)
    assert _one_warning(capsys.readouterr().err).endswith("OSError: disk full")
    assert run.calls == 1 and run.finished and tracker.wandb_run is None
    assert [r.get("loss") for r in read_jsonl(tmp_path / "m.jsonl")][:2] == [1.5, 2.5]


@pytest.mark.parametrize("where", ["config", "env"])
def test_disabled_writes_no_wandb_dir(tmp_path, capsys, wandb_env, monkeypatch, where):
    if where == "env":
        monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker(tmp_path / "exp" / "s" / "m.jsonl", cfg=_cfg("disabled" if where == "config" else "offline"),
                      stage="s")
    assert tracker.wandb_run is None
    _log_some(tracker)
    assert capsys.readouterr().err == ""
    assert not list(tmp_path.rglob("wandb"))
    assert len(read_jsonl(tmp_path / "exp" / "s" / "m.jsonl")) == 3


def test_non_main_rank_logs_nothing(tmp_path):
    tracker = Tracker(tmp_path / "exp" / "s" / "m.jsonl", enabled=False, cfg=_cfg(), stage="s")
    _log_some(tracker)
    assert not (tmp_path / "exp").exists()


def test_resume_keeps_earlier_records(tmp_path, wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    path = tmp_path / "m.jsonl"
    t = Tracker(path, cfg=_cfg())
    for i in range(5):
        t.log({"loss": float(i)}, step=float(i))
    t.close()
    t = Tracker(path, cfg=_cfg(), resume_step=2.0)
    t.log({"loss": 30.0}, step=3.0)
    t.close()
    assert [(r["kimg"], r["loss"]) for r in read_jsonl(path)] == [(0, 0), (1, 1), (2, 2), (3, 30)]
    assert os.environ["WANDB_MODE"] == "disabled"
