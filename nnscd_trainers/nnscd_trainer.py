"""The base of every nnscd trainer: nnU-Net's trainer with outputs a kill cannot corrupt, reproducible on request."""
import os
import random
from typing import List, Optional, Tuple

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import _LRScheduler

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnscd.core import nnunet_hooks
from nnscd.core.atomic_plans_manager import AtomicWritePlansManager
from nnscd.core.child_processes import end_forked_children_with_this_process
from nnscd.core.distributed import cpu_threads_per_process, process_device
from nnscd.core.predictor import nnScdPredictor
from nnscd.core.safe_io import atomic_path
from nnscd.core.token_planning import TokenPlan, apply_token_plan

# (epochs, training iterations per epoch, validation iterations per epoch): minutes on a 2-core CPU
CPU_SCHEDULE = (5, 10, 5)
# The quality protocol's budget (documentation/results/hippocampus.md): 10 epochs x 25 iterations at the plans' batch,
# where nnU-Net's U-Net learns (at the earlier 100 steps of batch 2 it predicted background). None keeps the plans' batch.
BUDGET_SCHEDULE, BUDGET_BATCH = (10, 25, 5), None
# Twice the budget's iterations: does a gap at the budget close with training? (the same validation, batch, warm-up)
BUDGET2X_SCHEDULE = (20, 25, 5)
# Equal compute, the protocol's second view: the training time nnU-Net's U-Net needs for the budget, converted into a
# trainer's epochs from the seconds per iteration (data loading included) that `nnScd_benchmark -d 4 -c 3d_fullres`
# measured for both on the quiet 2-core CPU (documentation/results/benchmark_hippocampus_steps_cpu.json).
UNET_ITERATION_S = 6.583


def equal_compute_schedule(iteration_s: float) -> tuple[int, int, int]:
    """The budget's schedule with as many epochs of 25 iterations as fit in the U-Net's budget time."""
    epochs, iterations, validation = BUDGET_SCHEDULE
    return round(epochs * UNET_ITERATION_S / iteration_s), iterations, validation


# Two short epochs: checks that a setup (a cluster, torchrun, a SLURM script) trains, checkpoints and validates
SMOKE_SCHEDULE = (2, 4, 2)

# The earlier comparison budget (100 steps of batch 2): too short for 3D quality, cheap and enough for 2D checks.
STEPS100_SCHEDULE, STEPS100_BATCH = (5, 20, 5), 2


def warmup_poly_lr(epoch: int, initial_lr: float, num_epochs: int, warmup_epochs: int,
                   exponent: float = 0.9) -> float:
    """Learning rate of an epoch: linear warm-up to initial_lr over warmup_epochs, then nnU-Net's poly decay."""
    if epoch < warmup_epochs:
        return initial_lr * (epoch + 1) / (warmup_epochs + 1)
    return initial_lr * (1 - (epoch - warmup_epochs) / (num_epochs - warmup_epochs)) ** exponent


class WarmupPolyLR(_LRScheduler):
    """`warmup_poly_lr` of the epoch nnU-Net passes to `step`: nnU-Net's checkpoints keep no scheduler state, so a
    schedule that counted its own steps would restart its warm-up on `--c`; this one continues the same curve."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_epochs: int, warmup: int):
        self.initial_lr, self.max_epochs, self.warmup = initial_lr, max_epochs, warmup
        super().__init__(optimizer)

    def step(self, epoch: Optional[int] = None) -> None:
        epoch = self.last_epoch + 1 if epoch is None else epoch
        self.last_epoch = epoch
        for group in self.optimizer.param_groups:
            group["lr"] = warmup_poly_lr(epoch, self.initial_lr, self.max_epochs, self.warmup)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


SEED_ENV = "nnScd_seed"


def seed_from_environment() -> Optional[int]:
    """The integer in $nnScd_seed, or None when unset (nnU-Net's behaviour: a different run every time)."""
    value = os.environ.get(SEED_ENV, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{SEED_ENV}={value!r} is not an integer: set it to e.g. 0, or unset it") from None


class SeededAugmenter(NonDetMultiThreadedAugmenter):
    """nnU-Net's augmentation workers, each with a fixed seed (nnU-Net passes seeds=None, so every worker reseeds
    numpy from the OS and two runs never see the same patches). The first seed comes from the global numpy RNG,
    which the trainer seeded, so training and validation loaders get different but fixed streams."""

    def __init__(self, data_loader, transform, num_processes: int, *args, seeds: Optional[List[int]] = None,
                 **kwargs):
        first = int(np.random.randint(0, 2 ** 31 - num_processes))
        super().__init__(data_loader, transform, num_processes, *args,
                         seeds=[first + i for i in range(num_processes)], **kwargs)


class nnScdTrainer(nnUNetTrainer):
    """nnUNetTrainer with atomic checkpoints and validation exports, a resumable checkpoint every epoch, and the
    final validation predicted by nnscd's batched predictor.

    nnU-Net writes `checkpoint_latest.pth` every 50 epochs and with a plain `torch.save`; a killed job then
    resumes up to 49 epochs back, or from a truncated file. Here every epoch ends with a checkpoint written
    beside the target and renamed over it, so `--c` resumes from the last finished epoch.

    With `nnScd_seed=N` in the environment, weights, patch sampling and augmentation are seeded: two runs on the
    same machine, with at most one augmentation worker (`nnUNet_n_proc_DA`), give the same losses and model.

    Under torch.distributed (nnScd_train started by torchrun, or with -num_gpus) each process trains on its own
    device, a GPU of its node or the CPU, where nnU-Net assumes GPU number RANK of a single node.

    Variants set `schedule` (see CPU_SCHEDULE) and `batch_size_override` instead of repeating an `__init__`.
    """
    schedule: Optional[Tuple[int, int, int]] = None  # None keeps nnU-Net's 1000 x 250 (50 validation)
    batch_size_override: Optional[int] = None  # None keeps the plans' batch

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        end_forked_children_with_this_process()  # a killed trainer (rank) takes its augmentation workers with it
        self.seed = seed_from_environment()
        if self.seed is not None:  # before nnU-Net builds anything random; folds and DDP ranks get their own
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if distributed else 0
            fold_index = fold if isinstance(fold, int) else 5  # fold 'all'
            seed = int(np.random.SeedSequence([self.seed, fold_index, rank]).generate_state(1)[0] >> 1)
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:  # nnU-Net moved rank r to cuda:r, whatever the node and the requested device
            self.device = process_device(device.type)
            if self.device.type != "cuda":
                self.grad_scaler = None
                torch.set_num_threads(cpu_threads_per_process())  # nnU-Net gives every process all the cores
        self.plans_manager = AtomicWritePlansManager(self.plans_manager.plans)
        self.use_token_plan(configuration)
        self.save_every = 1
        if self.schedule is not None:
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = self.schedule

    def initialize(self) -> None:
        with nnunet_hooks.trainer_ddp_wrapper(self._distributed):
            super().initialize()

    def _distributed(self, network: nn.Module, device_ids: Optional[List[int]] = None) -> DistributedDataParallel:
        """nnU-Net's DDP wrapper on this process's device (device_ids=None on the CPU, where gloo runs)."""
        return DistributedDataParallel(network, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @classmethod
    def token_plan(cls, configuration: dict) -> Optional[TokenPlan]:
        """The patch, token size and batch this trainer trains a resolved configuration with; None: the plans' own.
        Transformer trainers override it; nnScdTrainer.__init__ (use_token_plan) and nnScd_train's checks call it."""
        return None

    def use_token_plan(self, configuration: str) -> None:
        """Train (and save with the model, for nnScd_predict) the configuration with `token_plan`'s patch, token
        size and batch; the patch only ever grows (nnU-Net pads), so nothing is cropped."""
        resolved = self.configuration_manager.configuration
        plan = self.token_plan(resolved)
        if plan is None:
            return
        if plan.patch_size != list(resolved["patch_size"]):
            self.print_to_log_file(f"Token planning: patch {list(resolved['patch_size'])} -> {plan.patch_size} "
                                   f"(multiple of token size {plan.token_size}), batch {plan.batch_size}")
        apply_token_plan(self.plans_manager.plans["configurations"][configuration], plan)
        self.plans_manager = AtomicWritePlansManager(self.plans_manager.plans)
        self.configuration_manager = self.plans_manager.get_configuration(configuration)

    def _set_batch_size_and_oversample(self) -> None:
        if self.batch_size_override is not None:  # nnU-Net reads the batch from the configuration (DDP splits it)
            self.configuration_manager.configuration["batch_size"] = self.batch_size_override
        super()._set_batch_size_and_oversample()

    def get_dataloaders(self):
        if self.seed is None:
            return super().get_dataloaders()
        with nnunet_hooks.trainer_augmenter(SeededAugmenter):
            return super().get_dataloaders()

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's final validation, its sliding window run by nnScdPredictor (same labels; batched where faster)."""
        with nnunet_hooks.trainer_predictor(nnScdPredictor):
            super().perform_actual_validation(save_probabilities)

    def save_checkpoint(self, filename: str) -> None:
        with atomic_path(filename) as tmp:
            super().save_checkpoint(tmp)  # writes nothing off rank 0 or with checkpointing disabled


class nnScdTrainer_cpu(nnScdTrainer):
    """nnU-Net's U-Net on a short schedule: for trying the whole workflow on a CPU."""
    schedule = CPU_SCHEDULE


class nnScdTrainer_smoke(nnScdTrainer):
    """nnU-Net's U-Net for two short epochs: does a setup (torchrun, a cluster, a SLURM script) train end to end?"""
    schedule = SMOKE_SCHEDULE


class nnScdTrainer_budget(nnScdTrainer):
    """nnU-Net's U-Net on the budget of the CPU Hippocampus comparison."""
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH
