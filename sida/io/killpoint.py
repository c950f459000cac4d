"""A test hook that kills the process at a named point, so kill-and-resume is tested in every
window of a run deterministically rather than at one random moment.

    SIDA_KILL_AT=NAME[:N]   SIGKILL this process the N-th time (default 1st) it reaches `NAME`

Named points: ``tick`` (after a progress tick and its monitor evaluation), ``evaluated`` (after
an in-training evaluation updated the best record), ``checkpointed`` (after a resume
checkpoint was written), ``write:<file name>`` (inside an atomic write, after the temporary
file is complete and before it replaces ``<file name>``; e.g. ``write:state.pt:2``).
Unset (the normal case), `kill_point` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "SIDA_KILL_AT"
_hits: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process if `SIDA_KILL_AT` names this point and its count is reached."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, nth = spec.rpartition(":") if spec.rsplit(":", 1)[-1].isdigit() else (spec, "", "1")
    if want != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
