"""torch.distributed for nnU-Net's trainers: one process per device, on any number of nodes, started by torchrun.

torchrun (env:// rendezvous) sets RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE in every process; nnScd_train
starts the process group from them, nccl on CUDA and gloo on the CPU, with a collective timeout, so that a rank
that died or hangs ends the job instead of leaving the others waiting for ever. nnU-Net itself only spawns
processes on one node of GPUs (run_training's mp.spawn, nccl, cuda:RANK).
"""
import datetime
import os

import torch
import torch.distributed as dist

from nnscd.core.errors import UserError

TIMEOUT_ENV = "nnScd_ddp_timeout_s"
# Longest legitimate wait of one rank for the others: rank 0 unpacking the dataset, writing a checkpoint, or a rank
# predicting more validation cases than the rest. A dead or hung rank ends the job after this.
DEFAULT_TIMEOUT_S = 600


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """The processes of this node."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or a launcher setting its variables) started as one of several."""
    return world_size() > 1


def collective_timeout_s() -> float:
    """Seconds a rank waits in a collective before the job ends ($nnScd_ddp_timeout_s, default 600)."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise UserError(f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds: set it to e.g. "
                        f"{DEFAULT_TIMEOUT_S}, or unset it")
    return seconds


def process_device(device_type: str) -> torch.device:
    """This process's device: the GPU of its local rank on CUDA (one process per GPU of a node), else the CPU."""
    return torch.device("cuda", local_rank()) if device_type == "cuda" else torch.device(device_type)


def start_process_group(device_type: str) -> None:
    """Join the job's process group (nccl on CUDA, gloo on the CPU); UserError when a node has more processes
    than GPUs. Every collective then fails after collective_timeout_s instead of waiting for ever."""
    timeout = collective_timeout_s()
    if device_type == "cuda":
        processes, gpus = local_world_size(), torch.cuda.device_count()
        if processes > gpus:
            raise UserError(f"torchrun starts {processes} processes on this node but {gpus} GPU(s) are visible: "
                            f"one process per GPU (--nproc_per_node {gpus}, or fix CUDA_VISIBLE_DEVICES).")
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout))


def cpu_threads_per_process() -> int:
    """The CPU cores this process may use, shared by the processes of its node (nnU-Net gives each all cores)."""
    return max(1, len(os.sched_getaffinity(0)) // local_world_size())


def is_timeout(error: BaseException) -> bool:
    """True for the error a collective raises when another rank did not answer within the timeout."""
    text = str(error).lower()
    return isinstance(error, (dist.DistBackendError, RuntimeError)) and ("timed out" in text or "timeout" in text)
