"""Writes that a kill cannot leave half done: write beside the target, then rename over it."""
import csv
import errno
import json
import os
import shutil
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional, Sequence

from nnscd.core.errors import UserError

PARTIAL_PREFIX = ".partial_"
DISK_ERRORS = {errno.ENOSPC: "its disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied"}
NEARLY_FULL_BYTES = 1 << 20


def _disk_errno(error: BaseException) -> Optional[int]:
    """The disk errno of `error` or of an error it came from (a worker's, a library's), if any."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_ERRORS:
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def write_failure(folder: Optional[str], error: BaseException, atomic: bool = True) -> Optional[UserError]:
    """A UserError naming `folder` and the fix if writing there failed for a full disk, a quota or a folder that
    cannot be written; None when `error` has another cause (re-raise it as it is).

    Libraries that write from C (torch's zip writer, blosc2, SimpleITK) raise a RuntimeError without the errno;
    then the folder itself says why: no write access, or (almost) no free bytes left.
    """
    code = _disk_errno(error)
    reason = DISK_ERRORS[code] if code is not None else None
    if reason is None and atomic and folder and os.path.isdir(folder):  # only where a write of nnscd's was under way
        free = shutil.disk_usage(folder).free
        reason = ("it cannot be written (read-only file system or no permission)" if not os.access(folder, os.W_OK)
                  else f"its disk is full ({free} bytes free)" if free < NEARLY_FULL_BYTES else None)
    if reason is None:
        return None
    left = "nothing half-written was left, and finished work is kept" if atomic else "finished work is kept"
    where = f"in {folder}" if folder else "a file"
    return UserError(f"cannot write {where}: {reason} ({type(error).__name__}: {str(error)[:200]}). Free space "
                     f"there (or make it writable, or point nnUNet_preprocessed / nnUNet_results / -o at another disk) "
                     f"and rerun the same command: {left} (nnScd_train resumes with --c, nnScd_predict with "
                     f"--continue_prediction).")


def disk_write_failure(error: OSError) -> Optional[UserError]:
    """write_failure for an OSError raised by a write outside nnscd (nnU-Net's JSON, logs, plots), by its errno;
    the folder is the one the error names, if it names one."""
    if _disk_errno(error) is None:
        return None
    path = error.filename
    return write_failure(path and (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))), error,
                         atomic=False)


@contextmanager
def disk_errors_explained(folder: str, atomic: bool = True) -> Iterator[None]:
    """Writes into `folder` in the block: a failure for a full disk or a folder that cannot be written becomes
    write_failure's UserError; other errors, and UserErrors already raised, pass unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        failure = write_failure(folder, error, atomic)
        if failure is None:
            raise
        raise failure from error


@contextmanager
def atomic_path(final_path: str) -> Iterator[str]:
    """Yield a temporary path in the target's folder; if the block succeeds and wrote it, rename it to `final_path`.

    Works for a folder too (a dataset written whole into the temporary path), as long as `final_path` is absent.

    The prefix keeps the file ending, so writers that pick the format from it (SimpleITK) still work, and the
    leading dot keeps the partial file out of nnU-Net's folder listings.
    A full disk or a folder that cannot be written raises write_failure's UserError, naming the folder.
    """
    folder, name = os.path.split(os.path.abspath(final_path))
    tmp = os.path.join(folder, f"{PARTIAL_PREFIX}{os.getpid()}_{name}")
    try:
        with disk_errors_explained(folder):  # before the partial file is removed: it holds the missing space
            yield tmp
            if os.path.exists(tmp):
                os.replace(tmp, final_path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


def make_parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_json(path: str, content: Any, indent: int = 2) -> None:
    """`content` as JSON at `path` (its folder made if needed), atomically."""
    make_parent(path)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(content, f, indent=indent)


def write_csv(path: str, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
    """Rows as CSV with the columns `fields` (other keys left out), atomically."""
    make_parent(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
