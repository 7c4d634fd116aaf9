"""Token-sparse networks: FLOPs against the model, MTA assembly, shapes in 2D/3D, fp16, errors, registry."""
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nnscd.networks.flop_model import (nnunet_unet_forward_flops, token_sparse_flop_breakdown,
                                       token_sparse_forward_flops)
from nnscd.networks.plain_unet import build_nnunet_unet, nnunet_unet_plan
from nnscd.networks.registry import CONFIGS, FLOP_MODELS, NETWORKS, PAPER, build_network
from nnscd.networks.soft_topk import num_kept
from nnscd.networks.token_sparse_vit import (TokenSparseConfig, TokenSparseSegmenter, tap_blocks,
                                             upsampling_strides)

TINY = TokenSparseConfig(dim=48, depth=4, heads=2, token_size=4, prune_after=(1, 2), keep_ratios=(0.5, 0.5),
                         min_tokens=2, mta_dim=24, mta_heads=2, num_samples=16, decoder_features=8)


def measured_flops(net: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net.eval()(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("decoder", ["unetr", "light"])
def test_measured_flops_fall_with_keep_ratio_exactly_as_modelled(decoder):
    """Tolerance: none. The FLOP model counts what FlopCounterMode counts, so the integers must be equal; that
    only holds if pruning really shortens the sequences (a masked dense sequence would not pass)."""
    torch.manual_seed(0)
    patch, x = (16, 32, 32), torch.randn(2, 1, 16, 32, 32)
    flops = []
    for keep in (1.0, 0.5, 0.25):
        config = replace(TINY, decoder=decoder, token_size=(2, 4, 4), keep_ratios=(keep, keep))
        measured = measured_flops(TokenSparseSegmenter(1, 3, patch, config), x)
        assert measured == token_sparse_forward_flops(config, 1, 3, patch, batch_size=2)
        flops.append(measured)
    assert flops[0] > flops[1] > flops[2]


@pytest.mark.parametrize("assembly", ["projected", "infill"])
@pytest.mark.parametrize("decoder", ["unetr", "light"])
def test_keep_one_costs_the_dense_twin_plus_only_the_stp_mta_overhead(decoder, assembly):
    """At keep 1.0 encoder and decoder FLOPs equal the dense twin's; the difference is exactly the modelled
    scorers, skip assemblies and MTA."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 16, 16, 16)
    sparse = replace(TINY, decoder=decoder, keep_ratios=(1.0, 1.0), assembly=assembly)
    dense = replace(sparse, prune_after=(), keep_ratios=())
    parts = token_sparse_flop_breakdown(sparse, 2, 3, (16, 16, 16))
    overhead = parts["scorers"] + parts["skip_assemblies"] + parts["mta"]
    assert overhead > 0
    dense_flops = measured_flops(TokenSparseSegmenter(2, 3, (16, 16, 16), dense), x)
    assert measured_flops(TokenSparseSegmenter(2, 3, (16, 16, 16), sparse), x) - overhead == dense_flops
    assert dense_flops == token_sparse_forward_flops(dense, 2, 3, (16, 16, 16))


def test_blocks_run_on_gathered_shorter_sequences():
    net = TokenSparseSegmenter(1, 2, (16, 16, 16), TINY).eval()
    lengths = []
    for block in net.encoder.blocks:
        block.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        net(torch.randn(2, 1, 16, 16, 16))
    after_one = num_kept(64, 0.5, 2)
    assert lengths == [64, after_one, num_kept(after_one, 0.5, 2), num_kept(after_one, 0.5, 2)]


def test_nnunet_unet_follows_the_planner_and_its_flop_model():
    plan = nnunet_unet_plan((96, 96, 96))
    assert plan["features"] == [32, 64, 128, 256, 320]  # 96 -> 48 -> 24 -> 12 -> 6 (halve while >= 8)
    assert plan["strides"] == [(1, 1, 1)] + [(2, 2, 2)] * 4
    assert nnunet_unet_plan((16, 64, 64))["strides"][1:] == [(2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert nnunet_unet_plan((24, 40))["strides"][1:] == [(2, 2), (2, 2), (1, 2)]  # 40 -> 5 is odd: stop
    x = torch.randn(1, 1, 32, 32, 32)
    assert measured_flops(build_nnunet_unet(1, 3, (32, 32, 32)), x) == nnunet_unet_forward_flops(1, 3, (32, 32, 32))


def test_mta_returns_the_full_sequence_and_pruned_tokens_carry_their_stage_features():
    torch.manual_seed(1)
    net = TokenSparseSegmenter(1, 2, (16, 16, 16), TINY).eval()
    seen = {}
    for s, stage in enumerate(net.encoder.stages):
        stage.register_forward_hook(lambda m, args, out, s=s: seen.update({f"in{s}": args[0], f"out{s}": out}))
    net.mta.assemble.register_forward_hook(lambda m, args, out: seen.update(sources=args[0], assembled=out))
    net.mta.register_forward_hook(lambda m, args, out: seen.update(mta=out))
    with torch.no_grad():
        net(torch.randn(2, 1, 16, 16, 16))
    B, L, D = 2, 64, TINY.dim
    assert seen["mta"].shape == (B, L, D)
    sources = seen["sources"]
    assert len(sources) == 3  # pruned at stage 0, pruned at stage 1, survivors
    positions = torch.cat([s.positions for s in sources], dim=1)
    assert torch.equal(positions.sort(dim=1).values, torch.arange(L).expand(B, L))  # every position exactly once
    for s in range(2):  # pruned tokens: the features they had when stage s pruned them
        live_in, (_, dropped) = seen[f"in{s}"], seen[f"out{s}"]
        assert sources[s] is dropped
        rows = (live_in.positions.unsqueeze(2) == dropped.positions.unsqueeze(1)).float().argmax(1)  # (B, n)
        assert torch.equal(dropped.features, live_in.features.gather(1, rows.unsqueeze(-1).expand(-1, -1, D)))
    assembly = net.mta.assemble
    expected = torch.zeros(B, L, TINY.mta_dim)
    for s, source in enumerate(sources):  # each source through its own norm + linear + embedding, at its position
        feats = assembly.projs[s](assembly.norms[s](source.features)) + assembly.source_embed[s]
        for b in range(B):
            expected[b, source.positions[b]] = feats[b]
    assert torch.allclose(seen["assembled"], expected, atol=1e-6)


def test_each_unetr_skip_level_gets_its_own_assembly():
    """The fix over the published code: a skip fed from block t sees the tokens pruned before t with their
    stage features and the live ones with block t's features, through its own assembly."""
    config = replace(TINY, token_size=8, depth=6, prune_after=(1, 3), decoder_features=4)  # taps 2, 4, 6
    net = TokenSparseSegmenter(1, 2, (16, 32, 32), config).eval()
    assert net.taps == (2, 4, 6)
    assert {k: len(a.projs) for k, a in net.skip_assemblies.items()} == {"2": 2, "4": 3}
    maps = {}
    net.decoder.register_forward_hook(lambda m, args, out: maps.update(maps=args[1]))
    for key, assembly in net.skip_assemblies.items():
        assembly.register_forward_hook(lambda m, args, out, key=key: maps.update({key: out}))
    with torch.no_grad():
        net(torch.randn(1, 1, 16, 32, 32))
    assert len(maps["maps"]) == 3
    for i, key in enumerate(("2", "4")):
        assert torch.equal(maps["maps"][i].flatten(2).transpose(1, 2), maps[key])
    assert not torch.allclose(maps["maps"][0], maps["maps"][1])


CASES = [  # (patch, token size): 3D anisotropic, 3D isotropic, 2D
    ((16, 32, 32), (4, 8, 8)),
    ((16, 16, 16), 4),
    ((32, 48), 8),
]


@pytest.mark.parametrize("patch,token", CASES)
@pytest.mark.parametrize("decoder", ["unetr", "light"])
@pytest.mark.parametrize("sparse", [True, False])
def test_shapes_2d_3d_batch_and_anisotropic_tokens(patch, token, decoder, sparse):
    torch.manual_seed(2)
    config = replace(TINY, token_size=token, decoder=decoder)
    if not sparse:
        config = replace(config, prune_after=(), keep_ratios=())
    net = TokenSparseSegmenter(2, 3, patch, config).train()
    x = torch.randn(2, 2, *patch)
    out = net(x)
    assert out.shape == (2, 3, *patch)
    out.mean().backward()
    L = net.pos.table.shape[0]
    assert len(net.last_keep_indices) == (2 if sparse else 0)
    live = L
    for kept in net.last_keep_indices:
        live = num_kept(live, 0.5, TINY.min_tokens)
        assert kept.shape == (2, live) and kept.max() < L
        assert all(len(set(row.tolist())) == live for row in kept)


def test_decoder_levels_follow_the_largest_token_side():
    assert upsampling_strides((4, 16, 16)) == [(2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert len(upsampling_strides((8, 8, 8))) == 3 and len(upsampling_strides((4, 4))) == 2
    assert tap_blocks(12, 4) == (3, 6, 9, 12) and tap_blocks(12, 3) == (4, 8, 12) and tap_blocks(12, 1) == (12,)


def test_input_of_another_divisible_size_works():
    net = TokenSparseSegmenter(1, 2, (16, 16, 16), TINY).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 24, 16, 32)).shape == (1, 2, 24, 16, 32)


@pytest.mark.parametrize("decoder", ["unetr", "light"])
@pytest.mark.parametrize("training", [True, False])
def test_fp16_autocast_forward_is_finite_and_close_to_fp32(decoder, training):
    torch.manual_seed(3)
    net = TokenSparseSegmenter(1, 3, (16, 32, 32), replace(TINY, decoder=decoder)).train(training)
    x = 10 * torch.randn(2, 1, 16, 32, 32)
    with torch.autocast("cpu", dtype=torch.float16):
        out = net(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    if not training:  # deterministic: compare with fp32
        with torch.no_grad():
            reference = net(x)
        # fp16 may flip a near-tie in the (untrained) scores, so a few kept tokens differ: compare on average
        assert (out.float() - reference).abs().mean() <= 0.01 * reference.abs().max()
        dense = TokenSparseSegmenter(1, 3, (16, 32, 32), replace(net.config, prune_after=(), keep_ratios=())).eval()
        with torch.no_grad():
            reference = dense(x)
            with torch.autocast("cpu", dtype=torch.float16):
                out = dense(x)
        assert (out.float() - reference).abs().max() <= 0.05 * reference.abs().max()


def test_inference_is_deterministic_and_training_selects_the_same_tokens():
    torch.manual_seed(4)
    net = TokenSparseSegmenter(1, 2, (16, 16, 16), TINY)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        first = net.eval()(x)
        keep = [k.clone() for k in net.last_keep_indices]
        assert torch.equal(net(x), first)
        net.train()(x)
    assert all(torch.equal(a, b) for a, b in zip(keep, net.last_keep_indices))


@pytest.mark.parametrize("straight_through", [False, True])
def test_straight_through_trains_on_inference_features_and_still_teaches_the_scorers(straight_through):
    torch.manual_seed(4)
    net = TokenSparseSegmenter(1, 2, (16, 16, 16), replace(TINY, straight_through=straight_through))
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        inference = net.eval()(x)
    training = net.train()(x)
    assert torch.allclose(training, inference, atol=1e-5) == straight_through  # soft: the indicators scale features
    training.square().mean().backward()
    assert all(stage.scorer.head[-1].weight.grad.abs().sum() > 0 for stage in net.encoder.stages)


def test_keep_one_control_trains_every_token_through_the_sparse_architecture():
    """STPMTATrainer_keep1, the control against UNETRTrainer: no token is pruned or scaled in training, the scorers
    get exactly zero gradient (the published estimate would hand them noise), MTA still assembles the deepest tap."""
    from nnscd_trainers.token_sparse_trainers import STPMTATrainer_keep1

    torch.manual_seed(5)
    net = TokenSparseSegmenter(1, 2, (16, 16, 16), replace(TINY, **STPMTATrainer_keep1.config_changes))
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        inference = net.eval()(x)
    training = net.train()(x)
    assert [k.shape[1] for k in net.last_keep_indices] == [64, 64]  # the 4^3 grid, whole after both stages
    assert torch.allclose(training, inference, atol=1e-5)
    training.square().mean().backward()
    assert all(not p.grad.any() for stage in net.encoder.stages for p in stage.scorer.parameters())
    assert any(p.grad.any() for p in net.mta.blocks.parameters())


def test_patch_not_divisible_by_token_size_raises_a_clear_error():
    with pytest.raises(ValueError) as error:
        TokenSparseSegmenter(1, 2, (32, 32, 30), replace(TINY, token_size=8))
    message = str(error.value)
    assert "(32, 32, 30)" in message and "(8, 8, 8)" in message and "axis 2" in message and "32" in message
    net = TokenSparseSegmenter(1, 2, (16, 16, 16), TINY)
    with pytest.raises(ValueError, match=r"axis 1"):
        net(torch.randn(1, 1, 16, 18, 16))


def test_registry_names_builders_and_paper_setting():
    names = {"unetr", "stpmta", "vit-light", "stpmta-light", "nnunet-unet"}
    assert names | {f"{n}-paper" for n in names - {"nnunet-unet"}} <= set(NETWORKS) == set(FLOP_MODELS)
    assert PAPER.dim == 768 and PAPER.depth == 12 and PAPER.heads == 12 and PAPER.token_size == 8
    assert PAPER.prune_after == (3, 6, 9) and PAPER.keep_ratios == (0.25, 0.25, 0.25)
    assert not CONFIGS["unetr-paper"].sparse and CONFIGS["vit-light-paper"].decoder == "light"
    assert replace(CONFIGS["stpmta-paper"], prune_after=(), keep_ratios=()) == CONFIGS["unetr-paper"]
    net = build_network("stpmta-light", 1, 2, (16, 16, 16))
    assert isinstance(net, TokenSparseSegmenter) and net.config == CONFIGS["stpmta-light"]
    # best case at the paper's patch: the sparse network needs well under half the dense twin's FLOPs
    assert FLOP_MODELS["stpmta-light-paper"](1, 14, (96, 96, 96)) < 0.4 * FLOP_MODELS["vit-light-paper"](1, 14, (96, 96, 96))
    with pytest.raises(KeyError, match="known"):
        build_network("nope", 1, 2, (16, 16, 16))


def test_conv_stem_and_he_decoder_init_variants():
    """The recipe elements borrowed from Primus: its residual conv stem (FLOPs counted exactly) and its decoder
    init (He normal, larger than torch's default), each a config field, with clear errors where they do not fit."""
    patch = (16, 16, 16)
    config = replace(TINY, token_size=8, prune_after=(2,), keep_ratios=(0.5,), decoder="light", stem="conv",
                     decoder_init="he")
    net = TokenSparseSegmenter(1, 3, patch, config)
    assert type(net.patch_embed).__name__ == "PatchEmbedDeeperControlled"
    x = torch.randn(2, 1, *patch)
    assert measured_flops(net, x) == token_sparse_forward_flops(config, 1, 3, patch, batch_size=2)
    torch_init = TokenSparseSegmenter(1, 3, patch, replace(config, decoder_init="torch"))
    last = [m for m in net.decoder.modules() if isinstance(m, torch.nn.ConvTranspose3d)][0]
    last_torch = [m for m in torch_init.decoder.modules() if isinstance(m, torch.nn.ConvTranspose3d)][0]
    assert last.weight.std() > 2 * last_torch.weight.std() and not last.bias.any()
    with pytest.raises(ValueError, match="conv stem strides 8.*stem='linear'"):
        TokenSparseSegmenter(1, 3, patch, replace(config, token_size=4))
    with pytest.raises(ValueError, match="stem must be one of"):
        replace(config, stem="deep")


def test_layer_scale_scales_each_residual_branch_from_its_init():
    from nnscd.networks.token_sparse_vit import Block

    torch.manual_seed(0)
    plain, scaled = Block(24, 2, 4.0), Block(24, 2, 4.0, layer_scale=0.1)
    assert {k for k in scaled.state_dict()} - {k for k in plain.state_dict()} == {"ls1.gamma", "ls2.gamma"}
    scaled.load_state_dict(plain.state_dict(), strict=False)
    assert torch.equal(scaled.ls1.gamma, torch.full((24,), 0.1))
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        scaled.ls1.gamma.zero_(), scaled.ls2.gamma.zero_()
        assert torch.equal(scaled(x), x)  # both branches scaled to nothing: the identity
        scaled.ls1.gamma.fill_(1), scaled.ls2.gamma.fill_(1)
        assert torch.allclose(scaled(x), plain(x))  # scale 1: the plain block
    net = TokenSparseSegmenter(1, 2, (16, 16, 16), replace(CONFIGS["vit-light"], layer_scale=0.1, depth=2,
                                                           dim=24, heads=2, token_size=8))
    assert all(b.ls1.gamma.eq(0.1).all() for b in net.encoder.blocks)  # the ViT init leaves LayerScale alone


def test_infill_network_at_keep_one_is_the_dense_twin_and_warm_starts_from_its_checkpoint(tmp_path, capsys):
    """assembly="infill" holds every module of UNETR under the same name: a dense checkpoint loads with only the
    scorers and MTA fresh, and at keep 1 the network then computes the dense output, in training as at inference."""
    from nnscd.core.pretrained_weights import load_pretrained_weights

    torch.manual_seed(6)
    dense = TokenSparseSegmenter(1, 2, (16, 16, 16), replace(TINY, prune_after=(), keep_ratios=()))
    checkpoint = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": dense.state_dict()}, checkpoint)
    config = replace(TINY, keep_ratios=(1.0, 1.0), assembly="infill", estimator="perturbed_centered")
    net = TokenSparseSegmenter(1, 2, (16, 16, 16), config)
    load_pretrained_weights(net, str(checkpoint))
    assert "starting fresh: encoder.stages, mta" in capsys.readouterr().out
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), dense.eval()(x), atol=1e-5)
        assert torch.allclose(net.train()(x), dense.train()(x), atol=1e-5)
    projected = TokenSparseSegmenter(1, 2, (16, 16, 16), replace(config, assembly="projected"))
    assert not getattr(projected, "fresh_modules", ())  # its assemblies replace the dense norm: no warm start


def test_infill_decodes_each_position_from_the_deepest_block_it_reached_and_mta_corrects_it():
    """Pruned positions keep their stage features in every later tap, unnormalised in the skips and through the dense
    twin's final norm in the deepest map; MTA's correction starts at zero and is the first thing to learn."""
    torch.manual_seed(7)
    config = replace(TINY, token_size=8, depth=6, prune_after=(1, 3), decoder_features=4, assembly="infill")
    net = TokenSparseSegmenter(1, 2, (16, 32, 32), config).eval()
    assert net.taps == (2, 4, 6) and len(net.skip_assemblies) == 0
    seen = {}
    for s, stage in enumerate(net.encoder.stages):
        stage.register_forward_hook(lambda m, args, out, s=s: seen.update({f"pruned{s}": out[1], f"kept{s}": out[0]}))
    for number in (2, 4, 6):
        net.encoder.blocks[number - 1].register_forward_hook(lambda m, args, out, n=number: seen.update({n: out}))
    net.decoder.register_forward_hook(lambda m, args, out: seen.update(maps=args[1]))
    with torch.no_grad():
        net(torch.randn(1, 1, 16, 32, 32))
    maps = [m.flatten(2).transpose(1, 2)[0] for m in seen["maps"]]  # (L, D) each
    pruned0, pruned1 = seen["pruned0"], seen["pruned1"]
    assert torch.equal(maps[0][pruned0.positions[0]], pruned0.features[0])  # tap 2: stage-1 features
    live2 = seen["kept0"].positions[0]
    assert torch.equal(maps[0][live2], seen[2][0])  # and block 2's for the tokens still live
    assert torch.equal(maps[1][pruned0.positions[0]], pruned0.features[0])
    deepest = torch.cat([pruned0.features, pruned1.features, seen[6]], dim=1)[0]
    positions = torch.cat([pruned0.positions, pruned1.positions, seen["kept1"].positions], dim=1)[0]
    assert torch.allclose(maps[2][positions], net.norm(deepest), atol=1e-6)  # MTA adds zero at init
    net.train()(torch.randn(2, 1, 16, 32, 32)).square().mean().backward()
    assert net.mta.proj.weight.grad.abs().sum() > 0


def test_infill_network_starts_from_its_dense_twins_weights_for_the_same_seed():
    """Built after the same manual_seed, every module the dense twin has holds the twin's initial weights (the new
    ones draw their own), so seed-paired runs of the twins differ only in what pruning and MTA do."""
    config = replace(TINY, assembly="infill")
    torch.manual_seed(8)
    dense = TokenSparseSegmenter(1, 2, (16, 16, 16), replace(config, prune_after=(), keep_ratios=()))
    torch.manual_seed(8)
    sparse = TokenSparseSegmenter(1, 2, (16, 16, 16), config).state_dict()
    assert all(torch.equal(weight, sparse[name]) for name, weight in dense.state_dict().items())
    assert len(sparse) > len(dense.state_dict())
