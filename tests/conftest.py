"""Shared fixtures: one synthetic dataset, planned once, and one two-fold training reused by the whole session.

Everything goes through the nnScd_ console scripts, as a user would run them, with the nnUNet_* folders in a
temporary directory.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

BIN = Path(sys.executable).parent
DATASET_ID = 991
DATASET = f"Dataset{DATASET_ID}_NnscdDemo"
TRAINER = "nnScdTrainer_cpu"
CONFIG = "3d_fullres"


def run_command(args: List[str], env: Dict[str, str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run an nnScd_ console script; on failure show its output in the assertion."""
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def mean_dice(summary_file: Path) -> Dict[str, float]:
    return {k: v["Dice"] for k, v in json.loads(summary_file.read_text())["mean"].items()}


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory) -> Dict[str, str]:
    root = tmp_path_factory.mktemp("nnunet")
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir()
        env[name] = str(root / name)
        os.environ[name] = str(root / name)  # for in-process nnunetv2 calls in tests
    # nnScd_seed: the learning checks see the same run every time (one augmentation worker keeps it exact)
    env.update(nnUNet_n_proc_DA="1", nnUNet_def_n_proc="2", nnUNet_npp="0", nnUNet_nps="0", nnScd_seed="0")
    return env


@pytest.fixture(scope="session")
def planned_dataset(nnunet_env) -> Path:
    from nnscd.synthetic import write_synthetic_dataset

    raw = write_synthetic_dataset(nnunet_env["nnUNet_raw"], DATASET_ID)
    run_command(["nnScd_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIG, "-np", "2", "-npfp", "2",
                 "--verify_dataset_integrity"], nnunet_env)
    return Path(raw)


@pytest.fixture(scope="session")
def trained_model(nnunet_env, planned_dataset) -> Path:
    """Folds 0 and 1 of the short CPU trainer, with --npz (what find_best_configuration needs)."""
    for fold in ("0", "1"):
        run_command(["nnScd_train", str(DATASET_ID), CONFIG, fold, "-tr", TRAINER, "-device", "cpu", "--npz"],
                    nnunet_env)
    return Path(nnunet_env["nnUNet_results"]) / DATASET / f"{TRAINER}__nnUNetPlans__{CONFIG}"


@pytest.fixture(scope="session")
def trained_stpmta(nnunet_env, planned_dataset) -> Path:
    """Fold 3 of the 50-iteration CPU STP+MTA trainer on the token-aware plans, shared by the tests that need one."""
    run_command(["nnScd_train", str(DATASET_ID), CONFIG, "3", "-tr", "STPMTATrainer_cpu", "-p", "nnScdPlans",
                 "-device", "cpu"], nnunet_env)
    return Path(nnunet_env["nnUNet_results"]) / DATASET / f"STPMTATrainer_cpu__nnScdPlans__{CONFIG}"
