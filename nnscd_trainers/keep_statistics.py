"""Keep statistics of STP trainers: how often the scorers keep foreground tokens, per validation pass and epoch.

Shared by every trainer whose network has STP stages (`network.config.sparse`, `network.last_keep_indices`,
`network.token_size`, `network.config.keep_ratios`): the ViT family and the token-sparse Primus family.
"""
import os
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnscd.core.device import unwrap
from nnscd.core.nnunet_hooks import add_log_series
from nnscd.core.progress_plots import plot_per_epoch

LOG_KEY = "kept_foreground"


def foreground_tokens(foreground: torch.Tensor, token_size: List[int]) -> torch.Tensor:
    """(B, 1, *patch) foreground mask -> (B, L) float, 1 where a token holds any foreground voxel (C order)."""
    pool = F.max_pool3d if foreground.ndim == 5 else F.max_pool2d
    return pool(foreground.float(), token_size, token_size).flatten(1)


def foreground_mask(target: torch.Tensor, label_manager: LabelManager) -> torch.Tensor:
    """(B, 1 or regions, *patch) nnU-Net target -> (B, 1, *patch) bool: labels > 0 (the ignore label counts as
    foreground, so unlabelled positions are kept), or any region (the ignore channel, nnU-Net's last, dropped)."""
    if not label_manager.has_regions:
        return target > 0
    return (target[:, :-1] if label_manager.has_ignore_label else target).any(1, keepdim=True)


def kept_foreground_share(keep_indices: List[torch.Tensor], foreground: torch.Tensor,
                          token_size: List[int]) -> np.ndarray:
    """Per pruning stage: the share of foreground tokens (any voxel of the (B, 1, *patch) mask) still kept, over a
    batch. Chance level is the stage's cumulative keep ratio; a scorer that learned where the object is keeps more.
    """
    fg_tokens = foreground_tokens(foreground, token_size)  # (B, L), 1 = foreground token
    if not fg_tokens.any():
        return np.full(len(keep_indices), np.nan)
    return np.array([(torch.gather(fg_tokens, 1, index.cpu()).sum() / fg_tokens.sum()).item()
                     for index in keep_indices])


class KeepStatistics:
    """Mixin placed before the nnU-Net trainer in the bases: call `track_keep_statistics()` in `__init__` when the
    network prunes; validation batches then log, print and plot (`token_keep_progress.png`) the kept share."""

    def track_keep_statistics(self) -> None:
        add_log_series(self, LOG_KEY)

    def validation_step(self, batch: dict) -> dict:
        result = super().validation_step(batch)
        network = unwrap(self.network)
        if network.config.sparse:
            target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]  # full resolution
            result[LOG_KEY] = kept_foreground_share(network.last_keep_indices,
                                                    foreground_mask(target, self.label_manager), network.token_size)
        return result

    def on_validation_epoch_end(self, val_outputs: List[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        if LOG_KEY in val_outputs[0]:
            shares = np.nanmean(np.stack([o[LOG_KEY] for o in val_outputs]), axis=0)
            self.logger.log(LOG_KEY, [round(float(s), 4) for s in shares], self.current_epoch)
            keep = np.cumprod(unwrap(self.network).config.keep_ratios)
            self.print_to_log_file(f"Foreground tokens kept per pruning stage: {self.logger.get_value(LOG_KEY, -1)}"
                                   f" (chance: {[round(float(k), 4) for k in keep]})")

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        history = self.logger.get_value(LOG_KEY, None) if unwrap(self.network).config.sparse else None
        if history and self.local_rank == 0:
            keep = np.cumprod(unwrap(self.network).config.keep_ratios)
            stages = {f"after stage {i + 1}": [h[i] for h in history] for i in range(len(keep))}
            plot_per_epoch(stages, os.path.join(self.output_folder, "token_keep_progress.png"),
                           "Foreground tokens kept by STP (validation batches)", "share of foreground tokens kept",
                           references=dict(zip(stages, keep)))
