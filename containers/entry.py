"""The image's entry point (its runscript): run a stage, or one of the pipeline's commands.

    podman run IMAGE --help                     lists the stages and commands
    podman run IMAGE distill --config ...       = python -m stages.distill --config ...
    podman run IMAGE snakemake --profile ...    runs snakemake (also torchrun, python, wandb, sh)

The stage list is read from ``stages/*.py`` (their docstrings) without importing them, so
``--help`` answers at once and names exactly the stages this image carries.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import Sequence

STAGES_DIR = Path(__file__).resolve().parents[1] / "stages"
COMMANDS = ("snakemake", "torchrun", "python", "python3", "wandb", "bash", "sh")


def stages(stages_dir: Path = STAGES_DIR) -> dict[str, str]:
    """{stage name: first paragraph of its docstring} for every ``stages/<name>.py``."""
    out = {}
    for path in sorted(stages_dir.glob("*.py")):
        if path.name.startswith("_"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = " ".join(doc.strip().split("\n\n")[0].split())  # the first paragraph, on one line
        # "Stage `distill`: one distillation run ..." -> "one distillation run ..."
        out[path.stem] = first.split(":", 1)[1].strip() if first.startswith("Stage ") and ":" in first else first
    return out


def usage(stages_dir: Path = STAGES_DIR) -> str:
    """The text of ``--help``: how to call the image, its stages and commands."""
    found = stages(stages_dir)
    width = max(map(len, found), default=0)
    lines = ["usage: IMAGE STAGE [--config FILE] [--set key=value ...] [ARGS...]   runs python -m stages.STAGE",
             f"       IMAGE {{{','.join(COMMANDS)}}} ARGS...   runs that command",
             "       IMAGE STAGE --help   shows a stage's own options",
             "", "stages:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, summary in found.items()]
    lines += ["", "Results are written under the working directory (results/<experiment>/...): mount a host",
              "folder there (podman/docker: -v HOST_DIR:/opt/sida-pipeline/results)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, stages_dir: Path = STAGES_DIR) -> int:
    """Dispatch the container's arguments; returns an exit status only when it does not exec."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(stages_dir))
        return 0
    name = args[0]
    if name in COMMANDS:
        os.execvp(name, args)
    if name in stages(stages_dir):
        os.execv(sys.executable, [sys.executable, "-m", f"stages.{name}", *args[1:]])
    print(f"error: '{name}' is neither a stage ({', '.join(stages(stages_dir))}) nor a command "
          f"({', '.join(COMMANDS)}): run the image with --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
