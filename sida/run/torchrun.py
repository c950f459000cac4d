"""`torchrun` for the workflow's jobs: the same options, but a failed stage's log ends with the
stage's own one-line error instead of torchrun's failure table and traceback.

    python -m sida.run.torchrun --standalone --nproc-per-node N -m -- stages.distill --config ...

A worker that exits with status 1 has already printed its ``error: ...`` line (or, for a bug,
its traceback): the launcher adds nothing and exits 1. A worker that ends otherwise (killed by
a signal, another status) gets one ``error:`` line saying how. ``SIDA_DEBUG=1`` restores
torchrun's own report.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Sequence

from .cli import debug_enabled, error_line


def failure_line(stage: str, rank: int, exitcode: int) -> str:
    """The one line for a worker that ended with `exitcode` (negative: killed by that signal)."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return error_line(f"{stage}: rank {rank} was killed by {name}{hint}: rerun the same command to resume "
                          f"from its last checkpoint")
    return error_line(f"{stage}: rank {rank} exited with status {exitcode}: its output above says why")


def main(argv: Sequence[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(argv) if argv is not None else None)
    debug = debug_enabled()
    if not debug:
        # The agent logs every worker failure at ERROR level before raising its report.
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:
        if debug:
            raise
        rank, failure = exc.get_first_failure()
        if failure.exitcode != 1:
            print(failure_line(exc.name, rank, failure.exitcode), file=sys.stderr, flush=True)
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)
    except SignalException as exc:  # the job itself was stopped (SLURM preemption, time limit, Ctrl-C)
        if debug:
            raise
        print(error_line(f"stopped by {exc.sigval.name}: the last checkpoint is kept; rerun the same command to "
                         f"resume"), file=sys.stderr, flush=True)
        sys.exit(128 + int(exc.sigval))


if __name__ == "__main__":
    main()
