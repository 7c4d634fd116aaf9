"""ONNX export (nnScd_export_onnx) and onnxruntime prediction (nnScd_predict_from_modelfolder -m EXPORT): every
network family exports with a dynamic batch axis, predictions equal the torch predictor's, bad exports are named."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CONFIG, DATASET_ID, TRAINER, dice_per_class, export_onnx, predict_torch_and_onnx, run_command
from nnscd.core.errors import UserError
from nnscd.core.onnx_models import SIDECAR, sha256
from nnscd.tools.onnx_export import RELATIVE_TOLERANCE, export_model_folder, export_network, max_difference


def _apformer_pruning_about_half(patch):
    """An APFormer whose foreground head keeps a share of the queries that depends on the input, so that the
    exported graph (every query, pruned ones masked) is compared with torch's gathered inference path."""
    from nnscd.networks.apformer import APFormer

    torch.manual_seed(0)
    network = APFormer(1, 3, patch)
    torch.nn.init.normal_(network.fg_head.weight, std=0.5)
    return network


@pytest.mark.parametrize("name, patch", [("nnunet-unet", (32, 32, 32)), ("nnunet-unet", (32, 32)),
                                         ("stpmta", (32, 32, 32)), ("stpmta", (32, 32)),
                                         ("stpmta-light", (32, 32, 32)), ("stpmta-primus-light", (32, 32, 32)),
                                         ("primus-light", (32, 32, 32)), ("apformer", (32, 32, 32))])
def test_every_network_family_exports_and_onnxruntime_agrees_at_any_batch(name, patch, tmp_path):
    from nnscd.networks.registry import build_network

    network = _apformer_pruning_about_half(patch) if name == "apformer" else build_network(name, 1, 3, patch)
    network.eval()
    path = str(tmp_path / f"{name}.onnx")
    export_network(network, torch.zeros(2, 1, *patch), path)
    assert max_difference(network, path, (1, *patch)) < 1e-4  # at batch 1 and 2, traced at 2
    if name == "apformer":  # the inputs compared kept different shares of the queries
        shares = []
        for seed in (0, 1, 2):
            network(torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(seed)))
            shares.append(float(network.aux.qp_pruned_fraction))
        assert 0 < min(shares) and max(shares) < 1 and len(set(shares)) > 1, shares


def test_int8_quantisation_shrinks_the_model_and_still_runs(tmp_path):
    from nnscd.networks.registry import build_network
    from nnscd.tools.onnx_export import quantize_int8

    network = build_network("stpmta", 1, 3, (32, 32, 32)).eval()
    path, quantized = str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx")
    export_network(network, torch.zeros(2, 1, 32, 32, 32), path)
    quantize_int8(path, quantized)
    assert Path(quantized).stat().st_size < 0.5 * Path(path).stat().st_size
    assert max_difference(network, quantized, (1, 32, 32, 32)) < 0.5  # runs; its cost is measured in the docs


def test_unet_folds_export_and_onnxruntime_predicts_the_torch_labels(nnunet_env, planned_dataset, trained_model,
                                                                    tmp_path):
    export = tmp_path / "export"
    sidecar = export_onnx(nnunet_env, TRAINER, "nnUNetPlans", ["0", "1"], export)
    assert set(sidecar["folds"]) == {"0", "1"} and sidecar["configuration"] == CONFIG
    assert sidecar["trainer_name"] == TRAINER and sidecar["patch_size"] == [32, 32, 32]
    assert sidecar["plans"] == json.loads((trained_model / "plans.json").read_text())
    for entry in sidecar["folds"].values():
        assert entry["relative_difference"] < RELATIVE_TOLERANCE
        assert entry["sha256"] == sha256(str(export / entry["file"]))
    torch_out, onnx_out = predict_torch_and_onnx(nnunet_env, planned_dataset, TRAINER, "nnUNetPlans", ["0", "1"],
                                                 export, tmp_path)  # two folds ensembled, mirroring on
    assert min(dice_per_class(onnx_out, torch_out, [1, 2]).values()) >= 0.999
    assert not list(tmp_path.glob(".partial_*")) and not list(export.glob(".partial_*"))


def test_stpmta_exports_and_onnxruntime_predicts_the_torch_labels(nnunet_env, planned_dataset, trained_stpmta,
                                                                 tmp_path):
    export = tmp_path / "export"
    export_onnx(nnunet_env, "STPMTATrainer_cpu", "nnScdPlans", ["3"], export)
    torch_out, onnx_out = predict_torch_and_onnx(nnunet_env, planned_dataset, "STPMTATrainer_cpu", "nnScdPlans",
                                                 ["3"], export, tmp_path, tta=False)
    assert min(dice_per_class(onnx_out, torch_out, [1, 2]).values()) >= 0.999


@pytest.fixture(scope="module")
def unet_export(nnunet_env, trained_model, tmp_path_factory) -> Path:
    export = tmp_path_factory.mktemp("onnx") / "export"
    export_onnx(nnunet_env, TRAINER, "nnUNetPlans", ["0"], export)
    return export


def _damage_sidecar(export: Path) -> None:
    (export / SIDECAR).write_text((export / SIDECAR).read_text()[:100])


def _truncate_model(export: Path) -> None:
    model = export / "fold_0.onnx"
    model.write_bytes(model.read_bytes()[:1000])


@pytest.mark.parametrize("damage, folds, expected", [
    (None, ["0", "1"], ["holds no export of fold 1", "it holds fold(s) 0", "-f"]),
    (_damage_sidecar, ["0"], [SIDECAR, "not JSON", "nnScd_export_onnx"]),
    (_truncate_model, ["0"], ["fold_0.onnx", "changed since the export", "nnScd_export_onnx"]),
])
def test_an_unusable_export_is_named_before_any_output(nnunet_env, planned_dataset, unet_export, tmp_path, damage,
                                                       folds, expected):
    export = tmp_path / "export"
    shutil.copytree(unet_export, export)
    if damage:
        damage(export)
    out = tmp_path / "out"
    proc = run_command(["nnScd_predict_from_modelfolder", "-i", str(planned_dataset / "imagesTs"), "-o", str(out),
                        "-m", str(export), "-f", *folds, "-device", "cpu"], nnunet_env, check=False, in_process=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for part in expected:
        assert part in proc.stderr, (part, proc.stderr)
    assert not out.exists()


def test_export_replaces_only_an_export_and_refuses_other_folders(nnunet_env, trained_model, unet_export, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(unet_export, export)
    (export / "stale.txt").write_text("from an older export")
    export_onnx(nnunet_env, TRAINER, "nnUNetPlans", ["1"], export)
    assert sorted(p.name for p in export.iterdir()) == ["fold_1.onnx", SIDECAR]
    assert not list(tmp_path.glob(".partial_*"))

    other = tmp_path / "results"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    proc = run_command(["nnScd_export_onnx", "-d", str(DATASET_ID), "-c", CONFIG, "-tr", TRAINER, "-f", "0", "-o",
                        str(other)], nnunet_env, check=False, in_process=True)
    assert proc.returncode == 2 and "is not an nnscd ONNX export" in proc.stderr, proc.stderr
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_a_patch_the_network_cannot_take_is_refused_with_the_plans_to_fix(trained_stpmta, tmp_path):
    model = tmp_path / trained_stpmta.name
    shutil.copytree(trained_stpmta, model, ignore=shutil.ignore_patterns("validation", "*.png", "*.txt"))
    plans = json.loads((model / "plans.json").read_text())
    plans["configurations"][CONFIG]["patch_size"] = [20, 32, 32]  # not a multiple of the token size
    (model / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(UserError) as error:
        export_model_folder(str(model), ["3"], str(tmp_path / "export"), verbose=False)
    assert "patch" in str(error.value) and "plans.json" in str(error.value), error.value
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".partial_*"))
