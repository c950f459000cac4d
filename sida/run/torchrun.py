"""`torchrun` for the workflow's jobs: the same options, but a failed stage's log ends with the
stage's own one-line error instead of torchrun's failure table and traceback.

    python -m sida.run.torchrun --standalone --nproc-per-node N -m -- stages.distill --config ...

A worker that exits with status 1 has already printed its ``error: ...`` line (or, for a bug,
its traceback): the launcher adds nothing and exits 1. A worker that ends otherwise (killed by
a signal, another status) gets one ``error:`` line saying how. ``SIDA_DEBUG=1`` restores
torchrun's own report.

Signals: SIGTERM, SIGINT and SIGUSR1 to the launcher are passed on to its workers, and the
launcher then waits for them, however long their checkpoint takes (torchrun's own agent would
kill them 30 s after forwarding SIGTERM or SIGINT, and dies of SIGUSR1, which it does not
handle). The workers stop after the iteration in progress with status 75 (`sida.run.signals`),
and so does the launcher.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Sequence

from .cli import debug_enabled, error_line
from .signals import EXIT_PREEMPTED, STOP_SIGNALS


def child_pids(parent: int | None = None) -> list[int]:
    """The processes whose parent is `parent` (default this one): the launcher's workers."""
    import os

    parent = os.getpid() if parent is None else parent
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            pids.append(int(entry))
    return pids


def forward_to_workers(signum: int, frame: object = None) -> None:
    """The launcher's handler of the stop signals: pass the signal on and keep waiting."""
    import os

    for pid in child_pids():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    os.write(2, f"launcher: passed {signal.Signals(signum).name} on to the workers; waiting for their "
                f"checkpoint\n".encode())


def handle_stop_signals(args: object) -> None:
    """Make torchrun's agent forward SIGTERM / SIGINT / SIGUSR1 to the workers instead of
    stopping them (its handler is looked up when it starts the workers)."""
    from torch.distributed.elastic.multiprocessing import api

    names = [n.strip() for n in getattr(args, "signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT").split(",")]
    names += [s.name for s in STOP_SIGNALS if s.name not in names]
    args.signals_to_handle = ",".join(names)
    default = api._terminate_process_handler

    def handler(signum: int, frame: object) -> None:
        if signum in STOP_SIGNALS:
            forward_to_workers(signum, frame)
        else:
            default(signum, frame)

    api._terminate_process_handler = handler


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
    handle_stop_signals(args)
    debug = debug_enabled()
    if not debug:
        # The agent logs every worker failure at ERROR level before raising its report.
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(args)
        for sig in STOP_SIGNALS:  # the workers are done: a late signal must not fail the job now
            signal.signal(sig, signal.SIG_IGN)
    except ChildFailedError as exc:
        if debug:
            raise
        rank, failure = exc.get_first_failure()
        if failure.exitcode not in (1, EXIT_PREEMPTED):  # those have said why
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
