"""What every stage's command line shares: common flags and one-line errors.

A stage module defines `main(argv) -> None` and ends with
``if __name__ == "__main__": run_stage(main)``. User errors (`SidaError`) then print one
line, ``error: ...``, and exit with status 1, with no traceback; bugs still show one.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from ..errors import SidaError


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every stage takes: --config and --set."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default="config/config.yaml",
                        help="experiment config (YAML; validated against workflow/schemas/config.schema.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set distill.batch=32 (repeatable)")
    return parser


def run_stage(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a stage's `main`, turning user errors into one line on stderr and exit status 1."""
    try:
        main(argv)
    except SidaError as exc:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
