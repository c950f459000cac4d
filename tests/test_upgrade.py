"""An upgrade keeps results: a finished results folder stays finished when the config schema gains
keys with defaults (jobs' params hold only what the config sets, sida.run.workflow.without_defaults),
and a changed setting still reruns what depends on it.

The workflow runs from a copy of this checkout whose stages are stubs that only write their
outputs, so the real Snakemake metadata (params included) of a finished folder costs seconds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from helpers import add_defaulted_keys

# A stage: write the files its rule declares into --out (a folder, or a file's folder).
STAGE_STUB = """import os, sys
out = sys.argv[sys.argv.index("--out") + 1]
folder = os.path.dirname(out) if os.path.splitext(out)[1] else out
os.makedirs(folder, exist_ok=True)
for name in ("network.pt", "state.pt", "samples.png", "metrics.jsonl", "metrics.json", "report.md", "report.html"):
    open(os.path.join(folder, name), "w").close()
"""
# The launcher: run the module after `--` in this process (no torch, no workers).
LAUNCHER_STUB = """import runpy, sys
rest = sys.argv[sys.argv.index("--") + 1:]
sys.argv = rest
runpy.run_module(rest[0], run_name="__main__")
"""


@pytest.fixture
def stub_repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    for name in ("sida", "workflow", "config"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "stages").mkdir()
    for stage in ("teacher", "fetch", "distill", "evaluate", "report", "export"):
        (repo / "stages" / f"{stage}.py").write_text(STAGE_STUB)
    (repo / "stages" / "__init__.py").write_text("")
    (repo / "sida" / "run" / "torchrun.py").write_text(LAUNCHER_STUB)
    return repo


def _snakemake(repo: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PYTHONPATH=str(repo), PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    cmd = [str(Path(bindir) / "snakemake"), "-s", str(repo / "workflow" / "Snakefile"), "-d", str(workdir),
           "--cores", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _planned(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.mark.slow
def test_a_finished_folder_stays_finished_when_the_schema_gains_defaulted_keys(stub_repo, tmp_path):
    work = tmp_path / "work"
    _planned(_snakemake(stub_repo, work))
    assert (work / "results" / "digits" / "report").is_dir()
    assert "Nothing to be done" in _planned(_snakemake(stub_repo, work, "-n"))

    schema = stub_repo / "workflow" / "schemas" / "config.schema.yaml"
    schema.write_text(yaml.safe_dump(add_defaulted_keys(yaml.safe_load(schema.read_text())), sort_keys=False))
    assert "Nothing to be done" in _planned(_snakemake(stub_repo, work, "-n"))

    # A setting that changes is seen: the evaluations (and the report after them) rerun, no training.
    changed = tmp_path / "changed.yaml"
    changed.write_text("extends: " + str(stub_repo / "config" / "config.yaml") + "\nevaluate: {seed: 1}\n")
    out = _planned(_snakemake(stub_repo, work, "-n", "--configfile", str(changed)))
    assert re.search(r"^evaluate\s+4$", out, re.M) and re.search(r"^report\s+1$", out, re.M), out
    assert not re.search(r"^(teacher|warmup|sid|sida|sid2a)\s+\d", out, re.M), out
    assert "params" in out.lower()
