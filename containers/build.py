"""Build the Apptainer image from ``containers/sida.def`` (through spython).

    python -m containers.build [--def containers/sida.def] [--out containers/sida.sif] [--force]

Runs ``apptainer build`` (``--fakeroot`` unless root) from the repository root, so the
definition's relative ``%files`` paths resolve, passing the checkout's git commit and dirty flag
as build arguments (``SIDA_GIT_COMMIT``/``SIDA_GIT_DIRTY``; provenance reads them inside the
image). Afterwards it writes ``<image>.sha256``, which provenance records as the image digest
without hashing gigabytes in every job. Without apptainer (or singularity) it says so in one
line and points to the podman/docker route (``make container``, ``containers/image.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from . import DEF_FILE, DEFAULT_IMAGE, REPO_ROOT, ContainerError
from .sync import def_sections

MISSING_APPTAINER = ("apptainer is not installed: install it (https://apptainer.org/docs/admin/main/installation.html) "
                     "or build with podman/docker: make container (its build/*.docker.tar converts on an Apptainer "
                     "site: apptainer build sida.sif docker-archive://FILE)")


def find_apptainer() -> str:
    """Path of the apptainer (or legacy singularity) executable; ContainerError if neither."""
    for name in ("apptainer", "singularity"):
        exe = shutil.which(name)
        if exe:
            return exe
    raise ContainerError(MISSING_APPTAINER)


def git_build_args(root: Path = REPO_ROOT) -> dict[str, str]:
    """SIDA_GIT_COMMIT / SIDA_GIT_DIRTY of the checkout being built ('unknown' without git)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if commit else None
    return {"SIDA_GIT_COMMIT": commit or "unknown",
            "SIDA_GIT_DIRTY": "unknown" if status is None else ("true" if status else "false")}


def check_files(def_path: Path, root: Path = REPO_ROOT) -> None:
    """Every ``%files`` source must exist (apptainer's own error comes late and is cryptic)."""
    for line in def_sections(def_path).get("files", []):
        src = line.split()[0]
        if not (root / src).exists():
            raise ContainerError(f"{def_path.name} copies '{src}' into the image, but {root / src} does not exist")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build(def_path: str | Path = DEF_FILE, out: str | Path = DEFAULT_IMAGE, force: bool = False,
          fakeroot: bool | None = None) -> Path:
    """Build `out` (a SIF) from `def_path` with `spython.main.Client.build`; return the image path.

    `fakeroot` defaults to "not running as root". Raises ContainerError with a one-line reason.
    """
    exe = find_apptainer()
    def_path, out = Path(def_path).resolve(), Path(out).resolve()
    if not def_path.is_file():
        raise ContainerError(f"definition file {def_path} does not exist: pass --def")
    if out.exists() and not force:
        raise ContainerError(f"{out} exists: pass --force to rebuild it")
    out.parent.mkdir(parents=True, exist_ok=True)
    check_files(def_path)
    if fakeroot is None:
        fakeroot = os.geteuid() != 0
    options = ["--fakeroot"] if fakeroot else []
    for name, value in git_build_args().items():
        options += ["--build-arg", f"{name}={value}"]

    from spython.main import Client

    # spython always calls `singularity`; run the executable we found (apptainer on new systems).
    base_init = Client._init_command
    Client._init_command = lambda action, flags=None: [exe] + base_init(action, flags)[1:]
    cwd = os.getcwd()
    try:
        os.chdir(REPO_ROOT)  # %files sources are relative to the build's working directory
        result = Client.build(recipe=str(def_path), image=str(out), sudo=False, force=force,
                              options=options, return_result=True, quiet=False)
    finally:
        os.chdir(cwd)
        Client._init_command = base_init
    code = result.get("return_code", 1) if isinstance(result, dict) else (0 if result else 1)
    if code != 0 or not out.is_file():
        raise ContainerError(f"{Path(exe).name} build failed (exit status {code}); its output is above")
    digest = sha256_file(out)
    (out.parent / (out.name + ".sha256")).write_text(f"{digest}  {out.name}\n")
    print(f"built {out} (sha256:{digest})")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Command line of `python -m containers.build`."""
    parser = argparse.ArgumentParser(prog="python -m containers.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--def", dest="def_path", default=str(DEF_FILE), help="Apptainer definition file")
    parser.add_argument("--out", default=str(DEFAULT_IMAGE), help="image to write (SIF)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing image")
    parser.add_argument("--no-fakeroot", dest="fakeroot", action="store_false", default=None,
                        help="build without --fakeroot (needs root or a setuid installation)")
    a = parser.parse_args(argv)
    build(a.def_path, a.out, force=a.force, fakeroot=a.fakeroot)


if __name__ == "__main__":
    from sida.run.cli import run_stage

    run_stage(main)
