"""Shared fixtures. Keep each one small and documented; add new ones below the existing ones."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]

# Snakemake's SLURM executor plugin runs `scontrol show config` at every snakemake start (for a help
# text); with SLURM installed (the SLURM tests install it) and no controller running, scontrol
# retries for 9-10 s. Every process of the test session finds this scontrol first: it answers
# `show config` at once with an error when no slurmctld runs here, and is the real one otherwise.
SCONTROL_SHIM = """#!/bin/sh
if [ "$1 $2" = "show config" ] && ! pgrep -x slurmctld >/dev/null 2>&1; then
    echo "scontrol: no slurmctld runs on this machine (test session)" >&2
    exit 1
fi
PATH=$(printf %s "$PATH" | tr ':' '\\n' | grep -vxF "$(dirname "$0")" | paste -sd: -)
exec scontrol "$@"
"""


def pytest_configure(config) -> None:
    shim = Path(tempfile.mkdtemp(prefix="sida-test-bin-")) / "scontrol"
    shim.write_text(SCONTROL_SHIM)
    shim.chmod(0o755)
    config.scontrol_shim = shim
    os.environ["PATH"] = f"{shim.parent}{os.pathsep}{os.environ.get('PATH', '')}"


def pytest_unconfigure(config) -> None:
    shim = getattr(config, "scontrol_shim", None)
    if shim is not None:
        shim.unlink(missing_ok=True)
        shim.parent.rmdir()


class Snakemake:
    """Runs this repo's workflow in another working directory (`-s workflow/Snakefile -d DIR`),
    with the virtualenv's bin first on PATH (jobs call `torchrun` and `python`)."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        bindir = str(Path(sys.executable).parent)
        self.env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
        self.exe = str(Path(bindir) / "snakemake")

    def __call__(self, *args: str, profile: str = "local", configfile: str | Path | None = None,
                 timeout: float = 600, kill_after: float = 10, as_typed: bool = False,
                 prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
        """`snakemake ARGS --profile workflow/profiles/PROFILE [--configfile F]` inside `timeout -k`,
        run in the work dir. `as_typed=True`: run from the repository root with `--profile PROFILE`
        (the short form users type) and `-d` the work dir. `prefix`: a command that runs the rest
        elsewhere (e.g. on a test cluster's login node)."""
        cmd = [*prefix, "timeout", "-k", str(kill_after), str(int(timeout)), self.exe, *args, "-d", str(self.workdir)]
        cwd, env = self.workdir, self.env
        if as_typed:
            cwd, env = REPO, dict(self.env, PWD=str(REPO))  # PWD: where a shell would have started it
        else:
            cmd += ["-s", str(REPO / "workflow" / "Snakefile")]
        if profile:
            cmd += ["--profile", profile if as_typed else str(REPO / "workflow" / "profiles" / profile)]
        if configfile is not None:
            cmd += ["--configfile", str(configfile)]
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout + kill_after + 30)


@pytest.fixture
def snakemake(tmp_path) -> Snakemake:
    """A `Snakemake` runner in a fresh temporary working directory."""
    return Snakemake(tmp_path)


@pytest.fixture
def stage_here(capsys):
    """Runs a stage as `python -m` would, but in this process (so a test can patch it): the
    stage's `main` (or its module's name, e.g. "stages.distill") through `sida.run.cli.run_stage`,
    which turns errors into one line and exit codes. Returns (exit code, captured stderr)."""
    import importlib

    from sida.run.cli import run_stage

    def call(main, argv: Sequence[str]) -> tuple[int, str]:
        if isinstance(main, str):
            main = importlib.import_module(main).main
        with pytest.raises(SystemExit) as exc:
            run_stage(main, list(argv))
        return exc.value.code, capsys.readouterr().err

    return call


class StageInputs(NamedTuple):
    """What every stage command takes: a config file and a teacher network file."""

    config: Path
    teacher: Path


@pytest.fixture(scope="session")
def stage_inputs():
    """`stage_inputs(directory, cfg)` writes the raw config `cfg` (e.g. `helpers.tiny_config()`) to
    directory/cfg.yaml and an untrained teacher of its architecture to directory/teacher.pt.
    Session-scoped so module-scoped setups can use it (it keeps no state)."""
    from helpers import write_config, write_teacher

    def make(directory: Path, cfg: dict) -> StageInputs:
        return StageInputs(write_config(directory / "cfg.yaml", cfg), write_teacher(directory / "teacher.pt", cfg))

    return make
