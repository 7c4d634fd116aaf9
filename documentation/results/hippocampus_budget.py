"""Tables of the quality protocol (hippocampus_budget.sh trains; this reads what nnU-Net's final validation wrote).

For every trained `*_budget` (equal iterations) and `*_equalcompute` trainer on Hippocampus fold 0: Dice per class
and mean over the 42 validation cases, the paired per-case difference with its 95% t-interval against nnU-Net's U-Net
(nnScdTrainer_budget) and against the dense twin, training wall time (nnU-Net's epoch timestamps), iterations and
forward GFLOPs per tile. Runs already in --out's JSON are kept (trained models are never committed); a run found
again under nnUNet_results replaces its entry.

    nnUNet_results=... nnUNet_raw=... nnUNet_preprocessed=... python documentation/results/hippocampus_budget.py \
        --out documentation/results
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # the drivers are not in the package
from hippocampus import LABELS, _per_case_dice, gflops_per_tile, paired_difference  # noqa: E402
from nnscd.core.paths import settle_environment  # noqa: E402

DATASET = "Dataset004_Hippocampus"
UNET = "nnScdTrainer_budget"
TWINS = {  # sparse trainer -> its dense twin
    "STPMTAPrimusV3STrainer_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusV3STrainer_keep50_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusV3STrainer_cumulative_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusV3STrainer_fgprior_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusV3STrainer_fgprior_keep50_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusLightTrainer_budget": "PrimusLightTrainer_budget",
    "STPMTATrainer_fgprior_budget": "UNETRTrainer_budget",
    "STPMTATrainer_keep75_budget": "UNETRTrainer_budget",
    "STPMTATrainer_lr2en3_budget": "UNETRTrainer_lr2en3_budget",
    "STPMTALightTrainer_layerscale_budget": "ViTLightTrainer_layerscale_budget",
    "STPMTATrainer_equalcompute": "UNETRTrainer_equalcompute",
    "STPMTAPrimusLightTrainer_equalcompute": "PrimusLightTrainer_equalcompute",
    "STPMTAPrimusLightTrainer_fgprior_equalcompute": "PrimusLightTrainer_equalcompute",
    "STPMTATrainer_budget": "UNETRTrainer_budget",
    "STPMTALightTrainer_budget": "ViTLightTrainer_budget",
    "APFormerTrainer_budget": "APFormerNoPruneTrainer_budget",
}


def record(model: Path) -> dict:
    fold = model / "fold_0"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = checkpoint["logging"]
    epochs = len(logging["epoch_end_timestamps"])
    train_s = logging["epoch_end_timestamps"][-1] - logging["epoch_start_timestamps"][0]
    plans = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]
    images = sorted(Path(os.environ["nnUNet_raw"], DATASET, "imagesTr").glob("*_0000.nii.gz"))
    validation = {c["reference_file"].split("/")[-1].replace(".nii.gz", "") for c in summary["metric_per_case"]}
    flop_images = [i for i in images if i.name.replace("_0000.nii.gz", "") in validation][:5]
    return {
        "dice": {LABELS[k]: round(v["Dice"], 4) for k, v in summary["mean"].items()},
        "mean_dice": round(float(np.mean([v["Dice"] for v in summary["mean"].values()])), 4),
        "per_case": _per_case_dice(fold / "validation" / "summary.json"),
        "epochs": epochs, "iterations": epochs * 25, "batch": plans["batch_size"], "patch": plans["patch_size"],
        "train_wall_s": round(train_s, 1), "gflops_per_tile": round(gflops_per_tile(model, flop_images), 2),
    }


def table(records: dict) -> str:
    lines = ["| trainer | Dice Anterior | Dice Posterior | mean | vs nnU-Net U-Net [95% CI] | vs dense twin [95% CI] "
             "| iterations x batch | train wall s | GFLOPs / tile |", "|" + "---|" * 9]

    def versus(name: str, other: str) -> str:
        if other not in records or other == name:
            return ""
        d = paired_difference(records[name]["per_case"], records[other]["per_case"])
        return f"{d['mean']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}]"

    for name, r in records.items():
        lines.append(f"| {name} | {r['dice']['Anterior']:.3f} | {r['dice']['Posterior']:.3f} | {r['mean_dice']:.3f} "
                     f"| {versus(name, UNET)} | {versus(name, TWINS.get(name, name))} | {r['iterations']} x "
                     f"{r['batch']} | {r['train_wall_s']:.0f} | {r['gflops_per_tile']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    settle_environment(cpu=True)  # nnU-Net's trainer lookup finds nnscd's trainers, as in the nnScd_ commands
    results = Path(os.environ["nnUNet_results"]) / DATASET
    models = sorted(m for view in ("budget", "equalcompute") for m in results.glob(f"*_{view}__nnUNetPlans__3d_fullres"))
    out = Path(args.out)
    committed = out / "hippocampus_budget_fold0_cpu.json"  # runs of earlier sessions, whose models are gone
    records = json.loads(committed.read_text()) if committed.is_file() else {}
    records.update({m.name.split("__")[0]: record(m) for m in models
                    if (m / "fold_0" / "validation" / "summary.json").is_file()})
    records = dict(sorted(records.items()))
    (out / "hippocampus_budget_fold0_cpu.json").write_text(json.dumps(records, indent=1))
    (out / "hippocampus_budget_fold0_cpu.md").write_text(table(records) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
