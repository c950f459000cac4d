"""Generate ``containers/Dockerfile`` and ``.dockerignore`` from ``containers/sida.def``, and
``envs/environment.yaml`` from ``envs/requirements.txt``, so the Apptainer image, the
podman/Docker image, Snakemake's conda env and the Makefile's venv all come from one definition
and one list of pins.

    python -m containers.sync          # rewrite the generated files
    python -m containers.sync --check  # exit 1 naming the stale file(s); writes nothing

The definition is read with spython's recipe parser; the Dockerfile is written here rather than
by spython's writer, because an equivalent image needs an order spython does not produce:
- ``%arguments`` become ``ARG`` lines; one used in ``From:`` is declared before ``FROM``
  (Apptainer's ``{{ NAME }}`` placeholders become Docker's ``${NAME}``);
- each ``%files`` entry is copied just before the first ``%post`` line that names its
  destination (or a folder above or below it), so a code change does not redo the ~5 GB
  ``pip install`` layer; entries no line names are copied after the last ``RUN``;
- ``%environment`` becomes ``ENV`` after every ``RUN`` (Apptainer applies it at run time only),
  with the build arguments it uses declared just before, so a new commit only rebuilds the
  last, tiny layers;
- the runscript becomes an ``ENTRYPOINT`` running the same ``sh`` script with the container's
  arguments (a ``CMD`` would drop them);
- Docker-only: the image runs as the user ``%post`` creates with ``useradd`` (Apptainer runs as
  the calling user anyway), in the project directory ``/opt/sida-pipeline`` whose ``results/``
  is where a host results folder is mounted.
``.dockerignore`` lets only the ``%files`` sources into the build context (not ``.venv``,
``results`` or a built archive).
"""

from __future__ import annotations

import argparse
import json
import posixpath
import re
import shlex
from pathlib import Path
from typing import Sequence

import yaml

from . import (DEF_FILE, DOCKERFILE, DOCKERIGNORE, ENVIRONMENT_YAML, IMAGE_PROJECT_DIR, REPO_ROOT, REQUIREMENTS,
               ContainerError)

#: Python of the conda env: the version the pinned set was checked with (python-environment.md).
CONDA_PYTHON = "3.11"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_PATH_TOKEN = re.compile(r"(/[A-Za-z0-9_.\-/]+)")


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def parse_definition(def_path: str | Path = DEF_FILE):
    """The spython `Recipe` of an Apptainer definition file (its single build stage)."""
    from spython.main.parse.parsers import SingularityParser

    def_path = Path(def_path)
    if not def_path.is_file():
        raise ContainerError(f"definition file {def_path} does not exist")
    return SingularityParser(str(def_path)).recipe["spython-base"]


def def_header(def_path: str | Path = DEF_FILE) -> dict[str, str]:
    """The header keywords (``Bootstrap``, ``From``, ...) before the first ``%section``, as
    written: spython lowercases ``From``, which would rename ``{{ NAME }}`` placeholders."""
    header = {}
    for line in Path(def_path).read_text().splitlines():
        stripped = line.split("#", 1)[0].strip()
        if stripped.startswith("%"):
            break
        key, sep, value = stripped.partition(":")
        if sep:
            header[key.strip().lower()] = value.strip()
    return header


def def_sections(def_path: str | Path = DEF_FILE) -> dict[str, list[str]]:
    """Raw non-empty, non-comment lines of each ``%section`` of a definition file.

    spython files sections it does not know (``%arguments``) under comments; this keeps them.
    """
    sections: dict[str, list[str]] = {}
    current = None
    for line in Path(def_path).read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("%"):
            current = stripped[1:].split()[0].lower()
            sections.setdefault(current, [])
        elif current and stripped and not stripped.startswith("#"):
            sections[current].append(stripped)
    return sections


def build_arguments(def_path: str | Path = DEF_FILE) -> dict[str, str]:
    """The ``%arguments`` of a definition file (build-arg name -> default)."""
    args = {}
    for line in def_sections(def_path).get("arguments", []):
        name, _, default = line.partition("=")
        args[name.strip()] = default.strip()
    return args


def entrypoint_for(runscript: str) -> list[str]:
    """The Docker ENTRYPOINT that runs `runscript` like Apptainer does: ``sh`` with the
    container's arguments as ``$1..`` (``$0`` names the image in messages)."""
    return ["/bin/sh", "-c", runscript, "sida-pipeline"]


def image_user(install: list[str]) -> str | None:
    """The user a ``useradd ... NAME`` line of %post creates (the Docker image's USER)."""
    for cmd in install:
        words = shlex.split(cmd)
        if words and words[0] == "useradd":
            return words[-1]
    return None


def _names_path(cmd: str, dest: str) -> bool:
    """Whether a %post command names `dest`, a folder above it, or a path below it."""
    for token in _PATH_TOKEN.findall(cmd):
        token = token.rstrip("/")
        if token == dest or dest.startswith(token + "/") or token.startswith(dest + "/"):
            return True
    return False


def _docker(text: str) -> str:
    return _PLACEHOLDER.sub(r"${\1}", text)


def dockerfile_text(def_path: str | Path = DEF_FILE) -> str:
    """The Dockerfile equivalent to `def_path`, as `python -m containers.sync` writes it."""
    recipe = parse_definition(def_path)
    base = def_header(def_path).get("from", "")
    args = build_arguments(def_path)
    global_args = list(dict.fromkeys(_PLACEHOLDER.findall(base)))
    used = _PLACEHOLDER.findall(" ".join([base, *recipe.install, *recipe.environ, *recipe.labels]))
    undefined = [n for n in used if n not in args]
    if undefined:
        raise ContainerError(f"{_rel(Path(def_path))} uses {{{{ {undefined[0]} }}}} but its %arguments do not define it")
    declared: set[str] = set()

    def declare(*texts: str) -> list[str]:
        """ARG lines for the build arguments `texts` use that the stage has not declared yet
        (declared late on purpose: a RUN after an ARG whose value changed is not cached)."""
        names = [n for n in dict.fromkeys(_PLACEHOLDER.findall(" ".join(texts))) if n not in declared]
        declared.update(names)
        # An ARG declared before FROM keeps its default in the stage only when redeclared bare.
        return [f"ARG {n}" if n in global_args else f"ARG {n}={args[n]}" for n in names]

    lines = [
        f"# Generated from {_rel(Path(def_path))} by `python -m containers.sync`; do not edit.",
        "# Build from the repository root (make container does this, and more):",
        "#   podman build -f containers/Dockerfile -t sida-pipeline \\",
        "#     --build-arg SIDA_GIT_COMMIT=$(git rev-parse HEAD) [--build-arg BASE_IMAGE=...] .",
        *[f"ARG {n}={args[n]}" for n in global_args],
        f"FROM {_docker(base)} AS sida",
    ]
    files = [tuple(f.split()) for f in recipe.files]
    for cmd in recipe.install:
        for src, dest in [f for f in files if _names_path(cmd, f[1])]:
            lines.append(f"COPY {src} {dest}")
            files.remove((src, dest))
        lines += declare(cmd)
        lines.append(f"RUN {_docker(cmd)}")
    lines += [f"COPY {src} {dest}" for src, dest in files]
    lines += declare(*recipe.environ, *recipe.labels)
    # One ENV and one LABEL instruction: each instruction is a committed step of the build.
    if recipe.environ:
        lines.append("ENV " + " \\\n    ".join(_docker(e) for e in recipe.environ))
    if recipe.labels:
        pairs = [label.partition(" ") for label in recipe.labels]
        lines.append("LABEL " + " \\\n      ".join(f"{k}={json.dumps(_docker(v.strip()))}" for k, _, v in pairs))
    user = image_user(recipe.install)
    if user:
        lines.append(f"USER {user}")
    lines.append(f"WORKDIR {IMAGE_PROJECT_DIR}")
    if recipe.cmd:
        lines.append(f"ENTRYPOINT {json.dumps(entrypoint_for(recipe.cmd))}")
    return "\n".join(lines) + "\n"


def dockerignore_text(def_path: str | Path = DEF_FILE) -> str:
    """The ``.dockerignore`` that admits only the definition's ``%files`` sources."""
    sources = [f.split()[0] for f in parse_definition(def_path).files]
    return "\n".join([
        f"# Generated from {_rel(Path(def_path))} by `python -m containers.sync`; do not edit.",
        "# The build context is only what %files copies (not .venv, results/ or a built image).",
        "*",
        *[f"!{s}" for s in sources],
        "**/__pycache__",
        "**/*.pyc",
    ]) + "\n"


def requirement_lines(requirements: str | Path = REQUIREMENTS) -> list[str]:
    """The requirement specifiers of a pip requirements file (comments and blanks dropped)."""
    out = []
    for line in Path(requirements).read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def environment_yaml_text(requirements: str | Path = REQUIREMENTS) -> str:
    """The conda environment file for ``snakemake --sdm conda``, pins copied from `requirements`.

    The pins are inlined rather than ``pip: [-r requirements.txt]``: Snakemake copies the env
    file into ``.snakemake/conda/`` before ``conda env create``, where a relative ``-r`` does not
    resolve, and it hashes only this file's content, so changed pins would not rebuild the env.
    """
    env = {
        "name": "sida-pipeline",
        "channels": ["conda-forge", "nodefaults"],
        "dependencies": [f"python={CONDA_PYTHON}", "pip", {"pip": requirement_lines(requirements)}],
    }
    header = (f"# Generated from {_rel(Path(requirements))} by `python -m containers.sync`; do not edit.\n"
              "# Edit envs/requirements.txt (the single list of pins) and rerun the sync.\n")
    return header + yaml.safe_dump(env, sort_keys=False, default_flow_style=False)


def sync(check: bool = False, def_path: str | Path = DEF_FILE, dockerfile: str | Path = DOCKERFILE,
         requirements: str | Path = REQUIREMENTS, environment: str | Path = ENVIRONMENT_YAML,
         dockerignore: str | Path = DOCKERIGNORE) -> list[Path]:
    """Regenerate the Dockerfile, .dockerignore and environment.yaml; return the files that were
    (or, with `check`, would be) changed. With `check` nothing is written."""
    wanted = {Path(dockerfile): dockerfile_text(def_path), Path(dockerignore): dockerignore_text(def_path),
              Path(environment): environment_yaml_text(requirements)}
    stale = [p for p, text in wanted.items() if not p.is_file() or p.read_text() != text]
    if not check:
        for p in stale:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(wanted[p])
    return stale


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write the generated files, or `--check` that they are current."""
    parser = argparse.ArgumentParser(prog="python -m containers.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale; write nothing")
    parser.add_argument("--def", dest="def_path", default=str(DEF_FILE), help="Apptainer definition file")
    parser.add_argument("--dockerfile", default=str(DOCKERFILE))
    parser.add_argument("--requirements", default=str(REQUIREMENTS))
    parser.add_argument("--environment", default=str(ENVIRONMENT_YAML))
    parser.add_argument("--dockerignore", default=str(DOCKERIGNORE))
    a = parser.parse_args(argv)
    stale = sync(a.check, a.def_path, a.dockerfile, a.requirements, a.environment, a.dockerignore)
    names = ", ".join(_rel(p) for p in stale)
    if a.check and stale:
        raise ContainerError(f"{names} out of date with {_rel(Path(a.def_path))} / {_rel(Path(a.requirements))}: "
                             "run python -m containers.sync")
    print(f"updated {names}" if stale else "containers/Dockerfile, .dockerignore and envs/environment.yaml are up to date")


if __name__ == "__main__":
    from sida.run.cli import run_stage

    run_stage(main)
