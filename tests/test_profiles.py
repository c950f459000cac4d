"""`snakemake --profile slurm` and `--profile local` as users type them, from the root of a fresh
checkout (issue 16): the names resolve to workflow/profiles/ through the links at the root, the
longer `--profile profiles/slurm` keeps working, and a profile of the user's with the same name is
left alone and named in one line. Dry runs only (fast)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BIN = Path(sys.executable).parent


def _fresh_checkout(dest: Path) -> Path:
    """What a clone of this working tree holds: tracked and new (not ignored) files, links kept."""
    ls = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, text=True, timeout=60)
    if ls.returncode != 0:
        pytest.skip(f"not a git checkout ({ls.stderr.strip()[:200]}): cannot tell what a clone would hold")
    for rel in filter(None, ls.stdout.split("\0")):
        src, dst = REPO / rel, dest / rel
        if not (src.exists() or src.is_symlink()):  # deleted in the working tree
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return _fresh_checkout(tmp_path_factory.mktemp("clone"))


def _snakemake_in(root: Path, *args: str, xdg: Path) -> subprocess.CompletedProcess:
    """`snakemake ARGS` typed in a shell at `root`, with an empty (or the given) user config dir."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(root),
               PWD=str(root), XDG_CONFIG_HOME=str(xdg))
    env.pop("SNAKEMAKE_PROFILE", None)
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("profile", ["slurm", "local", "profiles/slurm"])
def test_profile_as_typed_from_a_fresh_checkout(checkout, tmp_path, profile):
    r = _snakemake_in(checkout, "--profile", profile, "-n", "--configfile", "config/ci-short.yaml",
                      xdg=tmp_path / "xdg")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Using profile {profile} for setting default command line arguments." in r.stderr
    assert "note: --profile" not in r.stderr  # the user has no profile of that name
    assert "teacher" in r.stdout and "This was a dry-run" in r.stdout
    assert not (checkout / "results" / "ci-short").exists()
    name = profile.split("/")[-1]
    assert (checkout / name).resolve() == (checkout / "workflow" / "profiles" / name).resolve()


def test_without_the_link_the_name_does_not_resolve(checkout, tmp_path):
    """What users met before (the check above can fail): from a directory without `slurm`."""
    r = _snakemake_in(tmp_path, "--profile", "slurm", "-n", "-s", str(checkout / "workflow" / "Snakefile"),
                      xdg=tmp_path / "xdg")
    assert r.returncode == 1
    assert "profile directory given (slurm), but no profile.yaml (or config.yaml) found" in r.stderr


def test_a_users_profile_of_the_same_name_is_left_alone_and_named(checkout, tmp_path):
    xdg = tmp_path / "xdg"
    theirs = xdg / "snakemake" / "slurm" / "config.yaml"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("executor: no-such-executor\n")  # a run with this profile would fail
    r = _snakemake_in(checkout, "--profile", "slurm", "-n", "--configfile", "config/ci-short.yaml", xdg=xdg)
    assert r.returncode == 0, r.stderr[-3000:]  # ours was used
    notes = [line for line in r.stderr.splitlines() if line.startswith("note: --profile slurm")]
    assert notes == [f"note: --profile slurm is this repository's (slurm -> workflow/profiles/slurm), not yours "
                     f"in {theirs.parent} (left as it is); to use yours on top of ours: "
                     f"--profile slurm --profile {theirs.parent}"], r.stderr[-2000:]
    assert theirs.read_text() == "executor: no-such-executor\n"
    # ...and the suggested command does use theirs (its broken executor is reported).
    r2 = _snakemake_in(checkout, "--profile", "slurm", "--profile", str(theirs.parent), "-n",
                       "--configfile", "config/ci-short.yaml", xdg=xdg)
    assert r2.returncode != 0 and "no-such-executor" in r2.stderr
