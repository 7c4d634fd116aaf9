"""Two runs in one folder: the second refuses, naming the folder and the first; a killed run leaves no lock stuck.

flock locks belong to an open file, so a lock this test holds through its own file blocks the command run here
in-process exactly as one held by another process would.
"""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONFIG, DATASET, DATASET_ID, TRAINER, run_command

HOLD = """
import sys, time
from nnscd.core.folder_lock import folder_lock
with folder_lock(sys.argv[1], "nnscd_train", "nnScd_train of this fold"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    from nnscd.core.errors import UserError
    from nnscd.core.folder_lock import folder_lock, held_locks

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert held_locks(str(tmp_path)) == ["nnscd_train"]
        with pytest.raises(UserError, match=f"{tmp_path}: another nnScd_train of this fold is running there "
                                            f"\\(pid {holder.pid} on "):
            with folder_lock(str(tmp_path), "nnscd_train", "nnScd_train of this fold"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".nnscd_train.nnscd.lock").exists() and held_locks(str(tmp_path)) == []  # left, not held
    with folder_lock(str(tmp_path), "nnscd_train", "nnScd_train of this fold"):
        assert held_locks(str(tmp_path)) == ["nnscd_train"]
    assert os.listdir(tmp_path) == []  # released and removed


def test_second_training_of_one_fold_refuses(nnunet_env, planned_dataset):
    from nnscd.core.folder_lock import folder_lock

    fold = Path(nnunet_env["nnUNet_results"]) / DATASET / f"{TRAINER}__nnUNetPlans__{CONFIG}" / "fold_2"
    made = not fold.exists()

    def files():  # another test may have trained this fold already: its files must stay as they are
        return {p.name: p.stat().st_mtime_ns for p in fold.iterdir() if not p.name.startswith(".")}

    try:
        with folder_lock(str(fold), "nnscd_train", "nnScd_train of this fold"):
            before = files()
            refused = run_command(["nnScd_train", str(DATASET_ID), CONFIG, "2", "-tr", TRAINER, "-device", "cpu"],
                                  nnunet_env, check=False, in_process=True)
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert f"{fold}: another nnScd_train of this fold is running there (pid {os.getpid()}" in refused.stderr
        assert files() == before  # nothing trained, nothing written
    finally:
        if made:
            shutil.rmtree(fold)


def test_second_prediction_into_one_folder_refuses_but_parts_run_side_by_side(nnunet_env, planned_dataset,
                                                                             trained_model, tmp_path):
    from nnscd.core.folder_lock import folder_lock

    out = tmp_path / "pred"
    args = ["nnScd_predict", "-i", str(planned_dataset / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
            "-c", CONFIG, "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"]
    with folder_lock(str(out), "nnscd_predict", "nnScd_predict"):
        refused = run_command(args, nnunet_env, check=False, in_process=True)
    assert refused.returncode == 2 and f"{out}: another nnScd_predict is running there" in refused.stderr
    assert not [n for n in os.listdir(out) if not n.startswith(".")]

    other_part = out / ".partial_1_case_011.nii.gz"  # what part 1 is writing now
    with folder_lock(str(out), "nnscd_predict_part1of2", "nnScd_predict of part 1 of 2"):
        other_part.write_bytes(b"being written")
        run_command([*args, "-num_parts", "2", "-part_id", "0"], nnunet_env, in_process=True)
        assert other_part.exists()  # not taken for a killed run's leftover
    assert sorted(n for n in os.listdir(out) if n.endswith(".nii.gz") and not n.startswith(".")) == \
        ["case_010.nii.gz", "case_012.nii.gz"]  # part 0 of 2: every other case
