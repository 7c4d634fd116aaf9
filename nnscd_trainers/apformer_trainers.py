"""APFormer trainers: nnU-Net's pipeline with the APFormer network (nnscd/networks/apformer.py), 2d and 3d_fullres.

- `APFormerTrainer`: APFormer from the plans' patch size; Dice + CE plus APFormer's auxiliary terms (SSA and the
  foreground head of query pruning); AdamW with a warm-up, then poly decay, computed from the epoch; the
  pruning rates of every validation pass logged, printed and drawn in `pruning_progress.png`.
- `APFormerNoPruneTrainer`: the ablation baseline, only the network builder differs (no QP, no DP).
- `*_cpu`, `*_budget`, `*_steps100`: the same on nnscd's short CPU schedule, on the quality protocol's budget and on
  100 steps of batch 2 (cheap 2D runs).

The network returns one tensor, so deep supervision is off (loss and data loader alike) and nnU-Net's
`train_step` runs unchanged: the auxiliary terms enter through the loss module, which receives the target.
"""
import math
import os
from typing import Callable, List

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from nnscd.networks.apformer import BOTTLENECK_STRIDE, APFormer, apformer_aux_loss, build_apformer, \
    build_apformer_noprune
from nnscd.core.device import unwrap
from nnscd.core.nnunet_hooks import add_log_series
from nnscd.core.progress_plots import plot_per_epoch
from nnscd_trainers.keep_statistics import foreground_mask
from nnscd_trainers.nnscd_trainer import (BUDGET_BATCH, BUDGET_SCHEDULE, CPU_SCHEDULE, STEPS100_BATCH, STEPS100_SCHEDULE,
                                          SMOKE_SCHEDULE, WarmupPolyLR, nnScdTrainer)
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

# Auxiliary loss weights: small beside Dice + CE (about 1 at init). SSA (about 0.05 at init) is a regulariser; the
# foreground BCE (about 0.7 at init) is all the foreground head learns from, and at 0.1 QP prunes a third to half of
# the validation queries after the 50 steps of the CPU schedule. No sparsity term: the DP gate learns from the
# segmentation loss (straight-through), and DP changes accuracy, not speed.
SSA_WEIGHT = 0.1
FG_WEIGHT = 0.1
SPARSITY_WEIGHT = 0.0

PRUNING_KEYS = ("qp_pruned_fraction", "dp_pruned_fraction")  # logged once per epoch, from the validation pass


class DiceCEWithAPFormerAux(nn.Module):
    """nnU-Net's Dice + CE, plus `apformer_aux_loss` after training forwards.

    Validation forwards (eval mode) have no SSA and are scored by Dice + CE alone, so nnU-Net's val_loss stays the
    task loss. The network is reached through a callable (it may be wrapped by DDP or torch.compile later).
    """

    def __init__(self, seg_loss: nn.Module, network: Callable[[], APFormer], label_manager: LabelManager,
                 ssa_weight: float, fg_weight: float, sparsity_weight: float):
        super().__init__()
        self.seg_loss = seg_loss
        self.network, self.label_manager = network, label_manager
        self.ssa_weight, self.fg_weight, self.sparsity_weight = ssa_weight, fg_weight, sparsity_weight

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        loss = self.seg_loss(output, target)
        net = self.network()
        if not net.training:
            return loss
        return loss + apformer_aux_loss(net, foreground_mask(target, self.label_manager), self.ssa_weight,
                                        self.fg_weight, self.sparsity_weight)

    def extra_repr(self) -> str:
        return f"ssa_weight={self.ssa_weight}, fg_weight={self.fg_weight}, sparsity_weight={self.sparsity_weight}"


def _configuration_names(plans_manager: PlansManager, configuration_manager: ConfigurationManager) -> List[str]:
    return [name for name in plans_manager.available_configurations
            if plans_manager.get_configuration(name).configuration == configuration_manager.configuration]


def check_patch_size(plans_manager: PlansManager, configuration_manager: ConfigurationManager) -> tuple:
    """The plans' patch size if APFormer can take it (2 or 3 axes, each a multiple of 8); else a ValueError that
    names the plans, the configuration, the patch and the fix."""
    patch = tuple(int(s) for s in configuration_manager.patch_size)
    if len(patch) in (2, 3) and all(s % BOTTLENECK_STRIDE == 0 for s in patch):
        return patch
    where = (f"configuration {'/'.join(_configuration_names(plans_manager, configuration_manager)) or '?'} of plans "
             f"'{plans_manager.plans_name}' ({plans_manager.dataset_name})")
    if len(patch) not in (2, 3):
        raise ValueError(f"APFormer is 2D or 3D, but {where} has patch_size {list(patch)}; use a 2d or 3d "
                         f"configuration")
    fixed = [math.ceil(s / BOTTLENECK_STRIDE) * BOTTLENECK_STRIDE for s in patch]
    raise ValueError(
        f"APFormer needs every patch side divisible by {BOTTLENECK_STRIDE} (three stride-2 stages down to its "
        f"transformer), but {where} has patch_size {list(patch)}. Fix: set that configuration's patch_size to "
        f"{fixed} in $nnUNet_preprocessed/{plans_manager.dataset_name}/{plans_manager.plans_name}.json - best in a "
        f"copy saved as e.g. {plans_manager.plans_name}APFormer.json with \"plans_name\" set to that name, then "
        f"train with `-p {plans_manager.plans_name}APFormer`. The patch size does not change preprocessing, so the "
        f"preprocessed data is reused.")


class APFormerTrainer(nnScdTrainer):
    """APFormer (CNN U-Net with a pruned GRPE/SSA transformer at 1/8 resolution) in nnU-Net, 2d and 3d_fullres.

    Recipe: AdamW (lr 3e-3, weight decay 1e-2, none on norms, biases, gates, widths and position tables), linear
    warm-up over the first 5% of epochs, then poly decay, a function of `current_epoch` so `--c` resumes it;
    nnU-Net's train_step (gradient clipping at 12, fp16 autocast + GradScaler on cuda; attention softmax in fp32).
    AdamW, not nnU-Net's SGD: on the CPU schedule both segment equally well, but under SGD the attention barely
    moves from its init (DP's pruned share 0.36-0.42, about 0.4 at init; AdamW 0.89-0.97); lr 1e-3 was too slow
    for 50 steps (test Dice 0.73-0.90 against 0.90-0.95). Measurements: documentation/apformer.md.
    """
    builder = staticmethod(build_apformer)  # (in_channels, classes, patch) -> APFormer

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # one output: plain Dice + CE, full-resolution targets only
        self.initial_lr = 3e-3
        self.weight_decay = 1e-2
        self.warmup_fraction = 0.05
        for key in PRUNING_KEYS:  # stored in checkpoints with nnU-Net's own series; reach wandb through logger.log
            add_log_series(self, key)

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """`builder` at the plans' patch size (the predictor calls only this; APFormer has no deep supervision)."""
        patch = check_patch_size(plans_manager, configuration_manager)
        return cls.builder(num_input_channels, num_output_channels, patch)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """APFormer has a single output."""

    def _apformer(self) -> APFormer:
        return unwrap(self.network)

    def _build_loss(self) -> nn.Module:
        return DiceCEWithAPFormerAux(super()._build_loss(), self._apformer, self.label_manager,
                                     SSA_WEIGHT, FG_WEIGHT, SPARSITY_WEIGHT)

    @property
    def warmup_epochs(self) -> int:
        return max(1, round(self.warmup_fraction * self.num_epochs))

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.network.named_parameters():  # decay would pull DP gates and GRPE log-widths to 0
            (no_decay if p.ndim <= 1 or "rel_tables" in name else decay).append(p)
        optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                      lr=self.initial_lr, weight_decay=self.weight_decay,
                                      fused=self.device.type == "cuda")
        return optimizer, WarmupPolyLR(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)

    def validation_step(self, batch: dict) -> dict:
        out = super().validation_step(batch)
        aux = self._apformer().aux  # of this batch's forward, in eval mode: QP really drops queries
        out["qp_pruned_fraction"] = aux.qp_pruned_fraction.item()
        out["dp_pruned_fraction"] = aux.dp_pruned_fraction.float().cpu().numpy()  # (depth,)
        return out

    def on_validation_epoch_end(self, val_outputs: List[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        qp = [o["qp_pruned_fraction"] for o in val_outputs]
        dp = [o["dp_pruned_fraction"] for o in val_outputs]
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (qp, dp))
            qp, dp = [q for g in gathered for q in g[0]], [d for g in gathered for d in g[1]]
        qp_mean, dp_layers = float(np.mean(qp)), np.mean(np.stack(dp), 0).astype(float)
        self.logger.log("qp_pruned_fraction", qp_mean, self.current_epoch)
        self.logger.log("dp_pruned_fraction", float(dp_layers.mean()), self.current_epoch)
        self.print_to_log_file(f"Pruned in validation (eval mode): queries {qp_mean:.4f}, dependencies "
                               f"{dp_layers.mean():.4f} (per layer {np.round(dp_layers, 4).tolist()})")

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        if self.local_rank == 0:
            self.plot_pruning_progress()

    def plot_pruning_progress(self) -> None:
        """`pruning_progress.png` beside nnU-Net's progress.png: pruning rates and pseudo Dice per epoch."""
        log = self.logger.get_value
        epochs = len(log("qp_pruned_fraction", None))
        plot_per_epoch({"queries pruned (QP)": log("qp_pruned_fraction", None),
                        "dependencies pruned (DP, mean over layers)": log("dp_pruned_fraction", None),
                        "pseudo Dice (mov. avg.)": log("ema_fg_dice", None)[:epochs]},
                       os.path.join(self.output_folder, "pruning_progress.png"),
                       f"{self.__class__.__name__}: validation batches, eval mode", "fraction")


class APFormerNoPruneTrainer(APFormerTrainer):
    """The ablation baseline: APFormer without query and dependency pruning (SSA and GRPE stay)."""
    builder = staticmethod(build_apformer_noprune)


class APFormerTrainer_cpu(APFormerTrainer):
    """APFormerTrainer on the short CPU schedule."""
    schedule = CPU_SCHEDULE


class APFormerNoPruneTrainer_cpu(APFormerNoPruneTrainer):
    """APFormerNoPruneTrainer on the short CPU schedule."""
    schedule = CPU_SCHEDULE


class APFormerTrainer_smoke(APFormerTrainer):
    """Two short epochs, to check that a setup trains end to end."""
    schedule = SMOKE_SCHEDULE


class APFormerTrainer_budget(APFormerTrainer):
    """APFormerTrainer on the budget of the CPU Hippocampus comparison."""
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class APFormerNoPruneTrainer_budget(APFormerNoPruneTrainer):
    """APFormerNoPruneTrainer on the budget of the CPU Hippocampus comparison."""
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class APFormerTrainer_steps100(APFormerTrainer):
    """5 epochs x 20 iterations at batch 2: cheap 2D runs (the test suite's 2D check)."""
    schedule, batch_size_override = STEPS100_SCHEDULE, STEPS100_BATCH
