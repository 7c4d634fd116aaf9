"""nnScd_token_maps and nnScd_attention_ablation: on one short STP+MTA training, and at unit level on a tiny net."""
import csv
import dataclasses
import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET, run_command
from nnscd.tools.attention_ablation import ablated_decoder, check_keep_ratios, inference_keep
from nnscd.networks.soft_topk import num_kept
from nnscd.networks.token_sparse_vit import TokenSparseConfig, TokenSparseSegmenter
from nnscd.core.errors import UserError
from nnscd.tools.token_maps import kept_voxels
from nnscd.tools.trained_models import require_pruning, require_token_sparse

TRAINER, PLANS, CONFIG = "STPMTATrainer_cpu", "nnScdPlans", "3d_fullres"
FOLD = "3"  # the fold conftest.trained_stpmta trains
TINY = TokenSparseConfig(dim=32, depth=4, heads=2, token_size=4, prune_after=(1, 2), keep_ratios=(0.5, 0.5),
                         min_tokens=2, mta_dim=16, mta_heads=2, num_samples=8, decoder_features=4)


# ---------------------------------------------------------------------------------------------------------------
# nnScd_token_maps
# ---------------------------------------------------------------------------------------------------------------

def test_token_maps_report_k_per_stage_and_draw_them(trained_stpmta, planned_dataset, nnunet_env, tmp_path):
    out = tmp_path / "maps"
    run_command(["nnScd_token_maps", "-m", str(trained_stpmta), "-f", FOLD, "-i", str(planned_dataset / "imagesTs"),
                 "-o", str(out), "-device", "cpu", "--slices", "3"], nnunet_env)
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (planned_dataset / "imagesTs").iterdir())
    assert sorted(p.name for p in out.glob("*.json")) == [f"{c}_tokens.json" for c in cases]

    configuration = json.loads((trained_stpmta / "plans.json").read_text())["configurations"][CONFIG]
    grid = [p // t for p, t in zip(configuration["patch_size"], configuration["token_size"])]
    import nnscd_trainers

    config = getattr(nnscd_trainers, TRAINER).network_config(configuration["token_size"])
    for case in cases:
        report = json.loads((out / f"{case}_tokens.json").read_text())
        assert report["grid"] == grid and report["num_tokens"] == math.prod(grid)
        live, previous = math.prod(grid), set(range(math.prod(grid)))
        assert [s["after_block"] for s in report["stages"]] == list(config.prune_after)
        for stage, keep in zip(report["stages"], config.keep_ratios):
            expected = num_kept(live, keep, config.min_tokens)
            positions = set(stage["positions"])
            assert stage["live_before"] == live and stage["kept"] == expected == len(positions)
            assert positions <= previous  # a stage keeps only tokens still live
            live, previous = expected, positions

        pixels = matplotlib.image.imread(out / f"{case}_tokens.png")[..., :3]
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500  # two stage rows, three slices
        dimmed = (pixels.max(axis=-1) < 0.3).mean()  # pruned tokens (50% and 75% of them) are dark
        tinted = (pixels[..., 0] - pixels[..., 2] > 0.15).mean()  # kept tokens carry an amber tint
        assert dimmed > 0.1 and tinted > 0.02, (dimmed, tinted)


def test_kept_voxels_follow_the_c_order_token_grid():
    mask = kept_voxels([1, 6], grid=(2, 2, 2), token_size=(1, 2, 3))  # positions 1 = (0, 0, 1), 6 = (1, 1, 0)
    expected = np.zeros((2, 4, 6), dtype=bool)
    expected[0, 0:2, 3:6] = expected[1, 2:4, 0:3] = True
    np.testing.assert_array_equal(mask, expected)


def test_pruning_and_network_checks_fail_with_the_trainers_to_use():
    with pytest.raises(UserError) as refused:
        require_pruning(TokenSparseSegmenter(1, 2, (16, 16, 16), TokenSparseConfig(prune_after=(), keep_ratios=())),
                        "UNETRTrainer")
    message = str(refused.value)
    assert "dense" in message and "STPMTATrainer" in message
    assert "UNETRTrainer" not in message.split("prunes:")[1]  # only trainers that prune are offered

    with pytest.raises(UserError) as refused:
        require_token_sparse(torch.nn.Conv3d(1, 2, 3), "nnScdTrainer", "nnScd_attention_ablation")
    message = str(refused.value)
    assert "TokenSparseSegmenter" in message and "UNETRTrainer" in message and "STPMTATrainer" in message


def fake_model_folder(nnunet_env, trainer_name: str) -> Path:
    """An untrained checkpoint of `trainer_name` in nnU-Net's model layout: what the predictor loads."""
    import nnscd_trainers
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    preprocessed = Path(nnunet_env["nnUNet_preprocessed"]) / DATASET
    plans_manager = PlansManager(str(preprocessed / f"{PLANS}.json"))
    network = getattr(nnscd_trainers, trainer_name).build_network_architecture(
        plans_manager, plans_manager.get_configuration(CONFIG), 1, 3, False)
    folder = Path(nnunet_env["nnUNet_results"]) / DATASET / f"{trainer_name}__{PLANS}__{CONFIG}"
    (folder / f"fold_{FOLD}").mkdir(parents=True, exist_ok=True)
    for name in (f"{PLANS}.json", "dataset.json"):
        (folder / ("plans.json" if name.startswith(PLANS) else name)).write_text((preprocessed / name).read_text())
    torch.save({"network_weights": network.state_dict(), "trainer_name": trainer_name,
                "init_args": {"configuration": CONFIG}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               folder / f"fold_{FOLD}" / "checkpoint_final.pth")
    return folder


def test_token_maps_of_a_dense_twin_stop_with_the_trainers_that_prune(planned_dataset, nnunet_env, tmp_path):
    folder = fake_model_folder(nnunet_env, "UNETRTrainer_cpu")
    proc = run_command(["nnScd_token_maps", "-m", str(folder), "-f", FOLD, "-i", str(planned_dataset / "imagesTs"),
                        "-o", str(tmp_path / "out"), "-device", "cpu"], nnunet_env, check=False,
                       in_process=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "dense network (no pruning stages)" in proc.stderr and "STPMTATrainer" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# nnScd_attention_ablation
# ---------------------------------------------------------------------------------------------------------------

def test_ablation_reports_each_mode_and_zeroed_attention_changes_the_prediction(trained_stpmta, planned_dataset,
                                                                                 nnunet_env, tmp_path):
    out = tmp_path / "ablation"
    proc = run_command(["nnScd_attention_ablation", "-m", str(trained_stpmta), "-f", FOLD,
                        "-i", str(planned_dataset / "imagesTs"), "-ref", str(planned_dataset / "labelsTs"),
                        "-o", str(out), "-device", "cpu", "-npp", "0", "-nps", "0", "--keep", "1"], nnunet_env)
    report = json.loads((out / "ablation.json").read_text())
    modes = report["modes"]
    assert list(modes) == ["none", "zeros", "shuffle", "keep1"] and report["tta"] is False
    assert report["keep_ratios"] == [0.5, 0.5]  # the network's own, restored after keep1
    assert set(modes["none"]["dice"]) == {"ball", "box", "mean"}
    assert all(drop == 0 for drop in modes["none"]["dice_drop"].values())
    for mode in modes.values():
        assert mode["dice_drop"] == pytest.approx({c: modes["none"]["dice"][c] - d for c, d in mode["dice"].items()})
    assert modes["zeros"]["dice"] != modes["none"]["dice"]

    cases = [p.name for p in (planned_dataset / "labelsTs").iterdir()]
    seg = {m: [sitk.GetArrayFromImage(sitk.ReadImage(str(out / m / c))) for c in cases] for m in ("none", "zeros")}
    assert any((a != b).any() for a, b in zip(seg["none"], seg["zeros"]))

    with open(out / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["class"]) for r in rows] == [(m, c) for m in modes for c in ("ball", "box", "mean")]
    assert all(float(r["dice"]) == pytest.approx(modes[r["mode"]]["dice"][r["class"]]) for r in rows)
    assert "mean drop" in proc.stdout and "zeros" in proc.stdout


def decoder_inputs(net: TokenSparseSegmenter, x: torch.Tensor, mode: str, monkeypatch, seed: int = 0):
    """The maps `net.decoder.forward` itself receives under an ablation, and the network's output."""
    received = []
    forward = net.decoder.forward

    def recording_forward(image, maps):
        received.append([m.clone() for m in maps])
        return forward(image, maps)

    with monkeypatch.context() as patch:
        patch.setattr(net.decoder, "forward", recording_forward)
        with ablated_decoder(net, mode, seed), torch.no_grad():
            output = net(x)
    return received[0], output


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TokenSparseSegmenter(1, 3, (16, 16, 16), TINY).eval(), torch.randn(2, 1, 16, 16, 16)


def test_zeros_ablation_feeds_the_decoder_zero_maps(tiny_net, monkeypatch):
    net, x = tiny_net
    clean, clean_output = decoder_inputs(net, x, "none", monkeypatch)
    zeroed, zeroed_output = decoder_inputs(net, x, "zeros", monkeypatch)
    assert len(zeroed) == len(clean) == len(net.taps)
    assert all(z.shape == c.shape and not z.any() and c.any() for z, c in zip(zeroed, clean))
    assert not torch.allclose(zeroed_output, clean_output)
    with torch.no_grad():  # the hook is gone after the block
        assert torch.equal(net(x), clean_output)


def test_inference_keep_changes_what_every_stage_keeps_inside_the_block_only(tiny_net):
    net, x = tiny_net
    with torch.no_grad():
        pruned = net(x)
        with inference_keep(net, 1.0):
            dense = net(x)
            assert [p.shape[1] for p in net.last_keep_indices] == [64, 64]  # 4^3 tokens, none pruned
        assert [p.shape[1] for p in net.last_keep_indices] == [64, 64]  # (the last forward's)
        assert torch.equal(net(x), pruned) and [p.shape[1] for p in net.last_keep_indices] == [32, 16]
    assert not torch.allclose(dense, pruned)


def test_keep_ratios_need_a_sparse_network_and_lie_in_zero_one():
    dense = TokenSparseSegmenter(1, 3, (16, 16, 16), dataclasses.replace(TINY, prune_after=(), keep_ratios=()))
    with pytest.raises(UserError, match="UNETRTrainer builds a dense network"):
        check_keep_ratios([1.0], dense, "UNETRTrainer")
    check_keep_ratios([], dense, "UNETRTrainer")  # nothing asked: nothing to refuse
    sparse = TokenSparseSegmenter(1, 3, (16, 16, 16), TINY)
    with pytest.raises(UserError, match=r"--keep 0.0 1.5: .* in \(0, 1\]"):
        check_keep_ratios([0.5, 0.0, 1.5], sparse, "STPMTATrainer")


def token_permutation(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """For (B, D, *grid) maps whose token columns were permuted: source position of every target position."""
    b, a = before.flatten(2)[0].T, after.flatten(2)[0].T  # (L, D)
    match = (a[:, None, :] == b[None, :, :]).all(dim=-1)  # (L, L)
    assert (match.sum(dim=1) == 1).all(), "every shuffled token is exactly one original token"
    return match.int().argmax(dim=1)


def test_shuffle_ablation_permutes_token_positions_alike_in_every_map(tiny_net, monkeypatch):
    net, x = tiny_net
    clean, _ = decoder_inputs(net, x, "none", monkeypatch)
    shuffled, _ = decoder_inputs(net, x, "shuffle", monkeypatch, seed=1)
    orders = [token_permutation(c, s) for c, s in zip(clean, shuffled)]
    assert all(torch.equal(o, orders[0]) for o in orders)  # one permutation for all maps
    assert not torch.equal(orders[0], torch.arange(len(orders[0])))
    assert torch.equal(token_permutation(clean[0], decoder_inputs(net, x, "shuffle", monkeypatch, seed=1)[0][0]),
                       orders[0])  # seeded
    assert not torch.equal(token_permutation(clean[0], decoder_inputs(net, x, "shuffle", monkeypatch, seed=2)[0][0]),
                           orders[0])


def test_central_tile_pads_a_case_smaller_than_the_patch():
    """Hippocampus cases (about 36 x 50 x 35) are smaller than their patch (40 x 56 x 40): padded as nnU-Net does."""
    from types import SimpleNamespace

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnscd.tools.token_maps import central_tile

    predictor = nnUNetPredictor(device=torch.device("cpu"))
    predictor.configuration_manager = SimpleNamespace(patch_size=[8, 8, 8])
    data = np.ones((1, 6, 7, 8), np.float32)
    tile, _ = central_tile(predictor, data)
    assert tile.shape == (1, 8, 8, 8) and tile.sum() == data.sum()
