"""Build the project's image with podman (or docker) and export it for Apptainer sites.

    python -m containers.image [--base auto|local|IMAGE] [--host-pip auto|1|0] [--archive docker|oci|none]

Builds ``containers/Dockerfile`` (generated from ``containers/sida.def``) from this checkout,
tags it ``localhost/sida-pipeline:<commit>`` (``-dirty`` when the tree has uncommitted changes),
and writes ``build/sida-image.json``: tag, image ID (``sha256:`` of its config, the digest a
container run records in provenance.json), manifest digest, base image, commit, engine. With an
archive format it also writes ``build/sida-pipeline-<tag>.<format>.tar``, which
``apptainer build sida.sif docker-archive://build/...tar`` (or ``oci-archive://``) converts.

The base image (build argument ``BASE_IMAGE``): ``auto`` (default) uses the definition's public
Debian + Python image when it is present or can be pulled, else the local Debian base made with
debootstrap (``python -m containers.base``); ``local`` always uses the latter; anything else is
an image name that must exist or be pullable. ``--host-pip`` (``SIDA_BUILD_HOST_PIP``): see
``containers/hostpip.py``; auto = on when the host has pip settings (podman only).
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from . import DEF_FILE, DOCKERFILE, REPO_ROOT, ContainerError
from . import hostpip
from .base import make_base
from .build import git_build_args, sha256_file
from .engine import Engine, find_engine
from .sync import build_arguments, sync

BUILD_DIR = REPO_ROOT / "build"
RECORD = BUILD_DIR / "sida-image.json"
IMAGE_NAME = "localhost/sida-pipeline"
ARCHIVE_FORMATS = {"docker": "docker-archive", "oci": "oci-archive"}
#: Build-output patterns that name the cause of a failed build, and the fix.
_DIAGNOSES = (
    (("CERTIFICATE_VERIFY_FAILED", "SSLError", "certificate verify failed"),
     "pip could not verify PyPI's certificate (a TLS-intercepting proxy?): build with SIDA_BUILD_HOST_PIP=1 "
     "so the build uses the host's CA bundle and pip settings"),
    (("No matching distribution found", "Could not find a version that satisfies"),
     "pip found no wheel for a pinned requirement (wrong Python in the base image, or PyPI unreachable): "
     "use a Python 3.10-3.12 Debian/Ubuntu base, or SIDA_BUILD_HOST_PIP=1 for the host's indexes and wheels"),
    (("apt-get: not found", "apt-get: command not found"),
     "the base image has neither python3+git nor apt-get: use a Debian/Ubuntu base (CONTAINER_BASE=local "
     "builds one with debootstrap)"),
    (("Temporary failure in name resolution", "Could not resolve", "Network is unreachable"),
     "the build could not reach the network (apt or PyPI): use CONTAINER_BASE=local (python3 and git already "
     "in it) and SIDA_BUILD_HOST_PIP=1 with local wheel directories"),
    (("No space left on device",), "the disk is full (the image needs ~7 GB): free space, e.g. podman system prune"),
)


def default_tag(git: dict[str, str]) -> str:
    """``localhost/sida-pipeline:<12 hex of the commit>[-dirty]`` (``unknown`` outside git)."""
    commit = git["SIDA_GIT_COMMIT"]
    tag = commit[:12] if commit != "unknown" else "unknown"
    return f"{IMAGE_NAME}:{tag}{'-dirty' if git['SIDA_GIT_DIRTY'] == 'true' else ''}"


def _pull(engine: Engine, ref: str) -> tuple[bool, str]:
    out = engine.call("pull", ref, timeout=1800)
    lines = [l for l in (out.stderr or "").splitlines() if l.strip()]
    return out.returncode == 0, (lines[-1].strip() if lines else "no output")


def resolve_base(engine: Engine, base: str | None) -> str:
    """The base image to build from (see the module doc); makes or pulls it when needed."""
    public = build_arguments(DEF_FILE)["BASE_IMAGE"]
    if base in (None, "", "auto"):
        if engine.image_id(public):
            return public
        ok, why = _pull(engine, public)
        if ok:
            return public
        print(f"base image {public} cannot be pulled ({why}); using the local Debian base instead", file=sys.stderr)
        return make_base(engine)
    if base == "local":
        return make_base(engine)
    if engine.image_id(base):
        return base
    ok, why = _pull(engine, base)
    if not ok:
        raise ContainerError(f"base image {base} is not available: not found locally and the pull failed ({why}); "
                             "name an image you have (podman images) or use CONTAINER_BASE=local (a Debian base "
                             "made here with debootstrap)")
    return base


def check_base(engine: Engine, base: str) -> None:
    """The base must start and have what the first %post line needs (apt-get, or python3 and git)."""
    engine.ensure_runs(base)
    probe = "command -v apt-get >/dev/null || { command -v python3 >/dev/null && command -v git >/dev/null; }"
    out = engine.call("run", "--rm", "--entrypoint", "/bin/sh", base, "-c", probe, timeout=300)
    if out.returncode != 0:
        raise ContainerError(f"base image {base} has neither apt-get nor python3 and git (or no /bin/sh): use a "
                             "Debian/Ubuntu image, or CONTAINER_BASE=local (a Debian base made with debootstrap)")


def diagnose(engine: Engine, code: int, tail: Sequence[str], host_pip: bool = False) -> str:
    """One line for a failed build: the cause recognised in its output and the fix, or the step."""
    text = "\n".join(tail)
    for patterns, message in _DIAGNOSES:
        if any(p in text for p in patterns):
            if host_pip and "SIDA_BUILD_HOST_PIP=1" in message:
                message = message.split(":")[0] + " even with the host's pip settings: check the CA bundle and " \
                    "indexes `pip config list` names on the host"
            return f"{engine.name} build failed: {message}"
    steps = [l for l in tail if l.startswith("STEP ")]
    where = f" at {steps[-1][:120]}" if steps else ""
    return f"{engine.name} build failed (exit status {code}){where}: its output is above"


def _stream(cmd: list[str], env: dict[str, str], keep: int = 400) -> tuple[int, list[str]]:
    """Run `cmd`, echoing its output as it comes; return the exit status and its last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        tail.append(line.rstrip("\n"))
    return proc.wait(), list(tail)


def build_image(engine: Engine | None = None, base: str | None = None, host_pip: str | None = None,
                tag: str | None = None, no_cache: bool = False, record_path: Path = RECORD) -> dict:
    """Build the image; write and return its record (see the module doc)."""
    engine = engine or find_engine()
    stale = sync(check=True)
    if stale:
        raise ContainerError(f"{', '.join(str(p.relative_to(REPO_ROOT)) for p in stale)} out of date with "
                             f"{DEF_FILE.relative_to(REPO_ROOT)}: run python -m containers.sync")
    git = git_build_args()
    tag = tag or default_tag(git)
    base = resolve_base(engine, base)
    check_base(engine, base)
    use_pip = hostpip.wanted(host_pip)
    settings = hostpip.host_pip_settings() if use_pip is not False else {}
    if use_pip and not settings:
        print("SIDA_BUILD_HOST_PIP: the host has no pip settings to pass on", file=sys.stderr)
    if settings and engine.name != "podman":
        if use_pip:
            raise ContainerError("SIDA_BUILD_HOST_PIP needs podman (docker build cannot mount host paths): "
                                 "install podman, or set SIDA_BUILD_HOST_PIP=0")
        print("the host's pip settings are not passed to a docker build (it cannot mount them)", file=sys.stderr)
        settings = {}
    build_args = {"BASE_IMAGE": base, **git}
    cmd = ["build", "-f", str(DOCKERFILE), "-t", tag]
    for name, value in build_args.items():
        cmd += ["--build-arg", f"{name}={value}"]
    if no_cache:
        cmd.append("--no-cache")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sida-hostpip-") as tmp:
        if settings:
            conf = Path(tmp) / "pip.conf"
            conf.write_text(hostpip.pip_conf_text(settings))
            conf.chmod(0o644)
            Path(tmp).chmod(0o755)
            mounts = hostpip.build_mounts(conf, settings)
            print(f"host pip settings for the build: {' '.join(mounts[1::2])}", file=sys.stderr)
            cmd += mounts
        print(f"building {tag} from {base} with {engine.name} ...", file=sys.stderr)
        code, tail = _stream(engine.command(*cmd, str(REPO_ROOT)), {**os.environ, **engine.env})
    if code != 0:
        raise ContainerError(diagnose(engine, code, tail, host_pip=bool(settings)))
    image_id = engine.image_id(tag)
    if not image_id:
        raise ContainerError(f"{engine.name} build reported success but {tag} is not there: rerun make container")
    baked = engine.inspect(tag, "{{range .Config.Env}}{{println .}}{{end}}") or ""
    if f"SIDA_GIT_COMMIT={git['SIDA_GIT_COMMIT']}" not in baked.splitlines():
        raise ContainerError(f"{tag} does not carry commit {git['SIDA_GIT_COMMIT']} (a stale build cache): "
                             "rebuild with --no-cache")
    record = {
        "image": tag,
        "id": image_id,
        "manifest_digest": engine.inspect(tag, "{{.Digest}}") or None,
        "engine": engine.name,
        "base_image": base,
        "base_id": engine.image_id(base),
        "commit": git["SIDA_GIT_COMMIT"],
        "dirty": git["SIDA_GIT_DIRTY"] == "true",
        "host_pip": bool(settings),
        "built_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - start),
    }
    write_record(record, record_path)
    print(f"built {tag} ({image_id}) in {record['build_seconds']} s; record: {_show(record_path)}", file=sys.stderr)
    return record


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def write_record(record: dict, path: Path = RECORD) -> None:
    from sida.io.atomic import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)


def read_record(path: Path = RECORD) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def verify_archive(path: Path, record: dict) -> None:
    """The archive must hold the image: its config blob hashes to the image ID (docker-archive:
    ``manifest.json`` names it; oci-archive: ``index.json`` -> manifest -> config)."""
    import tarfile

    want = record["id"].removeprefix("sha256:")
    try:
        with tarfile.open(path) as tar:
            def read(name: str) -> bytes:
                member = tar.extractfile(name.lstrip("./"))
                if member is None:
                    raise KeyError(name)
                return member.read()

            if record.get("archive_format", "docker-archive") == "docker-archive" and "manifest.json" in tar.getnames():
                config = read(json.loads(read("manifest.json"))[0]["Config"])
            else:
                index = json.loads(read("index.json"))
                digest = index["manifests"][0]["digest"].split(":")[1]
                manifest = json.loads(read(f"blobs/sha256/{digest}"))
                config = read(f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}")
    except (OSError, KeyError, IndexError, ValueError, tarfile.TarError) as exc:
        raise ContainerError(f"{path} is not a readable image archive ({exc}): rerun make container")
    if hashlib.sha256(config).hexdigest() != want:
        raise ContainerError(f"{path} holds another image than {record['id']}: rerun make container")


def save_archive(engine: Engine, record: dict, fmt: str = "docker", record_path: Path = RECORD) -> Path:
    """Write the image as a docker-archive / oci-archive tar beside the record (replacing an
    older one) and add its path and sha256 to the record."""
    if fmt not in ARCHIVE_FORMATS:
        raise ContainerError(f"archive format {fmt!r} is unknown: use one of {', '.join(ARCHIVE_FORMATS)}")
    if engine.name == "docker" and fmt != "docker":
        raise ContainerError("docker save writes only docker-archive: use --archive docker (or podman)")
    out_dir = record_path.parent
    name = record["image"].rsplit(":", 1)[-1]
    path = out_dir / f"sida-pipeline-{name}.{fmt}.tar"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    args = ["save", "-o", str(tmp)] + (["--format", ARCHIVE_FORMATS[fmt]] if engine.name == "podman" else [])
    start = time.monotonic()
    out = engine.call(*args, record["image"], timeout=3600)
    if out.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ContainerError(f"{engine.name} save failed ({(out.stderr or '').strip().splitlines()[-1:]}): "
                             "check free disk space (the archive is about the image's size)")
    verify_archive(tmp, {**record, "archive_format": ARCHIVE_FORMATS[fmt]})
    for old in out_dir.glob("sida-pipeline-*.tar"):
        if old != path:
            old.unlink()  # one archive at a time: each is gigabytes
    tmp.replace(path)
    record["archive"] = {"path": _show(path), "format": ARCHIVE_FORMATS[fmt], "sha256": sha256_file(path),
                         "bytes": path.stat().st_size}
    write_record(record, record_path)
    print(f"wrote {_show(path)} ({path.stat().st_size / 1e9:.1f} GB, {time.monotonic() - start:.0f} s); "
          f"on an Apptainer site: apptainer build sida.sif {ARCHIVE_FORMATS[fmt]}://{_show(path)}", file=sys.stderr)
    return path


def clean(engine: Engine, record_path: Path = RECORD) -> None:
    """Remove every ``localhost/sida-pipeline`` image, dangling build layers, the archive and
    the record (the base image stays: it is small and slow to make)."""
    ids = engine.call("images", "-q", IMAGE_NAME).stdout.split()
    if ids:
        engine.call("rmi", "-f", *sorted(set(ids)))
    engine.call("image", "prune", "-f")
    for old in record_path.parent.glob("sida-pipeline-*.tar"):
        old.unlink()
    record_path.unlink(missing_ok=True)
    print(f"removed {len(set(ids))} image(s) of {IMAGE_NAME}, dangling layers and {_show(record_path.parent)}/ "
          "archives", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m containers.image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=os.environ.get("CONTAINER_BASE") or "auto",
                        help="auto (default), local (debootstrap base) or an image name ($CONTAINER_BASE)")
    parser.add_argument("--host-pip", default=None, help="1, 0 or auto (default: $SIDA_BUILD_HOST_PIP, else auto)")
    parser.add_argument("--archive", default="docker", choices=[*ARCHIVE_FORMATS, "none"],
                        help="also write an archive for apptainer build (default docker)")
    parser.add_argument("--tag", help=f"image name (default {IMAGE_NAME}:<commit>)")
    parser.add_argument("--no-cache", action="store_true", help="rebuild every layer")
    parser.add_argument("--clean", action="store_true", help="remove the project's images and archive instead")
    a = parser.parse_args(argv)
    engine = find_engine()
    if a.clean:
        clean(engine)
        return
    record = build_image(engine, a.base, a.host_pip, a.tag, a.no_cache)
    if a.archive != "none":
        save_archive(engine, record, a.archive)
    print(record["id"])


if __name__ == "__main__":
    from sida.run.cli import run_stage

    run_stage(main)
