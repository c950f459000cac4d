"""User-facing errors.

A `SidaError` carries one line that names the problem and the fix. Stage command lines
catch it and print ``error: <message>`` without a traceback (see `sida.run.cli`), so bad
input never looks like a crash in our code. Operating-system failures (a full disk, a
read-only or missing directory) get the same treatment through `describe_os_error`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class SidaError(Exception):
    """An error caused by input the user can fix (config, files, environment)."""


class ConfigError(SidaError):
    """The experiment config is invalid (wrong type, unknown key, impossible value)."""


class CheckpointError(SidaError):
    """A checkpoint or network file is missing, truncated, corrupt or unsafe."""


class AssetError(SidaError):
    """An asset (teacher, dataset, reference statistics, weights) cannot be obtained."""


class DataError(SidaError):
    """A dataset or statistics file does not have the expected content or shape."""


class FileSystemError(SidaError):
    """An operating-system failure on a file the stage reads or writes (see `describe_os_error`)."""


class NonFiniteError(SidaError):
    """Training produced non-finite values (NaN/inf) beyond the configured budget."""


# errno -> (what happened, what to do). The path is named by `describe_os_error`.
_OS_FIXES = {
    errno.ENOTDIR: ("a part of the path is a file, not a directory",
                    "remove that file or choose another location (--out / results_dir)"),
    errno.EISDIR: ("it is a directory where a file is expected", "remove or rename that directory, or pass a file"),
    errno.EACCES: ("permission denied", "make it accessible to this user or choose another location "
                                        "(--out / results_dir)"),
    errno.EPERM: ("operation not permitted", "make it accessible to this user or choose another location "
                                             "(--out / results_dir)"),
    errno.EROFS: ("the file system is read-only", "write to a writable location (--out / results_dir) or "
                                                  "remount it read-write"),
    errno.ENOSPC: ("no space left on the device", "free space or choose another location (--out / results_dir); "
                                                  "a stage then resumes from its last checkpoint"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or choose another location (--out / results_dir); "
                                                 "a stage then resumes from its last checkpoint"),
    errno.EFBIG: ("the file is larger than the file system or the process's file size limit (ulimit -f) allows",
                  "raise the limit or choose another location (--out / results_dir)"),
    errno.ENOENT: ("no such file or directory",
                   "check the path; if it was moved or deleted while the stage ran, restore it and rerun"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter path"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (ulimit -n) and rerun"),
    errno.EIO: ("an input/output error of the device", "check the disk (dmesg) and rerun"),
    errno.ENOTEMPTY: ("the directory is not empty", "remove what is in it or choose another location"),
    errno.EEXIST: ("it already exists", "remove it or choose another location"),
}


#: errnos that mean the operating system could not read or write a file, as opposed to a
#: reader tripping over a damaged file (which some report as EINVAL from a seek past the end).
_ENVIRONMENT_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EMFILE,
    errno.ENFILE, errno.ESTALE, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG,
    errno.ELOOP, errno.ENOMEM})


def require_file(path: Path, what: str, error: type[SidaError], fix: str,
                 directory_fix: str | None = None) -> None:
    """Raises `error` naming `what` and `path` when `path` is a directory or does not exist:
    the check every reader makes before it opens an input, so the lines read alike."""
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file: {directory_fix or fix}")
    if not path.is_file():
        raise error(f"{what} {path} does not exist: {fix}")


def is_os_failure(exc: BaseException) -> bool:
    """True for an `OSError` caused by the system (permissions, missing path, full disk, ...)."""
    return isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS


def _file_in_the_way(path: Path) -> Path | None:
    """The first ancestor of `path` that exists but is not a directory (for ENOTDIR)."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def describe_os_error(exc: OSError, path: str | os.PathLike | None = None, action: str = "access") -> str:
    """One line for an operating-system failure: the path, the cause and the fix.

    `path` names the file when the error does not (a failed `write` carries no file name);
    `action` is what was being done to it ("write", "read", "access").
    """
    where = exc.filename if exc.filename is not None else path
    cause, fix = _OS_FIXES.get(exc.errno, (exc.strerror or str(exc) or type(exc).__name__,
                                           "fix the file system problem and rerun"))
    if exc.errno == errno.ENOTDIR and where is not None:
        blocker = _file_in_the_way(Path(os.fsdecode(where)))
        if blocker is not None:
            cause = f"{blocker} is a file, not a directory"
    name = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    code = f" [{name}]" if name else ""
    target = f"{os.fsdecode(where)}" if where is not None else "a file"
    if exc.filename2 is not None:
        target += f" -> {os.fsdecode(exc.filename2)}"
    return f"cannot {action} {target}: {cause}{code}: {fix}"


def brief_reason(exc: BaseException) -> str:
    """A library exception's first sentence, for quoting inside our one-line messages.

    Libraries go on after it with advice that is wrong for our users (torch: "If you are seeing
    this error, there is a high likelihood..."; numpy: load it unsafely with allow_pickle=); a
    fixed character cut would pass on half of that advice, so whole sentences only.
    """
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[0].split()) if lines else ""
    if text.startswith("[enforce fail at"):  # torch's C++ prefix: "[enforce fail at file:line] . msg"
        text = text.split("] ", 1)[-1].lstrip(". ")
    first = text.split(". ", 1)[0].rstrip(".") if text else ""
    return first if first else type(exc).__name__


def output_location_problem(path: str | os.PathLike) -> str | None:
    """Why nothing can be written under directory `path` (one line: path, cause, fix), or None.

    Looks at the deepest part of `path` that exists: a file there, a directory this user cannot
    write into, or a read-only file system. For checks before any work starts (the workflow's
    results_dir); a stage finds the same problems when it writes, through `describe_os_error`.
    """
    path = Path(path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    code = None
    if not existing.is_dir():
        code = errno.ENOTDIR
    elif not os.access(existing, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        code = errno.EROFS if read_only else errno.EACCES
    if code is None:
        return None
    return describe_os_error(OSError(code, os.strerror(code), str(path)), action="write under")
