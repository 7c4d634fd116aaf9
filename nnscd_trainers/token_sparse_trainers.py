"""STP+MTA token-sparse ViT trainers and their dense twins (UNETR, ViT with a light decoder).

One family, nnU-Net's pattern: `TokenSparseTrainer` adapts the network of `nnscd.networks.registry` to the plans
and gives it a ViT recipe; each variant changes one class attribute.

Recipe (what ViTs need and nnU-Net's SGD recipe lacks): AdamW, linear warm-up then poly decay, both computed from
`current_epoch` (nnU-Net's checkpoints keep no scheduler state, so `--c` continues the same curve); nnU-Net's
gradient clipping (12), fp16 autocast and GradScaler on CUDA, the same autocast at inference. The network gives
one full-resolution output, so deep supervision is off.
"""
import dataclasses
import functools
from typing import List, Mapping, Tuple, Union

import torch
from torch import nn

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnscd.networks.registry import CONFIGS
from nnscd.networks.token_sparse_vit import TokenSparseSegmenter, assembly_of
from nnscd.core.token_planning import TokenPlan, token_plan_for
from nnscd_trainers.foreground_prior import ForegroundPrior
from nnscd_trainers.keep_statistics import KeepStatistics
from nnscd_trainers.keep_warmup import KeepWarmup
from nnscd_trainers.nnscd_trainer import (BUDGET_BATCH, BUDGET_SCHEDULE, CPU_SCHEDULE, SMOKE_SCHEDULE,
                                          WarmupPolyLR, equal_compute_schedule, nnScdTrainer)


@functools.cache
def with_assembly(trainer: type, assembly: str) -> type:
    """`trainer` building its network with `assembly`, under the same name (checkpoints keep naming `trainer`)."""
    return type(trainer.__name__, (trainer,), {"config_changes": {**trainer.config_changes, "assembly": assembly},
                                               "__module__": trainer.__module__})


class TokenSparseTrainer(ForegroundPrior, KeepStatistics, KeepWarmup, nnScdTrainer):
    """Trains `nnscd.networks.registry.CONFIGS[network]` with the token size of the plans."""
    network = "stpmta"
    config_changes: dict = {}  # fields of TokenSparseConfig that a variant overrides
    initial_lr_adamw = 1e-3  # the small ViTs; ViT-B (the _paper variants) takes 3e-4
    weight_decay_adamw = 5e-2
    warmup_fraction = 0.05  # of all epochs, at least one

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        if self.prunes():
            self.track_keep_statistics()

    @classmethod
    def token_plan(cls, configuration: dict) -> TokenPlan:
        """The rule nnScd_plan_and_preprocess writes into nnScdPlans (token size from the spacing)."""
        return token_plan_for(configuration)

    @classmethod
    def prunes(cls) -> bool:
        return cls.network_config((8, 8, 8)).sparse

    @classmethod
    def pruning(cls) -> Tuple[Tuple[float, ...], int]:
        """(keep ratios, min tokens) of the STP stages, for the printed token plan."""
        config = cls.network_config((8, 8, 8))
        return config.keep_ratios, config.min_tokens

    @classmethod
    def network_config(cls, token_size: List[int]):
        return dataclasses.replace(CONFIGS[cls.network], token_size=tuple(token_size), **cls.config_changes)

    @classmethod
    def for_weights(cls, network_weights: Mapping[str, torch.Tensor]) -> type:
        """This trainer, or, for weights of the other assembly, this trainer with that assembly under the same
        name: STPMTATrainer folds trained before 2026-12-07 (projected assemblies) keep predicting and resuming."""
        assembly = assembly_of(network_weights)
        if assembly is None or assembly == cls.network_config((8, 8, 8)).assembly:
            return cls
        return with_assembly(cls, assembly)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        if isinstance(filename_or_checkpoint, str):  # (nnU-Net's loader reads only file names)
            weights = torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False,
                                 mmap=True)["network_weights"]
            layout = self.for_weights(weights)
            if layout is not type(self):
                found = assembly_of(weights)
                if self.was_initialized:
                    raise RuntimeError(f"{filename_or_checkpoint} holds the {found} assembly, and this "
                                       f"{type(self).__name__} already built its network; load the checkpoint "
                                       f"before initialize() (as nnScd_train --c does)")
                self.print_to_log_file(f"{filename_or_checkpoint}: a fold of the {found} assembly, not the "
                                       f"{self.network_config((8, 8, 8)).assembly} one {type(self).__name__} builds "
                                       f"today; it goes on with the fold's network")
                self.__class__ = layout
        super().load_checkpoint(filename_or_checkpoint)

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        configuration = configuration_manager.configuration
        token_size = cls.token_plan(configuration).token_size  # the recorded token size, else the rule's
        return TokenSparseSegmenter(num_input_channels, num_output_channels, configuration_manager.patch_size,
                                    cls.network_config(token_size))

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """The decoder has a single output: nothing to switch."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr_adamw,
                                      weight_decay=self.weight_decay_adamw)
        warmup = max(1, round(self.warmup_fraction * self.num_epochs))
        return optimizer, WarmupPolyLR(optimizer, self.initial_lr_adamw, self.num_epochs, warmup)


class STPMTATrainer(TokenSparseTrainer):
    """STP token pruning + MTA token completion + UNETR decoder (small CPU-trainable size). The decoder gets what
    UNETRTrainer's gets, completed: each position's raw features from the deepest block it reached, the deepest map
    normalised, plus MTA's correction (zero at init). At keep 1 it is UNETRTrainer's network, a UNETRTrainer fold
    warm-starts it (`-pretrained_weights`), and at one seed both start from the same weights. Folds trained before
    2026-12-07 hold the paper's projected assemblies (STPMTATrainer_projected) and are loaded as such."""
    network = "stpmta"


class STPMTATrainer_projected(TokenSparseTrainer):
    """The paper's decoder input: each skip level assembled by per-source norm + linear, the deepest map MTA's
    output; STPMTATrainer until 2026-12-07, and the network the variants below were measured with."""
    network = "stpmta-projected"


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


class STPMTATrainer_keep75(STPMTATrainer_projected):
    """Gentler pruning: 75% then 56% of the tokens stay live."""
    config_changes = {"keep_ratios": (0.75, 0.75)}


class STPMTATrainer_keep1(STPMTATrainer_projected):
    """The control against UNETRTrainer: STPMTATrainer_projected's network (scorers, token assembly, MTA) with
    every token kept. The centered estimate gives the scorers exactly zero gradient at keep 1, so this trains what
    the sparse architecture costs without any pruning."""
    config_changes = {"keep_ratios": (1.0, 1.0), "estimator": "perturbed_centered"}


class STPMTATrainer_infill(STPMTATrainer):
    """STPMTATrainer under the name its quality runs of 2026-12-06 carry (documentation/results/hippocampus.md)."""


class STPMTATrainer_infill_keep1(STPMTATrainer):
    """STPMTATrainer_keep1's control for STPMTATrainer's network: every token kept, scorers idle (centered
    estimate), so it is UNETRTrainer's network with UNETRTrainer's initial weights at one seed."""
    config_changes = STPMTATrainer_keep1.config_changes


class STPMTATrainer_keep25(STPMTATrainer_projected):
    """Harder pruning: 25% then 6% of the tokens stay live."""
    config_changes = {"keep_ratios": (0.25, 0.25)}


class STPMTATrainer_centered(STPMTATrainer_projected):
    """The soft top-K's gradient estimate with its control variate (`perturbed_centered`): the same expectation,
    without the noise the published estimate sends through the scorers into the encoder."""
    config_changes = {"estimator": "perturbed_centered"}


class STPMTATrainer_keepwarmup(STPMTATrainer_projected):
    """EViT's keep-ratio curriculum: every token live in epoch 0, the keep ratios reached by a cosine at 40% of the
    epochs (nnscd_trainers.keep_warmup); inference keeps 50% then 25% as STPMTATrainer."""
    keep_warmup = 0.4


class STPMTATrainer_straightthrough(STPMTATrainer_projected):
    """Kept and pruned tokens enter training unscaled, as at inference; the soft top-K indicators reach the scorers
    through their gradient only (straight-through)."""
    config_changes = {"straight_through": True}


class STPMTATrainer_lr2en3(STPMTATrainer_projected):
    """Twice the small ViT's learning rate (AdamW 2e-3): does a short budget want a faster start?"""
    initial_lr_adamw = 2e-3


class UNETRTrainer_lr2en3(UNETRTrainer):
    initial_lr_adamw = 2e-3


class STPMTATrainer_gumbel(STPMTATrainer_projected):
    """Ablation: the published code's single-sample Gumbel straight-through estimator instead of soft top-K."""
    config_changes = {"estimator": "gumbel"}


class STPMTATrainer_fgprior(STPMTATrainer_projected):
    """The scorers also learn which tokens hold foreground (nnscd_trainers.foreground_prior, weight 1)."""
    foreground_prior = 1.0


class ViTLightTrainer_heinit(ViTLightTrainer):
    """Primus' decoder init (He normal, a = 1e-2): the light decoder's default init leaves it predicting background."""
    config_changes = {"decoder_init": "he"}


class STPMTALightTrainer_heinit(STPMTALightTrainer):
    config_changes = {"decoder_init": "he"}


class ViTLightTrainer_layerscale(ViTLightTrainer):
    """Primus' LayerScale (0.1) on the encoder blocks: the tokens reach the light decoder with their patch content."""
    config_changes = {"layer_scale": 0.1}


class STPMTALightTrainer_layerscale(STPMTALightTrainer):
    config_changes = {"layer_scale": 0.1}


class ViTLightTrainer_convstem(ViTLightTrainer):
    """PrimusV3's residual conv stem (narrower: 16-32-64-128 channels) instead of the one-conv patch embedding."""
    config_changes = {"stem": "conv"}


class STPMTALightTrainer_convstem(STPMTALightTrainer):
    config_changes = {"stem": "conv"}


class STPMTATrainer_cpu(STPMTATrainer):
    schedule = CPU_SCHEDULE


class STPMTATrainer_smoke(STPMTATrainer):
    """Two short epochs, to check that a setup trains end to end."""
    schedule = SMOKE_SCHEDULE


class STPMTATrainer_demo(STPMTATrainer):
    """nnScd_demo's trainer: long enough on a CPU for Dice >= 0.5 on both synthetic classes."""
    schedule = (10, 20, 5)


class UNETRTrainer_smoke(UNETRTrainer):
    """Two short epochs, to check that a setup trains end to end."""
    schedule = SMOKE_SCHEDULE


class UNETRTrainer_cpu(UNETRTrainer):
    schedule = CPU_SCHEDULE


class STPMTALightTrainer_cpu(STPMTALightTrainer):
    schedule = CPU_SCHEDULE


class ViTLightTrainer_cpu(ViTLightTrainer):
    schedule = CPU_SCHEDULE


class STPMTATrainer_budget(STPMTATrainer):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTATrainer_projected_budget(STPMTATrainer_projected):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTATrainer_fgprior_budget(STPMTATrainer_fgprior):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTATrainer_keep75_budget(STPMTATrainer_keep75):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTATrainer_centered_budget(STPMTATrainer_centered):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTATrainer_keep1_budget(STPMTATrainer_keep1):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTATrainer_infill_budget(STPMTATrainer_infill):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTATrainer_infill_keep1_budget(STPMTATrainer_infill_keep1):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTATrainer_keepwarmup_budget(STPMTATrainer_keepwarmup):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTATrainer_straightthrough_budget(STPMTATrainer_straightthrough):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTATrainer_lr2en3_budget(STPMTATrainer_lr2en3):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class UNETRTrainer_lr2en3_budget(UNETRTrainer_lr2en3):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class UNETRTrainer_budget(UNETRTrainer):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTALightTrainer_budget(STPMTALightTrainer):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class ViTLightTrainer_budget(ViTLightTrainer):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class ViTLightTrainer_heinit_budget(ViTLightTrainer_heinit):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTALightTrainer_heinit_budget(STPMTALightTrainer_heinit):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class ViTLightTrainer_convstem_budget(ViTLightTrainer_convstem):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTALightTrainer_convstem_budget(STPMTALightTrainer_convstem):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class ViTLightTrainer_layerscale_budget(ViTLightTrainer_layerscale):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


class STPMTALightTrainer_layerscale_budget(STPMTALightTrainer_layerscale):
    schedule, batch_size_override = BUDGET_SCHEDULE, BUDGET_BATCH


# equal compute: the U-Net's budget time (nnscd_trainer.equal_compute_schedule; seconds per iteration measured)
class STPMTATrainer_equalcompute(STPMTATrainer_projected):  # the network its step time was measured for
    schedule, batch_size_override = equal_compute_schedule(2.203), BUDGET_BATCH  # 30 epochs x 25


class UNETRTrainer_equalcompute(UNETRTrainer):
    schedule, batch_size_override = equal_compute_schedule(2.127), BUDGET_BATCH  # 31 epochs x 25
