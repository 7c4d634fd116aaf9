"""Locks that keep two runs out of one folder (two trainings of one fold, two predictions into one output folder).

flock locks belong to the open file, so the kernel drops a lock when its process ends, killed or not: no lock is
ever left stuck, and the file a killed run leaves is taken over by the next one.
"""
import fcntl
import os
import socket
import time
from contextlib import contextmanager
from typing import Iterator, List

from nnscd.core.errors import UserError

LOCK_SUFFIX = ".nnscd.lock"


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _try_lock(fd: int, tries: int = 5) -> bool:
    """An exclusive lock on `fd` if no one holds one; a few short retries outlast held_locks' probes of it."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.05 * (attempt + 1))
    return False


@contextmanager
def folder_lock(folder: str, name: str, what: str) -> Iterator[None]:
    """Hold `folder/.NAME.nnscd.lock` while the block runs (the folder is made if needed).

    A second run asking for the same lock gets a UserError naming the folder, `what` runs there and its holder.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f".{name}{LOCK_SUFFIX}")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = os.pread(fd, 200, 0).decode(errors="replace") or "starting"
            os.close(fd)
            raise UserError(f"{folder}: another {what} is running there ({holder}). Wait for it to finish or stop "
                            f"it, then rerun; a killed run leaves no lock behind.") from None
        if _same_file(fd, path):  # else its holder removed it between our open and flock: take the new one
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.write(fd, holder.encode())
        yield
    finally:
        os.unlink(path)  # while still holding it: a run waiting on this file sees it gone and retries
        os.close(fd)


def held_locks(folder: str) -> List[str]:
    """The names of the locks in `folder` that a process holds now (this one's included)."""
    held = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(LOCK_SUFFIX):
            continue
        try:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        except FileNotFoundError:  # released meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(name[1:-len(LOCK_SUFFIX)])
        finally:
            os.close(fd)
    return held
