"""Converters on small replicas of the public layouts that the tests write (with the releases' quirks), and the MSD
converter on the real Hippocampus release."""
import filecmp
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from skimage import io

from dataset_conversion.btcv import convert_btcv
from dataset_conversion.isic2018 import convert_isic2018
from dataset_conversion.msd import convert_msd_dataset
from nnscd.core.errors import UserError

HIPPOCAMPUS = Path(__file__).parents[2] / "shared/data/Task04_Hippocampus"
BIN = Path(sys.executable).parent
DIRECTION_3D = (0, 1, 0, -1, 0, 0, 0, 0, 1)  # a rotation, so a wrong split of the 4D direction shows


@pytest.fixture
def raw(tmp_path, monkeypatch) -> Path:
    """Empty nnUNet_* folders of this test, as in-process nnunetv2 reads them."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    return tmp_path / "nnUNet_raw"


def write_nifti(path: Path, array: np.ndarray, channels: int = 0) -> None:
    """A 3D image, or with `channels` a 4D one (modalities on the fourth axis, as MSD stores them)."""
    image = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in array]) if channels else sitk.GetImageFromArray(array)
    if channels:
        image.SetSpacing((1.5, 1.0, 2.0, 1.0))
        image.SetOrigin((10.0, -5.0, 3.0, 0.0))
        direction = np.eye(4)
        direction[:3, :3] = np.reshape(DIRECTION_3D, (3, 3))
        image.SetDirection(direction.ravel().tolist())
    else:
        image.SetSpacing((1.5, 1.0, 2.0))
        image.SetOrigin((10.0, -5.0, 3.0))
        image.SetDirection(DIRECTION_3D)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def write_msd_task(root: Path, name: str = "Task05_Prostate", channels: int = 2) -> Path:
    """Three training cases and one test case; float32 and uint8 images, one float32 label, macOS `._*` files."""
    task = root / name
    rng = np.random.default_rng(0)
    shape = (channels, 6, 7, 8) if channels else (6, 7, 8)
    for i, dtype in enumerate((np.float32, np.uint8, np.uint8)):
        write_nifti(task / "imagesTr" / f"prostate_{i:02d}.nii.gz", (rng.random(shape) * 200).astype(dtype), channels)
        label = np.zeros((6, 7, 8), np.float32 if i == 0 else np.uint8)
        label[1:4, 2:5, 3:6] = 1
        label[2, 3, 4] = 2
        write_nifti(task / "labelsTr" / f"prostate_{i:02d}.nii.gz", label)
    write_nifti(task / "imagesTs" / "prostate_10.nii.gz", (rng.random(shape) * 200).astype(np.float32), channels)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub / "._prostate_00.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    modality = {"0": "T2", "1": "ADC"} if channels else {"0": "MRI"}
    (task / "dataset.json").write_text(json.dumps({
        "name": "PROSTATE", "tensorImageSize": "4D" if channels else "3D", "modality": modality,
        "labels": {"0": "background", "1": "PZ", "2": "TZ"}, "numTraining": 32, "numTest": 1,
        "training": [{"image": f"./imagesTr/prostate_{i:02d}.nii.gz"} for i in range(3)],
        "test": ["./imagesTs/prostate_10.nii.gz"]}))
    return task


def test_msd_4d_multimodal_with_release_quirks(tmp_path, raw):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    task = write_msd_task(tmp_path / "msd")
    (raw / ".partial_4242_Dataset005_Prostate/imagesTr").mkdir(parents=True)  # left by a killed run
    out = Path(convert_msd_dataset(str(task), num_processes=1))
    assert out == raw / "Dataset005_Prostate" and sorted(p.name for p in raw.iterdir()) == [out.name]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"prostate_{i:02d}_{c:04d}.nii.gz"
                                                                     for i in range(3) for c in range(2)]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["prostate_10_0000.nii.gz", "prostate_10_0001.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"prostate_{i:02d}.nii.gz" for i in range(3)]

    source = sitk.GetArrayFromImage(sitk.ReadImage(str(task / "imagesTr/prostate_01.nii.gz")))
    channel = sitk.ReadImage(str(out / "imagesTr/prostate_01_0001.nii.gz"))
    assert channel.GetDimension() == 3 and channel.GetPixelID() == sitk.sitkUInt8  # dtype kept
    np.testing.assert_array_equal(sitk.GetArrayFromImage(channel), source[1])
    assert channel.GetSpacing() == (1.5, 1.0, 2.0) and channel.GetOrigin() == (10.0, -5.0, 3.0)
    np.testing.assert_allclose(channel.GetDirection(), DIRECTION_3D)
    assert sitk.ReadImage(str(out / "imagesTr/prostate_00_0000.nii.gz")).GetPixelID() == sitk.sitkFloat32

    label = sitk.ReadImage(str(out / "labelsTr/prostate_00.nii.gz"))  # float32 in the source
    assert label.GetPixelID() == sitk.sitkUInt8 and label.GetOrigin() == (10.0, -5.0, 3.0)
    assert sorted(np.unique(sitk.GetArrayFromImage(label))) == [0, 1, 2]
    assert filecmp.cmp(task / "labelsTr/prostate_01.nii.gz", out / "labelsTr/prostate_01.nii.gz", shallow=False)

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "T2", "1": "ADC"} and dataset["file_ending"] == ".nii.gz"
    assert dataset["labels"] == {"background": 0, "PZ": 1, "TZ": 2} and dataset["numTraining"] == 3
    assert "training" not in dataset and "modality" not in dataset
    verify_dataset_integrity(str(out), num_processes=1)  # nnU-Net accepts it


def test_msd_refuses_bad_input_and_never_leaves_a_half_dataset(tmp_path, raw):
    def refused(task: Path, *expected: str, **kwargs) -> None:
        with pytest.raises(UserError) as refusal:
            convert_msd_dataset(str(task), **kwargs)
        message = str(refusal.value)
        assert all(e in message for e in expected), message
        assert [p.name for p in raw.iterdir() if p.name != "Dataset005_Prostate"] == []

    task = write_msd_task(tmp_path / "msd")
    renamed = task.rename(tmp_path / "msd" / "Prostate")
    refused(renamed, "TaskXX_Name")
    task = renamed.rename(task)
    (task / "labelsTr/prostate_02.nii.gz").rename(tmp_path / "kept.nii.gz")
    refused(task, "unpaired: prostate_02.nii.gz")
    (tmp_path / "kept.nii.gz").rename(task / "labelsTr/prostate_02.nii.gz")

    write_nifti(task / "labelsTr/prostate_02.nii.gz", np.full((6, 7, 8), 0.5, np.float32))
    refused(task, "labelsTr/prostate_02.nii.gz", "non-integer")  # a broken label stops it, nothing is left
    (task / "imagesTr/prostate_02.nii.gz").write_bytes(b"truncated")
    refused(task, "prostate_02.nii.gz", "Re-extract")

    (tmp_path / "empty/Task02_Heart").mkdir(parents=True)
    refused(tmp_path / "empty/Task02_Heart", "imagesTr does not exist", "Expected layout")

    write_msd_task(tmp_path / "fresh")
    convert_msd_dataset(str(tmp_path / "fresh/Task05_Prostate"))
    refused(tmp_path / "fresh/Task05_Prostate", "id 5 is taken", "Dataset005_Prostate")
    convert_msd_dataset(str(tmp_path / "fresh/Task05_Prostate"), overwrite_target_id=105)
    assert (raw / "Dataset105_Prostate/dataset.json").is_file()



@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="needs ../shared/data/Task04_Hippocampus")
def test_msd_hippocampus_release(tmp_path, raw):
    """The console script on the real release: float32 labels become uint8, images stay byte for byte."""
    proc = subprocess.run([str(BIN / "nnScd_convert_MSD_dataset"), "-i", str(HIPPOCAMPUS), "-np", "2"],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = raw / "Dataset004_Hippocampus"
    cases = sorted(p.name for p in (HIPPOCAMPUS / "labelsTr").iterdir() if not p.name.startswith("."))
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == cases and len(cases) == 208
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [c.replace(".nii", "_0000.nii") for c in cases]
    assert len(list((out / "imagesTs").iterdir())) == 130
    for case in ("hippocampus_003.nii.gz", "hippocampus_243.nii.gz"):  # the release's float32 labels
        source, label = sitk.ReadImage(str(HIPPOCAMPUS / "labelsTr" / case)), sitk.ReadImage(str(out / "labelsTr" / case))
        assert source.GetPixelID() == sitk.sitkFloat32 and label.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(source))
        assert label.GetSpacing() == source.GetSpacing() and label.GetOrigin() == source.GetOrigin()
    dtypes = {sitk.ReadImage(str(p)).GetPixelID() for p in sorted((out / "imagesTr").iterdir())[:40]}
    assert dtypes == {sitk.sitkFloat32, sitk.sitkUInt8}  # the mix is kept: nnU-Net reads both as float32
    assert filecmp.cmp(HIPPOCAMPUS / "imagesTr/hippocampus_001.nii.gz", out / "imagesTr/hippocampus_001_0000.nii.gz",
                       shallow=False)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert dataset["channel_names"] == {"0": "MRI"} and dataset["numTraining"] == 208


def write_btcv(root: Path) -> Path:
    rng = np.random.default_rng(1)
    raw_data = root / "Abdomen/RawData"
    for i in (1, 2):
        write_nifti(raw_data / f"Training/img/img{i:04d}.nii.gz", rng.integers(-1000, 1000, (5, 6, 7)).astype(np.int16))
        label = np.zeros((5, 6, 7), np.float32 if i == 1 else np.uint8)
        label[1:3, 1:4, 2:6] = 6
        label[3, 4, 5] = 13
        write_nifti(raw_data / f"Training/label/label{i:04d}.nii.gz", label)
    write_nifti(raw_data / "Testing/img/img0061.nii.gz", rng.integers(-1000, 1000, (5, 6, 7)).astype(np.int16))
    (raw_data / "Training/img/._img0001.nii.gz").write_bytes(b"AppleDouble")
    return root


def test_btcv(tmp_path, raw):
    root = write_btcv(tmp_path / "btcv")
    out = Path(convert_btcv(str(root), dataset_id=17))
    assert out == raw / "Dataset017_BTCV"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["img0001_0000.nii.gz", "img0002_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["img0001.nii.gz", "img0002.nii.gz"]
    assert [p.name for p in (out / "imagesTs").iterdir()] == ["img0061_0000.nii.gz"]
    label = sitk.ReadImage(str(out / "labelsTr/img0001.nii.gz"))
    assert label.GetPixelID() == sitk.sitkUInt8 and sorted(np.unique(sitk.GetArrayFromImage(label))) == [0, 6, 13]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT"} and dataset["numTraining"] == 2
    assert len(dataset["labels"]) == 14 and dataset["labels"]["liver"] == 6 and dataset["labels"]["left adrenal gland"] == 13

    for wrong in (tmp_path, root / "Abdomen/RawData/Training"):
        with pytest.raises(UserError, match=re.escape("Abdomen/RawData/{Training/img/imgXXXX.nii.gz")):
            convert_btcv(str(wrong), dataset_id=18)
    (root / "Abdomen/RawData/Training/label/label0002.nii.gz").unlink()
    with pytest.raises(UserError, match="unpaired: img0002.nii.gz"):
        convert_btcv(str(root / "Abdomen"), dataset_id=18)


def write_isic(root: Path) -> Path:
    rng = np.random.default_rng(2)
    images, masks = root / "ISIC2018_Task1-2_Training_Input", root / "ISIC2018_Task1_Training_GroundTruth"
    for folder in (images, masks, root / "ISIC2018_Task1-2_Test_Input"):
        folder.mkdir(parents=True)
    for i, shape in enumerate(((30, 40), (24, 36))):
        io.imsave(images / f"ISIC_{i:07d}.jpg", rng.integers(0, 255, (*shape, 3)).astype(np.uint8), check_contrast=False)
        mask = np.zeros(shape, np.uint8)
        mask[5:15, 8:30] = 255
        io.imsave(masks / f"ISIC_{i:07d}_segmentation.png", mask, check_contrast=False)
    io.imsave(root / "ISIC2018_Task1-2_Test_Input/ISIC_0012345.jpg", rng.integers(0, 255, (20, 25, 3)).astype(np.uint8))
    (images / "LICENSE.txt").write_text("CC-BY-NC")
    return root


def test_isic2018(tmp_path, raw):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    root = write_isic(tmp_path / "isic")
    out = Path(convert_isic2018(str(root), dataset_id=18))
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["ISIC_0000000_0000.png", "ISIC_0000001_0000.png"]
    assert [p.name for p in (out / "imagesTs").iterdir()] == ["ISIC_0012345_0000.png"]
    image, _ = NaturalImage2DIO().read_images([str(out / "imagesTr/ISIC_0000001_0000.png")])
    assert image.shape == (3, 1, 24, 36)
    mask = io.imread(out / "labelsTr/ISIC_0000000.png")
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1} and mask[5:15, 8:30].all()
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "R", "1": "G", "2": "B"} and dataset["file_ending"] == ".png"
    assert dataset["labels"] == {"background": 0, "lesion": 1} and dataset["numTraining"] == 2
    verify_dataset_integrity(str(out), num_processes=1)

    resized = Path(convert_isic2018(str(root), dataset_id=118, size=(16, 20)))
    assert io.imread(resized / "imagesTr/ISIC_0000001_0000.png").shape == (16, 20, 3)
    assert io.imread(resized / "labelsTr/ISIC_0000001.png").shape == (16, 20)

    io.imsave(root / "ISIC2018_Task1_Training_GroundTruth/ISIC_0000001_segmentation.png",
              np.full((24, 36), 128, np.uint8), check_contrast=False)
    with pytest.raises(UserError, match="ISIC_0000001_segmentation.png is not an ISIC mask"):
        convert_isic2018(str(root), dataset_id=218)
    assert not (raw / "Dataset218_ISIC2018").exists()
    with pytest.raises(UserError, match="ISIC2018_Task1-2_Training_Input/ISIC_XXXXXXX.jpg"):
        convert_isic2018(str(tmp_path), dataset_id=218)
