"""Tables of the quality protocol (hippocampus_budget.sh trains; this reads what nnU-Net's final validation wrote).

For every trained `*_budget` (equal iterations) and `*_equalcompute` trainer on Hippocampus fold 0: Dice per class
and mean over the 42 validation cases, the paired per-case difference with its 95% t-interval against nnU-Net's U-Net
(nnScdTrainer_budget) and against the dense twin, training wall time (nnU-Net's epoch timestamps), iterations and
forward GFLOPs per tile. Runs already in --out's JSON are kept (trained models are never committed); a run found
again under nnUNet_results replaces its entry.

Another seed (`nnScd_seed=N bash hippocampus_budget.sh ...` into its own nnUNet_results) is read with --seed N and
kept in hippocampus_budget_fold0_seedN_cpu.json; every run then also writes hippocampus_budget_seeds_fold0_cpu.md
and .json: for each pair trained at more than one seed, the difference per seed with the t-interval of their mean
over seeds (the seed noise), and the case-paired interval of the seed-averaged Dice (the case noise only).

--tag T files the runs under hippocampus_budget_fold0_seedN_T_cpu.json instead, out of the seed tables, compared
with the seed's committed runs (runs of an earlier version of a trainer, say, kept beside today's).

    nnUNet_results=... nnUNet_raw=... nnUNet_preprocessed=... python documentation/results/hippocampus_budget.py \
        --out documentation/results [--seed N] [--tag T]
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # the drivers are not in the package
from hippocampus import LABELS, _per_case_dice, gflops_per_tile, mean_ci95, paired_difference  # noqa: E402
from nnscd.checks.trainer_names import find_trainer  # noqa: E402
from nnscd.core.paths import settle_environment  # noqa: E402

DATASET = "Dataset004_Hippocampus"
UNET = "nnScdTrainer_budget"
TWINS = {  # sparse trainer -> its dense twin
    "STPMTAPrimusV3STrainer_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusV3STrainer_keep50_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusV3STrainer_keep1_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusV3STrainer_late_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusV3STrainer_straightthrough_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusV3STrainer_hard_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusV3STrainer_context_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusV3STrainer_budget2x": "PrimusV3STrainer_budget2x",
    "STPMTAPrimusV3STrainer_keepwarmup_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusV3STrainer_noprior_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusV3STrainer_noprior_cumulative_budget": "PrimusV3STrainer_budget",
    "STPMTAPrimusLightTrainer_budget": "PrimusLightTrainer_budget",
    "STPMTAPrimusLightTrainer_equalcompute": "PrimusLightTrainer_equalcompute",
    "STPMTAPrimusLightTrainer_noprior_equalcompute": "PrimusLightTrainer_equalcompute",
    "STPMTATrainer_budget": "UNETRTrainer_budget",
    "STPMTATrainer_projected_budget": "UNETRTrainer_budget",
    "STPMTATrainer_fgprior_budget": "UNETRTrainer_budget",
    "STPMTATrainer_keep75_budget": "UNETRTrainer_budget",
    "STPMTATrainer_centered_budget": "UNETRTrainer_budget",
    "STPMTATrainer_keep1_budget": "UNETRTrainer_budget",
    "STPMTATrainer_infill_budget": "UNETRTrainer_budget",
    "STPMTATrainer_infill_keep1_budget": "UNETRTrainer_budget",
    "STPMTATrainer_keepwarmup_budget": "UNETRTrainer_budget",
    "STPMTATrainer_straightthrough_budget": "UNETRTrainer_budget",
    "STPMTATrainer_lr2en3_budget": "UNETRTrainer_lr2en3_budget",
    "STPMTATrainer_equalcompute": "UNETRTrainer_equalcompute",
    "STPMTALightTrainer_budget": "ViTLightTrainer_budget",
    "STPMTALightTrainer_layerscale_budget": "ViTLightTrainer_layerscale_budget",
    "APFormerTrainer_budget": "APFormerNoPruneTrainer_budget",
}


def check_run(model: Path, seed: int) -> None:
    """SystemExit unless the run used `seed` and the foreground prior its trainer class has today (a run of a
    renamed class, or another seed's, would file its Dice under the wrong name)."""
    debug = json.loads((model / "fold_0" / "debug.json").read_text())
    name = model.name.split("__")[0]
    if debug.get("seed") != str(seed):
        raise SystemExit(f"{model}: trained with nnScd_seed={debug.get('seed')}, not {seed}. Pass --seed "
                         f"{debug.get('seed')}, or keep each seed's runs in their own nnUNet_results.")
    prior = getattr(find_trainer(name), "foreground_prior", 0.0)
    if float(debug.get("foreground_prior", 0.0)) != prior:
        raise SystemExit(f"{model}: trained with foreground_prior={debug.get('foreground_prior')}, but {name} has "
                         f"{prior} today (the class changed since). Move the folder out of nnUNet_results.")


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


def table(records: dict, references: Dict[str, dict] = {}) -> str:
    """`references`: further runs of the same seed that the rows are compared with (records win on a name)."""
    lines = ["| trainer | Dice Anterior | Dice Posterior | mean | vs nnU-Net U-Net [95% CI] | vs dense twin [95% CI] "
             "| iterations x batch | train wall s | GFLOPs / tile |", "|" + "---|" * 9]

    known = {**references, **records}

    def versus(name: str, other: str) -> str:
        if other not in known or other == name:
            return ""
        d = paired_difference(records[name]["per_case"], known[other]["per_case"])
        return f"{d['mean']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}]"

    for name, r in records.items():
        lines.append(f"| {name} | {r['dice']['Anterior']:.3f} | {r['dice']['Posterior']:.3f} | {r['mean_dice']:.3f} "
                     f"| {versus(name, UNET)} | {versus(name, TWINS.get(name, name))} | {r['iterations']} x "
                     f"{r['batch']} | {r['train_wall_s']:.0f} | {r['gflops_per_tile']:.2f} |")
    return "\n".join(lines)


SEED_FILE = re.compile(r"hippocampus_budget_fold0_(?:seed(\d+)_)?cpu\.json")  # seed 0 has no seed in its name


def seed_file(out: Path, seed: int) -> Path:
    return out / ("hippocampus_budget_fold0_cpu.json" if seed == 0 else f"hippocampus_budget_fold0_seed{seed}_cpu.json")


def seed_pairs(by_seed: Dict[int, dict]) -> List[dict]:
    """Each (trainer, reference) pair, reference its dense twin or the U-Net, where the trainer ran at more than one
    seed: the paired difference per seed (the reference of the same seed, else of seed 0: a fixed baseline), the
    t-interval of their mean over seeds, and the case-paired interval of the seed-averaged per-case Dice."""
    pairs = []
    for name in sorted({n for records in by_seed.values() for n in records}):
        for reference in dict.fromkeys([TWINS.get(name), UNET]):
            reference_seed = {s: s if reference in by_seed[s] else 0 for s in sorted(by_seed)  # else seed 0's
                              if name in by_seed[s] and (reference in by_seed[s] or reference in by_seed.get(0, {}))}
            if reference is None or reference == name or len(reference_seed) < 2:
                continue
            seeds, reference_seeds = list(reference_seed), sorted(set(reference_seed.values()))
            per_seed = {s: round(paired_difference(by_seed[s][name]["per_case"],
                                                   by_seed[r][reference]["per_case"])["mean"], 4)
                        for s, r in reference_seed.items()}
            mine = [by_seed[s][name]["per_case"] for s in seeds]
            theirs = [by_seed[s][reference]["per_case"] for s in reference_seeds]  # each reference run once
            average = [{case: float(np.mean([d[case] for d in dicts])) for case in dicts[0]} for dicts in (mine, theirs)]
            pairs.append({"trainer": name, "reference": reference, "reference_seeds": reference_seeds,
                          "per_seed": per_seed,
                          "over_seeds_ci95": {k: round(v, 4) for k, v in mean_ci95(list(per_seed.values())).items()},
                          "seed_averaged_ci95": {k: round(v, 4) for k, v in paired_difference(*average).items()},
                          "mean_dice_per_seed": {s: by_seed[s][name]["mean_dice"] for s in seeds}})
    return pairs


def seed_table(pairs: List[dict]) -> str:
    def interval(ci: dict) -> str:
        return f"{ci['mean']:+.3f} [{ci['ci95_low']:+.3f}, {ci['ci95_high']:+.3f}]"

    lines = ["| trainer | against | reference seeds | Dice per seed | difference per seed "
             "| mean over seeds [95% CI over seeds] | seed-averaged Dice, paired over cases [95% CI] |",
             "|" + "---|" * 7]
    for p in pairs:
        lines.append(f"| {p['trainer']} | {p['reference']} | {', '.join(map(str, p['reference_seeds']))} "
                     f"| {', '.join(f'{s}: {d:.3f}' for s, d in p['mean_dice_per_seed'].items())} "
                     f"| {', '.join(f'{s}: {d:+.3f}' for s, d in p['per_seed'].items())} "
                     f"| {interval(p['over_seeds_ci95'])} | {interval(p['seed_averaged_ci95'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0, help="the nnScd_seed the runs under nnUNet_results used")
    parser.add_argument("--tag", help="file the runs apart from the seed tables, e.g. runs of an earlier version")
    args = parser.parse_args()
    settle_environment(cpu=True)  # nnU-Net's trainer lookup finds nnscd's trainers, as in the nnScd_ commands
    results = Path(os.environ["nnUNet_results"]) / DATASET
    models = sorted(m for view in ("budget", "budget2x", "equalcompute")
                    for m in results.glob(f"*_{view}__nnUNetPlans__3d_fullres"))
    out = Path(args.out)
    committed = seed_file(out, args.seed)  # runs of earlier sessions, whose models are gone
    references = {}
    if args.tag:
        references = json.loads(committed.read_text()) if committed.is_file() else {}
        committed = out / f"hippocampus_budget_fold0_seed{args.seed}_{args.tag}_cpu.json"
    records = json.loads(committed.read_text()) if committed.is_file() else {}
    models = [m for m in models if (m / "fold_0" / "validation" / "summary.json").is_file()]
    for m in models:
        check_run(m, args.seed)
    records.update({m.name.split("__")[0]: record(m) for m in models})
    records = dict(sorted(records.items()))
    committed.write_text(json.dumps(records, indent=1))
    text = table(records, references)
    if args.tag:
        committed.with_suffix(".md").write_text(text + "\n")
        print(text)
        return
    if args.seed == 0:
        (out / "hippocampus_budget_fold0_cpu.md").write_text(text + "\n")
    print(text)
    by_seed = {int(match[1] or 0): json.loads(f.read_text()) for f in out.iterdir()
               if (match := SEED_FILE.fullmatch(f.name)) and f != committed}
    pairs = seed_pairs({**by_seed, args.seed: records})
    if pairs:
        (out / "hippocampus_budget_seeds_fold0_cpu.json").write_text(json.dumps(pairs, indent=1))
        (out / "hippocampus_budget_seeds_fold0_cpu.md").write_text(seed_table(pairs) + "\n")
        print(seed_table(pairs))


if __name__ == "__main__":
    main()
