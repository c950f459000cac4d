"""Test hooks that kill or signal the process at a named point, so kill-and-resume and
stop-on-signal are tested in every window of a run deterministically rather than at one random
moment, and a hook that makes iterations slow, so a short run can outlast a time limit.

    SIDA_KILL_AT=NAME[:N][,NAME[:N]...]   signal this process the N-th time (default 1st) it
                                          reaches `NAME` (several points: each fires once)
    SIDA_KILL_SIGNAL=KILL|TERM|USR1|INT   the signal (default KILL)
    SIDA_KILL_RANK=R                      only in the process of rank R (default: every process)
    SIDA_SLOW_ITER=SECONDS                sleep this long after every training iteration

Named points: ``iteration`` (after every training iteration), ``tick`` (after a progress tick
and its monitor evaluation), ``evaluated`` (after an in-training evaluation updated the best
record), ``checkpointed`` (after a resume checkpoint was written), ``eval-run`` (after an
evaluation run's result was kept), ``write:<file name>`` (inside an atomic write, after the
temporary file is complete and before it replaces ``<file name>``; e.g. ``write:state.pt:2``).
Unset (the normal case), `kill_point` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "SIDA_KILL_AT"
SIGNAL_ENV = "SIDA_KILL_SIGNAL"
RANK_ENV = "SIDA_KILL_RANK"
SLOW_ENV = "SIDA_SLOW_ITER"
_hits: dict[str, int] = {}


def _wanted(spec: str, name: str) -> int | None:
    """The hit count at which `spec` (NAME[:N], comma-separated) fires at `name`, or None."""
    for item in spec.split(","):
        want, _, nth = item.rpartition(":") if item.rsplit(":", 1)[-1].isdigit() else (item, "", "1")
        if want == name:
            return int(nth)
    return None


def kill_point(name: str) -> None:
    """Signal this process if `SIDA_KILL_AT` names this point and its count is reached."""
    spec = os.environ.get(ENV)
    if name == "iteration" and os.environ.get(SLOW_ENV):
        time.sleep(float(os.environ[SLOW_ENV]))
    if not spec:
        return
    nth = _wanted(spec, name)
    if nth is None:
        return
    rank = os.environ.get(RANK_ENV)
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == nth:
        sig = os.environ.get(SIGNAL_ENV, "KILL").upper().removeprefix("SIG")
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
