"""Provenance: what produced a stage's outputs, recorded next to them.

`write_provenance(out_dir, cfg)` writes ``provenance.json`` (code version, container image,
software versions, host, config hash, the command that ran and the command that reproduces it)
and ``config.resolved.yaml`` (the config after overrides and defaults) into a stage's output
directory, atomically. With both files a colleague can rerun the stage exactly:
check out the recorded commit, use the recorded image, run the ``reproduce`` command.

The code version comes from git when the running code lives in a git checkout (the usual case,
also inside the container: Snakemake binds the working directory and runs the host checkout);
otherwise from ``SIDA_GIT_COMMIT``/``SIDA_GIT_DIRTY``, which the container bakes in at build time.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import os
import platform
import shlex
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from ..io.atomic import atomic_write_json, atomic_write_text
from .config import config_hash

#: Root of the code that is running (a git checkout, or /opt/sida-pipeline in the image).
CODE_ROOT = Path(__file__).resolve().parents[2]
PROVENANCE_FILE = "provenance.json"
RESOLVED_CONFIG_FILE = "config.resolved.yaml"
DIFF_FILE = "git.diff"
CONTAINERENV = Path("/run/.containerenv")
_MAX_DIFF_BYTES = 10 * 1024 * 1024


def provenance(cfg: dict | None = None, *, resolved_config: str | Path | None = None) -> dict[str, Any]:
    """A JSON-able record of how this process was started and with what.

    `cfg` is the resolved experiment config (hashed with `sida.run.config.config_hash`);
    `resolved_config` is where it is (or will be) saved, used in the reproduce command.
    """
    code = git_info(CODE_ROOT)
    container = container_info()
    rec: dict[str, Any] = {
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code": code,
        "container": container,
        "software": software_versions(),
        "host": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        },
        "config_hash": config_hash(cfg) if cfg is not None else None,
        "experiment": (cfg or {}).get("experiment"),
        "cwd": os.getcwd(),
        "command": shlex.join(launch_command()),
    }
    rec["reproduce"] = reproduce_command(code, container, resolved_config)
    return rec


def write_provenance(out_dir: str | Path, cfg: dict) -> dict[str, Any]:
    """Write ``provenance.json`` and ``config.resolved.yaml`` into `out_dir` (atomically).

    Call it from the main process only. When the checkout has uncommitted changes, their diff
    goes to ``git.diff`` beside them, so the exact code can still be rebuilt. Returns the record.
    """
    out_dir = Path(out_dir)
    resolved = out_dir / RESOLVED_CONFIG_FILE
    rec = provenance(cfg, resolved_config=resolved)
    atomic_write_text(resolved, yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False))
    if rec["code"].get("dirty"):
        diff = working_tree_diff(CODE_ROOT)
        if diff is not None and len(diff.encode()) <= _MAX_DIFF_BYTES:
            atomic_write_text(out_dir / DIFF_FILE, diff)
            rec["code"]["diff_file"] = DIFF_FILE
            rec["code"]["diff_sha256"] = hashlib.sha256(diff.encode()).hexdigest()
    atomic_write_json(out_dir / PROVENANCE_FILE, rec)
    return rec


def _git(root: Path, *args: str, ok: tuple[int, ...] = (0,)) -> str | None:
    """Output of a git command in `root`, or None when git or the repository is unavailable."""
    try:
        # safe.directory: inside a container the checkout may belong to another uid.
        out = subprocess.run(["git", "-c", "safe.directory=*", "-C", str(root), *args],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode in ok else None


def working_tree_diff(root: str | Path = CODE_ROOT) -> str | None:
    """A patch from HEAD to the working tree, new (untracked, not ignored) files included,
    that ``git apply`` replays on a clean checkout of the commit; None without git."""
    root = Path(root)
    diff = _git(root, "diff", "HEAD", "--binary")
    if diff is None:
        return None
    untracked = _git(root, "ls-files", "--others", "--exclude-standard", "-z") or ""
    for name in filter(None, untracked.split("\0")):
        # --no-index exits 1 when the files differ, which they always do here.
        part = _git(root, "diff", "--no-index", "--binary", "--", "/dev/null", name, ok=(0, 1))
        diff += part or ""
    return diff


def _read_head(root: Path) -> str | None:
    """The commit of a checkout's HEAD read from `.git` directly (when no git binary exists)."""
    git_dir = root / ".git"
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        if (git_dir / ref).is_file():
            return (git_dir / ref).read_text().strip()
        for line in (git_dir / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        return None
    return None


def git_info(root: str | Path = CODE_ROOT) -> dict[str, Any]:
    """Commit and dirty flag of the code at `root`.

    ``source`` says where they come from: ``git`` (the checkout), ``git-files`` (read from
    `.git` without a git binary; dirty unknown), ``image`` (baked into the container at build
    time) or ``unknown``. Dirty means the working tree differs from the commit: changed tracked
    files or new files git does not ignore (results and caches are ignored by .gitignore).
    """
    root = Path(root)
    commit = _git(root, "rev-parse", "HEAD")
    if commit:
        status = _git(root, "status", "--porcelain")
        return {"commit": commit.strip(), "dirty": bool(status.strip()) if status is not None else None,
                "source": "git", "root": str(root)}
    commit = _read_head(root) if (root / ".git").exists() else None
    if commit:
        return {"commit": commit, "dirty": None, "source": "git-files", "root": str(root)}
    baked = os.environ.get("SIDA_GIT_COMMIT", "")
    if baked and baked != "unknown":
        dirty = os.environ.get("SIDA_GIT_DIRTY", "")
        return {"commit": baked, "dirty": {"true": True, "false": False}.get(dirty.lower()),
                "source": "image", "root": str(root)}
    return {"commit": None, "dirty": None, "source": "unknown", "root": str(root)}


@functools.lru_cache(maxsize=4)
def _sha256_file(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, cached per path, size and mtime (a SIF is gigabytes; size and mtime are
    in the key so a rebuilt image is hashed again)."""
    from ..io.assets import sha256_file

    return sha256_file(Path(path))


def image_digest(path: str | Path) -> str | None:
    """``sha256:<hex>`` of an image file: from its ``<image>.sha256`` sidecar (written by
    ``python -m containers.build``) when that is at least as new as the image, else computed."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return None  # the image path is not visible inside the container
    sidecar = path.with_name(path.name + ".sha256")
    try:
        if sidecar.stat().st_mtime_ns >= st.st_mtime_ns:
            hexdigest = sidecar.read_text().split()[0]
            return f"sha256:{hexdigest}"
    except (OSError, IndexError):
        pass
    try:
        return f"sha256:{_sha256_file(str(path), st.st_size, st.st_mtime_ns)}"
    except OSError:
        return None


def read_containerenv(path: str | Path = CONTAINERENV) -> dict[str, str]:
    """The ``key="value"`` lines of podman's ``/run/.containerenv`` (filled in for privileged
    containers only: engine, name, id, image, imageid); {} when absent or empty."""
    out = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip('"')
    return out


def container_info(environ: dict | None = None, containerenv: str | Path = CONTAINERENV) -> dict[str, Any] | None:
    """The container this process runs in, or None on a bare host.

    Apptainer/Singularity set ``APPTAINER_CONTAINER``/``SINGULARITY_CONTAINER`` to the image
    path (its digest is the file's sha256). podman sets ``container=podman`` and mounts
    ``/run/.containerenv``; Docker leaves ``/.dockerenv``. Neither tells an unprivileged
    container which image it runs, so whoever starts it passes ``SIDA_IMAGE`` and
    ``SIDA_IMAGE_DIGEST`` (the image ID it started, as ``make container-test`` does); podman's
    containerenv fills them in when it has them. Our image also sets ``SIDA_CONTAINER``.
    """
    env = os.environ if environ is None else environ
    sif = env.get("APPTAINER_CONTAINER") or env.get("SINGULARITY_CONTAINER")
    marker = env.get("SIDA_CONTAINER")
    podman = env.get("container") == "podman" or Path(containerenv).exists()
    docker = Path("/.dockerenv").exists()
    if not sif and not marker and not podman and not docker:
        return None
    if sif:
        runtime = "apptainer" if env.get("APPTAINER_CONTAINER") else "singularity"
    else:
        runtime = "podman" if podman else ("docker" if docker else "unknown")
    cenv = read_containerenv(containerenv) if podman else {}
    engine_id = f"sha256:{cenv['imageid']}" if cenv.get("imageid") else None
    return {
        "runtime": runtime,
        "image": sif or env.get("SIDA_IMAGE") or cenv.get("image"),
        "name": env.get("APPTAINER_NAME") or env.get("SINGULARITY_NAME") or marker,
        "digest": env.get("SIDA_IMAGE_DIGEST") or engine_id or (image_digest(sif) if sif else None),
        "sida_image": marker is not None,
        "baked_commit": env.get("SIDA_GIT_COMMIT"),
    }


def software_versions() -> dict[str, Any]:
    """Python, torch/CUDA and the installed versions of the pinned packages."""
    import torch

    versions: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    packages = {}
    req = CODE_ROOT / "envs" / "requirements.txt"
    names = []
    if req.is_file():
        for line in req.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                names.append(line.split("==")[0].split(">")[0].split("<")[0].split("[")[0].strip())
    for name in names:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    versions["packages"] = packages
    return versions


def launch_command() -> list[str]:
    """This process's command line as the user would type it (``python -m stages.x ...``).

    Under torchrun each worker runs the module itself; the launcher is added back from
    torchrun's environment so the command starts the same number of processes. A multi-node
    job is given back as the workflow starts it: srun once per node running `sida.run.launch`,
    which finds the rendezvous host and port itself (run it inside an allocation of that size).
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    # `python -m pkg.mod` leaves the module's file in argv[0]; name the module instead.
    prog = ["-m", spec.name] if spec is not None and spec.name not in ("__main__", None) else [sys.argv[0]]
    args = list(sys.argv[1:])
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ:
        local = os.environ.get("LOCAL_WORLD_SIZE", "1")
        nodes = max(1, int(os.environ.get("WORLD_SIZE", local)) // max(1, int(local)))
        if nodes == 1:
            return ["torchrun", "--standalone", "--nproc-per-node", local] + prog + args
        return ["srun", "--nodes", str(nodes), "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
                "python", "-m", "sida.run.launch", "--nproc-per-node", local] + prog[:1] + ["--"] + prog[1:] + args
    return ["python"] + prog + args


def _replace_config_args(argv: list[str], config: str) -> list[str]:
    """`argv` with --config/--set dropped (the resolved config has them all) and --config added."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--config", "--set"):
            skip = True
            continue
        if a.startswith(("--config=", "--set=")):
            continue
        out.append(a)
    return out + ["--config", config]


def reproduce_command(code: dict[str, Any], container: dict[str, Any] | None,
                      resolved_config: str | Path | None) -> str:
    """A shell command that reruns this stage: checkout, [container], launcher, resolved config."""
    cmd = launch_command()
    if resolved_config is not None:
        cmd = _replace_config_args(cmd, str(resolved_config))
    if container and container.get("image"):
        if container.get("runtime") in ("podman", "docker"):
            # The code is the image's; outputs went to the results folder mounted into it.
            cmd = [container["runtime"], "run", "--rm", "-v", "$PWD/results:/opt/sida-pipeline/results",
                   container["image"]] + cmd
        else:
            cmd = ["apptainer", "exec", "--nv", container["image"]] + cmd
    line = shlex.join(cmd).replace("'$PWD/results:/opt/sida-pipeline/results'", '"$PWD/results":/opt/sida-pipeline/results')
    steps = []
    if code.get("commit") and code.get("source") != "image":
        steps.append(f"git checkout {code['commit']}")
        if code.get("dirty"):
            where = Path(resolved_config).parent if resolved_config is not None else Path("<output dir>")
            steps.append(shlex.join(["git", "apply", str(where / DIFF_FILE)]))
    return " && ".join(steps + [line])
