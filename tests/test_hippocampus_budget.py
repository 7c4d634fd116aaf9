"""The quality protocol's seed table (documentation/results/hippocampus_budget.py), on fake per-case Dice."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "documentation" / "results"))  # a driver, not package
from hippocampus_budget import UNET, seed_pairs, seed_table, table  # noqa: E402

CASES = [f"hippocampus_{i:03d}" for i in range(6)]


def _run(dice: float) -> dict:
    per_case = {case: dice + 0.01 * (i % 2) for i, case in enumerate(CASES)}  # case noise of its own
    return {"per_case": per_case, "mean_dice": dice, "dice": {"Anterior": dice, "Posterior": dice},
            "iterations": 250, "batch": 7, "train_wall_s": 900.0, "gflops_per_tile": 8.8}


def test_seed_pairs_report_seed_noise_beside_case_noise():
    by_seed = {0: {"STPMTATrainer_budget": _run(0.78), "UNETRTrainer_budget": _run(0.79), UNET: _run(0.82)},
               1: {"STPMTATrainer_budget": _run(0.77), "UNETRTrainer_budget": _run(0.81)},
               2: {"STPMTATrainer_budget": _run(0.73), "UNETRTrainer_budget": _run(0.77)}}
    pairs = {(p["trainer"], p["reference"]): p for p in seed_pairs(by_seed)}

    twin = pairs[("STPMTATrainer_budget", "UNETRTrainer_budget")]
    assert twin["reference_seeds"] == [0, 1, 2]
    assert twin["per_seed"] == pytest.approx({0: -0.01, 1: -0.04, 2: -0.04})
    over_seeds, over_cases = twin["over_seeds_ci95"], twin["seed_averaged_ci95"]
    assert over_seeds["mean"] == pytest.approx(-0.03) and over_cases["mean"] == pytest.approx(-0.03)
    # the per-seed differences disagree by 3 points, the cases of the seed-averaged runs by nothing: only the
    # interval over seeds may reach 0
    assert over_seeds["ci95_low"] < -0.06 and over_seeds["ci95_high"] > 0
    assert over_cases["ci95_high"] - over_cases["ci95_low"] < 1e-6

    unet = pairs[("STPMTATrainer_budget", UNET)]  # the U-Net ran at seed 0 only: a fixed baseline for every seed
    assert unet["reference_seeds"] == [0]
    assert unet["per_seed"] == pytest.approx({0: -0.04, 1: -0.05, 2: -0.09})
    assert "-0.060 [" in seed_table([unet])


def test_tagged_runs_are_compared_with_the_seeds_committed_runs():
    """--tag: runs of an earlier version filed apart, each row still paired with the dense twin and the U-Net of the
    seed's committed table, which the tagged file does not hold."""
    tagged = {"STPMTATrainer_infill_budget": _run(0.77)}
    row = table(tagged, {"UNETRTrainer_budget": _run(0.81), UNET: _run(0.80)}).splitlines()[-1]
    assert row.startswith("| STPMTATrainer_infill_budget | 0.770") and "| -0.030 [" in row and "| -0.040 [" in row
