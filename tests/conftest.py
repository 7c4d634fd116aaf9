"""Shared fixtures: one synthetic dataset, planned once, and one two-fold training reused by the whole session.

Everything goes through the nnScd_ console scripts, as a user would run them, with the nnUNet_* folders in a
temporary directory.
"""
import contextlib
import io
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Dict, List
from unittest import mock

import pytest

BIN = Path(sys.executable).parent
DATASET_ID = 991
DATASET = f"Dataset{DATASET_ID}_NnscdDemo"
TRAINER = "nnScdTrainer_cpu"
CONFIG = "3d_fullres"


def run_command(args: List[str], env: Dict[str, str], check: bool = True, in_process: bool = False,
                **kwargs) -> subprocess.CompletedProcess:
    """Run an nnScd_ console script; on failure show its output in the assertion.

    in_process: call the script's entry point here, with its argv and environment, instead of starting it (each
    start imports torch and nnunetv2 again, about 20 s on the 2-core CI machine). For commands that stop early.
    """
    proc = _call_entry_point(args, env) if in_process else \
        subprocess.run([str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _call_entry_point(args: List[str], env: Dict[str, str]) -> subprocess.CompletedProcess:
    (script,) = entry_points(group="console_scripts", name=args[0])
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with mock.patch.dict(os.environ, env, clear=True), mock.patch.object(sys, "argv", list(args)), \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            script.load()()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def mean_dice(summary_file: Path) -> Dict[str, float]:
    return {k: v["Dice"] for k, v in json.loads(summary_file.read_text())["mean"].items()}


def dice_per_class(pred_folder: Path, label_folder: Path, classes: List[int]) -> Dict[int, float]:
    """Mean over cases of each class's Dice, read straight from the files (no nnScd_evaluate_folder start-up, whose
    spawned worker imports nnunetv2 once more); every labelled case must have a prediction."""
    import numpy as np
    import SimpleITK as sitk

    scores = {c: [] for c in classes}
    cases = sorted(label_folder.glob("*.nii.gz"))
    assert sorted(p.name for p in pred_folder.glob("*.nii.gz")) == [p.name for p in cases]
    for ref_file in cases:
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_file)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_folder / ref_file.name)))
        for c in classes:
            scores[c].append(2 * ((pred == c) & (ref == c)).sum() / ((pred == c).sum() + (ref == c).sum()))
    return {c: float(np.mean(v)) for c, v in scores.items()}


def export_onnx(env: Dict[str, str], trainer: str, plans: str, folds: List[str], out: Path,
                configuration: str = CONFIG) -> dict:
    """nnScd_export_onnx of the demo dataset's model (in this process); the export's sidecar."""
    from nnscd.core.onnx_models import SIDECAR

    run_command(["nnScd_export_onnx", "-d", str(DATASET_ID), "-c", configuration, "-tr", trainer, "-p", plans, "-f",
                 *folds, "-o", str(out)], env, in_process=True)
    return json.loads((out / SIDECAR).read_text())


def predict_torch_and_onnx(env: Dict[str, str], planned_dataset: Path, trainer: str, plans: str, folds: List[str],
                           export: Path, out: Path, tta: bool = True, configuration: str = CONFIG) -> tuple:
    """The label folders of the torch predictor (nnScd_predict) and of onnxruntime (the export), same test cases and
    flags, in this process."""
    flags = ["-f", *folds, "-device", "cpu", "-npp", "0", "-nps", "0"] + ([] if tta else ["--disable_tta"])
    images = str(planned_dataset / "imagesTs")
    run_command(["nnScd_predict", "-i", images, "-o", str(out / "torch"), "-d", str(DATASET_ID), "-c", configuration,
                 "-tr", trainer, "-p", plans, *flags], env, in_process=True)
    run_command(["nnScd_predict_from_modelfolder", "-i", images, "-o", str(out / "onnx"), "-m", str(export),
                 *flags], env, in_process=True)
    return out / "torch", out / "onnx"


# Under pytest-xdist (pyproject's `-n 2 --dist loadgroup`) each worker gets its share of the cores, handed down to
# the nnScd_ processes it starts; two workers with every core each would slow each other's torch threads down.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // WORKERS)))


def pytest_itemcollected(item: pytest.Item) -> None:
    """xdist groups (read by xdist's collection hook, so set here, before it): the tests that use one of the
    session's trained models run on one worker, so each model is trained once; every other module stays whole on one
    worker, with its module fixtures."""
    callspec = getattr(item, "callspec", None)  # a model fixture named by a parameter (request.getfixturevalue)
    used = [*getattr(item, "fixturenames", ()), *(callspec.params.values() if callspec else ())]
    shared = [name for name in ("trained_model", "trained_stpmta") if name in used]
    item.add_marker(pytest.mark.xdist_group(shared[0] if shared else item.module.__name__))


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
    from nnscd.tools.synthetic import write_synthetic_dataset

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
