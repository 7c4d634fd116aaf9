"""nnScd_benchmark's dataset and predict modes at a tiny size, through the console script."""
import csv
import json
from pathlib import Path

import matplotlib.image

from conftest import CONFIG, DATASET_ID, TRAINER, export_onnx, run_command
from nnscd.tools.benchmark_networks import RESULT_KEYS
from nnscd.tools.benchmark_trainers import PIPELINE_KEYS


def test_dataset_mode_times_the_trainer_with_and_without_data_loading(nnunet_env, trained_model, tmp_path):
    results_before = sorted(p.name for p in Path(nnunet_env["nnUNet_results"]).rglob("*"))
    run_command(["nnScd_benchmark", "-d", str(DATASET_ID), "-c", CONFIG, "-tr", TRAINER, "--device", "cpu",
                 "--iters", "1", "--warmup", "0", "--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv"),
                 "--plot", str(tmp_path / "b.png")], nnunet_env)
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["patch_size"] == [32, 32, 32] and report["batch_size"] == 2
    (row,) = report["results"]
    assert row["name"] == TRAINER and set(RESULT_KEYS) | set(PIPELINE_KEYS) <= set(row)
    assert row["iterations_per_epoch"] == 10  # the CPU schedule
    assert row["epoch_s_with_loading"] == row["iter_s_with_loading"] * 10
    assert row["params"] > 1e5 and row["gflops_forward"] > 0 and row["peak_memory_mb"] > 100
    with open(tmp_path / "b.csv") as f:
        assert next(csv.DictReader(f))["name"] == TRAINER
    assert matplotlib.image.imread(str(tmp_path / "b.png")).ndim == 3
    assert sorted(p.name for p in Path(nnunet_env["nnUNet_results"]).rglob("*")) == results_before, \
        "a benchmark must not write into the user's results"


def test_predict_mode_times_the_predictors_and_checks_they_agree(nnunet_env, planned_dataset, trained_model,
                                                                  tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    case = sorted((planned_dataset / "imagesTs").iterdir())[0]
    (images / case.name).symlink_to(case)
    export = tmp_path / "export"
    export_onnx(nnunet_env, TRAINER, "nnUNetPlans", ["0"], export)
    run_command(["nnScd_benchmark", "--predict", "-i", str(images), "-d", str(DATASET_ID), "-c", CONFIG, "-tr",
                 TRAINER, "-f", "0", "--device", "cpu", "--iters", "1", "--disable_tta", "--onnx", str(export),
                 "--json", str(tmp_path / "p.json"), "--csv", str(tmp_path / "p.csv")], nnunet_env)
    report = json.loads((tmp_path / "p.json").read_text())
    (row,) = report["cases"]
    assert row["case"] == case.name and row["tiles"] == 1 and row["nnunet_s"] > 0 and row["nnscd_s"] > 0
    assert row["identical_fraction"] > 0.999 and report["min_dice_between_predictors"] >= 0.999
    assert row["onnx_s"] > 0 and row["onnx_identical_fraction"] > 0.999 and report["onnx_min_dice"] >= 0.999
    assert report["mirroring"] is False and report["forward_batch_from"] == "timing"
    with open(tmp_path / "p.csv") as f:
        assert float(next(csv.DictReader(f))["onnx_min_dice"]) >= 0.999
