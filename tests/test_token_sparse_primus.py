"""Token-sparse Primus: the same computation as nnU-Net's PrimusV3 at keep 1, warm starts from a dense checkpoint,
RoPE rows that follow their tokens, FLOPs that fall with the keep ratio as modelled, trainers on nnU-Net's recipe."""
import dataclasses

import pytest
import torch
from dynamic_network_architectures.architectures.primus import PrimusV3S
from torch.utils.flop_counter import FlopCounterMode

import nnscd.networks.token_sparse_primus as sparse_primus
from nnscd.networks.flop_model import sparse_primus_flop_breakdown, sparse_primus_forward_flops
from nnscd.networks.registry import build_network, modelled_forward_flops
from nnscd.networks.token_sparse_primus import (SparsePrimusConfig, TokenSparsePrimus, eva_block_with_context,
                                               live_rope)
from nnscd.core.pretrained_weights import load_pretrained_weights

PATCH = (32, 32, 32)  # 4 x 4 x 4 = 64 tokens
KEEP_ALL_NO_MTA = SparsePrimusConfig(keep_ratios=(1.0, 1.0), mta=False)


@pytest.fixture(scope="module")
def dense() -> PrimusV3S:
    torch.manual_seed(0)  # nnunetv2's nnUNet_PrimusV3S_Trainer builds exactly this
    return PrimusV3S(1, 3, (8, 8, 8), PATCH, drop_path_rate=0.2, scale_attn_inner=True, init_values=0.1).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(1))


def warm_started(dense: PrimusV3S, config: SparsePrimusConfig) -> TokenSparsePrimus:
    net = TokenSparsePrimus(1, 3, PATCH, config).eval()
    result = net.load_state_dict(dense.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert {k.split(".")[0] for k in result.missing_keys} <= {"stages", "mta"}
    return net


def forward_both_ways(config: SparsePrimusConfig, image: torch.Tensor
                      ) -> tuple[TokenSparsePrimus, torch.Tensor, torch.Tensor]:
    """A seeded network without drop path, its training output (graph kept) and its inference output."""
    torch.manual_seed(0)
    net = TokenSparsePrimus(1, 3, PATCH, dataclasses.replace(config, drop_path_rate=0.0))
    with torch.no_grad():
        inference = net.eval()(image)
    return net, net.train()(image), inference


@pytest.mark.parametrize("config", [SparsePrimusConfig(prune_after=(), keep_ratios=()), KEEP_ALL_NO_MTA,
                                    SparsePrimusConfig(keep_ratios=(1.0, 1.0))], ids=["no-stages", "keep1", "keep1-mta"])
def test_keep_one_computes_what_nnunets_primus_computes(dense, image, config):
    net = warm_started(dense, config)
    with torch.no_grad():
        expected, got = dense(image), net(image)
    # keep 1 reorders the tokens by score (attention does not care); MTA's output projection starts at zero
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
    if config.sparse:
        assert all(k.shape == (2, 64) for k in net.last_keep_indices)


def test_the_light_network_is_the_first_primus_at_the_small_vits_size(image):
    from dynamic_network_architectures.architectures.primus import Primus

    torch.manual_seed(0)
    first = Primus(1, 192, (8, 8, 8), 3, 6, 4, PATCH, init_values=0.1, scale_attn_inner=True,
                   drop_path_rate=0.2).eval()  # dna's Primus: one-conv patch embedding, Eva blocks, PatchDecode
    light = TokenSparsePrimus(1, 3, PATCH, SparsePrimusConfig(size="Light", stem="patch", prune_after=(),
                                                              keep_ratios=()))
    assert light.load_state_dict(first.state_dict()) is not None  # strict: the same modules under the same names
    with torch.no_grad():
        assert torch.equal(light.eval()(image), first(image))
    config = SparsePrimusConfig(size="Light", stem="patch", prune_after=(2, 4), keep_ratios=(0.5, 0.5))
    with torch.device("meta"):
        net = TokenSparsePrimus(1, 3, PATCH, config).eval()
        with FlopCounterMode(display=False) as counter:
            net(torch.empty(1, 1, *PATCH))
    assert counter.get_total_flops() == sparse_primus_forward_flops(config, 1, 3, PATCH)


def test_rope_rows_travel_with_their_tokens(dense, image, monkeypatch):
    table = torch.randn(64, 16)
    positions = torch.stack([torch.randperm(64)[:10] for _ in range(2)])
    rows = live_rope(table, torch.zeros(2, 10, 8), positions)
    assert rows.shape == (2, 1, 10, 16) and torch.equal(rows[:, 0], table[positions])

    # keep 1 puts the tokens in score order; only if each carries its own RoPE row does the output stay Primus'
    net = warm_started(dense, KEEP_ALL_NO_MTA)
    with torch.no_grad():
        assert not torch.equal(net.encode(torch.randn(2, 64, 396))[1][0], torch.arange(64).expand(2, 64))
        monkeypatch.setattr(sparse_primus, "live_rope", lambda table, x, positions: table)  # rows left in grid order
        assert (net(image) - dense(image)).abs().max() > 1e-3


def test_dense_checkpoint_warm_starts_the_sparse_network(dense, image, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": dense.state_dict()}, checkpoint)
    net = TokenSparsePrimus(1, 3, PATCH, SparsePrimusConfig(keep_ratios=(1.0, 1.0)))
    load_pretrained_weights(net, str(checkpoint))
    assert "starting fresh: mta, stages" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.allclose(net.eval()(image), dense(image), atol=1e-5, rtol=1e-5)

    other = TokenSparsePrimus(1, 3, PATCH, SparsePrimusConfig(size="B"))  # another width: refused, file named
    with pytest.raises(RuntimeError, match="checkpoint_final.pth does not fit TokenSparsePrimus.*another shape"):
        load_pretrained_weights(other, str(checkpoint))


def test_pruning_trains_the_scorers_through_both_token_sets(image):
    torch.manual_seed(0)
    net = TokenSparsePrimus(1, 3, PATCH, SparsePrimusConfig(keep_ratios=(0.5, 0.5), mta=False)).train()
    net(image).square().mean().backward()
    for stage in net.stages:
        assert stage.scorer.head[-1].weight.grad.abs().sum() > 0


def test_keep_one_control_prunes_nothing_and_leaves_the_scorers_to_the_prior(image):
    """STPMTAPrimusV3STrainer_keep1: every token live and unscaled in training, no top-K gradient to the scorers
    (only the prior's loss teaches them), MTA's correction trained."""
    from nnscd_trainers.primus_trainers import STPMTAPrimusV3STrainer_keep1

    net, training, inference = forward_both_ways(STPMTAPrimusV3STrainer_keep1.network_config(), image)
    assert [k.shape for k in net.last_keep_indices] == [(2, 64), (2, 64)]
    assert torch.allclose(training, inference, atol=1e-5)
    training.square().mean().backward()
    assert all(not p.grad.any() for stage in net.stages for p in stage.scorer.parameters())
    assert net.mta.proj.weight.grad.any()


def test_late_pruning_runs_half_the_encoder_on_every_token(image):
    """STPMTAPrimusV3STrainer_late: Eva blocks 1-6 see the whole grid, 7-9 a quarter of it, 10-12 a sixteenth."""
    from nnscd_trainers.primus_trainers import STPMTAPrimusV3STrainer_late

    net = TokenSparsePrimus(1, 3, PATCH, STPMTAPrimusV3STrainer_late.network_config()).eval()
    seen = []
    for block in net.eva.blocks:
        block.register_forward_hook(lambda module, inputs, output: seen.append(output.shape[1]))
    with torch.no_grad():
        net(image)
    assert seen == [64] * 6 + [16] * 3 + [4] * 3


@pytest.mark.parametrize("context_tokens", [0, 5])
def test_a_block_with_context_is_the_block_on_live_and_context_tokens_read_at_the_live_ones(dense, context_tokens):
    """eva_block_with_context spells out timm's EvaAttention: it must equal the block run on the live and context
    tokens together, read at the live ones (and the block alone without context)."""
    block, rope = dense.eva.blocks[4], dense.eva.rope.get_embed()  # (64, R)
    generator = torch.Generator().manual_seed(2)
    positions = torch.randperm(64, generator=generator)[:7 + context_tokens].expand(2, -1)
    tokens = torch.randn(2, 7 + context_tokens, dense.embed_dim, generator=generator)
    rows = live_rope(rope, tokens, positions)  # (2, 1, 7 + M, R)
    with torch.no_grad():
        expected = block(tokens, rope=rows)[:, :7]
        got = eva_block_with_context(block, tokens[:, :7], rows[:, :, :7], tokens[:, 7:], rows[:, :, 7:])
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_context_tokens_let_the_live_tokens_attend_to_the_whole_grid(image, monkeypatch):
    """STPMTAPrimusV3STrainer_context: after each STP stage the live tokens' attention reads all 64 positions (the
    pruned ones as keys and values), where the default's reads only the live ones; MTA reads the grid in both."""
    from nnscd_trainers.primus_trainers import STPMTAPrimusV3STrainer, STPMTAPrimusV3STrainer_context

    attend = torch.nn.functional.scaled_dot_product_attention  # the real one, wrapped afresh for each network

    def attention_shapes(config: SparsePrimusConfig) -> list[tuple[int, int]]:
        net, shapes = TokenSparsePrimus(1, 3, PATCH, config).eval(), []
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda q, k, v, **kw: shapes.append((q.shape[2], k.shape[2])) or attend(q, k, v, **kw))
        with torch.no_grad():
            net(image)
        return shapes

    assert attention_shapes(STPMTAPrimusV3STrainer.network_config()) == \
        [(64, 64)] * 3 + [(16, 16)] * 3 + [(4, 4)] * 6 + [(64, 64)]
    assert attention_shapes(STPMTAPrimusV3STrainer_context.network_config()) == \
        [(64, 64)] * 3 + [(16, 64)] * 3 + [(4, 64)] * 6 + [(64, 64)]


@pytest.mark.parametrize("variant, scorers_learn", [("STPMTAPrimusV3STrainer_straightthrough", True),
                                                    ("STPMTAPrimusV3STrainer_hard", False)])
def test_unscaled_variants_train_on_what_inference_computes(image, variant, scorers_learn):
    """_straightthrough and _hard: the training forward equals the inference forward (no token scaled by its
    indicator); the scorers get the soft top-K's gradient through the first and none through the second."""
    import nnscd_trainers

    net, training, inference = forward_both_ways(getattr(nnscd_trainers, variant).network_config(), image)
    assert [k.shape[1] for k in net.last_keep_indices] == [16, 4]
    assert torch.allclose(training, inference, atol=1e-5)
    training.square().mean().backward()
    grads = [stage.scorer.head[-1].weight.grad for stage in net.stages]
    assert all(g is not None and g.any() for g in grads) if scorers_learn else all(g is None for g in grads)


@pytest.mark.parametrize("keep, context_tokens", [(1.0, False), (0.5, False), (0.25, False), (0.25, True)])
def test_measured_flops_fall_with_the_keep_ratio_as_modelled(image, keep, context_tokens):
    config = SparsePrimusConfig(keep_ratios=(keep, keep), context_tokens=context_tokens)
    with torch.device("meta"):
        net = TokenSparsePrimus(1, 3, PATCH, config).eval()
        with FlopCounterMode(display=False) as counter:
            net(torch.empty(1, 1, *PATCH))
    assert counter.get_total_flops() == sparse_primus_forward_flops(config, 1, 3, PATCH)
    parts = sparse_primus_flop_breakdown(config, 1, 3, PATCH)
    dense_parts = sparse_primus_flop_breakdown(dataclasses.replace(config, prune_after=(), keep_ratios=()), 1, 3, PATCH)
    assert parts["stem"] == dense_parts["stem"] and parts["decoder"] == dense_parts["decoder"]
    assert (parts["encoder"] < dense_parts["encoder"]) == (keep < 1)


def test_benchmark_names_build_nnunets_primus_and_its_sparse_twin():
    with torch.device("meta"):
        assert type(build_network("primusv3-s", 1, 2, PATCH)).__name__ == "PrimusV3S"
        assert isinstance(build_network("stpmta-primusv3-b", 1, 2, PATCH), TokenSparsePrimus)
        assert build_network("stpmta-primus-light", 1, 2, PATCH).config.stem == "patch"
    assert modelled_forward_flops("stpmta-primus-light", 1, 2, (96, 96, 96)) < \
        modelled_forward_flops("primus-light", 1, 2, (96, 96, 96))
    assert modelled_forward_flops("stpmta-primusv3-b", 1, 2, (96, 96, 96)) < \
        modelled_forward_flops("primusv3-b", 1, 2, (96, 96, 96))


def test_configuration_errors_name_the_fix():
    with pytest.raises(ValueError, match="Primus-S has 12 blocks"):
        TokenSparsePrimus(1, 2, PATCH, SparsePrimusConfig(prune_after=(3, 12)))
    with pytest.raises(ValueError, match="head width"):
        SparsePrimusConfig(mta_dim=192, mta_heads=3)


def test_sparse_primus_trainers_are_nnunets_primus_trainers_with_another_network():
    from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import AbstractPrimus, nnUNet_PrimusV3S_Trainer
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    import nnscd_trainers
    from nnscd_trainers.primus_trainers import STPMTAPrimusV3STrainer

    assert issubclass(STPMTAPrimusV3STrainer, nnUNet_PrimusV3S_Trainer)
    assert STPMTAPrimusV3STrainer.configure_optimizers is AbstractPrimus.configure_optimizers  # the recipe, inherited
    assert STPMTAPrimusV3STrainer.train_step is AbstractPrimus.train_step
    assert nnscd_trainers.PrimusV3STrainer_budget.build_network_architecture is \
        nnUNet_PrimusV3S_Trainer.build_network_architecture  # the dense twin builds nnunetv2's network, unchanged
    configuration = {"patch_size": [36, 52, 40], "spacing": [1.0, 1.0, 1.0], "batch_size": 7,
                     "architecture": {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []}}
    plan = STPMTAPrimusV3STrainer.token_plan(configuration)
    assert (plan.patch_size, plan.token_size, plan.batch_size) == ([40, 56, 40], [8, 8, 8], 7)  # rounded up
    with torch.device("meta"):
        net = STPMTAPrimusV3STrainer.build_network_architecture(
            None, ConfigurationManager({**configuration, "patch_size": plan.patch_size}), 1, 3, False)
    assert isinstance(net, TokenSparsePrimus) and net.config.size == "S" and net.grid == (5, 7, 5)
    assert nnscd_trainers.STPMTAPrimusV3STrainer_keep50.network_config().keep_ratios == (0.5, 0.5)
    assert not nnscd_trainers.STPMTAPrimusV3STrainer_noMTA.network_config().mta
    light, dense_light = nnscd_trainers.STPMTAPrimusLightTrainer, nnscd_trainers.PrimusLightTrainer
    assert issubclass(light, AbstractPrimus) and light.configure_optimizers is AbstractPrimus.configure_optimizers
    assert light.prunes() and not dense_light.prunes()
    assert dataclasses.replace(light.network_config(), prune_after=(), keep_ratios=()) == \
        dense_light.network_config()  # twins: only STP and MTA differ


def test_sparse_primus_end_to_end_warm_start_train_predict_token_maps(nnunet_env, planned_dataset, tmp_path):
    """Through the console scripts, as a user: a dense Primus checkpoint warm-starts STPMTAPrimusV3STrainer_smoke
    (only scorers and MTA fresh), training logs keep statistics, nnScd_predict and nnScd_token_maps use the model."""
    import json
    import re
    from pathlib import Path

    from conftest import CONFIG, DATASET, DATASET_ID, dice_per_class, run_command

    trainer = "STPMTAPrimusV3STrainer_smoke"  # 2 epochs x 4 iterations
    preprocessed = Path(nnunet_env["nnUNet_preprocessed"]) / DATASET
    patch = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"][CONFIG]["patch_size"]
    dense_checkpoint = tmp_path / "dense_primus.pth"  # what a dense nnUNet_PrimusV3S_Trainer fold saves
    torch.save({"network_weights": PrimusV3S(1, 3, (8, 8, 8), patch).state_dict()}, dense_checkpoint)
    train = run_command(["nnScd_train", str(DATASET_ID), CONFIG, "0", "-tr", trainer, "-device", "cpu",
                         "-pretrained_weights", str(dense_checkpoint)], nnunet_env)
    assert "starting fresh: mta, stages" in train.stdout
    model = Path(nnunet_env["nnUNet_results"]) / DATASET / f"{trainer}__nnUNetPlans__{CONFIG}"
    log = next((model / "fold_0").glob("training_log_*.txt")).read_text()
    stats = re.findall(r"Foreground tokens kept per pruning stage: (\[[^\]]*\])", log)
    assert len(stats) == 2 and all(len(json.loads(s)) == 2 for s in stats)
    assert (model / "fold_0" / "token_keep_progress.png").is_file()
    assert json.loads((model / "plans.json").read_text())["configurations"][CONFIG]["token_size"] == [8, 8, 8]

    out = tmp_path / "pred"
    run_command(["nnScd_predict", "-i", str(planned_dataset / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                 "-c", CONFIG, "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0",
                 "--disable_tta"], nnunet_env)
    assert set(dice_per_class(out, planned_dataset / "labelsTs", [1, 2])) == {1, 2}  # every case written

    maps = tmp_path / "maps"
    run_command(["nnScd_token_maps", "-m", str(model), "-f", "0", "-i", str(planned_dataset / "imagesTs"),
                 "-o", str(maps), "-device", "cpu", "--slices", "2"], nnunet_env)
    report = json.loads(next(maps.glob("*_tokens.json")).read_text())
    assert [(s["after_block"], s["kept"]) for s in report["stages"]] == [(3, 16), (6, 4)]  # 64 -> 16 -> 4 tokens


def test_a_patch_primus_cannot_take_is_refused_before_training_and_the_sparse_trainer_rounds_it(
        nnunet_env, planned_dataset):
    import json
    from pathlib import Path

    from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_PrimusV3S_Trainer

    from conftest import CONFIG, DATASET
    from nnscd.checks.input_checks import _network_problems
    from nnscd_trainers.primus_trainers import STPMTAPrimusV3STrainer

    preprocessed = Path(nnunet_env["nnUNet_preprocessed"]) / DATASET
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["configurations"][CONFIG]["patch_size"] = [36, 32, 32]
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    problems = _network_problems(nnUNet_PrimusV3S_Trainer, plans, CONFIG, dataset_json)
    assert len(problems) == 1 and "nnUNet_PrimusV3S_Trainer cannot take" in problems[0] and "[36, 32, 32]" in problems[0]
    assert _network_problems(STPMTAPrimusV3STrainer, plans, CONFIG, dataset_json) == []  # 36 -> 40


@pytest.mark.parametrize("cumulative, expected", [(True, [[0.5], [0.25], [0.25]]), (False, [[0.5], [0.5], [0.5]])])
def test_token_weights_in_training_follow_the_stp_decisions(image, monkeypatch, cumulative, expected):
    """Token sets are weighted by soft indicators after eva.norm. Cumulative: the product over every decision about
    a token (indicator 0.5 everywhere: pruned at 1 -> 0.5, pruned at 2 -> 0.5 x 0.5, survivors 0.5 x 0.5); else only
    the last decision's."""
    import nnscd.networks.token_sparse_vit as vit

    monkeypatch.setattr(vit, "soft_topk", lambda scores, k, *args: torch.full_like(scores, 0.5))
    config = SparsePrimusConfig(keep_ratios=(0.5, 0.5), cumulative_weights=cumulative)
    sources, _ = TokenSparsePrimus(1, 3, PATCH, config).train().encode(torch.randn(2, 64, 396))
    assert [torch.unique(s.weights).tolist() for s in sources] == expected
    assert [s.features.shape[1] for s in sources] == [32, 16, 16]
