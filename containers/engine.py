"""The container engine on this machine: podman (preferred), or docker where its daemon answers.

``SIDA_ENGINE=podman|docker`` (or a path to one) chooses explicitly. Some hosts cannot start a
container with podman's default OCI runtime (``setrlimit RLIMIT_NOFILE: Operation not
permitted`` under crun, or runc failing to raise a limit): the first container this module
starts is a probe, and when it fails that way every later podman command runs with
``containers/podman-runc.conf`` (runc with explicit ``nofile``/``nproc`` limits). A normal
machine keeps podman's own settings; a ``CONTAINERS_CONF`` of the caller is always respected.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import REPO_ROOT, ContainerError

RUNC_CONF = REPO_ROOT / "containers" / "podman-runc.conf"
MISSING_ENGINE = ("no container engine: install podman (Debian/Ubuntu: apt-get install podman runc) "
                  "or start Docker, then rerun")
#: What podman prints when its default runtime cannot apply the container's resource limits.
_LIMIT_ERRORS = ("setrlimit", "rlimit", "cgroups in hybrid mode")


@dataclass
class Engine:
    """A container engine command line (`exe`) and the environment its commands need."""

    name: str
    exe: str
    env: dict[str, str] = field(default_factory=dict)
    probed: bool = False

    def command(self, *args: str) -> list[str]:
        return [self.exe, *args]

    def call(self, *args: str, capture: bool = True, timeout: float | None = 600,
             input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run ``ENGINE args`` (output captured as text unless `capture` is false)."""
        env = {**os.environ, **self.env}
        if input is not None:
            return subprocess.run(self.command(*args), input=input, capture_output=capture, env=env, timeout=timeout)
        return subprocess.run(self.command(*args), capture_output=capture, text=capture, env=env, timeout=timeout)

    def inspect(self, ref: str, fmt: str) -> str | None:
        """``image inspect --format fmt`` of a local image, or None when it is not there."""
        out = self.call("image", "inspect", "--format", fmt, ref)
        return out.stdout.strip() if out.returncode == 0 else None

    def image_id(self, ref: str) -> str | None:
        """``sha256:<hex>`` ID (config digest) of a local image, or None."""
        ident = self.inspect(ref, "{{.Id}}")
        if not ident:
            return None
        return ident if ident.startswith("sha256:") else f"sha256:{ident}"

    def ensure_runs(self, image: str) -> None:
        """Start one throw-away container of `image`; on a limits failure switch podman to
        runc with explicit limits (once). ContainerError when no container can start."""
        if self.probed:
            return
        self.probed = True
        out = self.call("run", "--rm", "--entrypoint", "true", image, timeout=300)
        if out.returncode == 0:
            return
        err = _last_line(out.stderr)
        if self.name == "podman" and "CONTAINERS_CONF" not in os.environ and \
                any(e in out.stderr for e in _LIMIT_ERRORS):
            self.env["CONTAINERS_CONF"] = str(RUNC_CONF)
            retry = self.call("run", "--rm", "--entrypoint", "true", image, timeout=300)
            if retry.returncode == 0:
                print(f"podman: the default runtime cannot set resource limits here ({err}); "
                      f"using {RUNC_CONF.relative_to(REPO_ROOT)} (runc, explicit ulimits)", file=sys.stderr)
                return
            err = _last_line(retry.stderr)
            if "runc" in err and ("not found" in err or "executable file" in err):
                raise ContainerError(f"podman cannot start a container ({err}): install runc "
                                     "(apt-get install runc) or fix podman's runtime in containers.conf")
        raise ContainerError(f"{self.name} cannot start a container from {image} ({err}): "
                             f"check `{self.name} run --rm {image} true` and the engine's setup")


def _last_line(text: str | None, limit: int = 160) -> str:
    """The last non-empty line of an engine's output, its end kept when long (the cause is there)."""
    lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
    line = lines[-1] if lines else "no output"
    return line if len(line) <= limit else "..." + line[-limit:]


def _docker_answers(exe: str) -> bool:
    try:
        return subprocess.run([exe, "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def find_engine(choice: str | None = None) -> Engine:
    """The engine to use: `choice` or ``$SIDA_ENGINE`` (a name or a path), else podman, else a
    docker whose daemon answers. ContainerError in one line when there is none."""
    choice = choice or os.environ.get("SIDA_ENGINE") or None
    candidates: Sequence[str] = [choice] if choice else ["podman", "docker"]
    docker_down = None
    for cand in candidates:
        exe = shutil.which(cand)
        if not exe:
            continue
        name = "docker" if Path(cand).name.startswith("docker") else "podman"
        if name == "docker" and not _docker_answers(exe):
            docker_down = exe
            continue
        return Engine(name, exe)
    if choice:
        raise ContainerError(f"container engine '{choice}' (SIDA_ENGINE) is not usable: "
                             f"{'its daemon does not answer' if docker_down else 'not found on PATH'}; "
                             "install podman (apt-get install podman runc) or unset SIDA_ENGINE")
    if docker_down:
        raise ContainerError(f"{docker_down} is installed but its daemon does not answer (docker info failed): "
                             "start it (systemctl start docker) or install podman (apt-get install podman runc)")
    raise ContainerError(MISSING_ENGINE)
