"""Trainer discovery, names, clear errors and environment defaults."""
import os
import subprocess
import sys
from pathlib import Path

import nnunetv2
import nnscd_trainers
from conftest import BIN, CONFIG, DATASET_ID, run_command


def _nnunet_class_names() -> set:
    """Every class name defined anywhere in nnunetv2's trainer package (without importing the modules)."""
    import ast

    names = set()
    root = Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names |= {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    return names


def test_nnscd_trainer_names_never_collide_with_nnunet():
    ours = set(nnscd_trainers.__all__)
    assert ours, "nnscd_trainers exports no trainer"
    assert not ours & _nnunet_class_names()
    assert not [n for n in ours if "__" in n], "nnU-Net splits result folder names at '__'"


def test_lookup_finds_nnscd_trainer_as_picklable_class(nnunet_env):
    """nnU-Net's own lookup, through nnUNet_extTrainer, returns the class of the installed package."""
    code = ("import pickle; from nnscd.core.paths import settle_environment; settle_environment();"
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f;"
            "c = f('nnScdTrainer_cpu'); print(c.__module__); assert pickle.loads(pickle.dumps(c)) is c")
    out = subprocess.run([sys.executable, "-c", code], env=nnunet_env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "nnscd_trainers.nnscd_trainer"


def test_unknown_trainer_is_one_clear_error(nnunet_env, planned_dataset):
    proc = run_command(["nnScd_train", str(DATASET_ID), CONFIG, "0", "-tr", "NoSuchTrainer", "-device", "cpu"],
                       nnunet_env, check=False, in_process=True)
    assert proc.returncode == 2
    assert "unknown trainer 'NoSuchTrainer'" in proc.stderr and "nnScdTrainer_cpu" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_predict_without_trained_model_names_the_folder(nnunet_env, planned_dataset, tmp_path):
    proc = run_command(["nnScd_predict", "-i", str(planned_dataset / "imagesTs"), "-o", str(tmp_path / "o"),
                        "-d", str(DATASET_ID), "-c", CONFIG, "-tr", "nnScdTrainer", "-device", "cpu"],
                       nnunet_env, check=False, in_process=True)
    assert proc.returncode == 2 and "no trained model at" in proc.stderr and "nnScd_train" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_predict_refuses_output_equal_to_input(nnunet_env, planned_dataset):
    images = str(planned_dataset / "imagesTs")
    proc = run_command(["nnScd_predict", "-i", images, "-o", images, "-d", str(DATASET_ID), "-c", CONFIG,
                        "-device", "cpu"], nnunet_env, check=False, in_process=True)
    assert proc.returncode == 2 and "output folder equals the input folder" in proc.stderr


def test_env_defaults_are_announced_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_") and k != "NNSCD_ENV_ANNOUNCED"}
    env["NNSCD_DATA"] = str(tmp_path / "data")
    proc = subprocess.run([str(BIN / "nnScd_plan_experiment"), "-h"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stderr.count("not set; using") == 1 and str(tmp_path / "data") in proc.stderr
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == \
        ["nnUNet_preprocessed", "nnUNet_raw", "nnUNet_results"]


def test_every_nnunet_user_command_has_an_nnscd_twin():
    import importlib.metadata as md

    scripts = {ep.name for ep in md.entry_points(group="console_scripts")}
    wanted = ["plan_and_preprocess", "extract_fingerprint", "plan_experiment", "preprocess", "train", "predict",
              "predict_from_modelfolder", "find_best_configuration", "determine_postprocessing",
              "apply_postprocessing", "ensemble", "evaluate_folder", "export_model_to_zip",
              "install_pretrained_model_from_zip", "convert_MSD_dataset", "demo"]
    assert not [w for w in wanted if f"nnScd_{w}" not in scripts]
    for w in wanted[:-1]:
        assert f"nnUNetv2_{w}" in scripts, w  # the twin wraps a real nnU-Net command
