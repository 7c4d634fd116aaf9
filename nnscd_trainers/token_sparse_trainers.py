"""STP+MTA token-sparse ViT trainers and their dense twins (UNETR, ViT with a light decoder).

One family, nnU-Net's pattern: `TokenSparseTrainer` adapts the network of `nnscd.networks.registry` to the plans
and gives it a ViT recipe; each variant changes one class attribute.

Recipe (what ViTs need and nnU-Net's SGD recipe lacks): AdamW, linear warm-up then poly decay, both computed from
`current_epoch` (nnU-Net's checkpoints keep no scheduler state, so `--c` continues the same curve); nnU-Net's
gradient clipping (12), fp16 autocast and GradScaler on CUDA, the same autocast at inference. The network gives
one full-resolution output, so deep supervision is off.
"""
import dataclasses
import os
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnscd.atomic_plans_manager import AtomicWritePlansManager
from nnscd.networks.registry import CONFIGS
from nnscd.networks.token_sparse_vit import TokenSparseSegmenter
from nnscd.progress_plots import plot_per_epoch
from nnscd.token_planning import apply_token_plan, token_plan_for
from nnscd_trainers.nnscd_trainer import BUDGET_BATCH, BUDGET_SCHEDULE, CPU_SCHEDULE, WarmupPolyLR, nnScdTrainer, unwrap


def kept_foreground_share(keep_indices: List[torch.Tensor], target: torch.Tensor,
                          token_size: List[int]) -> np.ndarray:
    """Per pruning stage: the share of foreground tokens (any labelled voxel) that are still kept, over a batch.

    Chance level is the stage's cumulative keep ratio; a scorer that learned where the object is keeps far more.
    """
    pool = F.max_pool3d if target.ndim == 5 else F.max_pool2d
    fg_tokens = pool((target > 0).float(), token_size, token_size).flatten(1)  # (B, L), 1 = foreground token
    if not fg_tokens.any():
        return np.full(len(keep_indices), np.nan)
    return np.array([(torch.gather(fg_tokens, 1, index.cpu()).sum() / fg_tokens.sum()).item()
                     for index in keep_indices])


class TokenSparseTrainer(nnScdTrainer):
    """Trains `nnscd.networks.registry.CONFIGS[network]` with the token size of the plans."""
    network = "stpmta"
    config_changes: dict = {}  # fields of TokenSparseConfig that a variant overrides
    initial_lr_adamw = 1e-3  # the small ViTs; ViT-B (the _paper variants) takes 3e-4
    weight_decay_adamw = 5e-2
    warmup_fraction = 0.05  # of all epochs, at least one

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # Same token rule as nnScd_plan_and_preprocess writes into nnScdPlans; the plans saved with the model
        # (and used by nnScd_predict) carry the result. Rounds the patch up, never crops.
        resolved = self.configuration_manager.configuration
        plan = token_plan_for(resolved)
        if plan.patch_size != list(resolved["patch_size"]):
            self.print_to_log_file(f"Token planning: patch {list(resolved['patch_size'])} -> {plan.patch_size} "
                                   f"(multiple of token size {plan.token_size}), batch {plan.batch_size}")
        apply_token_plan(self.plans_manager.plans["configurations"][configuration], plan)
        self.plans_manager = AtomicWritePlansManager(self.plans_manager.plans)
        self.configuration_manager = self.plans_manager.get_configuration(configuration)
        self.enable_deep_supervision = False
        if self.network_config(plan.token_size).sparse:  # a new key of nnU-Net's logger: kept in checkpoints
            self.logger.local_logger.my_fantastic_logging.setdefault("kept_foreground", [])

    @classmethod
    def network_config(cls, token_size: List[int]):
        return dataclasses.replace(CONFIGS[cls.network], token_size=tuple(token_size), **cls.config_changes)

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        configuration = configuration_manager.configuration
        token_size = configuration.get("token_size") or token_plan_for(configuration).token_size
        return TokenSparseSegmenter(num_input_channels, num_output_channels, configuration_manager.patch_size,
                                    cls.network_config(token_size))

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """The decoder has a single output: nothing to switch."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr_adamw,
                                      weight_decay=self.weight_decay_adamw)
        warmup = max(1, round(self.warmup_fraction * self.num_epochs))
        return optimizer, WarmupPolyLR(optimizer, self.initial_lr_adamw, self.num_epochs, warmup)

    # keep statistics: how often the scorer keeps foreground tokens, measured on validation batches
    def validation_step(self, batch: dict) -> dict:
        result = super().validation_step(batch)
        network = unwrap(self.network)
        if network.config.sparse:
            result["kept_foreground"] = kept_foreground_share(network.last_keep_indices, batch["target"],
                                                              network.token_size)
        return result

    def on_validation_epoch_end(self, val_outputs: List[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        if "kept_foreground" in val_outputs[0]:
            shares = np.nanmean(np.stack([o["kept_foreground"] for o in val_outputs]), axis=0)
            self.logger.log("kept_foreground", [round(float(s), 4) for s in shares], self.current_epoch)
            keep = np.cumprod(unwrap(self.network).config.keep_ratios)
            self.print_to_log_file(f"Foreground tokens kept per pruning stage: {self.logger.get_value('kept_foreground', -1)}"
                                   f" (chance: {[round(float(k), 4) for k in keep]})")


    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        history = self.logger.local_logger.my_fantastic_logging.get("kept_foreground")
        if history and self.local_rank == 0:
            keep = np.cumprod(unwrap(self.network).config.keep_ratios)
            stages = {f"after stage {i + 1}": [h[i] for h in history] for i in range(len(keep))}
            plot_per_epoch(stages, os.path.join(self.output_folder, "token_keep_progress.png"),
                           "Foreground tokens kept by STP (validation batches)", "share of foreground tokens kept",
                           references=dict(zip(stages, keep)))


class STPMTATrainer(TokenSparseTrainer):
    """The paper's network: STP token pruning + MTA token completion + UNETR decoder (small CPU-trainable size)."""
    network = "stpmta"


class UNETRTrainer(TokenSparseTrainer):
    """The dense twin of STPMTATrainer: same ViT and UNETR decoder, no pruning, no MTA."""
    network = "unetr"


class STPMTALightTrainer(TokenSparseTrainer):
    """STP + MTA with the light (Primus-like) patch decoder: the ViT dominates, so sparsity pays the most."""
    network = "stpmta-light"


class ViTLightTrainer(TokenSparseTrainer):
    """The dense twin of STPMTALightTrainer."""
    network = "vit-light"


class STPMTATrainer_paper(STPMTATrainer):
    """ViT-B (768 wide, 12 deep), STP after blocks 3/6/9 keeping 25% each, token 8 along the finest axis."""
    network = "stpmta-paper"
    initial_lr_adamw = 3e-4


class UNETRTrainer_paper(UNETRTrainer):
    network = "unetr-paper"
    initial_lr_adamw = 3e-4


class STPMTALightTrainer_paper(STPMTALightTrainer):
    network = "stpmta-light-paper"
    initial_lr_adamw = 3e-4


class ViTLightTrainer_paper(ViTLightTrainer):
    network = "vit-light-paper"
    initial_lr_adamw = 3e-4


class STPMTATrainer_keep75(STPMTATrainer):
    """Gentler pruning: 75% then 56% of the tokens stay live."""
    config_changes = {"keep_ratios": (0.75, 0.75)}


class STPMTATrainer_keep25(STPMTATrainer):
    """Harder pruning: 25% then 6% of the tokens stay live."""
    config_changes = {"keep_ratios": (0.25, 0.25)}


class STPMTATrainer_gumbel(STPMTATrainer):
    """Ablation: the published code's single-sample Gumbel straight-through estimator instead of soft top-K."""
    config_changes = {"estimator": "gumbel"}


class STPMTATrainer_cpu(STPMTATrainer):
    schedule = CPU_SCHEDULE


class STPMTATrainer_demo(STPMTATrainer):
    """nnScd_demo's trainer: long enough on a CPU for Dice >= 0.5 on both synthetic classes."""
    schedule = (10, 20, 5)


class UNETRTrainer_cpu(UNETRTrainer):
    schedule = CPU_SCHEDULE


class STPMTALightTrainer_cpu(STPMTALightTrainer):
    schedule = CPU_SCHEDULE


class ViTLightTrainer_cpu(ViTLightTrainer):
    schedule = CPU_SCHEDULE


class STPMTATrainer_budget(STPMTATrainer):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class UNETRTrainer_budget(UNETRTrainer):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTALightTrainer_budget(STPMTALightTrainer):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class ViTLightTrainer_budget(ViTLightTrainer):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH
