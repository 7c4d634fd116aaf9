"""Keep-ratio warm-up for STP trainers: every token live in the first epoch, the keep ratios reached by a cosine.

Why: at the start of training STP's scorers are random, so the first pruning stages drop foreground tokens by chance
while the encoder, MTA and decoder are learning what a token holds; at the 250-iteration budget the sparse ViT lost
most where its scorers kept the least foreground (documentation/results/hippocampus.md). EViT (Liang et al.,
ICLR 2022) trains its token-sparse ViTs with the same curriculum: keep rate 1, then a cosine down to the target.

The factor is a function of `current_epoch` only, like nnscd's learning-rate schedules, so `--c` resumes on the same
curve. Validation and inference always use the network's own keep ratios (`SoftTopKPruning.keep`): the per-epoch
pseudo Dice and keep statistics measure the network users get.
"""
import math

from nnscd.core.device import unwrap
from nnscd.networks.token_sparse_vit import stp_stages


def warmup_keep(keep: float, epoch: int, warmup_epochs: int) -> float:
    """Keep ratio of a training epoch: 1 at epoch 0, cosine down to `keep` at `warmup_epochs`, then `keep`."""
    if epoch >= warmup_epochs:
        return keep
    return keep + (1 - keep) * 0.5 * (1 + math.cos(math.pi * epoch / warmup_epochs))


class KeepWarmup:
    """Mixin for STP trainers (before the nnU-Net trainer in the bases). `keep_warmup`: the share of the epochs over
    which the training keep ratios fall from 1 to the network's; 0 (the default) trains at the network's ratios."""
    keep_warmup: float = 0.0

    def keep_warmup_epochs(self) -> int:
        return round(self.keep_warmup * self.num_epochs)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        warmup_epochs = self.keep_warmup_epochs()
        if not warmup_epochs:
            return
        stages = stp_stages(unwrap(self.network))
        for stage in stages:
            stage.train_keep = warmup_keep(stage.keep, self.current_epoch, warmup_epochs)
        if stages:
            self.print_to_log_file("Training keep ratios (warm-up): "
                                   f"{[round(s.train_keep, 3) for s in stages]}, inference: {[s.keep for s in stages]}")
