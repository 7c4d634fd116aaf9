"""Full disks and read-only folders, made real: a size-limited tmpfs mounted for the test (the kernel itself refuses
the write, so every library raises what it raises on a cluster's full scratch disk), then grown or remounted to
show that a rerun completes. Needs mount rights (root, as on the CI machine); skipped with the reason otherwise.
"""
import contextlib
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from conftest import CONFIG, DATASET, DATASET_ID, TRAINER, run_command
from test_reliability_faults import _case_args, complete_cases, visible

PAGE = 4096


def _mount(folder: Path, options: str) -> None:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"a size-limited tmpfs needs mount rights: {proc.stderr.strip()}")


@contextlib.contextmanager
def small_disk(folder: Path, size: int, options: str = "rw"):
    """`folder` as a tmpfs of `size` bytes (rounded up to whole pages), unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    _mount(folder, f"{options},size={-(-size // PAGE) * PAGE}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def remount(folder: Path, options: str) -> None:
    """Grow the disk (`size=...`: space freed) or make it read-only (`ro`) with its files in place."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


def test_disk_write_failure_names_the_folder_only_for_disk_errors(tmp_path):
    from nnscd.core.safe_io import disk_write_failure

    full = disk_write_failure(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "plans.json")))
    assert f"cannot write in {tmp_path}: its disk is full" in str(full) and "rerun the same command" in str(full)
    assert "nothing half-written" not in str(full)  # nnU-Net's own writes are not atomic: never claim it
    assert disk_write_failure(OSError(errno.ENOENT, "No such file", str(tmp_path / "x"))) is None


def test_checkpoint_write_on_full_disk_keeps_the_previous_checkpoint(nnunet_env, planned_dataset, tmp_path):
    from nnscd.core.errors import UserError
    from nnscd_trainers import nnScdTrainer_cpu

    preprocessed = Path(nnunet_env["nnUNet_preprocessed"]) / DATASET
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    trainer = nnScdTrainer_cpu(plans, CONFIG, 3, json.loads((preprocessed / "dataset.json").read_text()),
                               device=torch.device("cpu"))
    trainer.initialize()
    trainer.save_checkpoint(str(tmp_path / "size.pth"))
    size = (tmp_path / "size.pth").stat().st_size
    with small_disk(tmp_path / "disk", size + 16 * PAGE) as disk:  # room for one checkpoint, not for its successor
        target = disk / "checkpoint_latest.pth"
        trainer.save_checkpoint(str(target))
        before = target.read_bytes()
        trainer.current_epoch = 7
        with pytest.raises(UserError, match=f"cannot write in {disk}: its disk is full"):
            trainer.save_checkpoint(str(target))
        assert target.read_bytes() == before and os.listdir(disk) == ["checkpoint_latest.pth"]  # no partial file
        remount(disk, f"size={3 * size}")
        trainer.save_checkpoint(str(target))
        assert torch.load(target, map_location="cpu", weights_only=False)["current_epoch"] == 8


def test_preprocessing_on_full_or_read_only_disk_leaves_nothing(nnunet_env, planned_dataset, tmp_path):
    from nnscd.core.atomic_preprocessor import nnScdPreprocessor
    from nnscd.core.errors import UserError

    args = _case_args(Path(nnunet_env["nnUNet_preprocessed"]) / DATASET, planned_dataset, "case_000")
    with small_disk(tmp_path / "disk", 4 * PAGE) as disk:
        with pytest.raises(UserError, match=f"cannot write in {disk}: its disk is full"):
            nnScdPreprocessor(verbose=False).run_case_save(str(disk / "case_000"), *args)
        assert os.listdir(disk) == []  # the staging folder is gone, no case listed
        remount(disk, f"size={4 << 20}")
        nnScdPreprocessor(verbose=False).run_case_save(str(disk / "case_000"), *args)
        assert complete_cases(disk) == ["case_000"] and not [n for n in os.listdir(disk) if n.startswith(".")]
    with small_disk(tmp_path / "read_only", PAGE, "ro") as disk:
        with pytest.raises(UserError, match=f"cannot write in {disk}: it is on a read-only file system"):
            nnScdPreprocessor(verbose=False).run_case_save(str(disk / "case_000"), *args)


def test_prediction_on_full_disk_then_continue(nnunet_env, planned_dataset, trained_model, tmp_path):
    out = tmp_path / "disk" / "pred"
    args = ["nnScd_predict", "-i", str(planned_dataset / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
            "-c", CONFIG, "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"]
    # room for nnU-Net's three JSON files (two copied from the model, one of arguments) and one segmentation
    pages = sum(-(-(trained_model / name).stat().st_size // PAGE) for name in ("plans.json", "dataset.json")) + 2
    with small_disk(tmp_path / "disk", pages * PAGE) as disk:
        failed = run_command(args, nnunet_env, check=False, in_process=True)
        assert failed.returncode == 2 and f"cannot write in {out}: its disk is full" in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr
        finished = visible(out)  # SimpleITK left empty files here, exit 0, before nnscd read its writes back
        assert len(finished) < 3 and not [n for n in os.listdir(out) if n.startswith(".")]
        for name in finished:
            assert sitk.ReadImage(str(out / name)).GetSize() == (32,) * 3
        remount(disk, f"size={4 << 20}")
        rerun = run_command([*args, "--continue_prediction"], nnunet_env, in_process=True)
        assert f"That's {3 - len(finished)} cases" in rerun.stdout
        assert visible(out) == [f"case_01{i}.nii.gz" for i in range(3)]
        for name in visible(out):
            assert sitk.ReadImage(str(out / name)).GetSize() == (32,) * 3
        remount(disk, "ro")
        refused = run_command([*args[:4], str(disk / "other"), *args[5:]], nnunet_env, check=False, in_process=True)
        assert refused.returncode == 2 and "it is on a read-only file system" in refused.stderr, refused.stderr
