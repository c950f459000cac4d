"""Atomic file writes: write to a temp file beside the target, then rename.

A killed job therefore leaves either the previous file or the new one, never half of one,
which is what lets every stage resume and keeps earlier results intact. A failed write (disk
full, read-only file system, a file where a directory should be) removes its temp file and
raises `FileSystemError` with one line naming the target, the cause and the fix.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import FileSystemError, describe_os_error
from .killpoint import kill_point

_TMP_MARK = ".tmp-"


def _remove_stale_temps(path: Path, suffix: str) -> None:
    """Temp files of `path` left by killed writers on this host (their pid is gone)."""
    for old in path.parent.glob(f".{path.name}{_TMP_MARK}*{suffix}"):
        pid = old.name[len(path.name) + 1 + len(_TMP_MARK):len(old.name) - len(suffix) or None]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            old.unlink(missing_ok=True)
        except OSError:
            pass  # alive under another user: leave it alone


@contextmanager
def atomic_write(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto `path` on success."""
    path = Path(path)
    # Same directory as the target, so os.replace is a rename on one file system.
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        kill_point(f"write:{path.name}")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FileSystemError(describe_os_error(exc, path, "write")) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _remove_stale_temps(path, suffix)


def atomic_save_torch(obj: Any, path: str | Path) -> None:
    """`torch.save` to `path` atomically."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:
            # torch's zip writer reports a failed write (disk full, file too large) as
            # "[enforce fail ...] unexpected pos": the OSError from our file object is its context.
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
