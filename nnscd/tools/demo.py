"""nnScd_demo: the whole nnU-Net workflow with nnscd's commands on a synthetic dataset, on the CPU, in minutes.

It runs the same console commands a user types (printed before each step), so the demo doubles as a tutorial:
write a dataset in nnU-Net raw format -> plan and preprocess (nnU-Net's plans plus token-aware nnScdPlans) ->
train one fold of the STP+MTA token-sparse ViT -> predict held-out cases -> Dice per class.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from nnscd.core.paths import settle_environment

DEMO_TRAINER = "STPMTATrainer_demo"
PLANS = "nnScdPlans"  # token-aware plans written by nnScd_plan_and_preprocess
MIN_DICE = 0.5


def _run(command: List[str]) -> None:
    print(f"\n$ {' '.join(command)}", flush=True)
    executable = Path(sys.executable).parent / command[0]  # the console scripts installed beside this python
    subprocess.run([str(executable), *command[1:]], check=True)


def _dice_per_class(summary_file: str, labels: Dict[str, int]) -> Dict[str, float]:
    with open(summary_file) as f:
        per_class = json.load(f)["mean"]
    names = {str(v): k for k, v in labels.items()}
    return {names[k]: v["Dice"] for k, v in per_class.items()}


def run_demo(args: argparse.Namespace) -> bool:
    """Write the synthetic dataset, plan, train, predict and print Dice; whether every Dice reached MIN_DICE."""
    started = time.time()
    settle_environment(cpu=args.device == "cpu")
    from nnscd.tools.synthetic import LABELS, write_synthetic_dataset
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

    raw = write_synthetic_dataset(os.environ["nnUNet_raw"], args.dataset_id)
    d, c = str(args.dataset_id), "3d_fullres"
    _run(["nnScd_plan_and_preprocess", "-d", d, "-c", c, "-np", "2", "-npfp", "2", "--verify_dataset_integrity"])
    _run(["nnScd_train", d, c, "0", "-tr", args.tr, "-p", PLANS, "-device", args.device])
    model = Path(os.environ["nnUNet_results"]) / Path(raw).name / f"{args.tr}__{PLANS}__{c}"
    predictions = model / "demo_predictions_imagesTs"
    _run(["nnScd_predict", "-i", f"{raw}/imagesTs", "-o", str(predictions), "-d", d, "-c", c, "-tr", args.tr,
          "-p", PLANS, "-f", "0", "-device", args.device, "-npp", "0", "-nps", "0"])
    compute_metrics_on_folder_simple(f"{raw}/labelsTs", str(predictions), [1, 2],
                                     str(predictions / "summary.json"), num_processes=1, chill=False)

    validation = _dice_per_class(str(model / "fold_0" / "validation" / "summary.json"), LABELS)
    held_out = _dice_per_class(str(predictions / "summary.json"), LABELS)
    print(f"\nnnscd demo finished in {time.time() - started:.0f} s")
    print(f"{'class':<8}{'validation Dice':>18}{'held-out Dice':>16}")
    for name in validation:
        print(f"{name:<8}{validation[name]:>18.3f}{held_out[name]:>16.3f}")
    print(f"dataset:     {raw}\nmodel:       {model}\npredictions: {predictions}")
    worst = min(*validation.values(), *held_out.values())
    if worst < MIN_DICE:
        print(f"nnscd: Dice {worst:.3f} is below {MIN_DICE}: the model did not learn; see the training log in "
              f"{model / 'fold_0'}", file=sys.stderr)
    return worst >= MIN_DICE

