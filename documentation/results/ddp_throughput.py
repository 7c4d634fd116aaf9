"""Training throughput of 1 against N processes (documentation/distributed.md), through the console script.

Each trainer's `_cpu` variant (5 epochs x 10 iterations at the plans' batch, split over the ranks as nnU-Net does)
trains fold 0 once with one process and once with `-num_gpus N` (torchrun, gloo on the CPU, cores / N threads
per process), the two runs of a trainer one after the other. The epoch times come from the checkpoint's logging
(epoch 0, which holds the warm-up, is left out); the rest of the wall time is start-up and the final validation,
which the ranks split.

    nnUNet_raw=... nnUNet_preprocessed=... python documentation/results/ddp_throughput.py -d 4 \
        -tr nnScdTrainer_cpu STPMTATrainer_cpu --out documentation/results
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nnscd.core.safe_io import write_csv, write_json

BIN = Path(sys.executable).parent


def train(dataset: str, trainer: str, processes: int, results: str, log: Path) -> dict:
    command = [str(BIN / "nnScd_train"), dataset, "3d_fullres", "0", "-tr", trainer, "-device", "cpu"]
    if processes > 1:
        command += ["-num_gpus", str(processes)]
    env = dict(os.environ, nnUNet_results=results, nnScd_seed="0")
    start = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - start
    fold = next(Path(results).glob(f"*/{trainer}__*/fold_0"))
    logging = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    epoch_s = np.subtract(logging["epoch_end_timestamps"], logging["epoch_start_timestamps"])[1:]
    train_s = logging["epoch_end_timestamps"][-1] - logging["epoch_start_timestamps"][0]
    dice = json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"]
    return {"trainer": trainer, "processes": processes, "epoch_s_mean": round(float(epoch_s.mean()), 2),
            "epoch_s_min": round(float(epoch_s.min()), 2), "train_s": round(train_s, 1),
            "startup_and_validation_s": round(wall - train_s, 1), "wall_s": round(wall, 1),
            "validation_dice": round(dice, 4), "command": " ".join(["nnScd_train"] + command[1:])}


def _cpu_model() -> str:
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return models[0] if models else platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-d", default="4")
    parser.add_argument("-tr", nargs="+", default=["nnScdTrainer_cpu", "STPMTATrainer_cpu"])
    parser.add_argument("-n", type=int, default=2, help="processes of the distributed run")
    parser.add_argument("--out", default="documentation/results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for trainer in args.tr:
            for processes in (1, args.n):
                results = os.path.join(scratch, f"{trainer}_{processes}")
                rows.append(train(args.d, trainer, processes, results, Path(scratch, f"{trainer}_{processes}.log")))
                print(rows[-1], flush=True)
    for row in rows:
        single = next(r for r in rows if r["trainer"] == row["trainer"] and r["processes"] == 1)
        row["epoch_speedup"] = round(single["epoch_s_mean"] / row["epoch_s_mean"], 3)
        row["wall_speedup"] = round(single["wall_s"] / row["wall_s"], 3)
    machine = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
               "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "nnU-Net's default")}
    name = f"ddp_throughput_cpu_{args.n}proc"
    write_json(os.path.join(args.out, name + ".json"), {"machine": machine, "runs": rows})
    write_csv(os.path.join(args.out, name + ".csv"), rows, list(rows[0]))


if __name__ == "__main__":
    main()
