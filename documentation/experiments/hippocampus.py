"""CPU comparison on MSD Task04 Hippocampus, fold 0: STP+MTA and APFormer trainers, their dense twins and nnU-Net's
U-Net.

Every trainer gets the same budget (nnscd_trainers BUDGET_SCHEDULE and BUDGET_BATCH; patch from nnScdPlans), is
trained with nnScd_train, predicts the fold-0 validation cases with nnScd_predict (without mirroring: a CPU budget)
and is evaluated with nnU-Net's metrics. Writes a JSON and a Markdown table: per-class Dice, the per-case paired
difference of each sparse trainer against its dense twin (mean and 95% t-interval), the attention ablation's Dice drop (token-sparse ViTs), APFormer's
pruning rates, forward GFLOPs per tile on real cases (eval mode, so pruning counts), wall times.

    python documentation/experiments/hippocampus.py --msd ../shared/data/Task04_Hippocampus --out documentation/results

Finished steps are skipped when rerun (trained folds, predictions, ablations), so an interrupted run continues.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nnscd.core.paths import settle_environment
from nnscd.core.safe_io import atomic_path

DATASET_ID, DATASET = "4", "Dataset004_Hippocampus"
CONFIG, PLANS, FOLD = "3d_fullres", "nnScdPlans", "0"
# trainer -> its dense twin (None: a reference without a twin)
TRAINERS: Dict[str, Optional[str]] = {
    "nnScdTrainer_budget": None,
    "UNETRTrainer_budget": None,
    "STPMTATrainer_budget": "UNETRTrainer_budget",
    "ViTLightTrainer_budget": None,
    "STPMTALightTrainer_budget": "ViTLightTrainer_budget",
    "APFormerNoPruneTrainer_budget": None,
    "APFormerTrainer_budget": "APFormerNoPruneTrainer_budget",
}
ABLATED = ("UNETRTrainer_budget", "STPMTATrainer_budget", "ViTLightTrainer_budget", "STPMTALightTrainer_budget")
FLOP_CASES = 5  # validation cases whose central tile is counted
LABELS = {"1": "Anterior", "2": "Posterior"}


def _run(command: List[str]) -> float:
    """Run an nnScd_ console script, return its wall time."""
    print(f"\n$ {' '.join(command)}", flush=True)
    start = time.time()
    subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], check=True)
    return time.time() - start


def _linked_folder(folder: Path, files: List[Path]) -> Path:
    """A folder of symlinks: nnScd_predict and the evaluation take folders, the cases are a subset of imagesTr."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        if not (folder / f.name).exists():
            (folder / f.name).symlink_to(f)
    return folder


def _per_case_dice(summary_file: Path) -> Dict[str, float]:
    """Case -> mean foreground Dice."""
    cases = json.loads(summary_file.read_text())["metric_per_case"]
    return {Path(c["reference_file"]).name: float(np.mean([c["metrics"][k]["Dice"] for k in LABELS])) for c in cases}


def _final_logging(model: Path) -> dict:
    """nnU-Net's per-epoch logs of fold FOLD, as the final checkpoint stores them."""
    import torch
    return torch.load(model / f"fold_{FOLD}" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)["logging"]


def mean_ci95(values: List[float]) -> Dict[str, float]:
    """Mean with its 95% t-interval (at least two values)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return {"mean": float(values.mean()), "ci95_low": float(values.mean() - half),
            "ci95_high": float(values.mean() + half)}


def paired_difference(a: Dict[str, float], b: Dict[str, float]) -> Dict[str, float]:
    """Mean of a - b over the shared cases with its 95% t-interval."""
    return {**mean_ci95([a[k] - b[k] for k in sorted(a)]), "cases": len(a)}


def gflops_per_tile(model: Path, images: List[Path]) -> float:
    """Mean forward GFLOPs of the trained network on the central tile of each case (eval mode, as at inference:
    APFormer's query pruning depends on the image)."""
    import torch
    from nnscd.tools.benchmark_networks import forward_flops
    from nnscd.core.predictor import nnScdPredictor
    from nnscd.tools.token_maps import central_tile

    predictor = nnScdPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (int(FOLD),), "checkpoint_final.pth")
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    flops = []
    for image in images:
        data, _, _ = preprocessor.run_case([str(image)], None, predictor.plans_manager,
                                           predictor.configuration_manager, predictor.dataset_json)
        tile, _ = central_tile(predictor, data)
        flops.append(forward_flops(predictor.network, torch.from_numpy(np.ascontiguousarray(tile))[None].float()))
    return float(np.mean(flops)) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--msd", required=True, help="the MSD Task04_Hippocampus folder")
    parser.add_argument("--out", required=True, help="where the JSON and Markdown summaries go")
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=list(TRAINERS))
    args = parser.parse_args()
    settle_environment(cpu=True)
    raw, results = Path(os.environ["nnUNet_raw"]) / DATASET, Path(os.environ["nnUNet_results"]) / DATASET
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / DATASET

    if not (raw / "dataset.json").is_file():
        _run(["nnScd_convert_MSD_dataset", "-i", args.msd, "-np", "2"])
    if not (preprocessed / f"{PLANS}.json").is_file():
        _run(["nnScd_plan_and_preprocess", "-d", DATASET_ID, "-c", CONFIG, "-np", "2", "-npfp", "2",
              "--verify_dataset_integrity"])

    work = results / "nnscd_fold0_comparison"
    work.mkdir(parents=True, exist_ok=True)
    record_file = work / "record.json"  # wall times survive a rerun that skips finished steps
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}

    def save_record() -> None:
        with atomic_path(str(record_file)) as tmp:
            Path(tmp).write_text(json.dumps(record, indent=2))

    def timed(trainer: str, key: str, command: List[str]) -> None:
        """Run a step and record its wall time at once (a kill later loses nothing)."""
        record.setdefault(trainer, {})[key] = _run(command)
        save_record()

    split = json.loads((preprocessed / "splits_final.json").read_text())[int(FOLD)]["val"]
    images = _linked_folder(work / "images", [raw / "imagesTr" / f"{c}_0000.nii.gz" for c in split])
    labels = _linked_folder(work / "labels", [raw / "labelsTr" / f"{c}.nii.gz" for c in split])
    for trainer in args.trainers:
        model = results / f"{trainer}__{PLANS}__{CONFIG}"
        if not (model / f"fold_{FOLD}" / "checkpoint_final.pth").is_file():
            timed(trainer, "train_wall_s", ["nnScd_train", DATASET_ID, CONFIG, FOLD, "-tr", trainer, "-p", PLANS,
                                            "-device", "cpu"])
        prediction = work / trainer
        if not (prediction / "summary.json").is_file():
            timed(trainer, "predict_wall_s", ["nnScd_predict", "-i", str(images), "-o", str(prediction), "-d",
                                              DATASET_ID, "-c", CONFIG, "-tr", trainer, "-p", PLANS, "-f", FOLD,
                                              "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"])
            _run(["nnScd_evaluate_folder", str(labels), str(prediction), "-djfile", str(model / "dataset.json"),
                  "-pfile", str(model / "plans.json"), "-np", "2"])
        if "gflops_per_tile" not in record.setdefault(trainer, {}):
            flops = gflops_per_tile(model, sorted(images.iterdir())[:FLOP_CASES])
            record[trainer]["gflops_per_tile"] = flops
        if trainer in ABLATED and not (work / f"ablation_{trainer}" / "ablation.json").is_file():
            timed(trainer, "ablation_wall_s", ["nnScd_attention_ablation", "-m", str(model), "-f", FOLD, "-i",
                                               str(images), "-ref", str(labels), "-o", str(work / f"ablation_{trainer}"),
                                               "-device", "cpu"])
        save_record()

    summary = summarise(work, record, args.trainers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(str(out / "hippocampus_fold0_cpu.json")) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    with atomic_path(str(out / "hippocampus_fold0_cpu.md")) as tmp:
        Path(tmp).write_text(markdown(summary))
    print(markdown(summary))


def summarise(work: Path, record: dict, trainers: List[str]) -> dict:
    from nnscd_trainers.nnscd_trainer import BUDGET_BATCH, BUDGET_SCHEDULE

    rows, per_case = {}, {}
    for trainer in trainers:
        summary = json.loads((work / trainer / "summary.json").read_text())
        per_case[trainer] = _per_case_dice(work / trainer / "summary.json")
        rows[trainer] = {"dice": {LABELS[k]: summary["mean"][k]["Dice"] for k in LABELS},
                         "mean_fg_dice": summary["foreground_mean"]["Dice"], **record.get(trainer, {})}
        history = _final_logging(Path(os.environ["nnUNet_results"]) / DATASET / f"{trainer}__{PLANS}__{CONFIG}")
        for key in ("qp_pruned_fraction", "dp_pruned_fraction", "kept_foreground"):
            if key in history:
                rows[trainer][f"last_epoch_{key}"] = np.asarray(history[key][-1]).tolist()
        ablation = work / f"ablation_{trainer}" / "ablation.json"
        if ablation.is_file():
            rows[trainer]["attention_ablation"] = json.loads(ablation.read_text())
    for trainer, twin in TRAINERS.items():
        if twin is not None and trainer in rows and twin in rows:
            rows[trainer]["paired_vs_dense_twin"] = {"twin": twin,
                                                     **paired_difference(per_case[trainer], per_case[twin])}
    return {"dataset": DATASET, "configuration": CONFIG, "plans": PLANS, "fold": int(FOLD),
            "schedule_epochs_iterations_val": list(BUDGET_SCHEDULE), "batch_size": BUDGET_BATCH,
            "machine": f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, CPU only",
            "command": "python documentation/experiments/hippocampus.py --msd ../shared/data/Task04_Hippocampus "
                       "--out documentation/results", "trainers": rows}


def markdown(summary: dict) -> str:
    lines = [f"Fold {summary['fold']} of {summary['dataset']} ({summary['configuration']}, plans {summary['plans']}), "
             f"schedule {summary['schedule_epochs_iterations_val']} (epochs, iterations, validation iterations), batch "
             f"{summary['batch_size']}, "
             f"{summary['machine']}.", "",
             "| trainer | Dice Anterior | Dice Posterior | mean | vs dense twin (mean, 95% CI) | GFLOPs/tile | train s "
             "| predict s |", "|---|---|---|---|---|---|---|---|"]
    for name, row in summary["trainers"].items():
        paired = row.get("paired_vs_dense_twin")
        vs = (f"{paired['mean']:+.4f} [{paired['ci95_low']:+.4f}, {paired['ci95_high']:+.4f}] vs {paired['twin']}"
              if paired else "")
        lines.append(f"| {name} | {row['dice']['Anterior']:.4f} | {row['dice']['Posterior']:.4f} | "
                     f"{row['mean_fg_dice']:.4f} | {vs} | {row.get('gflops_per_tile', float('nan')):.2f} | "
                     f"{row.get('train_wall_s', float('nan')):.0f} | {row.get('predict_wall_s', float('nan')):.0f} |")
    lines += ["", "Last epoch's validation pass: the share of foreground tokens still kept per STP stage "
              "(`kept_foreground`), APFormer's pruned queries (QP) and dependencies (DP).", "",
              "| trainer | kept foreground per stage | QP pruned | DP pruned |", "|---|---|---|---|"]
    for name, row in summary["trainers"].items():
        kept, qp, dp = (row.get(f"last_epoch_{k}") for k in ("kept_foreground", "qp_pruned_fraction",
                                                              "dp_pruned_fraction"))
        if kept is not None or qp is not None:
            lines.append(f"| {name} | {', '.join(f'{v:.2f}' for v in kept) if kept else ''} | "
                         f"{'' if qp is None else f'{qp:.3f}'} | {'' if dp is None else f'{dp:.3f}'} |")
    ablated = {n: r["attention_ablation"] for n, r in summary["trainers"].items() if "attention_ablation" in r}
    if ablated:
        lines += ["", "Attention ablation (`nnScd_attention_ablation`): mean foreground Dice with the transformer's "
                  "maps replaced, and the drop from the unchanged network.", "", "| trainer | mode | mean Dice | drop |",
                  "|---|---|---|---|"]
        for name, result in ablated.items():
            for mode, entry in result["modes"].items():
                lines.append(f"| {name} | {mode} | {entry['dice']['mean']:.4f} | {entry['dice_drop']['mean']:+.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
