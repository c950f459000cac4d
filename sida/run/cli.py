"""What every stage's command line shares: common flags and one-line errors.

A stage module defines `main(argv) -> None` and ends with
``if __name__ == "__main__": run_stage(main)``. User errors (`SidaError`) and operating-system
failures (`OSError`: a full disk, a read-only or missing directory, a file where a directory
should be) then print one line, ``error: ...`` naming the path, the cause and the fix, and exit
with status 1, with no traceback; bugs still show one. ``SIDA_DEBUG=1`` in the environment
shows the traceback of every error (the one line is printed first).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Sequence

from ..errors import SidaError, describe_os_error
from .signals import EXIT_PREEMPTED, Preempted, ignore_from_now

DEBUG_ENV = "SIDA_DEBUG"


def debug_enabled() -> bool:
    """True when `SIDA_DEBUG` asks for tracebacks (any value but '', '0', 'false', 'no')."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every stage takes: --config and --set."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog=f"{DEBUG_ENV}=1 in the environment shows tracebacks with errors.")
    parser.add_argument("--config", default="config/config.yaml",
                        help="experiment config (YAML; validated against workflow/schemas/config.schema.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set distill.batch=32 (repeatable)")
    return parser


def rank_prefix() -> str:
    """``[rank R] `` on ranks other than 0 (of a torchrun job), else ''."""
    rank = os.environ.get("RANK")
    return f"[rank {rank}] " if rank not in (None, "0") else ""


def error_line(message: str) -> str:
    """``error: <message>`` on one line, prefixed with the rank on ranks other than 0."""
    return f"{rank_prefix()}error: {' '.join(message.split())}"


def print_line(text: str) -> None:
    """Write `text` and its newline to stderr in one write. `print` writes the two separately when
    stderr is unbuffered (PYTHONUNBUFFERED=1, as in the container and the tests), so the last lines
    of two ranks sharing one pipe (torchrun, srun) could run together; one write of under PIPE_BUF
    (4 KiB) bytes to a pipe is atomic."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run_stage(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a stage's `main`, turning user and file-system errors into one line on stderr and exit 1,
    and a stop on a signal (`Preempted`: its checkpoint or finished work is on disk) into one line
    and exit `EXIT_PREEMPTED` (75)."""
    try:
        main(argv)
        ignore_from_now()  # done and written: a late signal must not fail the job now
    except Preempted as exc:
        print_line(f"{rank_prefix()}stopped: {exc} (exit {EXIT_PREEMPTED})")
        sys.exit(EXIT_PREEMPTED)
    except (SidaError, OSError) as exc:
        message = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        if debug_enabled():
            traceback.print_exc()
        print_line(error_line(message))
        sys.exit(1)
    except KeyboardInterrupt:
        print_line(f"{rank_prefix()}interrupted: the last checkpoint is kept; rerun the same command to resume")
        sys.exit(130)
