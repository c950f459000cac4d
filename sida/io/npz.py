"""Reading `.npz` archives (reference statistics, evaluation caches) without unpickling anything,
with one-line errors of our own: numpy's messages for a bad file end in advice to load it
unsafely (``allow_pickle=``), which must never reach a user."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError, FileSystemError, describe_os_error, is_os_failure, require_file

_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


def _not_an_archive(path: Path) -> str | None:
    """Why `path` is not an .npz archive at all (None when it starts like one)."""
    with open(path, "rb") as f:
        head = f.read(6)
    if not head:
        return "the file is empty"
    if head == _NPY_MAGIC:
        return "a single .npy array, not an .npz archive"
    if head[:4] != _ZIP_MAGIC:
        return "not an .npz archive"
    return None


def load_npz(path: str | Path, what: str, fix: str) -> dict[str, np.ndarray]:
    """Every array of the `.npz` archive at `path`, read with ``allow_pickle=False``.

    Raises `DataError` ``<what> <path> cannot be read: it is corrupt or not an .npz archive
    (<reason>): <fix>``, or `FileSystemError` when the operating system cannot read it.
    """
    path = Path(path)
    require_file(path, what, DataError, fix)
    try:
        reason = _not_an_archive(path)
        if reason is None:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
    except OSError as exc:
        if is_os_failure(exc):  # the OS could not read it: not the file's fault
            raise FileSystemError(describe_os_error(exc, path, "read")) from None
        reason = "a damaged archive"
    except zipfile.BadZipFile:
        reason = "a zip archive cut short (truncated?)" if not zipfile.is_zipfile(path) else "a damaged zip archive"
    except ValueError as exc:
        reason = ("it holds Python objects (pickled data), which are never loaded" if "pickle" in str(exc)
                  else "a damaged array")
    except (EOFError, KeyError, TypeError):
        reason = "a damaged array"
    raise DataError(f"{what} {path} cannot be read: it is corrupt or not an .npz archive ({reason}): {fix}")
