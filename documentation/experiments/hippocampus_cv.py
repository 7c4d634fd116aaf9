"""The full nnU-Net protocol on MSD Task04 Hippocampus: 5-fold cross-validation of a token-sparse trainer, model
selection and postprocessing, test-set prediction and the Decathlon submission zip.

convert -> plan/preprocess (nnScdPlans) -> nnScd_train of every fold with --npz -> nnScd_find_best_configuration
(cross-validated Dice, ensembles with --ensemble-with, postprocessing) -> nnScd_predict of imagesTs with the five
folds -> nnScd_apply_postprocessing -> nnScd_msd_submission. Writes a JSON, a Markdown section and a plot: per-fold
and cross-validated per-class Dice, what postprocessing (and an ensemble) changed, wall times, machine, commands.

    python documentation/experiments/hippocampus_cv.py --msd ../shared/data/Task04_Hippocampus --out documentation/results

The default `STPMTATrainer_budget` is the short CPU schedule (nnscd_trainers BUDGET_SCHEDULE, BUDGET_BATCH); on a GPU
pass `--trainer STPMTATrainer --device cuda`. Finished steps are skipped when rerun. A fold trained without --npz (as by
documentation/experiments/hippocampus.py) is validated again with --npz; a fold another process is training now (a training log
written in the last 30 minutes, no validation summary yet) is left to it and waited for at the end.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import numpy as np

from hippocampus import CONFIG, DATASET, DATASET_ID, LABELS, PLANS, _run
from nnscd.core.paths import settle_environment
from nnscd.core.safe_io import atomic_path

BUSY_S, POLL_S, WAIT_S = 30 * 60, 60, 40 * 60
MSD_TASK = "Task04_Hippocampus"


def _save_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(str(path)) as tmp:
        Path(tmp).write_text(json.dumps(content, indent=2))


def _portable(command: List[str]) -> str:
    """The command as a user would type it: data folders as $nnUNet_* variables."""
    text = " ".join(command)
    for name in ("nnUNet_results", "nnUNet_raw", "nnUNet_preprocessed"):
        text = text.replace(os.environ[name], f"${name}")
    return text


class Record:
    """Commands, wall times and results of finished steps in a JSON file, saved after every step, so that a rerun
    that skips finished steps still reports them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"steps": {}, "epochs_s": {}}

    def run(self, key: str, command: List[str]) -> None:
        wall = _run(command)
        self.data["steps"][key] = {"command": _portable(command), "wall_s": round(wall, 1),
                                   "load_average_1min": round(os.getloadavg()[0], 2)}
        self.save()

    def save(self) -> None:
        _save_json(self.path, self.data)


def _nii_count(folder: Path) -> int:
    return len(list(folder.glob("*.nii.gz"))) if folder.is_dir() else 0


def _busy(fold: Path) -> bool:
    """Another process is training or validating this fold: a fresh training log and no validation summary yet."""
    return not (fold / "validation" / "summary.json").is_file() and any(
        time.time() - log.stat().st_mtime < BUSY_S for log in fold.glob("training_log_*.txt"))


def _epoch_seconds(fold: Path) -> float:
    """Summed epoch times from the final checkpoint's log (also for folds another process trained)."""
    import torch
    log = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    return float(np.sum(np.subtract(log["epoch_end_timestamps"], log["epoch_start_timestamps"])))


def train_fold(record: Record, model: Path, trainer: str, fold: int, device: str) -> bool:
    """Train (or resume, or only re-validate with --npz) one fold; False if another process is on it."""
    folder = model / f"fold_{fold}"
    if _busy(folder):
        print(f"{trainer} fold {fold}: another process is training it, coming back later", flush=True)
        return False
    command = ["nnScd_train", DATASET_ID, CONFIG, str(fold), "-tr", trainer, "-p", PLANS, "-device", device, "--npz"]
    if (folder / "checkpoint_final.pth").is_file():
        if not any((folder / "validation").glob("*.npz")) or not (folder / "validation" / "summary.json").is_file():
            record.run(f"validate {trainer} fold {fold}", [*command, "--val"])  # trained without --npz
    else:
        resume = ["--c"] if (folder / "checkpoint_latest.pth").is_file() else []  # an interrupted run
        record.run(f"train {trainer} fold {fold}", [*command, *resume])
    record.data["epochs_s"].setdefault(trainer, {})[str(fold)] = round(_epoch_seconds(folder), 1)
    record.save()
    return True


def train_folds(record: Record, results: Path, trainer: str, folds: List[int], device: str) -> None:
    model = results / f"{trainer}__{PLANS}__{CONFIG}"
    waiting = [f for f in folds if not train_fold(record, model, trainer, f, device)]
    deadline = time.time() + WAIT_S
    while waiting:
        if time.time() > deadline:
            sys.exit(f"{trainer} folds {waiting} are still being trained by another process after {WAIT_S // 60} "
                     f"minutes; rerun this command when they are done.")
        time.sleep(POLL_S)
        waiting = [f for f in waiting if not train_fold(record, model, trainer, f, device)]


def predict_test_set(record: Record, info: dict, raw: Path, work: Path, folds: List[int], device: str) -> Path:
    """nnScd_predict imagesTs with the selected model (each member and nnScd_ensemble if an ensemble won), then
    nnScd_apply_postprocessing; returns the postprocessed folder."""
    best, n_test = info["best_model_or_ensemble"], _nii_count(raw / "imagesTs")
    record.data["test_cases"] = n_test
    members = best["selected_model_or_models"]
    outputs = []
    for member in members:
        output = work / "imagesTs_predicted" / member["trainer"]
        if _nii_count(output) < n_test:  # --continue_prediction: a killed run redoes only the missing cases
            record.run(f"predict {member['trainer']}", [
                "nnScd_predict", "-i", str(raw / "imagesTs"), "-o", str(output), "-d", DATASET_ID, "-c",
                member["configuration"], "-tr", member["trainer"], "-p", member["plans_identifier"], "-f",
                *map(str, folds), "-device", device, "--continue_prediction",
                *(["--save_probabilities"] if len(members) > 1 else [])])
        outputs.append(output)
    if len(members) > 1:
        ensembled = work / "imagesTs_predicted" / "ensemble"
        if _nii_count(ensembled) < n_test:
            record.run("ensemble", ["nnScd_ensemble", "-i", *map(str, outputs), "-o", str(ensembled), "-np", "2"])
        outputs = [ensembled]
    postprocessed = work / "imagesTs_postprocessed"
    if _nii_count(postprocessed) < n_test:
        plans = Path(best["some_plans_file"])
        record.run("postprocess", ["nnScd_apply_postprocessing", "-i", str(outputs[0]), "-o", str(postprocessed),
                                   "-pp_pkl_file", best["postprocessing_file"], "-plans_json", str(plans),
                                   "-dataset_json", str(plans.with_name("dataset.json")), "-np", "2"])
    return postprocessed


def package(record: Record, msd: Path, predictions: Path, archive: Path) -> None:
    """nnScd_msd_submission; its verdict (it checks every case before writing) goes into the record."""
    if archive.is_file() and "submission" in record.data:
        return
    command = ["nnScd_msd_submission", "-i", f"{msd}={predictions}", "-o", str(archive)]
    print(f"\n$ {' '.join(command)}", flush=True)
    done = subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], capture_output=True,
                          text=True)
    print(done.stdout + done.stderr, flush=True)
    output = (done.stdout + done.stderr).splitlines()
    lines = [_portable([line]) for line in output if line.strip() and "%|" not in line]  # no progress bars
    record.data["submission"] = {"command": _portable(command), "passed": done.returncode == 0,
                                 "archive": _portable([str(archive)]),
                                 "size_bytes": archive.stat().st_size if archive.is_file() else None,
                                 "packager_output": lines[-20:]}
    record.save()


def _dice(summary: dict) -> dict:
    """Per-class and mean foreground Dice from an nnU-Net summary.json (or postprocessing.json) section."""
    return {**{LABELS[k]: round(summary["mean"][k]["Dice"], 4) for k in LABELS},
            "mean": round(summary["foreground_mean"]["Dice"], 4)}


def _processor() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return names[0] if names else platform.processor() or "unknown processor"


def schedule_text(trainers: List[str]) -> str:
    from nnscd_trainers.nnscd_trainer import BUDGET_BATCH, BUDGET_SCHEDULE

    if not all(t.endswith("_budget") for t in trainers):
        return "the trainers' own schedule"
    batch = "the plans' batch" if BUDGET_BATCH is None else f"batch {BUDGET_BATCH}"
    return (f"short CPU budget: {BUDGET_SCHEDULE[0]} epochs x {BUDGET_SCHEDULE[1]} iterations at {batch} "
            f"(nnU-Net: 1000 x 250); a check of the protocol, not a converged model")


def summarise(results: Path, info: dict, record: dict, trainers: List[str], folds: List[int], schedule: str,
              device: str) -> dict:
    """Everything the Markdown section shows, from the files nnU-Net wrote and the record."""
    per_fold = {}
    for trainer in trainers:
        model = results / f"{trainer}__{PLANS}__{CONFIG}"
        per_fold[trainer] = {}
        for fold in folds:
            summary = json.loads((model / f"fold_{fold}" / "validation" / "summary.json").read_text())
            per_fold[trainer][str(fold)] = {**_dice(summary), "cases": len(summary["metric_per_case"]),
                                            "epochs_s": record["epochs_s"].get(trainer, {}).get(str(fold))}
    crossval = {}
    for identifier in info["all_results"]:
        source = (results / "ensembles" / identifier if identifier.startswith("ensemble___") else
                  results / identifier / f"crossval_results_folds_{'_'.join(map(str, folds))}")
        crossval[identifier] = _dice(json.loads((source / "summary.json").read_text()))
    best = info["best_model_or_ensemble"]
    postprocessing = json.loads(Path(best["postprocessing_file"]).with_name("postprocessing.json").read_text())
    best_name = max(info["all_results"], key=info["all_results"].get)
    return {
        "dataset": DATASET, "configuration": CONFIG, "plans": PLANS, "trainers": trainers, "folds": folds,
        "schedule": schedule,
        "machine": {"platform": platform.platform(), "processor": _processor(),
                    "cores": os.cpu_count(), "device": device},
        "per_fold": per_fold,
        "cross_validation": crossval,
        "ensemble": (f"{len(crossval) - len(trainers)} ensemble(s) evaluated" if len(trainers) > 1 else
                     "none: no second trainer was trained in this run, so no ensemble"),
        "best": {"name": best_name, "before_postprocessing": _dice(postprocessing["input_folder"]),
                 "after_postprocessing": _dice(postprocessing["postprocessed"]),
                 "postprocessing_fns": postprocessing["postprocessing_fns"],
                 "postprocessing_kwargs": postprocessing["postprocessing_kwargs"]},
        "invocations": record.get("invocations", []), "steps": record["steps"], "test_cases": record.get("test_cases"),
        "submission": record.get("submission"),
    }


def markdown(summary: dict) -> str:
    machine, trainers = summary["machine"], ", ".join(summary["trainers"])
    lines = [f"### 5-fold cross-validation, model selection and the Task04 submission ({trainers})", "",
             f"{summary['dataset']}, {summary['configuration']}, plans {summary['plans']}, folds "
             f"{' '.join(map(str, summary['folds']))}. Schedule: {summary['schedule']}. Machine: "
             f"{machine['platform']}, {machine['processor']}, {machine['cores']} cores, {machine['device']}.", "",
             "Per fold (each fold's validation cases, `fold_X/validation/summary.json`):", "",
             "| trainer | fold | cases | Dice Anterior | Dice Posterior | mean | training epochs s |",
             "|---|---|---|---|---|---|---|"]
    for trainer, rows in summary["per_fold"].items():
        for fold, row in rows.items():
            lines.append(f"| {trainer} | {fold} | {row['cases']} | {row['Anterior']:.4f} | {row['Posterior']:.4f} | "
                         f"{row['mean']:.4f} | {row['epochs_s'] or float('nan'):.0f} |")
    lines += ["", "Cross-validated (all folds' validation cases pooled, `nnScd_find_best_configuration`):", "",
              "| model | Dice Anterior | Dice Posterior | mean |", "|---|---|---|---|"]
    lines += [f"| {name} | {d['Anterior']:.4f} | {d['Posterior']:.4f} | {d['mean']:.4f} |"
              for name, d in summary["cross_validation"].items()]
    best = summary["best"]
    before, after = best["before_postprocessing"], best["after_postprocessing"]
    steps = "; ".join(f"`{fn}({', '.join(f'{k}={v}' for k, v in kwargs.items())})`"
                      for fn, kwargs in zip(best["postprocessing_fns"], best["postprocessing_kwargs"]))
    lines += ["", f"Ensemble: {summary['ensemble']}. Selected: `{best['name']}`.", "",
              f"Postprocessing, chosen on the pooled cross-validation and applied in this order: {steps or 'none'}. "
              f"Its effect there:", "",
              "| | Dice Anterior | Dice Posterior | mean |", "|---|---|---|---|"]
    change = {k: after[k] - before[k] for k in before}
    lines += [f"| {name} | {d['Anterior']:{fmt}} | {d['Posterior']:{fmt}} | {d['mean']:{fmt}} |"
              for name, d, fmt in (("before", before, ".4f"), ("after", after, ".4f"), ("change", change, "+.4f"))]
    invocations = "; ".join(f"`{i}`" for i in summary["invocations"])
    found = " and ".join(name for step, name in (("convert", "the conversion"), ("plan and preprocess", "planning"))
                         if step not in summary["steps"])
    found = f" (here {found}, done with the same commands by `documentation/experiments/hippocampus.py`)" if found else ""
    lines += ["", f"Run as {invocations}. Steps found done are skipped and not listed{found}. Commands in the "
              f"order run, with wall times and the 1-minute load average after each (how busy the machine was):", "",
              "| step | wall s | load | command |", "|---|---|---|---|"]
    lines += [f"| {key} | {step['wall_s']:.0f} | {step['load_average_1min']} | `{step['command']}` |"
              for key, step in summary["steps"].items()]
    submission = summary["submission"]
    if not submission:
        lines += ["", "Test-set prediction and submission: not finished yet."]
    else:
        verdict = "passed" if submission["passed"] else "FAILED"
        lines += ["", f"Submission ({summary['test_cases']} test cases): `{submission['command']}` {verdict} the "
                  f"packager's checks "
                  f"(every test case predicted, in the test image's geometry, with the task's labels): "
                  f"`{submission['archive']}`, {(submission['size_bytes'] or 0) / 1e6:.2f} MB, not committed. "
                  f"Packager: {' / '.join(submission['packager_output'][-2:])}"]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Per-fold and cross-validated Dice per class, before and after postprocessing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = {f"{trainer.split('_')[0]} f{fold}": row for trainer, rows in summary["per_fold"].items()
            for fold, row in rows.items()}
    bars.update({"CV": summary["best"]["before_postprocessing"], "CV + pp": summary["best"]["after_postprocessing"]})
    x = np.arange(len(bars))
    figure, axis = plt.subplots(figsize=(max(6, len(bars) * 0.8), 3.5))
    for i, label in enumerate(LABELS.values()):
        axis.bar(x + (i - 0.5) * 0.4, [row[label] for row in bars.values()], 0.4, label=label)
    axis.set_xticks(x, list(bars), rotation=30, ha="right")
    axis.set_ylabel("Dice")
    axis.set_ylim(0, 1)
    axis.legend()
    axis.set_title(f"{summary['dataset']} cross-validation ({', '.join(summary['trainers'])})", fontsize=9)
    figure.tight_layout()
    with atomic_path(str(path)) as tmp:
        figure.savefig(tmp, dpi=80)
    plt.close(figure)


def write_summaries(stem: Path, summary: dict) -> None:
    """JSON, Markdown and plot; written once the cross-validation is done (the test-set prediction takes long on a
    CPU) and again at the end."""
    _save_json(stem.with_suffix(".json"), summary)
    with atomic_path(str(stem.with_suffix(".md"))) as tmp:
        Path(tmp).write_text(markdown(summary))
    plot(summary, stem.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--msd", required=True, help="the MSD Task04_Hippocampus folder (imagesTs, dataset.json)")
    parser.add_argument("--out", required=True, help="where the JSON, Markdown and plot summaries go")
    parser.add_argument("--trainer", default="STPMTATrainer_budget")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for training and prediction")
    parser.add_argument("--ensemble-with", help="a second trainer, trained on the same folds and ensembled")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="folds in training order (a fold another process is training goes last)")
    args = parser.parse_args()
    settle_environment(cpu=args.device == "cpu")
    raw, preprocessed = (Path(os.environ[n]) / DATASET for n in ("nnUNet_raw", "nnUNet_preprocessed"))
    results = Path(os.environ["nnUNet_results"]) / DATASET
    trainers, folds = [args.trainer, *([args.ensemble_with] if args.ensemble_with else [])], sorted(args.folds)
    work = results / f"nnscd_cv_{'_'.join(trainers)}"
    record = Record(work / "record.json")
    record.data.setdefault("invocations", []).append(" ".join(["python documentation/experiments/hippocampus_cv.py",
                                                               *sys.argv[1:]]))

    if not (raw / "dataset.json").is_file():
        record.run("convert", ["nnScd_convert_MSD_dataset", "-i", args.msd, "-np", "2"])
    if not (preprocessed / f"{PLANS}.json").is_file():
        record.run("plan and preprocess", ["nnScd_plan_and_preprocess", "-d", DATASET_ID, "-c", CONFIG, "-np", "2",
                                           "-npfp", "2", "--verify_dataset_integrity"])
    for trainer in trainers:
        train_folds(record, results, trainer, args.folds, args.device)

    info_file = work / "inference_information.json"
    if not info_file.is_file():
        record.run("find best configuration", ["nnScd_find_best_configuration", DATASET_ID, "-c", CONFIG, "-tr",
                                               *trainers, "-p", PLANS, "-f", *map(str, folds), "-np", "2"])
        # the dataset-level files are rewritten by any later find_best_configuration run: keep this run's
        shutil.copy(results / "inference_instructions.txt", work / "inference_instructions.txt")
        shutil.copy(results / "inference_information.json", info_file)
    info = json.loads(info_file.read_text())
    write_summaries(Path(args.out) / f"hippocampus_cv_{args.device}",
                    summarise(results, info, record.data, trainers, folds, schedule_text(trainers), args.device))

    postprocessed = predict_test_set(record, info, raw, work, folds, args.device)
    package(record, Path(args.msd), postprocessed, work / f"{MSD_TASK}_submission.zip")
    summary = summarise(results, info, record.data, trainers, folds, schedule_text(trainers), args.device)
    write_summaries(Path(args.out) / f"hippocampus_cv_{args.device}", summary)
    print(markdown(summary))


if __name__ == "__main__":
    main()
