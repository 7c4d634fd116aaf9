"""Token-sparse Primus trainers on nnU-Net's own Primus recipe, and nnscd twins of nnunetv2's dense Primus trainers.

`STPMTAPrimusV3{S,B,M,L}Trainer` inherit nnunetv2's `nnUNet_PrimusV3{S,B,M,L}_Trainer` (and with it `AbstractPrimus`:
AdamW 3e-4, betas (0.9, 0.98), linear warm-up of the whole net, then poly, gradient clipping at 1, no deep
supervision) and change what sparsity needs: the network, `TokenSparsePrimus` with STP stages and MTA, and the
foreground prior its scorers learn from (an auxiliary loss in training only). Their dense twin is nnunetv2's trainer
itself, unchanged; `PrimusV3{S,B}Trainer_*` are that trainer on nnscd's schedules (same atomic per-epoch
checkpoints, seeding and final-validation predictor as the sparse one, so a comparison differs only in the sparse
network and its prior).

Warm start: `nnScd_train ... -tr STPMTAPrimusV3STrainer -pretrained_weights FOLD/checkpoint_final.pth` of a dense
Primus fold loads every Primus module; only the scorers and MTA start fresh (nnscd.core.pretrained_weights).
"""
import dataclasses

import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import (AbstractPrimus, nnUNet_PrimusV3B_Trainer,
                                                                     nnUNet_PrimusV3L_Trainer, nnUNet_PrimusV3M_Trainer,
                                                                     nnUNet_PrimusV3S_Trainer)
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnscd.networks.token_sparse_primus import LIGHT, PRIMUS_TOKEN, SparsePrimusConfig, TokenSparsePrimus
from nnscd.core.token_planning import TokenPlan, plan_tokens
from nnscd_trainers.foreground_prior import ForegroundPrior
from nnscd_trainers.keep_statistics import KeepStatistics
from nnscd_trainers.keep_warmup import KeepWarmup
from nnscd_trainers.nnscd_trainer import (BUDGET2X_SCHEDULE, BUDGET_BATCH, BUDGET_SCHEDULE, CPU_SCHEDULE,
                                          SMOKE_SCHEDULE, equal_compute_schedule, nnScdTrainer)

NNUNET_WARMUP_SHARE = 50 / 1000  # AbstractPrimus: 50 warm-up epochs of 1000


class nnScdPrimusTrainer(nnScdTrainer, AbstractPrimus):
    """nnU-Net's Primus recipe with nnscd's checkpoints, seeding and schedules. A shortened schedule keeps nnU-Net's
    warm-up share (5% of the epochs) instead of spending all of a short run warming up, but at least two epochs:
    nnU-Net's linear warm-up reaches the full rate in its last epoch, so one epoch would be no warm-up at all.
    Patches are rounded up to multiples of Primus' 8^3 token (nnunetv2's own trainers crash on others)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.warmup_duration_whole_net = max(2, round(NNUNET_WARMUP_SHARE * self.num_epochs))

    @classmethod
    def token_plan(cls, configuration: dict) -> TokenPlan:
        return plan_tokens(configuration["patch_size"], configuration["spacing"], configuration["batch_size"],
                           tokens=PRIMUS_TOKEN)


class TokenSparsePrimusTrainer(ForegroundPrior, KeepStatistics, KeepWarmup, nnScdPrimusTrainer):
    """Builds `TokenSparsePrimus` of `size`; variants change `config_changes` (fields of SparsePrimusConfig).

    The scorers learn the foreground prior by default: without it they pruned the foreground (0.9% of it kept after
    block 3 of PrimusV3-S, chance 25%), and it raised Dice in every run (+0.5 points for PrimusV3-S at the budget,
    +3.2 for the light network at equal compute, both paired intervals above 0; documentation/trainers.md). The
    `_noprior` variants train without it."""
    size = "S"
    config_changes: dict = {}
    foreground_prior = 1.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.prunes():
            self.track_keep_statistics()

    @classmethod
    def prunes(cls) -> bool:
        return cls.network_config().sparse

    @classmethod
    def network_config(cls) -> SparsePrimusConfig:
        return dataclasses.replace(SparsePrimusConfig(size=cls.size), **cls.config_changes)

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return TokenSparsePrimus(num_input_channels, num_output_channels, configuration_manager.patch_size,
                                 cls.network_config())


class STPMTAPrimusV3STrainer(TokenSparsePrimusTrainer, nnUNet_PrimusV3S_Trainer):
    """PrimusV3-S with STP after Eva blocks 3 and 6 (25% of the tokens live, then 6.25%), MTA and the foreground
    prior."""
    size = "S"


class STPMTAPrimusV3BTrainer(TokenSparsePrimusTrainer, nnUNet_PrimusV3B_Trainer):
    size = "B"


class STPMTAPrimusV3MTrainer(TokenSparsePrimusTrainer, nnUNet_PrimusV3M_Trainer):
    size = "M"


class STPMTAPrimusV3LTrainer(TokenSparsePrimusTrainer, nnUNet_PrimusV3L_Trainer):
    size = "L"


class STPMTAPrimusLightTrainer(TokenSparsePrimusTrainer):
    """The light network on Primus' recipe: one-conv patch stem, 6 Eva blocks 192 wide, Primus' patch decoder, STP
    after blocks 2 and 4 keeping 50% each, MTA. 16-18x cheaper per iteration than nnU-Net's U-Net on Hippocampus;
    at the 10 x 25 budget its dense twin still predicts background (documentation/results/hippocampus.md)."""
    size, config_changes = LIGHT["size"], LIGHT


class PrimusLightTrainer(TokenSparsePrimusTrainer):
    """The dense twin of STPMTAPrimusLightTrainer (no pruning, no MTA); nnunetv2 has no trainer of this size."""
    size, config_changes = LIGHT["size"], {**LIGHT, "prune_after": (), "keep_ratios": ()}
    foreground_prior = 0.0  # no scorers to teach


class STPMTAPrimusV3STrainer_keep50(STPMTAPrimusV3STrainer):
    """Gentler pruning: 50% then 25% of the tokens stay live."""
    config_changes = {"keep_ratios": (0.5, 0.5)}


class STPMTAPrimusV3STrainer_keep1(STPMTAPrimusV3STrainer):
    """The control against nnU-Net's PrimusV3-S: the sparse network (scorers learning the prior, MTA) with every
    token kept; the centered estimate gives the scorers no top-K gradient. Against the dense twin it measures what
    the added modules and the prior's loss cost, against STPMTAPrimusV3STrainer what pruning costs."""
    config_changes = {"keep_ratios": (1.0, 1.0), "estimator": "perturbed_centered"}


class STPMTAPrimusV3STrainer_late(STPMTAPrimusV3STrainer):
    """Later pruning: STP after Eva blocks 6 and 9 (of 12), so every token passes half the encoder before any is
    pruned; at the budget the keep-1 control put 2 of the sparse network's 2.9 points on pruning after blocks 3, 6."""
    config_changes = {"prune_after": (6, 9)}


class STPMTAPrimusV3STrainer_straightthrough(STPMTAPrimusV3STrainer):
    """Kept and pruned tokens reach the decoder unscaled in training, as at inference; the soft top-K indicators
    reach the scorers through their gradient only. After block 6 the 6.25% cut runs through the foreground (36% of
    it kept), so the default scales foreground tokens near the cut by about half in training and never at
    inference."""
    config_changes = {"straight_through": True}


class STPMTAPrimusV3STrainer_hard(STPMTAPrimusV3STrainer):
    """Hard top-K in training too: no token scaled, no top-K gradient; the scorers learn from the foreground prior
    alone. Pruning is then the only difference from the keep-1 control, whose every token is live."""
    config_changes = {"estimator": "hard"}


class STPMTAPrimusV3STrainer_context(STPMTAPrimusV3STrainer):
    """Pruned tokens stay keys and values of every later Eva block, frozen as they were pruned: the live tokens
    attend to the whole grid, as in the keep-1 control, while only they are updated. By default the 11 tokens live
    after block 6 of Hippocampus' 175 attend to each other only."""
    config_changes = {"context_tokens": True}


class STPMTAPrimusV3STrainer_keepwarmup(STPMTAPrimusV3STrainer):
    """EViT's keep-ratio curriculum: every token live in epoch 0, the keep ratios reached by a cosine at 40% of the
    epochs (nnscd_trainers.keep_warmup); inference keeps 25% then 6.25% as STPMTAPrimusV3STrainer."""
    keep_warmup = 0.4


class STPMTAPrimusV3STrainer_noprior(STPMTAPrimusV3STrainer):
    """Without the foreground prior: the scorers learn only through STP's soft top-K."""
    foreground_prior = 0.0


class STPMTAPrimusV3STrainer_noprior_cumulative(STPMTAPrimusV3STrainer_noprior):
    """Every token weighted by the product of all its soft indicators after eva.norm (not only the last decision)."""
    config_changes = {"cumulative_weights": True}


class STPMTAPrimusLightTrainer_noprior(STPMTAPrimusLightTrainer):
    """The light sparse network without the foreground prior."""
    foreground_prior = 0.0


class STPMTAPrimusV3STrainer_noMTA(STPMTAPrimusV3STrainer):
    """Ablation: no completion attention; pruned positions are decoded from the features they were pruned with."""
    config_changes = {"mta": False}


# schedule variants (nnscd_trainer: CPU_SCHEDULE to try the workflow, BUDGET_* the quality protocol's budget)
class STPMTAPrimusV3STrainer_cpu(STPMTAPrimusV3STrainer):
    schedule = CPU_SCHEDULE


class STPMTAPrimusV3STrainer_smoke(STPMTAPrimusV3STrainer):
    schedule = SMOKE_SCHEDULE


class STPMTAPrimusV3STrainer_budget(STPMTAPrimusV3STrainer):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTAPrimusV3STrainer_keep50_budget(STPMTAPrimusV3STrainer_keep50):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTAPrimusV3STrainer_keep1_budget(STPMTAPrimusV3STrainer_keep1):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTAPrimusV3STrainer_late_budget(STPMTAPrimusV3STrainer_late):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTAPrimusV3STrainer_straightthrough_budget(STPMTAPrimusV3STrainer_straightthrough):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTAPrimusV3STrainer_hard_budget(STPMTAPrimusV3STrainer_hard):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTAPrimusV3STrainer_context_budget(STPMTAPrimusV3STrainer_context):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTAPrimusV3STrainer_keepwarmup_budget(STPMTAPrimusV3STrainer_keepwarmup):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTAPrimusV3STrainer_noprior_budget(STPMTAPrimusV3STrainer_noprior):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTAPrimusV3STrainer_noprior_cumulative_budget(STPMTAPrimusV3STrainer_noprior_cumulative):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class PrimusV3STrainer_cpu(nnScdPrimusTrainer, nnUNet_PrimusV3S_Trainer):
    """nnunetv2's dense PrimusV3-S trainer on nnscd's CPU schedule: the twin of STPMTAPrimusV3STrainer_cpu."""
    schedule = CPU_SCHEDULE


class PrimusV3STrainer_budget(nnScdPrimusTrainer, nnUNet_PrimusV3S_Trainer):
    """nnunetv2's dense PrimusV3-S trainer on the quality protocol's budget."""
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTAPrimusV3STrainer_budget2x(STPMTAPrimusV3STrainer):
    schedule, batch_size_override = BUDGET2X_SCHEDULE, BUDGET_BATCH


class PrimusV3STrainer_budget2x(nnScdPrimusTrainer, nnUNet_PrimusV3S_Trainer):
    schedule, batch_size_override = BUDGET2X_SCHEDULE, BUDGET_BATCH


class PrimusV3BTrainer_budget(nnScdPrimusTrainer, nnUNet_PrimusV3B_Trainer):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTAPrimusV3BTrainer_budget(STPMTAPrimusV3BTrainer):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTAPrimusLightTrainer_budget(STPMTAPrimusLightTrainer):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class PrimusLightTrainer_budget(PrimusLightTrainer):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTAPrimusLightTrainer_cpu(STPMTAPrimusLightTrainer):
    schedule = CPU_SCHEDULE


class PrimusLightTrainer_cpu(PrimusLightTrainer):
    schedule = CPU_SCHEDULE


# equal compute: the U-Net's budget time (nnscd_trainer.equal_compute_schedule; seconds per iteration measured without
# the foreground prior, which costs no measurable step time: benchmark_hippocampus_steps_fgprior_cpu.json)
class STPMTAPrimusV3STrainer_equalcompute(STPMTAPrimusV3STrainer):
    schedule, batch_size_override = equal_compute_schedule(6.186), BUDGET_BATCH  # 11 epochs x 25


class STPMTAPrimusLightTrainer_equalcompute(STPMTAPrimusLightTrainer):
    schedule, batch_size_override = equal_compute_schedule(0.366), BUDGET_BATCH  # 180 epochs x 25


class STPMTAPrimusLightTrainer_noprior_equalcompute(STPMTAPrimusLightTrainer_noprior):
    schedule, batch_size_override = STPMTAPrimusLightTrainer_equalcompute.schedule, BUDGET_BATCH  # the same time


class PrimusLightTrainer_equalcompute(PrimusLightTrainer):
    schedule, batch_size_override = equal_compute_schedule(0.412), BUDGET_BATCH  # 160 epochs x 25
