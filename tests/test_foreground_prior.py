"""The foreground prior on STP's scorers: it teaches them to keep the tokens that hold foreground, it enters the loss
of training forwards only, and the trainers that name it use it."""
import pytest
import torch
from torch import nn

import nnscd_trainers
from nnscd.networks.token_sparse_vit import SoftTopKPruning, TokenSparseConfig, TokenSparseSegmenter
from nnscd_trainers.foreground_prior import ForegroundPrior, LossWithForegroundPrior, scorer_prior_loss
from nnscd_trainers.keep_statistics import kept_foreground_share

PATCH, TOKEN = (16, 16, 16), 4  # 4 x 4 x 4 = 64 tokens


class _Labels:  # what the loss reads of nnU-Net's LabelManager
    has_regions = has_ignore_label = False


def _blob_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose foreground (one bright 8^3 cube = 8 of the 64 tokens) sits at a random token-aligned place."""
    image, target = torch.randn(n, 1, *PATCH, generator=generator) * 0.3, torch.zeros(n, 1, *PATCH)
    for b in range(n):
        z, y, x = (torch.randint(0, 3, (3,), generator=generator) * TOKEN).tolist()
        target[b, 0, z:z + 8, y:y + 8, x:x + 8] = 1
    return image + 2 * target, target


def _network() -> TokenSparseSegmenter:
    torch.manual_seed(0)
    config = TokenSparseConfig(dim=48, depth=3, heads=2, token_size=TOKEN, prune_after=(1, 2),
                               keep_ratios=(0.25, 0.5), mta_dim=24, mta_heads=2)
    return TokenSparseSegmenter(1, 2, PATCH, config)


def _kept_share(net: nn.Module, image: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        net.eval()(image)
    return float(kept_foreground_share(net.last_keep_indices, target > 0, [TOKEN] * 3)[0])


def test_the_prior_teaches_the_scorers_to_keep_the_foreground():
    generator = torch.Generator().manual_seed(0)
    net = _network()
    test_image, test_target = _blob_batch(8, generator)
    before = _kept_share(net, test_image, test_target)
    stages = [m for m in net.modules() if isinstance(m, SoftTopKPruning)]
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(40):
        image, target = _blob_batch(4, generator)
        net.train()(image)
        loss = scorer_prior_loss(stages, target > 0, [TOKEN] * 3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _kept_share(net, test_image, test_target)
    assert before < 0.6 and after > 0.95, (before, after)  # stage 1 keeps 16 of 64 tokens: room for all 8


def test_the_prior_enters_training_losses_only():
    net = _network()
    image, target = _blob_batch(2, torch.Generator().manual_seed(1))
    loss = LossWithForegroundPrior(lambda output, t: output.sum() * 0, lambda: net, _Labels(), weight=1.0)
    assert loss(net.train()(image), target).item() > 0.1  # BCE of untrained scorers is about log 2
    with torch.no_grad():
        assert loss(net.eval()(image), target).item() == 0  # validation: nnU-Net's loss alone
    assert all(m.last_scores is None for m in net.modules() if isinstance(m, SoftTopKPruning))


class _SegLoss(nn.Module):
    def forward(self, output, target):
        return output.sum() * 0


class _Trainer:
    def _build_loss(self):
        return _SegLoss()


@pytest.mark.parametrize("weight, prunes, wrapped", [(1.0, True, True), (0.0, True, False), (1.0, False, False)])
def test_trainers_wrap_the_loss_when_they_name_the_prior_and_prune(weight, prunes, wrapped):
    trainer_class = type("T", (ForegroundPrior, _Trainer), {"foreground_prior": weight,
                                                             "prunes": classmethod(lambda cls: prunes)})
    trainer = trainer_class()
    trainer.network, trainer.label_manager = _network(), _Labels()
    assert isinstance(trainer._build_loss(), LossWithForegroundPrior) == wrapped


def test_the_hard_estimator_is_refused_without_the_prior():
    """With estimator "hard" the scorers get no gradient from the segmentation loss: without the prior they would
    never learn, so the trainer stops before training instead."""
    hard = TokenSparseConfig(dim=48, depth=3, heads=2, token_size=TOKEN, prune_after=(1, 2),
                             keep_ratios=(0.25, 0.5), mta_dim=24, mta_heads=2, estimator="hard")
    trainer_class = type("T", (ForegroundPrior, _Trainer), {"foreground_prior": 0.0,
                                                             "prunes": classmethod(lambda cls: True)})
    trainer = trainer_class()
    trainer.network, trainer.label_manager = TokenSparseSegmenter(1, 2, PATCH, hard), _Labels()
    with pytest.raises(ValueError, match="'hard' top-K estimator gives STP's scorers no gradient.*prior"):
        trainer._build_loss()
    trainer.foreground_prior = 1.0
    assert isinstance(trainer._build_loss(), LossWithForegroundPrior)
    trainer.foreground_prior, trainer.network = 0.0, _network()  # the published estimator: learns without the prior
    assert isinstance(trainer._build_loss(), _SegLoss)


def test_the_sparse_primus_family_learns_the_prior_by_default_and_the_vit_family_does_not():
    """The defaults follow what was measured (documentation/trainers.md): the prior helped every sparse Primus run and
    hurt STPMTATrainer's ViT."""
    for name in ("STPMTAPrimusV3STrainer", "STPMTAPrimusV3BTrainer", "STPMTAPrimusV3MTrainer", "STPMTAPrimusV3LTrainer",
                 "STPMTAPrimusLightTrainer", "STPMTAPrimusV3STrainer_keep50_budget"):
        assert getattr(nnscd_trainers, name).foreground_prior == 1.0, name
    for name in ("STPMTATrainer", "STPMTALightTrainer", "STPMTAPrimusV3STrainer_noprior_budget", "PrimusLightTrainer"):
        assert getattr(nnscd_trainers, name).foreground_prior == 0.0, name


@pytest.mark.parametrize("name, base_name, scheduled", [
    ("STPMTAPrimusV3STrainer_noprior", "STPMTAPrimusV3STrainer", "_budget"),
    ("STPMTAPrimusLightTrainer_noprior", "STPMTAPrimusLightTrainer", "_equalcompute"),
    ("STPMTATrainer_fgprior", "STPMTATrainer_projected", "_budget")])  # measured on the projected network
def test_the_prior_variants_are_their_base_trainers_with_the_prior_switched(name: str, base_name: str,
                                                                             scheduled: str):
    variant, base = getattr(nnscd_trainers, name), getattr(nnscd_trainers, base_name)
    assert {variant.foreground_prior, base.foreground_prior} == {0.0, 1.0}
    assert variant.network_config.__func__ is base.network_config.__func__  # the same network
    assert (variant.config_changes, getattr(variant, "network", None)) == \
        (base.config_changes, getattr(base, "network", None))
    run, base_run = getattr(nnscd_trainers, name + scheduled), getattr(nnscd_trainers, base_name + scheduled)
    assert issubclass(run, variant)
    assert (run.schedule, run.batch_size_override) == (base_run.schedule, base_run.batch_size_override)
