"""Whole-run wall time of `nnUNetv2_predict` against `nnScd_predict` (and, with --onnx, against
`nnScd_predict_from_modelfolder -m EXPORT`, onnxruntime): same model, cases and flags, in turns.

    python documentation/results/time_whole_predict.py -i IMAGES -d 4 -c 3d_fullres -tr TRAINER -p PLANS -f 0 \
        --repeats 2 --json OUT.json [--nnscd-env nnScd_cpu_bf16=1] [--onnx EXPORT] [--extra -npp 0 -nps 0]

Each command runs as a user types it, with `-device cpu` and a fresh output folder, and is timed from start to
exit (process start, preprocessing, sliding window, export). `--nnscd-env` sets variables for nnScd_predict only;
`--extra` adds flags to every command. Afterwards the label files of each are compared with nnUNetv2_predict's
case by case (Dice per class, identical voxels).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnscd.tools.benchmark_predictors import agreement
from nnscd.core.paths import TRAINER_LOOKUP_FOLDER

BIN = Path(sys.executable).parent


def timed_run(command: list, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{command[0]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def agreement_per_case(ours: Path, theirs: Path) -> dict:
    """Per case: fraction of identical voxels and Dice per foreground label present in either segmentation."""
    cases = {}
    for file in sorted(theirs.glob("*.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(ours / file.name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(file)))
        cases[file.name] = agreement(a, b, [int(v) for v in np.union1d(np.unique(a), np.unique(b)) if v > 0])
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", required=True, type=Path)
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", required=True)
    parser.add_argument("-tr", required=True)
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("-f", default="0")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nnscd-env", nargs="*", default=[], help="NAME=VALUE for nnScd_predict only")
    parser.add_argument("--onnx", type=Path, help="an nnScd_export_onnx folder of the same model: also onnxruntime")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags for every command (last)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    common = ["-i", str(args.i), "-f", args.f, "-device", "cpu", "--disable_progress_bar", *args.extra]
    model = ["-d", args.d, "-c", args.c, "-tr", args.tr, "-p", args.p]
    # nnU-Net finds nnscd's trainers through nnUNet_extTrainer, as a user would point it there
    env = {**os.environ, "nnUNet_extTrainer": TRAINER_LOOKUP_FOLDER}
    commands = {"nnunet": ([str(BIN / "nnUNetv2_predict"), *model, *common], env),
                "nnscd": ([str(BIN / "nnScd_predict"), *model, *common],
                          {**env, **dict(v.split("=", 1) for v in args.nnscd_env)})}
    if args.onnx:
        commands["onnx"] = ([str(BIN / "nnScd_predict_from_modelfolder"), "-m", str(args.onnx), *common], env)
    names = list(commands)
    seconds = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        outputs = {name: Path(tmp) / name for name in names}
        for repeat in range(args.repeats):  # in turns, each starting in its turn, so all see the same load on average
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                shutil.rmtree(outputs[name], ignore_errors=True)
                command, variables = commands[name]
                seconds[name].append(timed_run([*command, "-o", str(outputs[name])], variables))
                print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
        agreements = {name: agreement_per_case(outputs[name], outputs["nnunet"]) for name in names[1:]}
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    cases = agreements["nnscd"]
    report = {"command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "cases": len(cases),
              "nnscd_env": args.nnscd_env, "seconds": seconds, "median_s": medians}
    for name, per_case in agreements.items():
        prefix = "" if name == "nnscd" else f"{name}_"
        report |= {f"{prefix}speedup": medians["nnunet"] / medians[name],
                   f"{prefix}identical_cases": sum(c["identical_fraction"] == 1.0 for c in per_case.values()),
                   f"{prefix}min_dice": min(min(c["dice"].values(), default=1.0) for c in per_case.values()),
                   f"{prefix}per_case": per_case}
        print(f"{len(per_case)} cases: nnUNetv2_predict {medians['nnunet']:.1f} s, {name} {medians[name]:.1f} s, "
              f"{medians['nnunet'] / medians[name]:.2f}x; identical labels in {report[prefix + 'identical_cases']}/"
              f"{len(per_case)} cases, lowest Dice against nnU-Net's {report[prefix + 'min_dice']:.5f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
