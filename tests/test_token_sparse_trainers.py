"""STP+MTA trainers inside nnU-Net: network building from plans, schedule, keep statistics, end to end."""
import json
import re
from dataclasses import replace

import pytest
import torch

import nnscd_trainers
from conftest import CONFIG, DATASET, DATASET_ID, dice_per_class, run_command
from nnscd.networks.token_sparse_vit import TokenSparseSegmenter, assembly_of
from nnscd_trainers.keep_statistics import kept_foreground_share
from nnscd_trainers.token_sparse_trainers import TokenSparseTrainer, WarmupPolyLR

TOKEN_TRAINERS = [getattr(nnscd_trainers, n) for n in nnscd_trainers.__all__
                  if issubclass(getattr(nnscd_trainers, n), TokenSparseTrainer) and "paper" not in n]


def _configuration_manager(patch, token_size=None):
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    config = {"patch_size": patch, "spacing": [1.0] * len(patch), "batch_size": 2,
              "architecture": {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []}}
    if token_size:
        config["token_size"] = token_size
    return ConfigurationManager(config)


@pytest.mark.parametrize("trainer", TOKEN_TRAINERS, ids=lambda t: t.__name__)
def test_each_trainer_builds_its_network_from_the_plans(trainer):
    token = [8, 8, 8] if "convstem" in trainer.__name__ else [4, 8, 8]  # the conv stem strides 8 on every axis
    net = trainer.build_network_architecture(None, _configuration_manager([16, 32, 32], token), 2, 3, False)
    assert isinstance(net, TokenSparseSegmenter) and net.token_size == tuple(token)
    assert net.config.sparse == trainer.network.startswith("stpmta")  # the registry name says whether it prunes
    with torch.no_grad():
        assert net.eval()(torch.randn(2, 2, 16, 32, 32)).shape == (2, 3, 16, 32, 32)


def test_variants_change_only_what_they_name():
    base = nnscd_trainers.STPMTATrainer_projected.network_config([8, 8, 8])
    assert nnscd_trainers.STPMTATrainer_keep25.network_config([8, 8, 8]).keep_ratios == (0.25, 0.25)
    gumbel = nnscd_trainers.STPMTATrainer_gumbel.network_config([8, 8, 8])
    assert gumbel.estimator == "gumbel" and gumbel.keep_ratios == base.keep_ratios
    centered = nnscd_trainers.STPMTATrainer_centered.network_config([8, 8, 8])
    assert centered == replace(base, estimator="perturbed_centered")
    paper = nnscd_trainers.STPMTATrainer_paper.network_config([8, 8, 8])
    assert (paper.dim, paper.depth, paper.heads, paper.prune_after) == (768, 12, 12, (3, 6, 9))


# STPMTATrainer variants whose runs (documentation/results/) were made with the projected assemblies
MEASURED_ON_PROJECTED = ["keep75", "keep25", "keep1", "centered", "keepwarmup", "straightthrough", "lr2en3", "gumbel",
                         "fgprior", "equalcompute", "projected_budget"]


def test_stpmta_trainer_decodes_the_infill_and_measured_variants_keep_their_network():
    def assembly(name: str) -> str:
        return getattr(nnscd_trainers, name).network_config([8, 8, 8]).assembly

    assert [assembly(n) for n in ("STPMTATrainer", "STPMTATrainer_budget", "STPMTATrainer_demo")] == ["infill"] * 3
    assert {assembly(f"STPMTATrainer_{v}") for v in MEASURED_ON_PROJECTED} == {"projected"}
    assert assembly("STPMTATrainer_paper") == "projected"  # the paper's network at the paper's size
    for name in ("STPMTATrainer_infill_budget", "STPMTATrainer_infill"):  # the names of the infill's first runs
        assert getattr(nnscd_trainers, name).network_config([8, 8, 8]) == \
            nnscd_trainers.STPMTATrainer.network_config([8, 8, 8])


def _projected_fold(trained_stpmta, model, fold: str) -> dict:
    """`model`/fold_`fold`: trained_stpmta's fold 3 with the weights of an STPMTATrainer_cpu of the projected
    assemblies, as a fold trained before 2026-12-07 holds them; returns those weights."""
    import shutil

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    shutil.copytree(trained_stpmta / "fold_3", model / f"fold_{fold}")
    checkpoint_file = model / f"fold_{fold}" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    plans = PlansManager(json.loads((model / "plans.json").read_text()))
    network = nnscd_trainers.STPMTATrainer_projected.build_network_architecture(
        plans, plans.get_configuration(CONFIG), 1, 3, False)
    weights = network.state_dict()
    checkpoint["network_weights"] = weights
    checkpoint["optimizer_state"] = torch.optim.AdamW(network.parameters()).state_dict()
    torch.save(checkpoint, checkpoint_file)
    return weights


def test_a_fold_of_the_projected_network_predicts_and_validates_as_that_network(nnunet_env, trained_stpmta, tmp_path,
                                                                               monkeypatch):
    import shutil

    from nnscd.core.errors import UserError
    from nnscd.core.paths import TRAINER_LOOKUP_FOLDER
    from nnscd.core.predictor import nnScdPredictor

    monkeypatch.setenv("nnUNet_extTrainer", TRAINER_LOOKUP_FOLDER)  # as every nnScd_ command sets it

    results = tmp_path / "results"
    model = results / DATASET / trained_stpmta.name
    shutil.copytree(trained_stpmta, model, ignore=shutil.ignore_patterns("fold_*"))
    shutil.copytree(trained_stpmta / "fold_3", model / "fold_3")  # today's network
    old = _projected_fold(trained_stpmta, model, "4")

    def network_of(*folds):
        predictor = nnScdPredictor(device=torch.device("cpu"))
        predictor.initialize_from_trained_model_folder(str(model), folds)
        return predictor.trainer_name, predictor.network

    name, network = network_of("4")
    assert (name, network.config.assembly) == ("STPMTATrainer_cpu", "projected")
    assert all(torch.equal(v, old[k]) for k, v in network.state_dict().items())
    assert network_of("3")[1].config.assembly == "infill"
    assert assembly_of(torch.load(model / "fold_3" / "checkpoint_final.pth", weights_only=False)["network_weights"]) \
        == "infill"
    with pytest.raises(UserError, match="fold_4.*older STPMTATrainer_cpu network.*fold_3"):
        network_of("3", "4")

    # nnScd_train --val (as --c) loads the old fold into the network it holds and validates with it
    shutil.rmtree(model / "fold_3")
    (model / "fold_4").rename(model / "fold_3")
    shutil.rmtree(model / "fold_3" / "validation", ignore_errors=True)
    run_command(["nnScd_train", str(DATASET_ID), CONFIG, "3", "-tr", "STPMTATrainer_cpu", "-p", "nnScdPlans",
                 "-device", "cpu", "--val"], {**nnunet_env, "nnUNet_results": str(results)})
    assert (model / "fold_3" / "validation" / "summary.json").is_file()
    logs = "".join(f.read_text() for f in (model / "fold_3").glob("training_log_*.txt"))
    assert "a fold of the projected assembly, not the infill one STPMTATrainer_cpu builds today" in logs


def test_learning_rate_is_a_function_of_the_epoch_so_resuming_keeps_it():
    def lrs(start, stop):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = WarmupPolyLR(optimizer, 1e-3, max_epochs=20, warmup=3)
        out = []
        for epoch in range(start, stop):
            scheduler.step(epoch)  # what nnU-Net's on_train_epoch_start does
            out.append(optimizer.param_groups[0]["lr"])
        return out

    straight = lrs(0, 20)
    assert straight[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # warm-up, then the peak
    assert all(a > b for a, b in zip(straight[3:], straight[4:]))  # then poly decay
    assert lrs(7, 20) == pytest.approx(straight[7:])  # a fresh scheduler at epoch 7 (as after --c)


def test_kept_foreground_share_counts_foreground_tokens_kept():
    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, :4, :4] = 1  # one foreground token of four (token 4x4, grid 2x2)
    keep = [torch.tensor([[0, 3]]), torch.tensor([[3]])]
    assert kept_foreground_share(keep, target > 0, (4, 4)).tolist() == [1.0, 0.0]


def test_stpmta_end_to_end_train_predict_evaluate(nnunet_env, planned_dataset, trained_stpmta, tmp_path):
    trainer, model = "STPMTATrainer_cpu", trained_stpmta
    log = next((model / "fold_3").glob("training_log_*.txt")).read_text()
    stats = [json.loads(s) for s in re.findall(r"Foreground tokens kept per pruning stage: (\[[^\]]*\])", log)]
    assert len(stats) == 5 and all(len(s) == 2 for s in stats)  # every epoch, both pruning stages
    assert (model / "fold_3" / "token_keep_progress.png").stat().st_size > 10_000
    plans = json.loads((model / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["token_size"] == [8, 8, 8]

    out = tmp_path / "pred"
    run_command(["nnScd_predict", "-i", str(planned_dataset / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                 "-c", "3d_fullres", "-tr", trainer, "-p", "nnScdPlans", "-f", "3", "-device", "cpu",
                 "-npp", "0", "-nps", "0", "--disable_tta"], nnunet_env)
    dice = dice_per_class(out, planned_dataset / "labelsTs", [1, 2])
    assert min(dice.values()) > 0.2, dice  # 50 iterations of a ViT from scratch: learning, not yet converged


def test_equal_compute_schedules_give_each_trainer_the_unets_budget_time():
    from pathlib import Path

    from nnscd_trainers.nnscd_trainer import BUDGET_SCHEDULE, UNET_ITERATION_S, equal_compute_schedule

    assert equal_compute_schedule(UNET_ITERATION_S) == BUDGET_SCHEDULE
    assert equal_compute_schedule(UNET_ITERATION_S / 3) == (30, 25, 5)
    measured = json.loads((Path(__file__).parents[1] / "documentation" / "results" /
                           "benchmark_hippocampus_steps_cpu.json").read_text())["results"]
    step_s = {r["name"]: r["iter_s_with_loading"] for r in measured}
    assert UNET_ITERATION_S == pytest.approx(step_s["nnScdTrainer"], abs=1e-3)
    variants = [n for n in nnscd_trainers.__all__ if n.endswith("_equalcompute")]
    assert len(variants) >= 5
    for name in variants:  # the epochs follow the committed measurement of the trainer they shorten
        epochs = getattr(nnscd_trainers, name).schedule[0]
        assert epochs == round(BUDGET_SCHEDULE[0] * step_s["nnScdTrainer"] / step_s[name.split("_")[0]]), name
