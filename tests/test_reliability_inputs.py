"""Bad inputs stop before any work with a message that names the file or argument and the fix.

Each case breaks one thing in a tiny dataset (8^3 images) or model folder and calls nnscd's checks in-process;
a few run the console scripts end to end to show the exit status and that nothing is left half-written.
RECORD collects (input, message) for documentation/reliability.md.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import CONFIG, DATASET, DATASET_ID, TRAINER, run_command

SHAPE = (8, 8, 8)
RECORD: Dict[str, str] = {}  # input -> the problem reported; saved for documentation/reliability.md


@pytest.fixture(scope="module", autouse=True)
def catalogue():
    """With NNSCD_RELIABILITY_RECORD=FILE, write RECORD there after this module (documentation/reliability.md)."""
    yield
    if os.environ.get("NNSCD_RELIABILITY_RECORD"):
        Path(os.environ["NNSCD_RELIABILITY_RECORD"]).write_text(json.dumps(RECORD, indent=1))


def write_image(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=None, direction=None) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[:image.GetDimension()])
    if origin is not None:
        image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))


def make_dataset(root: Path, ending: str = ".nii.gz", cases: int = 3, channels: int = 2) -> Path:
    """A valid raw dataset: `cases` cases of `channels` 8^3 channels, labels 0-2."""
    folder = root / "Dataset001_Tiny"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(cases):
        for c in range(channels):
            write_image(folder / "imagesTr" / f"case_{i:03d}_{c:04d}{ending}", rng.normal(size=SHAPE).astype(np.float32))
        write_image(folder / "labelsTr" / f"case_{i:03d}{ending}", rng.integers(0, 3, SHAPE).astype(np.uint8))
    dataset_json = {"channel_names": {str(c): f"mod{c}" for c in range(channels)}, "numTraining": cases,
                    "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ending}
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    return folder


def edit_json(folder: Path, change: Callable[[dict], None]) -> None:
    content = json.loads((folder / "dataset.json").read_text())
    change(content)
    (folder / "dataset.json").write_text(json.dumps(content))


def rewrite(path: Path, change: Callable[[np.ndarray], np.ndarray], **geometry) -> None:
    image = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image)), isVector=False)
    if new.GetSize() == image.GetSize():
        new.CopyInformation(image)
    for key, value in geometry.items():
        getattr(new, f"Set{key}")(value)
    sitk.WriteImage(new, str(path))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def set_value(value):
    def change(a):
        a = a.copy()
        a[0, 0, 0] = value
        return a
    return change


def nifti_set(path: Path, value: float, dtype=np.float32) -> None:
    """Store `value` at one voxel as the NIfTI file holds it (written by nibabel, which keeps NaN and inf; the
    dataset's reader, SimpleITK, hands them over as 0)."""
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj).astype(dtype)
    data[0, 0, 0] = value
    header = image.header.copy()
    header.set_data_dtype(dtype)
    nib.save(nib.Nifti1Image(data, image.affine, header), str(path))


def all_background(folder: Path) -> None:
    for label in (folder / "labelsTr").iterdir():
        rewrite(label, np.zeros_like)


IMG, LBL = "imagesTr/case_001_0000", "labelsTr/case_001"
BAD_DATASETS = {
    "missing channel file": (lambda d: (d / f"{IMG[:-1]}1.nii.gz").unlink(), "case_001_0001.nii.gz: missing: channel 1"),
    "extra channel file": (lambda d: shutil.copy(d / f"{IMG}.nii.gz", d / f"{IMG[:-1]}2.nii.gz"), "channel 2, but"),
    "missing label": (lambda d: (d / f"{LBL}.nii.gz").unlink(), "case_001.nii.gz: missing: case case_001 has images"),
    "NaN in a NIfTI image": (lambda d: nifti_set(d / f"{IMG}.nii.gz", np.nan), "case_001_0000.nii.gz: 1 NaN/inf"),
    "inf in a NIfTI image": (lambda d: nifti_set(d / f"{IMG}.nii.gz", np.inf), "case_001_0000.nii.gz: 1 NaN/inf"),
    "NaN in a NIfTI label": (lambda d: nifti_set(d / f"{LBL}.nii.gz", np.nan), "case_001.nii.gz: 1 NaN/inf label"),
    "labels all background": (all_background, "all 3 label files hold only background"),
    "label without images": (lambda d: shutil.copy(d / f"{LBL}.nii.gz", d / "labelsTr/case_009.nii.gz"),
                             "label without images"),
    "label value not in dataset.json": (lambda d: rewrite(d / f"{LBL}.nii.gz", set_value(5)), "label values [5]"),
    "non-integer label values": (lambda d: rewrite(d / f"{LBL}.nii.gz", lambda a: a.astype(np.float32) + 0.5),
                                 "non-integer label values"),
    "image/label shape mismatch": (lambda d: rewrite(d / f"{LBL}.nii.gz", lambda a: a[:6]), "size (8, 8, 6) differs"),
    "image/label spacing mismatch": (lambda d: rewrite(d / f"{LBL}.nii.gz", lambda a: a, Spacing=(1, 1, 2.5)),
                                     "spacing (1.0, 1.0, 2.5) differs"),
    "image/label orientation mismatch": (lambda d: rewrite(d / f"{LBL}.nii.gz", lambda a: a,
                                                           Direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)), "orientation"),
    "image/label origin mismatch": (lambda d: rewrite(d / f"{LBL}.nii.gz", lambda a: a, Origin=(0, 0, 4.0)),
                                    "origin [0.0, 0.0, 4.0] differs"),
    "channel/channel spacing mismatch": (lambda d: rewrite(d / f"{IMG[:-1]}1.nii.gz", lambda a: a, Spacing=(2, 1, 1)),
                                         "case_001_0001.nii.gz: spacing"),
    "4D image": (lambda d: rewrite(d / f"{IMG}.nii.gz", lambda a: np.stack([a, a])), "4D image"),
    "vector image": (lambda d: sitk.WriteImage(sitk.Compose([sitk.ReadImage(str(d / f"{IMG}.nii.gz"))] * 3),
                                               str(d / f"{IMG}.nii.gz")), "3 values per voxel"),
    "2D case in a 3D dataset": (lambda d: [rewrite(d / f"{f}.nii.gz", lambda a: a[0]) for f in
                                           (IMG, f"{IMG[:-1]}1", LBL)], "2D image in a dataset of mostly 3D"),
    "empty .nii.gz": (lambda d: (d / f"{IMG}.nii.gz").write_bytes(b""), "empty file (0 bytes)"),
    "truncated .nii.gz": (lambda d: truncate(d / f"{IMG}.nii.gz"), "truncated"),
    "not an image": (lambda d: (d / f"{IMG}.nii.gz").write_bytes(b"<html>404</html>" * 40), "cannot be read"),
    "wrong file ending": (lambda d: (d / f"{IMG}.nii.gz").rename(d / f"{IMG}.nii"), "wrong file ending"),
    "no channel number in name": (lambda d: shutil.copy(d / f"{IMG}.nii.gz", d / "imagesTr/case_005.nii.gz"),
                                  "lacks the 4-digit channel number"),
    "no dataset.json": (lambda d: (d / "dataset.json").unlink(), "dataset.json: missing"),
    "dataset.json not JSON": (lambda d: (d / "dataset.json").write_text('{"labels": {'), "not valid JSON"),
    "dataset.json missing keys": (lambda d: edit_json(d, lambda j: j.pop("file_ending")), "missing keys ['file_ending']"),
    "dataset.json duplicate key": (lambda d: (d / "dataset.json").write_text(
        (d / "dataset.json").read_text().replace('"a": 1', '"a": 1, "a": 2')), "duplicate keys ['a']"),
    "dataset.json duplicate label value": (lambda d: edit_json(d, lambda j: j["labels"].update(b=1)),
                                           "one value several names"),
    "dataset.json labels not consecutive": (lambda d: edit_json(d, lambda j: j["labels"].update(b=3)),
                                            "not consecutive"),
    "dataset.json no background": (lambda d: edit_json(d, lambda j: j["labels"].pop("background")),
                                   "\"background\": 0"),
    "dataset.json channel_names keys": (lambda d: edit_json(d, lambda j: j.update(channel_names={"1": "a", "2": "b"})),
                                        "channel_names keys are ['1', '2']"),
    "dataset.json unknown file_ending": (lambda d: edit_json(d, lambda j: j.update(file_ending=".jpg2")),
                                         "has no nnU-Net reader"),
    "dataset.json wrong numTraining": (lambda d: edit_json(d, lambda j: j.update(numTraining=5)),
                                       "numTraining is 5, but there are 3"),
    "dataset.json case listed twice": (lambda d: edit_json(d, lambda j: j.update(dataset={
        k: {"images": [f"imagesTr/case_000_{c:04d}.nii.gz" for c in range(2)], "label": f"labelsTr/{k}.nii.gz"}
        for k in ("case_000", "case_001", "case_002")})), "listed for cases case_000 and case_001"),
}


@pytest.mark.parametrize("name", list(BAD_DATASETS))
def test_bad_dataset_is_reported(name, tmp_path):
    from nnscd.checks.input_checks import check_raw_dataset

    folder = make_dataset(tmp_path)
    assert check_raw_dataset(str(folder)) == []
    damage, expected = BAD_DATASETS[name]
    damage(folder)
    problems = check_raw_dataset(str(folder))
    assert any(expected in p for p in problems), problems
    assert all(". " in p for p in problems)  # what is wrong, then what to do
    RECORD[name] = next(p for p in problems if expected in p)
    assert not [p for p in problems if "label without images" in p and name != "label without images"], problems


def test_nifti_values_are_read_from_the_file_in_chunks(tmp_path):
    from nnscd.checks.input_checks import nifti_non_finite

    path = tmp_path / "ct.nii.gz"
    write_image(path, np.zeros((20, 30, 40), np.float32))
    nifti_set(path, np.inf)
    assert nifti_non_finite(str(path), chunk_bytes=1000) == nifti_non_finite(str(path)) == 1  # across chunks
    write_image(path, np.zeros((20, 30, 40), np.int16))
    assert nifti_non_finite(str(path)) == 0  # integer voxels cannot be NaN


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_intensities_are_reported(value, tmp_path):
    """.nrrd keeps NaN/inf (SimpleITK reads them in a NIfTI file as 0, so nnU-Net never sees them there)."""
    from nnscd.checks.input_checks import check_raw_dataset

    folder = make_dataset(tmp_path, ending=".nrrd")
    rewrite(folder / f"{IMG}.nrrd", set_value(value))
    problems = check_raw_dataset(str(folder))
    assert len(problems) == 1 and "case_001_0000.nrrd: 1 NaN/inf voxel(s)" in problems[0], problems
    RECORD[f"{value} in an image"] = problems[0]


def test_all_problems_in_one_message(tmp_path):
    from nnscd.checks.input_checks import MAX_REPORTED, check_raw_dataset, describe

    folder = make_dataset(tmp_path, cases=12)
    for i in range(12):  # one problem per case, more than one message lists
        (folder / "labelsTr" / f"case_{i:03d}.nii.gz").rename(folder / "labelsTr" / f"case_{i:03d}.nii")
    message = describe(check_raw_dataset(str(folder)), str(folder))
    assert message.startswith("24 problems in") and f"... and {24 - MAX_REPORTED} more" in message


# --- training setup: the session's planned Dataset991 -------------------------------------------------------

def _training_problems(configuration=CONFIG, fold="0", trainer=TRAINER, plans="nnUNetPlans", resume=False):
    import nnscd_trainers
    from nnscd.checks.input_checks import check_training_setup

    return check_training_setup(str(DATASET_ID), configuration, fold, getattr(nnscd_trainers, trainer), plans, resume)


@pytest.fixture
def extra_plans(nnunet_env, planned_dataset):
    """Write a variant of nnUNetPlans into the preprocessed folder for one test."""
    base = Path(nnunet_env["nnUNet_preprocessed"]) / DATASET
    written = []

    def write(name: str, change: Callable[[dict], None]) -> str:
        plans = json.loads((base / "nnUNetPlans.json").read_text())
        plans["plans_name"] = name
        change(plans)
        (base / f"{name}.json").write_text(json.dumps(plans))
        written.append(base / f"{name}.json")
        return name

    yield write
    for path in written:
        path.unlink()


def test_training_setup_problems(nnunet_env, planned_dataset, extra_plans, capsys):
    from nnscd.checks.trainer_names import find_trainer
    from nnscd.core.errors import UserError
    from nnscd.core.paths import settle_environment

    assert _training_problems() == []
    cases = {
        "unknown configuration": (_training_problems(configuration="3d_highres"), "configuration '3d_highres': not in"),
        "unknown plans": (_training_problems(plans="nnUNetResEncUNetLPlans"), "-p nnUNetResEncUNetLPlans: no plans file"),
        "fold out of range": (_training_problems(fold="7"), "fold '7': out of range"),
        "fold not a number": (_training_problems(fold="first"), "fold 'first': out of range"),
    }
    bad_patch = extra_plans("nnscdOddPatch", lambda p: p["configurations"][CONFIG].update(patch_size=[20, 20, 20]))
    cases["patch a token network cannot take"] = (
        _training_problems(trainer="APFormerTrainer_cpu", plans=bad_patch), "cannot take configuration")
    assert _training_problems(trainer="STPMTATrainer_cpu", plans=bad_patch) == []  # rounds its patch up to tokens
    unfinished = extra_plans("nnscdUnfinished", lambda p: p["configurations"][CONFIG].update(
        data_identifier="nnscdUnfinished_3d_fullres"))
    data = Path(nnunet_env["nnUNet_preprocessed"]) / DATASET / "nnscdUnfinished_3d_fullres"
    data.mkdir()
    (data / "case_000.b2nd").write_bytes(b"half")
    cases["preprocessing killed"] = (_training_problems(plans=unfinished), "preprocessing did not finish (0 of 10")
    shutil.rmtree(data)
    for name, (problems, expected) in cases.items():
        assert len(problems) == 1 and expected in problems[0], (name, problems)
        RECORD[name] = problems[0]
    settle_environment()  # registers nnscd's trainers with nnU-Net's lookup, as every nnScd_ command does
    with pytest.raises(UserError) as refused:
        find_trainer("STPMTATrainer_typo")
    RECORD["unknown trainer"] = f"nnscd: error: {refused.value}"
    assert "unknown trainer 'STPMTATrainer_typo'" in RECORD["unknown trainer"]


def test_resume_from_corrupt_checkpoint_is_refused(nnunet_env, planned_dataset):
    fold = Path(nnunet_env["nnUNet_results"]) / DATASET / f"nnScdTrainer_budget__nnUNetPlans__{CONFIG}" / "fold_4"
    fold.mkdir(parents=True)
    try:
        torch.save({"current_epoch": 3}, fold / "checkpoint_latest.pth")
        assert _training_problems(fold="4", trainer="nnScdTrainer_budget", resume=True) == []
        truncate(fold / "checkpoint_latest.pth")
        problems = _training_problems(fold="4", trainer="nnScdTrainer_budget", resume=True)
        assert len(problems) == 1 and "checkpoint_latest.pth: corrupt or truncated" in problems[0], problems
        RECORD["corrupt checkpoint for --c"] = problems[0]
    finally:
        shutil.rmtree(fold.parent)


def test_resume_from_another_trainers_checkpoint_is_refused(nnunet_env, planned_dataset):
    fold = Path(nnunet_env["nnUNet_results"]) / DATASET / f"nnScdTrainer_budget__nnUNetPlans__{CONFIG}" / "fold_4"
    fold.mkdir(parents=True)
    written_by = {"trainer_name": "nnScdTrainer_budget", "current_epoch": 3,
                  "init_args": {"plans": {"plans_name": "nnUNetPlans"}, "configuration": CONFIG, "fold": 4}}
    try:
        torch.save(written_by, fold / "checkpoint_latest.pth")
        assert _training_problems(fold="4", trainer="nnScdTrainer_budget", resume=True) == []
        for change, expected in (({"trainer_name": "STPMTATrainer_budget"}, "this run is trainer nnScdTrainer_budget"),
                                 ({"init_args": {**written_by["init_args"], "configuration": "2d", "fold": 1}},
                                  "this run is configuration 3d_fullres, fold 4")):
            torch.save({**written_by, **change}, fold / "checkpoint_latest.pth")
            problems = _training_problems(fold="4", trainer="nnScdTrainer_budget", resume=True)
            assert len(problems) == 1 and expected in problems[0], problems
        RECORD["--c with another configuration's checkpoint"] = problems[0]
    finally:
        shutil.rmtree(fold.parent)


def test_preprocessed_data_damaged_after_preprocessing_is_found_at_training_start(nnunet_env, planned_dataset,
                                                                                  extra_plans):
    from nnscd.checks.input_checks import _preprocessed_problems

    base = Path(nnunet_env["nnUNet_preprocessed"]) / DATASET
    damaged = extra_plans("nnscdDamaged", lambda p: p["configurations"][CONFIG].update(
        data_identifier="nnscdDamaged_3d_fullres"))
    data = base / "nnscdDamaged_3d_fullres"
    shutil.copytree(base / "nnUNetPlans_3d_fullres", data)
    try:
        assert _training_problems(plans=damaged) == []
        truncate(data / "case_003_seg.b2nd")
        (data / "case_006.pkl").write_bytes(b"")
        problems = _training_problems(plans=damaged)
        assert len(problems) == 1 and "damaged since preprocessing (truncated or unreadable): case_003_seg.b2nd, " \
            "case_006.pkl. Run nnScd_preprocess -d 991 -c 3d_fullres -p nnscdDamaged" in problems[0], problems
        RECORD["preprocessed case truncated after preprocessing"] = problems[0]
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            (data / f"case_005{suffix}").unlink()
        cases = [f"case_{i:03d}" for i in range(10)]
        problems = _preprocessed_problems(str(data), 10, "nnScd_preprocess", cases)
        assert len(problems) == 1 and "(9 of 10 cases complete, missing: case_005)" in problems[0], problems
        RECORD["preprocessed case deleted after preprocessing"] = problems[0]
    finally:
        shutil.rmtree(data)


# --- prediction input: a model folder with the session's plans ----------------------------------------------

@pytest.fixture
def model_folder(nnunet_env, planned_dataset, tmp_path) -> Path:
    """A trained-model folder of Dataset991's plans, 1 channel, 3d_fullres, with a (tiny) fold_0 checkpoint."""
    base = Path(nnunet_env["nnUNet_preprocessed"]) / DATASET
    folder = tmp_path / f"{TRAINER}__nnUNetPlans__{CONFIG}"
    (folder / "fold_0").mkdir(parents=True)
    shutil.copy(base / "nnUNetPlans.json", folder / "plans.json")
    shutil.copy(base / "dataset.json", folder / "dataset.json")
    torch.save({"network_weights": {}}, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def _prediction_problems(inputs: Path, model: Path, folds: List[str] = ("0",)) -> List[str]:
    from nnscd.checks.input_checks import check_prediction_input

    return check_prediction_input(str(inputs), str(model), list(folds))


def test_prediction_input_problems(model_folder, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        write_image(inputs / f"case_{i}_0000.nii.gz", rng.normal(size=SHAPE).astype(np.float32))
    assert _prediction_problems(inputs, model_folder) == []
    cases = {}
    shutil.copy(inputs / "case_0_0000.nii.gz", inputs / "case_0_0001.nii.gz")
    cases["channel count different from training"] = (_prediction_problems(inputs, model_folder),
                                                       "channel 1, but the model/dataset has 1 channel(s)")
    (inputs / "case_0_0001.nii.gz").unlink()
    cases["missing fold checkpoint"] = (_prediction_problems(inputs, model_folder, ["0", "3"]),
                                        "-f 3: ", "fold_3/checkpoint_final.pth: missing")
    truncate(model_folder / "fold_0" / "checkpoint_final.pth")
    cases["corrupt checkpoint"] = (_prediction_problems(inputs, model_folder), "corrupt or truncated")
    torch.save({}, model_folder / "fold_0" / "checkpoint_final.pth")
    write_image(inputs / "case_0_0000.nii.gz", rng.normal(size=SHAPE[1:]).astype(np.float32))
    cases["3D model given 2D data"] = (_prediction_problems(inputs, model_folder), "configuration 3d_fullres is 3D")
    (inputs / "case_0_0000.nii.gz").rename(inputs / "case_0_0000.nii")
    cases["wrong file ending (prediction)"] = (_prediction_problems(inputs, model_folder), "wrong file ending")
    (inputs / "case_0_0000.nii").unlink()
    nifti_set(inputs / "case_1_0000.nii.gz", np.nan)
    cases["NaN in a NIfTI prediction input"] = (_prediction_problems(inputs, model_folder),
                                                "case_1_0000.nii.gz: 1 NaN/inf voxel(s)")

    two_d = tmp_path / f"{TRAINER}__nnUNetPlans__2d"
    shutil.copytree(model_folder, two_d)
    plans = json.loads((two_d / "plans.json").read_text())
    plans["original_median_shape_after_transp"] = [1, 32, 32]
    (two_d / "plans.json").write_text(json.dumps(plans))
    cases["2D model given 3D data"] = (_prediction_problems(inputs, two_d), "trained on 2D images")
    for name, (problems, *expected) in cases.items():
        assert all(any(e in p for p in problems) for e in expected), (name, problems)
        RECORD[name] = next(p for p in problems if expected[-1] in p)


@pytest.mark.parametrize("name", ["empty prediction input folder", "output folder equal to the input folder"])
def test_prediction_folders_refused(name, tmp_path, capsys):
    from nnscd.cli.nnunet_commands import check_prediction_folders
    from nnscd.core.errors import UserError

    inputs = tmp_path / "in"
    inputs.mkdir()
    if name.startswith("output"):
        write_image(inputs / "case_0000.nii.gz", np.zeros(SHAPE, np.float32))
    with pytest.raises(UserError) as refused:
        check_prediction_folders(str(inputs), str(inputs if name.startswith("output") else tmp_path / "out"))
    RECORD[name] = str(refused.value)
    assert str(inputs) in RECORD[name]


# --- end to end: exit status, one message, nothing written --------------------------------------------------

def test_plan_and_preprocess_stops_before_fingerprinting(nnunet_env, planned_dataset, tmp_path):
    raw = Path(nnunet_env["nnUNet_raw"]) / "Dataset993_Broken"
    shutil.copytree(make_dataset(tmp_path), raw)
    try:
        (raw / f"{LBL}.nii.gz").unlink()
        truncate(raw / "imagesTr/case_002_0001.nii.gz")
        proc = run_command(["nnScd_plan_and_preprocess", "-d", "993", "-c", CONFIG, "-np", "1", "-npfp", "1"],
                           nnunet_env, check=False, in_process=True)
        assert proc.returncode != 0
        assert "2 problems in" in proc.stderr and "case_001.nii.gz: missing" in proc.stderr
        assert "case_002_0001.nii.gz: truncated" in proc.stderr and "Traceback" not in proc.stderr
        assert not (Path(nnunet_env["nnUNet_preprocessed"]) / "Dataset993_Broken").exists()
    finally:
        shutil.rmtree(raw)


def test_predict_and_train_stop_before_loading(nnunet_env, model_folder, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    write_image(inputs / "case_0_0000.nii.gz", np.zeros(SHAPE, np.float32))
    write_image(inputs / "case_0_0001.nii.gz", np.zeros(SHAPE, np.float32))
    proc = run_command(["nnScd_predict_from_modelfolder", "-i", str(inputs), "-o", str(out), "-m", str(model_folder),
                        "-f", "0", "-device", "cpu"], nnunet_env, check=False, in_process=True)
    assert proc.returncode != 0 and "case_0_0001.nii.gz: channel 1" in proc.stderr, proc.stderr
    assert not out.exists()
    proc = run_command(["nnScd_train", str(DATASET_ID), CONFIG, "5", "-tr", TRAINER, "-device", "cpu"], nnunet_env,
                       check=False, in_process=True)
    assert proc.returncode != 0 and "fold '5': out of range" in proc.stderr, proc.stderr
    assert not (Path(nnunet_env["nnUNet_results"]) / DATASET / f"{TRAINER}__nnUNetPlans__{CONFIG}" / "fold_5").exists()


@pytest.mark.parametrize("name, value", [("nnUNet_n_proc_DA", "-1"), ("nnUNet_n_proc_DA", "two"),
                                         ("nnUNet_def_n_proc", "0")])
def test_bad_process_variables_are_refused_before_any_work(name, value, nnunet_env, planned_dataset):
    fingerprint = Path(nnunet_env["nnUNet_preprocessed"]) / DATASET / "dataset_fingerprint.json"
    before = fingerprint.stat().st_mtime_ns
    proc = run_command(["nnScd_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIG],
                       {**nnunet_env, name: value}, check=False, in_process=True)
    assert proc.returncode == 2 and f"{name}={value!r}: set it to a whole number" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and fingerprint.stat().st_mtime_ns == before
    RECORD[f"{name}={value}"] = proc.stderr.strip().removeprefix("nnscd: error: ")


def test_planning_works_with_augmentation_workers_off(nnunet_env, planned_dataset):
    """nnUNet_n_proc_DA=0 is nnU-Net's documented switch for no augmentation workers; its planner set torch's
    threads to it and died."""
    proc = run_command(["nnScd_plan_experiment", "-d", str(DATASET_ID), "-overwrite_plans_name", "nnUNetPlansDA0"],
                       {**nnunet_env, "nnUNet_n_proc_DA": "0"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = Path(nnunet_env["nnUNet_preprocessed"]) / DATASET
    assert (folder / "nnUNetPlansDA0.json").is_file() and (folder / "nnUNetPlansDA0_nnScd.json").is_file()
