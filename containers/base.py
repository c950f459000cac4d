"""A Debian 12 base image made locally with debootstrap: no image registry needed.

    python -m containers.base [--tag localhost/sida-base:bookworm] [--mirror URL] [--force]

Many HPC login nodes and this project's CI machines reach a Debian mirror and PyPI but no image
registry. debootstrap (root) installs a minimal Debian bookworm with the packages the image's
``%post`` needs (python3 3.11, python3-venv, git, ca-certificates) into a temporary folder, which
is imported as a local image. ``make container`` uses it as ``BASE_IMAGE`` when the public base
cannot be pulled. The mirror defaults to the first Debian one in the host's apt sources.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from . import ContainerError
from .engine import Engine, find_engine

BASE_TAG = "localhost/sida-base:bookworm"
SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "git", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: The imported file system has no image config: give it the usual PATH.
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def apt_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The first Debian archive URI in the host's apt sources (deb822 ``.sources`` or one-line
    ``sources.list``), without the security archive; DEFAULT_MIRROR if there is none."""
    files = sorted((sources_dir / "sources.list.d").glob("*.sources")) + [sources_dir / "sources.list"] + \
        sorted((sources_dir / "sources.list.d").glob("*.list"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        uris = re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.M)
        for uri in uris:
            if "debian" in uri and "security" not in uri:
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def debootstrap_command(root: Path, mirror: str, packages: Sequence[str] = PACKAGES) -> list[str]:
    return ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(root), mirror]


def make_base(engine: Engine, tag: str = BASE_TAG, mirror: str | None = None, force: bool = False) -> str:
    """Build the base image `tag` (unless it exists and not `force`); return the tag."""
    if not force and engine.image_id(tag):
        print(f"base image {tag} exists (python -m containers.base --force rebuilds it)", file=sys.stderr)
        return tag
    if not shutil.which("debootstrap"):
        raise ContainerError("debootstrap is not installed: apt-get install debootstrap (it builds the local "
                             "Debian base), or pass a base image your registry has (CONTAINER_BASE=IMAGE)")
    if os.geteuid() != 0:
        raise ContainerError("debootstrap needs root: run `sudo python -m containers.base` once, "
                             "or pass a base image your registry has (CONTAINER_BASE=IMAGE)")
    mirror = mirror or apt_mirror()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sida-base-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        root = Path(tmp) / "rootfs"
        print(f"debootstrap {SUITE} from {mirror} ...", file=sys.stderr)
        out = subprocess.run(debootstrap_command(root, mirror), capture_output=True, text=True)
        if out.returncode != 0:
            last = [l for l in (out.stderr + out.stdout).splitlines() if l.strip()][-1:] or ["no output"]
            raise ContainerError(f"debootstrap failed ({last[0].strip()}): check that {mirror} is reachable, "
                                 "or pass --mirror URL (a Debian mirror)")
        # Package caches and lists are ~110 MB the image does not need (apt-get update refetches).
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (root / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(engine.command("import", "--change", f"ENV PATH={IMAGE_PATH}", "-", tag),
                             stdin=tar.stdout, capture_output=True, text=True, env={**os.environ, **engine.env})
        tar.stdout.close()
        tar.wait()
        if imp.returncode != 0 or tar.returncode != 0:
            raise ContainerError(f"{engine.name} import of the debootstrap root failed "
                                 f"({(imp.stderr.strip().splitlines() or ['tar failed'])[-1]})")
    print(f"built base image {tag} in {time.monotonic() - start:.0f} s", file=sys.stderr)
    return tag


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m containers.base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default=BASE_TAG, help="name of the local base image")
    parser.add_argument("--mirror", help="Debian mirror (default: the host's apt sources)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the image exists")
    a = parser.parse_args(argv)
    print(make_base(find_engine(), a.tag, a.mirror, a.force))


if __name__ == "__main__":
    from sida.run.cli import run_stage

    run_stage(main)
