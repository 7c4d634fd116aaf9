"""Forked child processes that end with the process that forked them.

nnU-Net's augmentation workers (batchgenerators' daemon processes, forked) end when their trainer exits normally,
but a trainer killed with SIGKILL (a rank torchrun or a cluster ends, an out-of-memory kill) leaves them running
for ever, waiting to put batches into a queue nobody reads. Linux can deliver a signal to a process when its
parent dies (prctl PR_SET_PDEATHSIG); every child forked after `end_forked_children_with_this_process()` asks for
SIGTERM. Spawned processes (nnU-Net's export and preprocessing pools) are not forked this way and end on their own
when their parent's pipes close.
"""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_forking_pid = 0  # the pid of the process that forks, set just before each fork
_installed = False


def _remember_forking_process() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _end_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != _forking_pid:  # the parent died between the fork and prctl: the signal will never come
        os._exit(1)


def end_forked_children_with_this_process() -> None:
    """From now on, every process forked by this one (or by its children) gets SIGTERM when its parent dies.
    Idempotent; nothing to do off Linux."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(before=_remember_forking_process, after_in_child=_end_with_parent)
    _installed = True
