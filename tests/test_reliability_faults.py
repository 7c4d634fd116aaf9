"""Kills at deterministic points of preprocessing and prediction: no half-written output is ever used or visible.

A fault is injected by a script that wraps a write function: it writes half of one file and then SIGKILLs its
own process group (as a cluster's scheduler would), so the kill lands at the same point every run. Spawned
worker processes re-import the script, so the wrapper is active in them too. (Training kills and checkpoint
writes: tests/test_foundation_faults.py.)
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk

from conftest import CONFIG, DATASET, DATASET_ID, TRAINER, run_command

KILL_PREPROCESSING = '''
import os, signal, sys
import blosc2

asarray = blosc2.asarray


def asarray_then_die(array, *args, urlpath=None, **kwargs):
    result = asarray(array, *args, urlpath=urlpath, **kwargs)
    if urlpath is not None and os.path.basename(urlpath) == "{case}_seg.b2nd":
        os.truncate(urlpath, os.path.getsize(urlpath) // 2)
        os.killpg(0, signal.SIGKILL)
    return result


blosc2.asarray = asarray_then_die
if __name__ == "__main__":
    from nnscd.cli.nnunet_commands import preprocess
    preprocess()
'''

KILL_PREDICTION = '''
import os, signal
import SimpleITK as sitk

write = sitk.WriteImage


def write_then_die(image, path, *args):
    write(image, path, *args)
    if "{case}" in os.path.basename(path):
        os.truncate(path, os.path.getsize(path) // 2)
        os.killpg(0, signal.SIGKILL)


sitk.WriteImage = write_then_die
if __name__ == "__main__":
    from nnscd.cli.nnunet_commands import predict
    predict()
'''


def run_until_killed(script: str, args, env, tmp_path: Path) -> None:
    path = tmp_path / "killed_run.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True, text=True,
                          start_new_session=True, timeout=300)  # own process group: the kill hits only this run
    assert proc.returncode == -9, f"not killed: {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


def complete_cases(folder: Path):
    """Cases training would list (nnU-Net's own listing), each loaded in full."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    cases = sorted(nnUNetDatasetBlosc2.get_identifiers(str(folder)))
    for case in cases:
        data, seg, _, properties = nnUNetDatasetBlosc2(str(folder), [case]).load_case(case)
        assert np.isfinite(data[:]).all() and seg[:].shape[1:] == data.shape[1:] and "spacing" in properties
    return cases


def visible(folder: Path):
    """Segmentations a user or nnU-Net sees (pathlib's glob would also match hidden partial files)."""
    return sorted(n for n in os.listdir(folder) if n.endswith(".nii.gz") and not n.startswith("."))


def _case_args(base: Path, raw: Path, case: str):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(str(base / "nnUNetPlans.json"))
    return ([str(raw / "imagesTr" / f"{case}_0000.nii.gz")], str(raw / "labelsTr" / f"{case}.nii.gz"), manager,
            manager.get_configuration(CONFIG), json.loads((base / "dataset.json").read_text()))


def test_preprocessing_write_killed_half_way_leaves_no_listed_case(nnunet_env, planned_dataset, tmp_path,
                                                                    monkeypatch):
    """In-process: nnU-Net's preprocessor lists a case whose segmentation was cut off; nnscd's lists none."""
    import blosc2
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnscd.core.atomic_preprocessor import nnScdPreprocessor

    args = _case_args(Path(nnunet_env["nnUNet_preprocessed"]) / DATASET, planned_dataset, "case_000")
    asarray = blosc2.asarray

    def asarray_then_die(array, *a, urlpath=None, **kw):
        result = asarray(array, *a, urlpath=urlpath, **kw)
        if urlpath is not None and urlpath.endswith("_seg.b2nd"):
            os.truncate(urlpath, os.path.getsize(urlpath) // 2)
            raise KeyboardInterrupt("killed while writing the segmentation")
        return result

    monkeypatch.setattr(blosc2, "asarray", asarray_then_die)
    for preprocessor, folder in ((DefaultPreprocessor, tmp_path / "nnunet"), (nnScdPreprocessor, tmp_path / "nnscd")):
        folder.mkdir()
        with pytest.raises(KeyboardInterrupt):
            preprocessor(verbose=False).run_case_save(str(folder / "case_000"), *args)
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    assert nnUNetDatasetBlosc2.get_identifiers(str(tmp_path / "nnunet")) == ["case_000"]  # half-written, listed
    assert os.listdir(tmp_path / "nnscd") == []  # staging folder removed, nothing listed
    monkeypatch.undo()
    nnScdPreprocessor(verbose=False).run_case_save(str(tmp_path / "nnscd" / "case_000"), *args)
    assert complete_cases(tmp_path / "nnscd") == ["case_000"]


def test_preprocessing_killed_mid_dataset_then_rerun(nnunet_env, planned_dataset, tmp_path):
    from nnscd.checks.input_checks import check_training_setup
    from nnscd_trainers import nnScdTrainer_cpu

    # a 4-case copy of the session dataset, so the shared one is never left half-preprocessed
    name = "Dataset994_NnscdKill"
    raw, base = Path(nnunet_env["nnUNet_raw"]) / name, Path(nnunet_env["nnUNet_preprocessed"]) / name
    cases = [f"case_{i:03d}" for i in range(4)]
    for sub, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
        (raw / sub).mkdir(parents=True)
        for case in cases:
            shutil.copy(planned_dataset / sub / f"{case}{suffix}", raw / sub)
    base.mkdir()
    for file in ("dataset.json", "nnUNetPlans.json"):
        content = json.loads((Path(nnunet_env["nnUNet_preprocessed"]) / DATASET / file).read_text())
        content.update(numTraining=4) if file == "dataset.json" else content.update(dataset_name=name)
        (raw / file if file == "dataset.json" else base / file).write_text(json.dumps(content))
    shutil.copy(raw / "dataset.json", base / "dataset.json")
    command = ["-d", "994", "-c", CONFIG, "-np", "1"]

    run_until_killed(KILL_PREPROCESSING.replace("{case}", "case_002"), command, nnunet_env, tmp_path)
    data = base / "nnUNetPlans_3d_fullres"
    assert complete_cases(data) == cases[:2]  # the killed case is not listed, the others are whole
    problems = check_training_setup("994", CONFIG, "0", nnScdTrainer_cpu, "nnUNetPlans", False)
    assert len(problems) == 1 and "preprocessing did not finish (2 of 4 cases" in problems[0], problems

    run_command(["nnScd_preprocess", *command], nnunet_env)
    assert complete_cases(data) == cases and not [n for n in os.listdir(data) if n.startswith(".")]
    assert check_training_setup("994", CONFIG, "0", nnScdTrainer_cpu, "nnUNetPlans", False) == []


def test_prediction_killed_mid_folder_then_continue(nnunet_env, planned_dataset, trained_model, tmp_path):
    out = tmp_path / "pred"
    args = ["-i", str(planned_dataset / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIG,
            "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"]
    run_until_killed(KILL_PREDICTION.replace("{case}", "case_011"), args, nnunet_env, tmp_path)
    finished = visible(out)
    assert finished == ["case_010.nii.gz"]  # the killed case_011 exists only as a hidden partial file
    assert [p.name for p in out.glob(".partial_*")] and sitk.ReadImage(str(out / finished[0])).GetSize() == (32,) * 3
    before = (out / finished[0]).stat()

    rerun = run_command(["nnScd_predict", *args, "--continue_prediction"], nnunet_env)
    assert "That's 2 cases" in rerun.stdout  # case_010 is not redone
    after = (out / finished[0]).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert visible(out) == [f"case_01{i}.nii.gz" for i in range(3)]
    assert not list(out.glob(".partial_*"))
    for name in visible(out):
        assert sitk.ReadImage(str(out / name)).GetSize() == (32,) * 3


FORK_THEN_DIE = '''
import multiprocessing, os, signal, sys, time
from nnscd.core.child_processes import end_forked_children_with_this_process

if sys.argv[1] == "end_with_parent":
    end_forked_children_with_this_process()
worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,), daemon=True)  # as batchgenerators
worker.start()
open(sys.argv[2], "w").write(str(worker.pid))
os.kill(os.getpid(), signal.SIGKILL)
'''


def _running(pid: int) -> bool:
    try:  # an orphan that ended may stay a zombie until init reaps it
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_forked_worker_ends_with_its_killed_parent(tmp_path):
    """A SIGKILLed trainer's augmentation workers (forked daemon processes) end with it; without
    end_forked_children_with_this_process (nnScdTrainer calls it) they would wait for ever."""
    script = tmp_path / "fork_then_die.py"
    script.write_text(FORK_THEN_DIE)
    workers = {}
    for mode in ("end_with_parent", "plain"):  # no pipes: the plain worker would hold them open
        run = subprocess.run([sys.executable, str(script), mode, str(tmp_path / mode)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert run.returncode == -signal.SIGKILL
        workers[mode] = int((tmp_path / mode).read_text())
    try:
        deadline = time.monotonic() + 10
        while _running(workers["end_with_parent"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(workers["end_with_parent"]), "the worker outlived its killed parent"
        assert _running(workers["plain"]), "the control worker ended by itself: the test would prove nothing"
    finally:
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
