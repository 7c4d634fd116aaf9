"""The keep-ratio warm-up: every token live in the first training epoch, the network's keep ratios reached by a
cosine, inference untouched, and a function of the epoch (so `--c` resumes on the same curve)."""
import pytest
import torch

import nnscd_trainers
from nnscd.networks.token_sparse_vit import SoftTopKPruning, TokenSparseConfig, TokenSparseSegmenter
from nnscd_trainers.keep_warmup import KeepWarmup, warmup_keep

PATCH, TOKEN = (16, 16, 16), 4  # 64 tokens


def _network() -> TokenSparseSegmenter:
    torch.manual_seed(0)
    config = TokenSparseConfig(dim=48, depth=3, heads=2, token_size=TOKEN, prune_after=(1, 2),
                               keep_ratios=(0.5, 0.5), mta_dim=24, mta_heads=2)
    return TokenSparseSegmenter(1, 2, PATCH, config)


def test_warmup_keep_falls_from_one_to_the_keep_ratio_by_a_cosine():
    curve = [warmup_keep(0.25, epoch, 4) for epoch in range(7)]
    assert curve[0] == 1.0 and curve[2] == pytest.approx(0.625)  # half way: the mean of 1 and 0.25
    assert all(a > b for a, b in zip(curve[:5], curve[1:5]))
    assert curve[4:] == [0.25] * 3


def test_training_forwards_keep_train_keep_and_inference_keeps_keep():
    net, image = _network(), torch.randn(2, 1, *PATCH)
    for stage in net.modules():
        if isinstance(stage, SoftTopKPruning):
            stage.train_keep = 1.0
    net.train()(image)
    assert [p.shape[1] for p in net.last_keep_indices] == [64, 64]  # every token live, nothing pruned
    with torch.no_grad():
        net.eval()(image)
    assert [p.shape[1] for p in net.last_keep_indices] == [32, 16]  # the network's own ratios


class _Trainer:  # what KeepWarmup reads of nnU-Net's trainer
    num_epochs = 10

    def __init__(self, epoch: int, network: torch.nn.Module):
        self.current_epoch, self.network, self.log = epoch, network, []

    def on_train_epoch_start(self):
        self.network.train()

    def print_to_log_file(self, line):
        self.log.append(line)


def _train_keeps(keep_warmup: float, epoch: int) -> list:
    trainer = type("T", (KeepWarmup, _Trainer), {"keep_warmup": keep_warmup})(epoch, _network())
    trainer.on_train_epoch_start()
    return [m.train_keep for m in trainer.network.modules() if isinstance(m, SoftTopKPruning)]


def test_the_mixin_sets_each_stage_from_the_epoch_alone():
    assert _train_keeps(0.4, 0) == [1.0, 1.0]
    assert _train_keeps(0.4, 2) == pytest.approx([0.75, 0.75])  # 4 warm-up epochs of 10
    assert _train_keeps(0.4, 4) == [0.5, 0.5]
    assert _train_keeps(0.4, 9) == [0.5, 0.5]
    assert _train_keeps(0.0, 0) == [None, None]  # no warm-up: trains at the network's ratios


@pytest.mark.parametrize("name, base_name", [("STPMTATrainer_keepwarmup", "STPMTATrainer"),
                                             ("STPMTAPrimusV3STrainer_keepwarmup", "STPMTAPrimusV3STrainer")])
def test_the_warmup_variants_are_their_base_trainers_with_the_warmup(name: str, base_name: str):
    variant, base = getattr(nnscd_trainers, name), getattr(nnscd_trainers, base_name)
    assert (variant.keep_warmup, base.keep_warmup) == (0.4, 0.0)
    assert variant.on_train_epoch_start is KeepWarmup.on_train_epoch_start  # nothing overrides it in the bases
    assert (variant.config_changes, variant.foreground_prior) == (base.config_changes, base.foreground_prior)
    run, base_run = getattr(nnscd_trainers, name + "_budget"), getattr(nnscd_trainers, base_name + "_budget")
    assert issubclass(run, variant)
    assert (run.schedule, run.batch_size_override) == (base_run.schedule, base_run.batch_size_override)
