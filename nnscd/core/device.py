"""Device helpers shared by the trainers, the predictor and the tools."""
import os
from typing import Optional

import torch
from torch import nn

from nnscd.core.errors import UserError
from nnscd.core.paths import settle_environment


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a wall-clock time covers it; nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def unwrap(network: nn.Module) -> nn.Module:
    """The network itself, under DDP and torch.compile wrappers."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


def prepare_run(device: Optional[str] = None) -> None:
    """Settle nnU-Net's environment for a run on `device` ("cuda", "cpu" or None when the command takes none);
    UserError for a CUDA run on a machine without CUDA, before any work starts."""
    settle_environment(cpu=device == "cpu" or not torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA is not available on this machine. Add `-device cpu` (nnU-Net's flag) to run on the CPU.")
