"""A foreground prior for STP's scorers: an auxiliary BCE that teaches each scorer which tokens hold foreground.

Why: trained only through STP's soft top-K, the scorers of the token-sparse Primus learned to prune the
foreground (0.9% of foreground tokens kept after block 3 at the Hippocampus budget, chance 25%;
documentation/results/hippocampus.md). The soft indicator scales a token's features, so its gradient says whether
a token's features should be larger, not whether the token is worth the deeper blocks. APFormer's query pruning
learns from the same kind of foreground head (nnscd_trainers/apformer_trainers.py).

`ForegroundPrior` is a trainer mixin: `foreground_prior = w > 0` adds w x mean BCE(raw score, token holds
foreground) per STP stage to nnU-Net's loss after training forwards; validation losses stay Dice + CE.
"""
from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnscd.networks.token_sparse_vit import SoftTopKPruning, stp_stages
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnscd_trainers.keep_statistics import foreground_mask, foreground_tokens
from nnscd.core.device import unwrap


def scorer_prior_loss(stages: List[SoftTopKPruning], foreground: Tensor, token_size: List[int]) -> Tensor:
    """Mean over stages of BCE(raw scores of the tokens each stage ranked, 1 where the token holds foreground)."""
    labels = foreground_tokens(foreground, token_size)  # (B, L)
    losses = [F.binary_cross_entropy_with_logits(scores, labels.gather(1, positions))
              for scores, positions in (s.last_scores for s in stages)]
    return torch.stack(losses).mean()


class LossWithForegroundPrior(nn.Module):
    """nnU-Net's loss plus `weight` x scorer_prior_loss after training forwards. The network is reached through a
    callable: it may be wrapped by DDP or torch.compile after the loss is built."""

    def __init__(self, seg_loss: nn.Module, network: Callable[[], nn.Module], label_manager: LabelManager,
                 weight: float):
        super().__init__()
        self.seg_loss, self.network, self.label_manager, self.weight = seg_loss, network, label_manager, weight

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        loss = self.seg_loss(output, target)
        net = self.network()
        if not net.training:
            return loss
        stages = stp_stages(net)
        seg = target[0] if isinstance(target, (list, tuple)) else target  # full resolution under deep supervision
        return loss + self.weight * scorer_prior_loss(stages, foreground_mask(seg, self.label_manager),
                                                      list(net.token_size))

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class ForegroundPrior:
    """Mixin for STP trainers (before the nnU-Net trainer in the bases). `foreground_prior`: the prior's weight;
    0 (the default) leaves nnU-Net's loss as it is."""
    foreground_prior: float = 0.0

    def _build_loss(self) -> nn.Module:
        loss = super()._build_loss()
        if any(stage.config.estimator == "hard" for stage in stp_stages(unwrap(self.network))) \
                and not self.foreground_prior > 0:
            raise ValueError(f"{type(self).__name__}: the 'hard' top-K estimator gives STP's scorers no gradient, "
                             f"so only the foreground prior can teach them; set foreground_prior > 0 or use "
                             f"another estimator")
        if self.foreground_prior > 0 and self.prunes():
            return LossWithForegroundPrior(loss, lambda: unwrap(self.network), self.label_manager,
                                           self.foreground_prior)
        return loss
