"""nnScd_seed: two seeded runs see the same patches and augmentations and end with the same losses and weights."""
import json

import pytest
import torch

from conftest import CONFIG, DATASET, run_command
from nnscd_trainers.nnscd_trainer import SEED_ENV, nnScdTrainer, seed_from_environment


class _ThreeSteps(nnScdTrainer):
    schedule = (1, 3, 1)


def _train_once() -> tuple:
    from nnunetv2.paths import nnUNet_preprocessed

    folder = f"{nnUNet_preprocessed}/{DATASET}"
    plans = {**json.load(open(f"{folder}/nnUNetPlans.json")), "continue_training": False}  # as run_training sets it
    dataset_json = json.load(open(f"{folder}/dataset.json"))
    trainer = _ThreeSteps(plans, CONFIG, 2, dataset_json, torch.device("cpu"))
    trainer.disable_checkpointing = True
    trainer.run_training()
    state = trainer.network.state_dict()
    logged = trainer.logger.local_logger.my_fantastic_logging
    return logged["train_losses"] + logged["val_losses"], torch.cat([v.flatten().float() for v in state.values()])


def test_seeded_runs_are_identical_and_unseeded_runs_differ(planned_dataset, nnunet_env, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")  # augmentation in a worker process, as in training
    monkeypatch.setenv(SEED_ENV, "7")
    losses_a, weights_a = _train_once()
    losses_b, weights_b = _train_once()
    assert losses_a == losses_b and torch.equal(weights_a, weights_b)

    monkeypatch.delenv(SEED_ENV)
    losses_c, weights_c = _train_once()
    assert losses_c != losses_a and not torch.equal(weights_c, weights_a)


@pytest.mark.parametrize("value, expected", [("", None), ("0", 0), (" 12 ", 12)])
def test_seed_is_read_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv(SEED_ENV, value)
    assert seed_from_environment() == expected


def test_a_seed_that_is_not_an_integer_stops_training_with_the_fix(nnunet_env, planned_dataset):
    proc = run_command(["nnScd_train", "991", CONFIG, "0", "-tr", "nnScdTrainer_cpu", "-device", "cpu"],
                       {**nnunet_env, SEED_ENV: "abc"}, check=False, in_process=True)
    assert proc.returncode == 2 and "nnScd_seed='abc' is not an integer" in proc.stderr, proc.stderr
