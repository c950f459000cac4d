"""Stopping on a signal: SIGTERM, SIGUSR1 and SIGINT ask a stage to stop, never kill it mid-write.

SLURM ends jobs by signal (SIGTERM at preemption and at the time limit, then SIGKILL after
`KillWait`; with `--signal`, an early warning a set time before). Two ways of stopping:

- Training stages (`install(raise_now=False)`): the handler only records the request. The
  training loop asks `stop_agreed` once per iteration; when any rank was signalled, every rank
  finishes the same iteration, the loop writes its resume checkpoint and raises `Preempted`.
  A signal after the last iteration is ignored: the stage writes its outputs and exits 0.
  A second signal during that write is only noted, so nothing is ever half-written.
- Evaluation (`install(raise_now=True)`): the first signal raises `Preempted` at once (the
  finished evaluation runs are already on disk, atomically; only the run in progress is lost);
  later signals are only noted, so the clean-up of an interrupted write is not interrupted.

`sida.run.cli.run_stage` turns `Preempted` into one line and exit status `EXIT_PREEMPTED`
(75, EX_TEMPFAIL: "try again"): rerunning the same command resumes.

Several processes agree with one MAX all-reduce of a CPU int per iteration (`stop_agreed`), on
gloo: the job's group on the CPU, a gloo group of its own beside NCCL on GPUs, so the check
never reads a device tensor back to the host. A signal to any one rank therefore stops all of
them after the same iteration.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

# torch is imported where the flag is reduced, not here: `sida.run.cli` (every command's error
# wrapper, the container build's included) imports this module and must run without torch.

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): checkpointed on a signal, rerun to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(BaseException):
    """A stage stopped on a signal; what it finished is on disk and a rerun resumes it. A
    BaseException, like KeyboardInterrupt: raised in the middle of evaluation code, no
    `except Exception` there may take it for an error and carry on."""


class _State:
    """The process's stop request (signal handlers are process-wide, so is this)."""

    signame: str | None = None  # the first signal received
    count = 0
    raise_now = False
    installed = False
    gloo_group: object = None


_state = _State()


def _write(msg: str) -> None:
    # os.write, not print: a handler may run inside a print to stderr (a re-entrant call would raise)
    from .cli import rank_prefix  # (cli imports this module)

    try:
        os.write(2, f"{rank_prefix()}{msg}\n".encode())
    except OSError:
        pass


def _handler(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    _state.count += 1
    if _state.signame is not None:
        _write(f"received {name} again: already stopping")
        return
    _state.signame = name
    if _state.raise_now:
        _write(f"received {name}: stopping; finished work is kept")
        raise Preempted(f"stopped by {name}: the finished work is kept; rerun the same command to resume")
    _write(f"received {name}: writing a checkpoint after the iteration in progress, then exiting")


def install(raise_now: bool = False) -> None:
    """Handle SIGTERM, SIGUSR1 and SIGINT in this process (main thread only) as described above."""
    _state.raise_now, _state.installed = raise_now, True
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


def ignore_from_now() -> None:
    """Ignore the stop signals from here on, in a process that handled them: its work is done
    and written, and a late signal must not kill it while the interpreter shuts down (Python
    gives the signals their default action back then), which would fail a job whose outputs
    are complete (and get them deleted)."""
    if _state.installed:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def requested() -> str | None:
    """The name of the first signal received by this process (None when none was)."""
    return _state.signame


def reset() -> None:
    """Forget a stop request (tests that run several stages in one process)."""
    _state.signame, _state.count, _state.gloo_group, _state.installed = None, 0, None, False


def _flag_group(group: object) -> object:
    """The group the flag is reduced over: `group` itself when it is gloo, else a gloo group of
    the same ranks (made once; every rank makes it at the same call)."""
    import torch.distributed as dist

    if dist.get_backend(group) == "gloo":
        return group
    if _state.gloo_group is None:
        ranks = None if group is None else dist.get_process_group_ranks(group)
        _state.gloo_group = dist.new_group(ranks=ranks, backend="gloo")
    return _state.gloo_group


def stop_agreed(group: object = None) -> bool:
    """True on every rank of `group` (None: the job) when any of them was signalled. Collective:
    every rank calls it at the same point (once per iteration)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return _state.signame is not None
    flag = torch.tensor([int(_state.signame is not None)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_flag_group(group))
    return bool(flag.item())
