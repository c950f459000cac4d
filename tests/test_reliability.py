"""Reliability probe: the bad inputs, operating-system failures and kill points a hostile user
tries, in one place (issue 10).

1. OS failures (a file where --out's directory should be, read-only, disk full, a file-size
   limit, a file or directory vanishing mid-run) end in one `error:` line naming the path, the
   cause and the fix, exit status 1 and no traceback, in every stage, through the workflow's
   launcher and in Snakemake's log; SIDA_DEBUG=1 brings the traceback back.
2. Damaged files say "corrupt or not a checkpoint" / "not an .npz archive" and never pass on a
   library's advice (torch's `weights_only`, numpy's `allow_pickle=`).
3. Non-finite values never become a result: NaN/inf weights in an input are refused naming the
   tensor; a run that diverges, or whose updates stay non-finite for a whole tick, stops with one
   line, keeps its last good checkpoint and writes no network.
4. A kill in every window of a run (before the first checkpoint, between an in-training
   evaluation and the next checkpoint, right after a checkpoint, during a checkpoint write,
   during the final writes) resumes bit-identically: networks, final state and the metrics log.
   Kills are placed with `SIDA_KILL_AT` (sida.io.killpoint), not at a random moment.

Disk full and read-only use a small tmpfs when the tests run as root (mounting is allowed);
otherwise read-only falls back to a chmod, and the file-size limit (RLIMIT_FSIZE) works for
any user.
"""

from __future__ import annotations

import errno
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import (REPO, assert_same_run, error_lines, files_under, run_module,  # noqa: E402
                     tiny_config, write_config)

ADVICE = ("weights_only", "allow_pickle", "unsafely", "pickle.load", "high likelihood", "internal")


def _the_error(stderr: str) -> str:
    """The one `error:` line, which must also be the last line, with no traceback anywhere."""
    errs = error_lines(stderr)
    assert len(errs) == 1, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == errs[0], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    for advice in ADVICE:
        assert advice not in errs[0], errs[0]
    return errs[0]


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*tmp-*")] if root.exists() else []


@pytest.fixture(scope="module")
def setup(tmp_path_factory, stage_inputs):
    d = tmp_path_factory.mktemp("reliability")
    cfg = tiny_config()
    cfg["results_dir"] = str(d / "results")
    cfg["evaluate"] = {"num_runs": 1, "num_samples": 16, "batch": 16, "teacher_steps": 1, "reference_max_images": 64,
                       "inception_score": False, "precision_recall": False, "classifier": {"epochs": 1}}
    metrics = d / "metrics.jsonl"
    metrics.write_text('{"kimg": 0.032, "loss_fake": 1.0}\n')
    config, teacher = stage_inputs(d, cfg)
    return {"dir": d, "cfg": cfg, "config": config, "teacher": teacher, "metrics": metrics}


# == 1. operating-system failures ==================================================================

def _stage_args(stage: str, s: dict, out: Path) -> tuple[str, list[str]]:
    """The command line of `stage` writing under `out` (a path below a plain file)."""
    c, t = str(s["config"]), str(s["teacher"])
    return {
        "teacher": ("stages.teacher", ["--config", c, "--out", str(out)]),
        "distill": ("stages.distill", ["--config", c, "--run", "warmup", "--teacher", t, "--out", str(out)]),
        "generate": ("stages.generate", ["--network", t, "--num", "2", "--out", str(out)]),
        "evaluate": ("stages.evaluate", ["--config", c, "--set", f"results_dir={out}", "--network", t, "--kind", "teacher",
                                         "--name", "teacher", "--out", str(out / "metrics.json")]),
        "report": ("stages.report", ["--config", c, "--metrics-jsonl", str(s["metrics"]), "--out", str(out / "report.md")]),
        "fetch": ("stages.fetch", ["--config", c, "--out", str(out)]),
        "containers.sync": ("containers.sync", ["--dockerfile", str(out / "Dockerfile"),
                                                "--environment", str(out / "environment.yaml")]),
    }[stage]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["teacher", "distill", "generate", "evaluate", "report", "fetch", "containers.sync"])
def test_output_below_a_file_is_one_error_line_in_every_stage(setup, tmp_path, stage):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    module, args = _stage_args(stage, setup, blocker / "out")
    res = run_module(module, *args)
    assert res.returncode == 1, res.stderr[-3000:]
    line = _the_error(res.stderr)
    assert str(blocker) in line and "not a directory" in line and "choose another location" in line, line
    assert blocker.read_text() == "not a directory"


def test_debug_flag_shows_the_traceback_and_still_ends_in_the_line(setup, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = run_module("stages.teacher", "--config", str(setup["config"]), "--out", str(blocker / "out"), SIDA_DEBUG="1")
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "NotADirectoryError" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: cannot access")


def _mount_tmpfs(path: Path, size: str, read_only: bool = False) -> bool:
    """Mount a tmpfs of `size` at `path` (root only); False when that is not possible here."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nothing can be written into: a read-only tmpfs (root) or chmod 555 (others)."""
    path = tmp_path / "ro"
    if _mount_tmpfs(path, "1m", read_only=True):
        yield path
        _umount(path)
    else:
        if os.geteuid() == 0:
            pytest.skip("running as root without permission to mount: chmod would not stop root")
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


def test_read_only_output_location(setup, read_only_dir, stage_here):
    from stages.teacher import main

    code, err = stage_here(main, ["--config", str(setup["config"]), "--out", str(read_only_dir / "teacher")])
    assert code == 1
    line = _the_error(err)
    assert str(read_only_dir / "teacher") in line, line
    assert "read-only" in line or "permission denied" in line, line


@pytest.fixture
def small_disk(tmp_path):
    path = tmp_path / "disk"
    if not _mount_tmpfs(path, "256k"):
        pytest.skip("needs root to mount a small tmpfs (the file-size-limit test covers other users)")
    yield path
    _umount(path)


def _keep_earlier(out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "earlier.txt").write_text("an earlier result")
    return files_under(out)


def test_disk_full_while_checkpointing(setup, small_disk, stage_here):
    from stages.teacher import main

    out = small_disk / "teacher"
    before = _keep_earlier(out)
    code, err = stage_here(main, ["--config", str(setup["config"]), "--out", str(out)])
    assert code == 1
    line = _the_error(err)
    assert "no space left" in line and str(out / "work") in line and "resume" in line, line
    assert not _temps(out), _temps(out)  # the atomic write removed its half-written temp file
    assert {k: v for k, v in files_under(out).items() if k in before} == before


def _file_size_limit(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    return preexec


@pytest.mark.slow
def test_file_size_limit_while_checkpointing_any_user(setup, tmp_path):
    """torch.save reports a failed write as "[enforce fail ...] unexpected pos"; we say why."""
    out = tmp_path / "teacher"
    before = _keep_earlier(out)
    res = run_module("stages.teacher", "--config", str(setup["config"]), "--out", str(out), preexec=_file_size_limit(100_000))
    assert res.returncode == 1, res.stderr[-3000:]
    line = _the_error(res.stderr)
    assert "file size limit" in line and "state.pt" in line and "enforce" not in line, line
    assert not _temps(out)
    assert {k: v for k, v in files_under(out).items() if k in before} == before


def test_output_directory_vanishing_mid_run(setup, tmp_path, monkeypatch, stage_here):
    """The whole --out removed after the first tick: the next write says so (in process, placed
    deterministically with the loop's tick hook)."""
    import sida.train.driver as driver_mod
    from stages.teacher import main

    out = tmp_path / "teacher"
    monkeypatch.setattr(driver_mod, "kill_point", lambda name: shutil.rmtree(out) if name == "tick" and out.exists() else None)
    code, err = stage_here(main, ["--config", str(setup["config"]), "--set", "teacher.tick_kimg=0.016", "--set",
                                  "teacher.snapshot_kimg=0.128", "--out", str(out)])
    assert code == 1
    line = _the_error(err)
    assert str(out / "work") in line and "no such file" in line and "deleted while the stage ran" in line, line


def test_dataset_file_vanishing_mid_run(setup, tmp_path, monkeypatch, stage_here):
    import sida.train.driver as driver_mod
    from PIL import Image
    from stages.teacher import main

    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(data / f"{i}.png")
    monkeypatch.setattr(driver_mod, "kill_point",
                        lambda name: [p.unlink() for p in data.glob("*.png")] if name == "tick" else None)
    code, err = stage_here(main, ["--config", str(setup["config"]), "--set", "data.kind=folder", "--set",
                                  f"data.path={data}", "--set", "data.label_dim=0", "--set", "teacher.tick_kimg=0.016",
                                  "--out", str(tmp_path / "out")])
    assert code == 1
    line = _the_error(err)
    assert str(data) in line and ".png" in line and "no such file" in line and "restore it" in line, line


def test_permission_denied_reading_a_checkpoint_is_not_called_corrupt(tmp_path, monkeypatch):
    from sida.errors import FileSystemError
    from sida.io import checkpoints

    path = tmp_path / "net.pt"
    path.write_bytes(b"whatever")

    def deny(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    monkeypatch.setattr(torch, "load", deny)
    with pytest.raises(FileSystemError) as info:
        checkpoints.load_network(path)
    assert "permission denied" in str(info.value) and str(path) in str(info.value)
    assert "corrupt" not in str(info.value)


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"),
                                        (errno.EACCES, "permission denied"), (errno.EDQUOT, "quota")])
def test_failed_atomic_write_names_target_cause_and_fix_and_leaves_nothing(tmp_path, monkeypatch, code, words):
    from sida.errors import FileSystemError
    from sida.io import atomic

    target = tmp_path / "out" / "state.pt"
    target.parent.mkdir()
    target.write_bytes(b"the previous checkpoint")

    def fail(src, dst):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(FileSystemError) as info:
        atomic.atomic_save_torch({"x": torch.ones(3)}, target)
    msg = str(info.value)
    assert msg.startswith(f"cannot write {target}:") and words in msg and "\n" not in msg, msg
    assert target.read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.pt"]


def test_stale_temp_files_of_killed_writers_are_removed(tmp_path):
    from sida.io.atomic import atomic_write_text

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".x.json.tmp-{dead.pid}"
    stale.write_text("half")
    atomic_write_text(tmp_path / "x.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


@pytest.mark.slow
def test_launcher_log_ends_with_the_stage_error(setup, tmp_path):
    """What the workflow runs (`python -m sida.run.torchrun` = torchrun): no torchrun traceback or
    failure table after the stage's line."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = run_module("sida.run.torchrun", "--standalone", "--nproc-per-node", "1", "-m", "--",
                     "stages.teacher", "--config", str(setup["config"]), "--out", str(blocker / "out"), timeout=300)
    assert res.returncode == 1
    line = _the_error(res.stderr)
    assert str(blocker) in line and "ChildFailedError" not in res.stderr


def test_launcher_line_for_a_killed_worker():
    from sida.run.torchrun import failure_line

    line = failure_line("stages.distill", 1, -signal.SIGKILL)
    assert line.startswith("error: stages.distill: rank 1 was killed by SIGKILL") and "resume" in line, line
    assert "status 3" in failure_line("stages.distill", 0, 3)


def test_a_stage_line_reaches_an_unbuffered_stderr_in_one_write(monkeypatch):
    """Under PYTHONUNBUFFERED=1 (the container, the tests) `print` writes a line and its newline
    separately, so the `stopped:` lines of two ranks on one pipe could run together (CI saw
    "...(exit 75)[rank 1] stopped: ..."). `print_line` writes both at once."""
    import io

    from sida.run.cli import print_line

    class Raw(io.RawIOBase):
        def __init__(self):
            self.writes: list[bytes] = []

        def writable(self):
            return True

        def write(self, b):
            self.writes.append(bytes(b))
            return len(b)

    raw = Raw()
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(raw, write_through=True))  # what -u gives
    print("control", file=sys.stderr)
    assert raw.writes == [b"control", b"\n"]  # the interleaving the stage lines must avoid
    raw.writes.clear()
    print_line("[rank 1] stopped: by SIGUSR1 (exit 75)")
    assert raw.writes == [b"[rank 1] stopped: by SIGUSR1 (exit 75)\n"]


@pytest.mark.slow
def test_workflow_log_names_the_failure(tmp_path, snakemake):
    """An OS failure inside a workflow job: Snakemake's output repeats the stage's line with the log
    path, and the job's log ends with it."""
    cfg = tiny_config()
    cfg["experiment"] = "probe"
    cfg["distill"]["runs"] = {"warmup": {"init": "teacher", "phases": [{"kind": "warmup", "kimg": 0.016}],
                                         "evaluate": False}}
    config = write_config(tmp_path / "cfg.yaml", cfg)
    work = tmp_path / "results" / "probe" / "teacher" / "work"
    work.parent.mkdir(parents=True)
    work.write_text("a file where the stage's work directory goes")
    r = snakemake("--until", "teacher", configfile=config, timeout=300)
    assert r.returncode != 0
    log = tmp_path / "results" / "probe" / "logs" / "teacher.log"
    line = _the_error(log.read_text())
    assert "results/probe/teacher/work" in line, line
    assert any(l.startswith("[teacher] error: ") and "(log: results/probe/logs/teacher.log)" in l
               for l in r.stderr.splitlines()), r.stderr[-3000:]


def test_workflow_refuses_an_unwritable_results_dir_in_one_line(tmp_path, snakemake):
    """Snakemake itself fails with a traceback when results_dir lies below a file (it scans the
    output folders while building the DAG): the Snakefile checks first."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = snakemake("-n", "--config", f"results_dir={blocker / 'results'}", configfile=REPO / "config" / "ci-short.yaml",
                  timeout=300)
    assert r.returncode == 1
    line = _the_error(r.stderr)
    assert line.startswith("error: results_dir: cannot write under") and f"{blocker} is a file" in line, line


def test_output_location_problems_are_named(tmp_path):
    from sida.errors import output_location_problem

    assert output_location_problem(tmp_path / "no" / "such" / "dir") is None  # created when needed
    (tmp_path / "f").write_text("x")
    assert "is a file, not a directory" in output_location_problem(tmp_path / "f" / "x")


# == 2. damaged files ===============================================================================

def _damaged(kind: str, tmp_path: Path) -> bytes:
    if kind == "random":
        return np.random.default_rng(1).bytes(4096)
    if kind == "empty":
        return b""
    if kind == "text":
        return b"hello, I am not a checkpoint\n"
    if kind == "pickle":
        return pickle.dumps({"G": [1, 2, 3]})
    if kind == "npz":
        buf = tmp_path / "x.npz"
        np.savez(buf, a=np.zeros(3))
        return buf.read_bytes()
    full = tmp_path / "full.pt"
    torch.save({"w": torch.randn(4000)}, full)
    return full.read_bytes()[:2000]  # truncated


@pytest.mark.parametrize("kind", ["random", "empty", "text", "pickle", "npz", "truncated"])
@pytest.mark.parametrize("role", ["teacher", "resume", "init"])
def test_damaged_checkpoints_are_corrupt_or_not_a_checkpoint(setup, tmp_path, kind, role, stage_here):
    from stages.distill import main

    bad = tmp_path / "bad.pt"
    bad.write_bytes(_damaged(kind, tmp_path))
    out = tmp_path / "out"
    argv = ["--config", str(setup["config"]), "--run", "warmup", "--teacher", str(setup["teacher"]), "--out", str(out)]
    if role == "teacher":
        argv[argv.index(str(setup["teacher"]))] = str(bad)
    elif role == "init":
        argv[argv.index("warmup")] = "sid"
        argv += ["--init", str(bad)]
    else:
        (out / "work").mkdir(parents=True)
        shutil.copy(bad, out / "work" / "state.pt")
        bad = out / "work" / "state.pt"
    before = files_under(out) if out.exists() else None
    code, err = stage_here(main, argv)
    assert code == 1
    line = _the_error(err)
    assert str(bad) in line and "corrupt or not a checkpoint" in line and "delete it" in line, line
    assert (files_under(out) if out.exists() else None) == before


def test_checkpoint_with_foreign_objects_is_refused_as_such(tmp_path):
    from sida.errors import CheckpointError
    from sida.io import checkpoints

    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "obj": _Foreign()}, path)
    with pytest.raises(CheckpointError, match="objects other than tensors") as info:
        checkpoints.load_network(path)
    assert not any(a in str(info.value) for a in ADVICE)


class _Foreign:
    pass


@pytest.mark.parametrize("kind", ["random", "pickle", "empty", "truncated", "npy", "object_array"])
def test_damaged_reference_statistics_carry_no_library_advice(tmp_path, kind):
    from sida.errors import DataError
    from sida.eval.refstats import load_ref_stats

    path = tmp_path / "refs.npz"
    if kind == "random":
        path.write_bytes(np.random.default_rng(2).bytes(3000))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"mu": [0.0], "sigma": [[1.0]]}))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        np.savez(path, mu=np.zeros(4), sigma=np.eye(4))
        path.write_bytes(path.read_bytes()[:100])
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(4))
    else:
        np.savez(path, mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    with pytest.raises(DataError) as info:
        load_ref_stats(path)
    msg = str(info.value)
    assert str(path) in msg and "corrupt or not an .npz archive" in msg and "\n" not in msg, msg
    assert msg.endswith("or fix the path"), msg
    assert not any(a in msg for a in ADVICE), msg


@pytest.mark.parametrize("case", ["binary", "directory"])
def test_config_that_is_not_a_yaml_file(tmp_path, case, stage_here):
    from stages.teacher import main

    path = tmp_path / "cfg.yaml"
    if case == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        path.mkdir()
    code, err = stage_here(main, ["--config", str(path), "--out", str(tmp_path / "out")])
    line = _the_error(err)
    assert code == 1 and str(path) in line and ("not text" in line or "is a directory" in line), line


def test_a_network_file_passed_as_init_state(setup, tmp_path, stage_here):
    from stages.distill import main

    code, err = stage_here(main, ["--config", str(setup["config"]), "--run", "sid", "--teacher", str(setup["teacher"]),
                                  "--init", str(setup["teacher"]), "--out", str(tmp_path / "o")])
    line = _the_error(err)
    assert code == 1 and "is a network file, not a sida training state" in line and "delete" not in line, line


def test_generate_with_a_zero_batch(setup, tmp_path, stage_here):
    from stages.generate import main

    code, err = stage_here(main, ["--network", str(setup["teacher"]), "--batch", "0", "--out", str(tmp_path)])
    line = _the_error(err)
    assert code == 1 and "--batch" in line, line


@pytest.mark.parametrize("content", [b"\xff\xfe binary", b"[]", b'{"name": "x"}'])
def test_report_with_a_damaged_evaluation(setup, tmp_path, content, stage_here):
    from stages.report import main

    bad = tmp_path / "metrics.json"
    bad.write_bytes(content)
    out = tmp_path / "report" / "report.md"
    code, err = stage_here(main, ["--config", str(setup["config"]), "--evaluations", str(bad), "--out", str(out)])
    line = _the_error(err)
    assert code == 1 and str(bad) in line and "rerun the evaluate stage" in line, line
    assert not out.parent.exists()


def test_resume_truncates_a_damaged_metrics_log_atomically(tmp_path, monkeypatch):
    """A resumed stage cuts its metrics log back to the checkpoint; a torn or binary tail is dropped,
    and the rewrite is atomic (a kill during it keeps the old log)."""
    from sida.run import tracking

    log = tmp_path / "metrics.jsonl"
    log.write_bytes(b'{"kimg": 0.016}\n{"kimg": 0.032}\n{"kimg": 0.048}\n\xff\xfe{"kim')
    tracking.truncate_jsonl(log, 0.032)
    assert log.read_text() == '{"kimg": 0.016}\n{"kimg": 0.032}\n'
    import sida.io.atomic as atomic

    monkeypatch.setattr(atomic, "kill_point", lambda name: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        tracking.truncate_jsonl(log, 0.016)
    assert log.read_text() == '{"kimg": 0.016}\n{"kimg": 0.032}\n'


@pytest.mark.parametrize("kind", ["random", "pickle"])
def test_damaged_inception_weights_and_edm_pickles_carry_no_library_advice(tmp_path, kind):
    from sida.errors import CheckpointError
    from sida.eval.features import InceptionExtractor
    from sida.io.edm_pickle import load_edm_pickle

    path = tmp_path / "weights.pt"
    path.write_bytes(np.random.default_rng(3).bytes(5000) if kind == "random" else pickle.dumps({"a": 1}))
    for load in (lambda: InceptionExtractor(path, "legacy_tensorflow", "cpu"), lambda: load_edm_pickle(path)):
        with pytest.raises(CheckpointError) as info:
            load()
        msg = str(info.value)
        assert str(path) in msg and not any(a in msg for a in ADVICE), msg


def test_brief_reason_keeps_whole_first_sentences():
    from sida.errors import brief_reason

    numpy_msg = ("This file contains pickled (object) data. If you trust the file you can load it unsafely using "
                 "the `allow_pickle=` keyword argument or `pickle.load()`.")
    assert brief_reason(ValueError(numpy_msg)) == "This file contains pickled (object) data"
    assert brief_reason(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 534")) == \
        "unexpected pos 640 vs 534"
    assert brief_reason(RuntimeError("Error(s) in loading state_dict for X:\n\tMissing key(s): a.b")) == \
        "Error(s) in loading state_dict for X:"
    assert brief_reason(KeyError()) == "KeyError"


# == 3. non-finite values ===========================================================================

def _poison(src: Path, dst: Path, key: str | None = None) -> str:
    """Copy a network file with one weight tensor filled with NaN; return the tensor's name."""
    rec = torch.load(src, weights_only=True)
    key = key or next(k for k, v in rec["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    rec["state_dict"][key] = torch.full_like(rec["state_dict"][key], float("nan"))
    torch.save(rec, dst)
    return key


def test_teacher_with_nan_weights_is_refused_naming_the_tensor(setup, tmp_path, stage_here):
    from stages.distill import main

    bad = tmp_path / "nan-teacher.pt"
    key = _poison(setup["teacher"], bad)
    out = tmp_path / "out"
    code, err = stage_here(main, ["--config", str(setup["config"]), "--run", "warmup", "--teacher", str(bad), "--out",
                                  str(out)])
    assert code == 1
    line = _the_error(err)
    assert str(bad) in line and f"'{key}'" in line and "non-finite" in line, line
    assert not out.exists()


def test_init_generator_and_init_state_with_inf_are_refused(setup, tmp_path, stage_here):
    from sida.io import checkpoints
    from stages.distill import main

    net = checkpoints.load_network(setup["teacher"])
    rec = checkpoints.network_record(net)
    key = next(iter(rec["state_dict"]))
    rec["state_dict"][key][...] = float("inf")
    state = tmp_path / "warmup-state.pt"
    checkpoints.atomic_save_torch({"G": rec, "G_ema": rec, "fake": rec, "format": checkpoints.STATE_FORMAT,
                                   "version": 1, "meta": "{}"}, state)
    code, err = stage_here(main, ["--config", str(setup["config"]), "--run", "sid", "--teacher", str(setup["teacher"]),
                                  "--init", str(state), "--out", str(tmp_path / "o")])
    line = _the_error(err)
    assert code == 1 and str(state) in line and f"'{key}'" in line and "(G)" in line, line
    gen = tmp_path / "gen.pt"
    _poison(setup["teacher"], gen, key)
    with pytest.raises(Exception, match=f"'{key}'"):
        checkpoints.load_network(gen)


def test_a_network_with_nan_weights_is_never_written(setup, tmp_path):
    from sida.errors import NonFiniteError
    from sida.io import checkpoints

    net = checkpoints.load_network(setup["teacher"])
    with torch.no_grad():
        next(net.parameters())[0] = float("nan")
    target = tmp_path / "network.pt"
    with pytest.raises(NonFiniteError, match="refusing to write"):
        checkpoints.save_network(target, net)
    assert not list(tmp_path.iterdir())


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch, stage_here):
    """G's weights turn NaN right after the warm-up's checkpoint (placed with the loop's hook): the
    run stops at the next check with one line naming the tensor; the warm-up checkpoint stays,
    finite; no network or final state is written."""
    import sida.train.driver as driver_mod
    import stages.distill as stage
    from sida.io import checkpoints

    made = {}
    real_init = stage.init_nets
    monkeypatch.setattr(stage, "init_nets", lambda *a, **k: made.setdefault("nets", real_init(*a, **k)))

    def poison(name: str) -> None:
        if name == "checkpointed":
            with torch.no_grad():
                next(made["nets"].G.parameters()).fill_(float("nan"))
    monkeypatch.setattr(driver_mod, "kill_point", poison)
    out = tmp_path / "out"
    code, err = stage_here(stage.main, ["--config", str(setup["config"]), "--run", "mixed", "--teacher",
                                        str(setup["teacher"]), "--out", str(out)])
    assert code == 1
    line = _the_error(err)
    first = next(iter(made["nets"].G.state_dict()))
    assert f"training diverged: G.{first} holds" in line and "up to 0.064 kimg" in line, line
    assert f"{out / 'work' / 'state.pt'} (0.032 kimg) is kept" in line, line
    kept = checkpoints.load_state(out / "work" / "state.pt")
    assert kept["meta"]["nimg"] == 32
    for key in ("G", "G_ema", "fake"):
        assert not checkpoints.nonfinite_tensors(kept[key]), key
    assert not (out / "network.pt").exists() and not (out / "state.pt").exists()


def test_a_learning_rate_at_the_edge_of_float32_diverges_and_stops(setup, tmp_path, stage_here):
    """lr_g = 3e38 throws some of G's weights past float32 at its first update (the sid phase after
    the warm-up's checkpoint): the run stops instead of writing a NaN generator as a result."""
    from stages.distill import main

    out = tmp_path / "out"
    code, err = stage_here(main, ["--config", str(setup["config"]), "--run", "mixed", "--teacher",
                                  str(setup["teacher"]), "--set", "distill.lr_g=3e38", "--out", str(out)])
    assert code == 1
    line = _the_error(err)
    assert "training diverged: G." in line and "(0.032 kimg) is kept" in line, line
    assert not (out / "network.pt").exists() and not (out / "state.pt").exists()


def test_a_whole_tick_of_nonfinite_gradients_stops_the_run(setup, tmp_path, stage_here):
    """lambda_sid = 1e39 makes every generator loss infinite: its gradients are NaN/inf (zeroed, so
    the weights stay finite) in every update of the sid phase, a whole tick of skipped updates."""
    from stages.distill import main

    out = tmp_path / "out"
    code, err = stage_here(main, ["--config", str(setup["config"]), "--run", "mixed", "--teacher",
                                  str(setup["teacher"]), "--set", "distill.lambda_sid=1e39", "--out", str(out)])
    assert code == 1
    line = _the_error(err)
    assert "all 2 updates of the tick ending at 0.064 kimg had NaN/inf gradients" in line, line
    assert "(0.032 kimg) is kept" in line and "nonfinite_budget" in line, line
    assert not (out / "network.pt").exists() and not (out / "state.pt").exists()


class _FakeLoop:
    """A loop whose updates report non-finite gradients on a schedule (and can poison its weight)."""

    def __init__(self, bad: list[int], poison_at: int | None = None) -> None:
        self.net = torch.nn.Linear(2, 2)
        self.bad, self.poison_at = bad, poison_at
        self.nimg, self.batch, self.i = 0, 16, 0
        self.gens = {"noise": torch.Generator().manual_seed(0)}

    def step(self) -> dict:
        with torch.no_grad():
            self.net.weight.add_(0.01)
            if self.i == self.poison_at:
                self.net.weight[0, 1] = float("inf")
        out = {"loss": torch.tensor(1.0), "nonfinite_g": torch.tensor(self.bad[self.i] if self.i < len(self.bad) else 0)}
        self.i += 1
        return out

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "nimg": self.nimg}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.nimg = state["nimg"]

    def phase_name(self) -> str:
        return "fake"


def _drive(tmp_path: Path, loop: _FakeLoop, budget: int | None, iters: int = 8) -> Path:
    """Ticks of 2 updates, a checkpoint every 2 ticks."""
    from sida.run.dist import DistInfo, init
    from sida.train.driver import Checkpointer, run

    init("cpu", 1)
    ckpt = Checkpointer(tmp_path / "work", DistInfo(0, 1, 0, torch.device("cpu")), "h", "fake")
    run(loop, iters * 16, 0.032, 0.064, ckpt, ckpt.info, watch={"net": loop.net}, nonfinite_budget=budget)
    return ckpt.path


@pytest.mark.parametrize("bad,budget,stops_at", [
    ([0, 1, 1, 0, 1, 0, 0, 1], None, None),     # never a whole tick: goes on
    ([0, 0, 0, 0, 1, 1, 0, 0], None, 0.096),   # the third tick is all skipped updates
    ([0, 0, 1, 0, 0, 0, 0, 0], 0, 0.064),      # budget 0: any skipped update stops
    ([3, 5, 0, 0, 0, 0, 0, 0], 2, None),       # counts are updates, not gradient entries
])
def test_skipped_update_budget(tmp_path, bad, budget, stops_at):
    from sida.errors import NonFiniteError
    from sida.io import checkpoints

    loop = _FakeLoop(bad)
    if stops_at is None:
        _drive(tmp_path, loop, budget)
        assert loop.nimg == 128
        return
    with pytest.raises(NonFiniteError) as info:
        _drive(tmp_path, loop, budget)
    msg = str(info.value)
    assert f"ending at {stops_at:.3f} kimg" in msg and "NaN/inf gradients" in msg and "nonfinite_budget" in msg, msg
    if stops_at > 0.064:  # the checkpoint at 0.064 kimg is kept
        assert checkpoints.load_state(tmp_path / "work" / "state.pt")["meta"]["nimg"] == 64
        assert "(0.064 kimg) is kept" in msg
    else:
        assert not (tmp_path / "work" / "state.pt").exists() and "no checkpoint had been written yet" in msg


def test_nonfinite_parameter_stops_before_the_checkpoint(tmp_path):
    from sida.errors import NonFiniteError
    from sida.io import checkpoints

    loop = _FakeLoop([0] * 8, poison_at=4)  # the 5th update; next check: the tick at 0.096 kimg
    with pytest.raises(NonFiniteError, match=r"net\.weight holds 1 NaN/inf value\(s\)") as info:
        _drive(tmp_path, loop, None)
    assert "(0.064 kimg) is kept" in str(info.value)
    kept = checkpoints.load_state(tmp_path / "work" / "state.pt")
    assert kept["meta"]["nimg"] == 64 and torch.isfinite(kept["net"]["weight"]).all()


# == 4. kill in every window, resume bit-identically ================================================

RUN = "mixed"


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory, stage_inputs):
    """8 iterations of 16 images with dropout: warmup 2, sid 2, sida 4. A tick every iteration, a
    checkpoint every 3 (at 0.048, 0.096 kimg), the monitor every 2 (0.048, 0.064, 0.096, 0.128
    kimg; none in warm-up): the evaluation at 0.064 lies between two checkpoints."""
    d = tmp_path_factory.mktemp("kill")
    cfg = tiny_config(dropout=0.1, tick_kimg=0.016, snapshot_kimg=0.048)
    cfg["distill"]["runs"][RUN]["phases"] = [{"kind": "warmup", "kimg": 0.032}, {"kind": "sid", "kimg": 0.032},
                                             {"kind": "sida", "kimg": 0.064}]
    cfg["teacher"].update(kimg=0.096, tick_kimg=0.016, snapshot_kimg=0.048)
    cfg["results_dir"] = str(d / "results")
    cfg["evaluate"] = {"batch": 64, "reference_max_images": 64, "classifier": {"epochs": 1},
                       "during_training": {"every_kimg": 0.032, "num_samples": 16}}
    config, teacher = stage_inputs(d, cfg)
    args = ["--config", str(config), "--run", RUN, "--teacher", str(teacher)]
    ref = d / "uninterrupted"
    res = run_module("stages.distill", *args, "--out", str(ref), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("  fd ") == 4, res.stderr[-3000:]
    teacher_ref = d / "teacher-uninterrupted"
    res = run_module("stages.teacher", "--config", str(config), "--out", str(teacher_ref), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"args": args, "ref": ref, "config": config, "teacher_ref": teacher_ref}


def _kill_then_resume(module: str, args: list[str], out: Path, point: str) -> str:
    killed = run_module(module, *args, "--out", str(out), timeout=300, SIDA_KILL_AT=point)
    assert killed.returncode == -signal.SIGKILL, f"not killed at {point}: {killed.stderr[-3000:]}"
    resumed = run_module(module, *args, "--out", str(out), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (out / "work").exists() and not _temps(out), files_under(out).keys()
    return resumed.stderr


@pytest.mark.slow
@pytest.mark.parametrize("point,resumes_at", [
    ("tick:1", None),                 # before the first checkpoint: starts over
    ("evaluated:2", 0.048),           # after the evaluation at 0.064, before the checkpoint at 0.096
    ("checkpointed:1", 0.048),        # right after the first checkpoint
    ("write:state.pt:2", 0.048),      # while writing the second checkpoint (temp file complete)
    ("write:last.pt", 0.096),         # during the final writes ...
    ("write:network.pt", 0.096),      # ... of both networks
])
def test_distill_killed_in_every_window_resumes_bit_identically(kill_setup, tmp_path, point, resumes_at):
    out = tmp_path / "out"
    log = _kill_then_resume("stages.distill", kill_setup["args"], out, point)
    if resumes_at is None:
        assert "resuming" not in log
    else:
        assert f"resuming from {out / 'work' / 'state.pt'} at {resumes_at:.2f} kimg" in log, log[-2000:]
    assert_same_run(kill_setup["ref"], out, ["G", "G_ema", "fake"])


@pytest.mark.slow
@pytest.mark.parametrize("point", ["write:state.pt:1", "write:network.pt"])
def test_teacher_killed_while_writing_resumes_bit_identically(kill_setup, tmp_path, point):
    out = tmp_path / "out"
    _kill_then_resume("stages.teacher", ["--config", str(kill_setup["config"])], out, point)
    assert_same_run(kill_setup["teacher_ref"], out, [])


@pytest.mark.parametrize("sharded", [False, True])
def test_a_resume_checkpoint_of_the_other_parallel_kind_is_refused(tmp_path, sharded):
    """A run whose distill.parallel changed would otherwise start fresh beside the other kind's
    checkpoint (work/state.pt for ddp, the directory work/state for fsdp) and drop its work."""
    from sida.errors import CheckpointError
    from sida.run.dist import DistInfo
    from sida.train.checkpointer import Checkpointer

    work = tmp_path / "work"
    work.mkdir()
    if sharded:
        (work / "state.pt").write_bytes(b"")
    else:
        (work / "state").mkdir()
    ckpt = Checkpointer(work, DistInfo(0, 1, 0, torch.device("cpu")), "h", "sida", sharded=sharded)
    was = "ddp" if sharded else "fsdp"
    with pytest.raises(CheckpointError, match=f"written by a `parallel: {was}` run.*set distill.parallel back to {was}"):
        ckpt.load_if_any(None)
    assert sorted(p.name for p in work.iterdir()) == ["state.pt" if sharded else "state"]
