"""Whole-run wall time of `nnUNetv2_predict` against `nnScd_predict`: same model, cases and flags, in turns.

    python documentation/results/time_whole_predict.py -i IMAGES -d 4 -c 3d_fullres -tr TRAINER -p PLANS -f 0 \
        --repeats 2 --json OUT.json [--nnscd-env nnScd_cpu_bf16=1]

Each command runs as a user types it, with `-device cpu` and a fresh output folder, and is timed from start to
exit (process start, preprocessing, sliding window, export). `--nnscd-env` sets variables for nnScd_predict only.
Afterwards the label files of the two are compared case by case (Dice per class, identical voxels).
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
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    flags = ["-i", str(args.i), "-d", args.d, "-c", args.c, "-tr", args.tr, "-p", args.p, "-f", args.f,
             "-device", "cpu", "--disable_progress_bar"]
    # nnU-Net finds nnscd's trainers through nnUNet_extTrainer, as a user would point it there
    env = {**os.environ, "nnUNet_extTrainer": TRAINER_LOOKUP_FOLDER}
    commands = {"nnunet": (str(BIN / "nnUNetv2_predict"), env),
                "nnscd": (str(BIN / "nnScd_predict"), {**env, **dict(v.split("=", 1) for v in args.nnscd_env)})}
    seconds = {name: [] for name in commands}
    with tempfile.TemporaryDirectory() as tmp:
        outputs = {name: Path(tmp) / name for name in commands}
        for repeat in range(args.repeats):  # in turns, so both see the same load on average
            for name in (("nnunet", "nnscd") if repeat % 2 == 0 else ("nnscd", "nnunet")):
                shutil.rmtree(outputs[name], ignore_errors=True)
                program, variables = commands[name]
                seconds[name].append(timed_run([program, *flags, "-o", str(outputs[name])], variables))
                print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
        cases = agreement_per_case(outputs["nnscd"], outputs["nnunet"])
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    report = {"command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "cases": len(cases),
              "nnscd_env": args.nnscd_env, "seconds": seconds, "median_s": medians,
              "speedup": medians["nnunet"] / medians["nnscd"],
              "identical_cases": sum(c["identical_fraction"] == 1.0 for c in cases.values()),
              "min_dice": min(min(c["dice"].values(), default=1.0) for c in cases.values()), "per_case": cases}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"{len(cases)} cases: nnUNetv2_predict {medians['nnunet']:.1f} s, nnScd_predict {medians['nnscd']:.1f} s, "
          f"{report['speedup']:.2f}x; identical labels in {report['identical_cases']}/{len(cases)} cases, lowest "
          f"Dice between the two {report['min_dice']:.5f}")


if __name__ == "__main__":
    main()
