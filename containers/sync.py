"""Generate ``containers/Dockerfile`` from ``containers/sida.def`` and ``envs/environment.yaml``
from ``envs/requirements.txt``, so the Apptainer image, the Docker image, Snakemake's conda env
and the Makefile's venv all come from one definition and one list of pins.

    python -m containers.sync          # rewrite both files
    python -m containers.sync --check  # exit 1 naming the stale file(s); writes nothing

The Dockerfile is spython's translation of the definition (its recipe parser and Docker writer)
with three fix-ups that spython does not do and that keep the two images equivalent:
the runscript becomes an ``ENTRYPOINT`` running the same ``sh`` script with the container's
arguments (spython's ``CMD`` would drop them); ``%arguments`` become ``ARG`` lines; Apptainer's
``{{ NAME }}`` build-argument placeholders become Docker's ``${NAME}``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Sequence

import yaml

from . import DEF_FILE, DOCKERFILE, ENVIRONMENT_YAML, REPO_ROOT, REQUIREMENTS, ContainerError

#: Python of the conda env: the version the pinned set was checked with (python-environment.md).
CONDA_PYTHON = "3.11"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


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


def dockerfile_text(def_path: str | Path = DEF_FILE) -> str:
    """The Dockerfile equivalent to `def_path`, as `python -m containers.sync` writes it."""
    from spython.main.parse.writers import DockerWriter

    recipe = parse_definition(def_path)
    if recipe.cmd:
        recipe.entrypoint = json.dumps(entrypoint_for(recipe.cmd))
        recipe.cmd = None
    body = DockerWriter({"sida": recipe}).convert()
    body = _PLACEHOLDER.sub(r"${\1}", body)
    lines = body.splitlines()
    args = [f"ARG {name}={default}" for name, default in build_arguments(def_path).items()]
    first_from = next(i for i, l in enumerate(lines) if l.startswith("FROM "))
    lines[first_from + 1:first_from + 1] = args  # after FROM: stage-scoped, visible to ENV/LABEL
    header = [
        f"# Generated from {_rel(Path(def_path))} by `python -m containers.sync` (spython); do not edit.",
        "# Build from the repository root:",
        "#   docker build -f containers/Dockerfile -t sida-pipeline \\",
        "#     --build-arg SIDA_GIT_COMMIT=$(git rev-parse HEAD) .",
    ]
    return "\n".join(header + lines) + "\n"


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
         requirements: str | Path = REQUIREMENTS, environment: str | Path = ENVIRONMENT_YAML) -> list[Path]:
    """Regenerate the Dockerfile and environment.yaml; return the files that were (or, with
    `check`, would be) changed. With `check` nothing is written."""
    wanted = {Path(dockerfile): dockerfile_text(def_path), Path(environment): environment_yaml_text(requirements)}
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
    a = parser.parse_args(argv)
    stale = sync(a.check, a.def_path, a.dockerfile, a.requirements, a.environment)
    names = ", ".join(_rel(p) for p in stale)
    if a.check and stale:
        raise ContainerError(f"{names} out of date with {_rel(Path(a.def_path))} / {_rel(Path(a.requirements))}: "
                             "run python -m containers.sync")
    print(f"updated {names}" if stale else "containers/Dockerfile and envs/environment.yaml are up to date")


if __name__ == "__main__":
    from sida.run.cli import run_stage

    run_stage(main)
