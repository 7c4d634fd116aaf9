"""Faults a cluster job meets: kill -9 mid-training, a checkpoint write that dies half way."""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, CONFIG, DATASET, DATASET_ID, TRAINER, run_command


def _epoch_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["current_epoch"]


def test_kill_during_training_then_continue_resumes_at_last_finished_epoch(nnunet_env, planned_dataset):
    trainer = "nnScdTrainer_smoke"  # 2 epochs x 4 iterations
    fold_dir = Path(nnunet_env["nnUNet_results"]) / DATASET / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_2"
    latest = fold_dir / "checkpoint_latest.pth"
    cmd = [str(BIN / "nnScd_train"), str(DATASET_ID), CONFIG, "2", "-tr", trainer, "-device", "cpu"]
    proc = subprocess.Popen(cmd, env=nnunet_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    try:
        while not (latest.is_file() and _epoch_of(latest) >= 1):  # nnU-Net alone would save at epoch 50
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline, "no checkpoint_latest after the first epoch"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved_epoch = _epoch_of(latest)  # the checkpoint survives the kill intact
    assert saved_epoch == 1 and not (fold_dir / "checkpoint_final.pth").exists()

    resumed = run_command(["nnScd_train", str(DATASET_ID), CONFIG, "2", "-tr", trainer, "-device", "cpu", "--c"],
                          nnunet_env)
    epochs = [int(e) for e in re.findall(r"Epoch (\d+)\n", resumed.stdout)]
    assert epochs == [1], epochs
    # nnU-Net's poly schedule is a function of the epoch: the resumed epoch gets its own learning rate
    lr = float(re.search(r"Current learning rate: ([0-9.e-]+)", resumed.stdout).group(1))
    assert lr == pytest.approx(round(0.01 * (1 - saved_epoch / 2) ** 0.9, 5), abs=1e-5)
    assert _epoch_of(fold_dir / "checkpoint_final.pth") == 2


def test_interrupted_checkpoint_write_keeps_previous_checkpoint(nnunet_env, planned_dataset, tmp_path, monkeypatch):
    from nnscd_trainers import nnScdTrainer_cpu

    preprocessed = Path(nnunet_env["nnUNet_preprocessed"]) / DATASET
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnU-Net's run_training adds this key before building a trainer
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    trainer = nnScdTrainer_cpu(plans, CONFIG, 3, dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    target = tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(target))
    before = target.read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):  # the process is killed after writing part of the file
        with open(f, "wb") as handle:
            handle.write(before[: len(before) // 2])
        raise KeyboardInterrupt("killed during torch.save")

    trainer.current_epoch = 7
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(target))
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert torch.load(target, map_location="cpu", weights_only=False)["current_epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pth"]  # no partial file left behind
