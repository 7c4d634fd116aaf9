"""nnScd_msd_submission: the Decathlon layout from predictions, every problem listed, no zip unless all pass."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnscd.tools.msd_submission import write_submission

HIPPOCAMPUS = Path(__file__).parents[2] / "shared/data/Task04_Hippocampus"
BIN = Path(sys.executable).parent


def write_task(root: Path, name: str, cases: list, channels: int = 0) -> Path:
    """An MSD task folder with just what a submission needs: imagesTs (4D when `channels`) and dataset.json."""
    task = root / name
    (task / "imagesTs").mkdir(parents=True)
    for i, case in enumerate(cases):
        volume = sitk.GetImageFromArray(np.full((5, 6, 7), i, np.float32))
        volume.SetSpacing((0.7, 0.7, 3.0))
        volume.SetOrigin((1.0, 2.0, 3.0))
        image = sitk.JoinSeries([volume] * channels) if channels else volume
        sitk.WriteImage(image, str(task / "imagesTs" / case))
    (task / "imagesTs" / f"._{cases[0]}").write_bytes(b"AppleDouble")
    (task / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a", "2": "b"}}))
    return task


def predict_like(test_image: Path, target: Path, value: int = 1) -> None:
    """A fake prediction in the test image's geometry (its first three axes), as nnU-Net writes them."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(test_image))
    reader.ReadImageInformation()
    n = reader.GetDimension()
    seg = np.zeros(reader.GetSize()[:3][::-1], np.uint8)
    seg[1, 1, 1] = value
    image = sitk.GetImageFromArray(seg)
    image.SetSpacing(reader.GetSpacing()[:3])
    image.SetOrigin(reader.GetOrigin()[:3])
    image.SetDirection(np.reshape(reader.GetDirection(), (n, n))[:3, :3].ravel().tolist())
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(target))


def predict_task(task: Path, folder: Path) -> Path:
    for image in (task / "imagesTs").glob("[!.]*.nii.gz"):
        predict_like(image, folder / image.name)
    (folder / "plans.json").write_text("{}")  # nnU-Net's side files are not predictions
    (folder / "predict_from_raw_data_args.json").write_text("{}")
    return folder


def test_submission_layout_for_3d_and_4d_tasks(tmp_path):
    hippocampus = write_task(tmp_path / "msd", "Task04_Hippocampus", ["hippocampus_002.nii.gz", "hippocampus_005.nii.gz"])
    prostate = write_task(tmp_path / "msd", "Task05_Prostate", ["prostate_03.nii.gz"], channels=2)
    tasks = [(str(hippocampus), str(predict_task(hippocampus, tmp_path / "pred04"))),
             (str(prostate), str(predict_task(prostate, tmp_path / "pred05")))]
    assert write_submission(tasks, str(tmp_path / "out/submission.zip")) == []
    with zipfile.ZipFile(tmp_path / "out/submission.zip") as archive:
        assert sorted(archive.namelist()) == ["Task04_Hippocampus/hippocampus_002.nii.gz",
                                              "Task04_Hippocampus/hippocampus_005.nii.gz",
                                              "Task05_Prostate/prostate_03.nii.gz"]
        archive.extract("Task05_Prostate/prostate_03.nii.gz", tmp_path / "unzipped")
    assert sitk.ReadImage(str(tmp_path / "unzipped/Task05_Prostate/prostate_03.nii.gz")).GetSize() == (7, 6, 5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["submission.zip"]


def test_every_problem_is_listed_and_no_zip_is_written(tmp_path):
    cases = [f"hippocampus_00{i}.nii.gz" for i in range(1, 6)]
    task = write_task(tmp_path / "msd", "Task04_Hippocampus", cases)
    predictions = predict_task(task, tmp_path / "pred")
    (predictions / cases[0]).unlink()  # missing case
    predict_like(task / "imagesTs" / cases[1], predictions / "hippocampus_099.nii.gz")  # not a test case
    predict_like(task / "imagesTs" / cases[2], predictions / cases[2], value=3)  # not one of the task's labels
    shifted = sitk.ReadImage(str(predictions / cases[3]))
    shifted.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(shifted, str(predictions / cases[3]))  # resampled: wrong geometry
    (predictions / cases[4]).write_bytes(b"truncated")

    proc = subprocess.run([str(BIN / "nnScd_msd_submission"), "-i", f"{task}={predictions}", "-o",
                           str(tmp_path / "submission.zip")], capture_output=True, text=True)
    assert proc.returncode != 0 and not (tmp_path / "submission.zip").exists()
    lines = [line for line in proc.stderr.splitlines() if line.startswith("  - ")]
    assert "5 problem(s), no zip written" in proc.stderr and len(lines) == 5, proc.stderr
    for name, problem in ((cases[0], "missing"), ("hippocampus_099.nii.gz", "not a test case"),
                          (cases[2], "label values [3] are not Task04_Hippocampus's labels [0, 1, 2]"),
                          (cases[3], "spacing (1, 1, 1) differs from the test image's (0.7, 0.7, 3)"),
                          (cases[4], "cannot be read")):
        assert any(name in line and problem in line for line in lines), (name, proc.stderr)

    assert write_submission([(str(task), str(tmp_path / "nowhere"))], str(tmp_path / "s.zip"))[0].startswith(
        f"{tmp_path / 'nowhere'}: no such prediction folder")
    renamed = task.rename(tmp_path / "msd/Hippocampus")
    assert any("not a Decathlon task folder name" in p for p in write_submission(
        [(str(renamed), str(predictions))], str(tmp_path / "s.zip")))


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="needs ../shared/data/Task04_Hippocampus")
def test_hippocampus_submission(tmp_path):
    """All 130 test cases of the real release, predicted in their geometry, zipped under their MSD names."""
    predictions = predict_task(HIPPOCAMPUS, tmp_path / "pred")
    proc = subprocess.run([str(BIN / "nnScd_msd_submission"), "-i", f"{HIPPOCAMPUS}={predictions}", "-o",
                           str(tmp_path / "submission.zip")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not in this zip: Task01_BrainTumour" in proc.stdout
    tests = sorted(p.name for p in (HIPPOCAMPUS / "imagesTs").iterdir() if not p.name.startswith("."))
    with zipfile.ZipFile(tmp_path / "submission.zip") as archive:
        assert sorted(archive.namelist()) == [f"Task04_Hippocampus/{name}" for name in tests] and len(tests) == 130
