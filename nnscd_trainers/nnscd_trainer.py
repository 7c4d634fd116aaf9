"""The base of every nnscd trainer: nnU-Net's trainer with outputs a kill cannot corrupt."""
from typing import Optional, Tuple

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnscd.atomic_plans_manager import AtomicWritePlansManager
from nnscd.safe_io import atomic_path

# (epochs, training iterations per epoch, validation iterations per epoch): minutes on a 2-core CPU
CPU_SCHEDULE = (5, 10, 5)
# The short budget that every trainer of the CPU Hippocampus comparison gets (documentation/results)
BUDGET_SCHEDULE = (10, 25, 10)


class nnScdTrainer(nnUNetTrainer):
    """nnUNetTrainer with atomic checkpoints and validation exports, and a resumable checkpoint every epoch.

    nnU-Net writes `checkpoint_latest.pth` every 50 epochs and with a plain `torch.save`; a killed job then
    resumes up to 49 epochs back, or from a truncated file. Here every epoch ends with a checkpoint written
    beside the target and renamed over it, so `--c` resumes from the last finished epoch.

    Variants set `schedule` (see CPU_SCHEDULE) instead of repeating an `__init__`.
    """
    schedule: Optional[Tuple[int, int, int]] = None  # None keeps nnU-Net's 1000 x 250 (50 validation)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.plans_manager = AtomicWritePlansManager(self.plans_manager.plans)
        self.save_every = 1
        if self.schedule is not None:
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = self.schedule

    def save_checkpoint(self, filename: str) -> None:
        with atomic_path(filename) as tmp:
            super().save_checkpoint(tmp)  # writes nothing off rank 0 or with checkpointing disabled


class nnScdTrainer_cpu(nnScdTrainer):
    """nnU-Net's U-Net on a short schedule: for trying the whole workflow on a CPU."""
    schedule = CPU_SCHEDULE


class nnScdTrainer_budget(nnScdTrainer):
    schedule = BUDGET_SCHEDULE
