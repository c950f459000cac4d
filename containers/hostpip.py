"""Let pip inside an image build use the host's pip settings (``SIDA_BUILD_HOST_PIP``).

Sites that reach PyPI through a TLS-intercepting proxy, a mirror or local wheel directories
configure pip on the host (``/etc/pip.conf``, ``~/.config/pip/pip.conf``, ``PIP_*`` variables);
a container build sees none of it and fails (``CERTIFICATE_VERIFY_FAILED``, or the pinned
wheels are not found). With the option on, the build gets, for its ``RUN`` steps only:
- one pip.conf holding the host's effective settings (``pip config list``: its files and
  ``PIP_*`` variables merged), mounted at ``/etc/pip.conf``;
- every local file or folder those settings name (CA bundle, constraint file, ``find-links``
  folders, ``file://`` indexes with the ``files/`` beside a ``simple/`` index), read-only at
  the same path.
Nothing of it is committed to the image: the same settings that made the host's venv make the
image's, so both install the same wheels (the container test needs the same torch build).
"""

from __future__ import annotations

import ast
import configparser
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

from . import ContainerError

#: pip options whose values are local paths or URLs that may be file:// ones.
PATH_OPTIONS = {"cert", "client-cert", "constraint", "requirement", "find-links", "index-url", "extra-index-url"}
_LINE = re.compile(r"^(?P<section>[^.]*)\.(?P<key>[^=]+)=(?P<value>.*)$")


def host_pip_settings(python: str = sys.executable) -> dict[str, dict[str, str]]:
    """{section: {key: value}} of the host's effective pip configuration; ``PIP_*`` variables
    (pip's ``:env:`` section) override the files and go to ``[global]``. Empty without pip."""
    try:
        out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    files: dict[str, dict[str, str]] = {}
    env: dict[str, str] = {}
    for line in out.stdout.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        value = m["value"]
        try:
            value = ast.literal_eval(value)  # pip prints repr()-style quoted values
        except (ValueError, SyntaxError):
            pass
        section, key = m["section"], m["key"]
        (env if section == ":env:" else files.setdefault(section, {}))[key] = str(value)
    settings = files
    if env:
        settings.setdefault("global", {}).update(env)
    return settings


def pip_conf_text(settings: dict[str, dict[str, str]]) -> str:
    """The settings as a pip.conf (INI) text."""
    parser = configparser.ConfigParser(interpolation=None)
    for section, values in settings.items():
        parser[section] = values
    buf = io.StringIO()
    buf.write("# The host's pip settings for an image build (containers/hostpip.py); not kept in the image.\n")
    parser.write(buf)
    return buf.getvalue()


def named_paths(settings: dict[str, dict[str, str]]) -> list[Path]:
    """Existing local files and folders the settings name (deduplicated, parents before
    children dropped). A ``file://.../simple`` index brings its parent folder, where such
    local indexes keep the wheel files their pages link to."""
    found: list[Path] = []
    for values in settings.values():
        for key, value in values.items():
            if key not in PATH_OPTIONS:
                continue
            for token in value.split():
                if token.startswith("file:"):
                    path = Path(unquote(urlparse(token).path))
                    if path.name == "simple":
                        path = path.parent
                elif token.startswith("/"):
                    path = Path(token)
                else:
                    continue  # a remote URL, a bare option
                if path.exists():
                    found.append(path.resolve() if path.is_symlink() else path)
    found = sorted(set(found))
    return [p for p in found if not any(q != p and q in p.parents for q in found)]


def build_mounts(conf_file: Path, settings: dict[str, dict[str, str]]) -> list[str]:
    """``-v`` options for ``podman build``: the written pip.conf at /etc/pip.conf and the named
    paths read-only at their own place."""
    mounts = ["-v", f"{conf_file}:/etc/pip.conf:ro"]
    for path in named_paths(settings):
        mounts += ["-v", f"{path}:{path}:ro"]
    return mounts


def wanted(option: str | None) -> bool | None:
    """Parse ``SIDA_BUILD_HOST_PIP`` / ``--host-pip``: True (1/yes/on), False (0/no/off) or None
    (auto: on when the host has any pip settings)."""
    value = (option if option is not None else os.environ.get("SIDA_BUILD_HOST_PIP", "auto")).strip().lower()
    if value in ("1", "yes", "on", "true"):
        return True
    if value in ("0", "no", "off", "false"):
        return False
    if value in ("", "auto"):
        return None
    raise ContainerError(f"SIDA_BUILD_HOST_PIP={value!r} is not understood: use 1, 0 or auto")
