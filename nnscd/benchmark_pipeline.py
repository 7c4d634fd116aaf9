"""nnScd_benchmark on a dataset: trainers as training builds them, and the two predictors on a folder of cases.

Dataset mode, `nnScd_benchmark -d DATASET -c CONFIG -tr TRAINER [TRAINER ...]`: each trainer is built by nnU-Net's
`get_trainer_from_args` from the dataset's plans and initialised (network, loss, optimiser, data loaders with
nnU-Net's augmentation workers), in a fresh subprocess of its own (its peak memory is its own; its log files go to a
temporary nnUNet_results). Reported with the network mode's fields, on one real batch: training step (nnU-Net's
`train_step`: forward, loss, backward, clipping, optimiser) and inference, params, FLOPs, peak memory; plus the
time per iteration with the data loaders feeding each step (`iter_s_with_loading`) against the same step on a
batch already in memory (`iter_s_without_loading`), and both scaled to the trainer's training iterations per
epoch (validation not included).

Predict mode, `nnScd_benchmark --predict -i IMAGES -d DATASET -c CONFIG -tr TRAINER -f FOLD`: every case is
preprocessed once, then predicted by nnunetv2's `nnUNetPredictor` and by `nnScdPredictor` in turns (sliding
window, mirroring as `nnScd_predict` does, `--disable_tta` to turn it off); per case the seconds of each, the
speed-up, and how far the two segmentations agree (identical voxels, Dice per class).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nnscd.benchmark import (RESULT_KEYS, device_description, forward_flops, interleaved_medians, make_parent,
                             peak_memory_mb, synchronize, write_csv, write_json, write_plot)
from nnscd.safe_io import atomic_path

PIPELINE_KEYS = ("iter_s_with_loading", "iter_s_without_loading", "iterations_per_epoch", "epoch_s_with_loading",
                 "epoch_s_without_loading")


# ---------------------------------------------------------------------------------------------------------------
# dataset mode: one trainer, measured in its own process
# ---------------------------------------------------------------------------------------------------------------

def modelled_gflops(network: torch.nn.Module, in_channels: int, classes: int, patch: Sequence[int],
                    batch: int) -> Optional[float]:
    from nnscd.networks.flop_model import sparse_primus_forward_flops, token_sparse_forward_flops
    from nnscd.networks.token_sparse_primus import primus_config_of
    from nnscd.networks.token_sparse_vit import TokenSparseSegmenter

    if isinstance(network, TokenSparseSegmenter):
        return token_sparse_forward_flops(network.config, in_channels, classes, patch, batch) / 1e9
    primus = primus_config_of(network)
    return None if primus is None else sparse_primus_forward_flops(primus, in_channels, classes, patch, batch) / 1e9


def measure_trainer(args: argparse.Namespace, trainer_name: str) -> dict:
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnscd_trainers.nnscd_trainer import unwrap

    device = torch.device(args.device)
    trainer = get_trainer_from_args(args.d, args.c, args.f, trainer_name, args.p, device=device)
    trainer.initialize()
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    loader, _ = trainer.get_dataloaders()
    network, iters = trainer.network, args.iters
    try:
        with_loading = interleaved_medians({"step": lambda: trainer.train_step(next(loader))}, iters, args.warmup,
                                           device)["step"]
        batch = next(loader)
        without_loading = interleaved_medians({"step": lambda: trainer.train_step(batch)}, iters, 0, device)["step"]
        data = batch["data"].to(device)
        network.eval()
        autocast = torch.autocast(device.type) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
        with torch.inference_mode(), autocast:
            infer = interleaved_medians({"forward": lambda: network(data)}, iters, 0, device)["forward"]
        gflops = forward_flops(unwrap(network), data) / 1e9
    finally:
        if hasattr(loader, "_finish"):  # nnU-Net's augmentation workers are processes: end them with the measurement
            loader._finish()
    patch, size = list(trainer.configuration_manager.patch_size), data.shape[0]
    return {"name": trainer_name, "params": sum(p.numel() for p in network.parameters()),
            "gflops_forward": gflops,
            "gflops_model": modelled_gflops(unwrap(network), data.shape[1], trainer.label_manager.num_segmentation_heads,
                                            patch, size),
            "train_step_s": without_loading, "train_samples_per_s": size / without_loading,
            "infer_samples_per_s": size / infer, "peak_memory_mb": peak_memory_mb(device),
            "iter_s_with_loading": with_loading, "iter_s_without_loading": without_loading,
            "iterations_per_epoch": trainer.num_iterations_per_epoch,
            "epoch_s_with_loading": with_loading * trainer.num_iterations_per_epoch,
            "epoch_s_without_loading": without_loading * trainer.num_iterations_per_epoch,
            "patch_size": patch, "batch_size": size}


def measure_trainer_in_subprocess(args: argparse.Namespace, trainer_name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [sys.executable, "-m", "nnscd.benchmark", "-d", args.d, "-c", args.c, "-tr", trainer_name,
                   "-p", args.p, "-f", str(args.f), "--device", args.device, "--iters", str(args.iters),
                   "--warmup", str(args.warmup), "--worker", out]
        env = {**os.environ, "nnUNet_results": os.path.join(tmp, "results")}  # the trainer's logs, not the user's
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"nnScd_benchmark: measuring {trainer_name} failed (exit {proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


def run_dataset_mode(args: argparse.Namespace) -> dict:
    results = [measure_trainer_in_subprocess(args, name) for name in tqdm(args.tr, desc="trainers", unit="trainer")]
    first = results[0]
    print(f"{'trainer':<32}{'params M':>9}{'GFLOPs':>9}{'train s':>9}{'infer/s':>9}{'iter+data s':>12}"
          f"{'iter s':>8}{'epoch s':>9}{'peak MB':>9}")
    for r in results:
        print(f"{r['name']:<32}{r['params'] / 1e6:>9.2f}{r['gflops_forward']:>9.1f}{r['train_step_s']:>9.3f}"
              f"{r['infer_samples_per_s']:>9.2f}{r['iter_s_with_loading']:>12.3f}{r['iter_s_without_loading']:>8.3f}"
              f"{r['epoch_s_with_loading']:>9.1f}{r['peak_memory_mb']:>9.0f}")
    return {"device": device_description(args.device), "torch": torch.__version__, "dataset": args.d,
            "configuration": args.c, "plans": args.p, "fold": args.f, "patch_size": first["patch_size"],
            "batch_size": first["batch_size"], "data_augmentation_workers": os.environ.get("nnUNet_n_proc_DA"),
            "results": [{k: r[k] for k in (*RESULT_KEYS, *PIPELINE_KEYS, "patch_size", "batch_size")}
                        for r in results]}


# ---------------------------------------------------------------------------------------------------------------
# predict mode: nnunetv2's predictor against nnscd's
# ---------------------------------------------------------------------------------------------------------------

def load_predictors(args: argparse.Namespace) -> list:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from nnscd.predictor import nnScdPredictor

    model = get_output_folder(args.d, args.tr[0], args.p, args.c)
    predictors = []
    for cls in (nnUNetPredictor, nnScdPredictor):
        predictor = cls(use_mirroring=not args.disable_tta, device=torch.device(args.device),
                        perform_everything_on_device=args.device == "cuda", allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model, (args.f,), args.chk)
        predictors.append(predictor)
    return predictors


def agreement(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> dict:
    dice = {}
    for label in labels:
        union = (a == label).sum() + (b == label).sum()
        dice[str(label)] = 1.0 if union == 0 else float(2 * ((a == label) & (b == label)).sum() / union)
    return {"identical_fraction": float((a == b).mean()), "dice": dice}


def run_predict_mode(args: argparse.Namespace) -> dict:
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
    from nnscd.predictor import batch_factor_from_environment, cpu_bf16_requested

    reference, ours = load_predictors(args)
    device = torch.device(args.device)
    cases = create_lists_from_splitted_dataset_folder(args.i, ours.dataset_json["file_ending"])
    if not cases:
        raise SystemExit(f"nnScd_benchmark: no images ending in {ours.dataset_json['file_ending']} in {args.i}")
    preprocessor = ours.configuration_manager.preprocessor_class(verbose=False)
    labels = [int(v) for v in ours.label_manager.all_labels if v > 0]
    rows = []
    for files in tqdm(cases, desc="cases", unit="case"):
        data, _, _ = preprocessor.run_case(files, None, ours.plans_manager, ours.configuration_manager,
                                           ours.dataset_json)
        data = torch.from_numpy(data).float()
        if not rows:  # untimed, up to 2 tiles per axis: first-call set-up, nnscd's batch timing
            corner = data[(slice(None), *(slice(0, int(1.5 * p)) for p in ours.configuration_manager.patch_size))]
            for predictor in (reference, ours):
                predictor.predict_sliding_window_return_logits(corner)
        seconds: Dict[str, List[float]] = {"nnunet": [], "nnscd": []}
        logits = {}
        for repeat in range(args.iters):  # in turns, so both see the same load on average
            order = (("nnunet", reference), ("nnscd", ours)) if repeat % 2 == 0 else (("nnscd", ours),
                                                                                       ("nnunet", reference))
            for name, predictor in order:
                synchronize(device)
                start = time.perf_counter()
                logits[name] = predictor.predict_sliding_window_return_logits(data)
                synchronize(device)
                seconds[name].append(time.perf_counter() - start)
        segmentation = {n: np.asarray(ours.label_manager.convert_logits_to_segmentation(l.float().cpu()))
                        for n, l in logits.items()}
        padded = pad_nd_image(data, ours.configuration_manager.patch_size, "constant", {"value": 0})
        nnunet_s, nnscd_s = statistics.median(seconds["nnunet"]), statistics.median(seconds["nnscd"])
        rows.append({"case": os.path.basename(files[0]), "shape": list(data.shape[1:]),
                     "tiles": len(ours._internal_get_sliding_window_slicers(padded.shape[1:])),
                     "nnunet_s": nnunet_s, "nnscd_s": nnscd_s, "speedup": nnunet_s / nnscd_s,
                     **agreement(segmentation["nnscd"], segmentation["nnunet"], labels)})
    speedups = [r["speedup"] for r in rows]
    print(f"{'case':<28}{'shape':>16}{'tiles':>6}{'nnunet s':>10}{'nnscd s':>9}{'speed-up':>9}{'identical':>10}")
    for r in rows:
        print(f"{r['case']:<28}{'x'.join(map(str, r['shape'])):>16}{r['tiles']:>6}{r['nnunet_s']:>10.3f}"
              f"{r['nnscd_s']:>9.3f}{r['speedup']:>9.2f}{r['identical_fraction']:>10.5f}")
    print(f"median speed-up {statistics.median(speedups):.2f}x over {len(rows)} cases; lowest Dice between the "
          f"two: {min(min(r['dice'].values()) for r in rows):.5f}")
    return {"device": device_description(args.device), "torch": torch.__version__, "dataset": args.d,
            "configuration": args.c, "plans": args.p, "trainer": args.tr[0], "fold": args.f,
            "mirroring": not args.disable_tta, "nnscd_cpu_bf16": device.type == "cpu" and cpu_bf16_requested(),
            "forward_batch": ours.forward_batch,
            "forward_batch_from": "timing" if batch_factor_from_environment() is None else "nnScd_predict_batch_factor",
            "repeats": args.iters, "median_speedup": statistics.median(speedups),
            "min_dice_between_predictors": min(min(r["dice"].values()) for r in rows), "cases": rows}


def write_predict_csv(path: str, rows: Sequence[dict]) -> None:
    import csv

    make_parent(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "tiles", "nnunet_s", "nnscd_s", "speedup", "identical_fraction", "min_dice"])
        writer.writerows([r["case"], r["tiles"], r["nnunet_s"], r["nnscd_s"], r["speedup"], r["identical_fraction"],
                          min(r["dice"].values())] for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nnScd_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("-tr", nargs="+", required=True, help="trainer(s); predict mode takes one")
    parser.add_argument("-p", default="nnUNetPlans", help="plans name (nnscd's token trainers: nnScdPlans)")
    parser.add_argument("-f", type=int, default=0, help="fold (its split feeds the loaders; predict: its model)")
    parser.add_argument("--predict", action="store_true", help="time nnunetv2's and nnscd's predictors on -i")
    parser.add_argument("-i", help="predict mode: folder of images (CASE_0000.nii.gz, ...)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="predict mode: checkpoint name")
    parser.add_argument("--disable_tta", action="store_true", help="predict mode: no mirroring")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=10, help="timed repeats (median); predict mode: per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    parser.add_argument("--json", help="write the results as JSON")
    parser.add_argument("--csv", help="write the results as CSV")
    parser.add_argument("--plot", help="dataset mode: PNG with throughput and FLOPs per trainer")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one trainer, result to this file
    args = parser.parse_args(argv)
    if args.predict and (not args.i or len(args.tr) != 1):
        parser.error("--predict needs -i IMAGES and exactly one -tr")
    if args.predict and not os.path.isdir(args.i):
        parser.error(f"-i {args.i} is not a folder")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str]) -> None:
    from nnscd.commands import check_trainer_name
    from nnscd.paths import settle_environment

    args = parse_args(argv)
    settle_environment(cpu=args.device == "cpu")
    if args.predict:
        from nnscd.predictor import check_predictor_environment
        try:
            check_predictor_environment()
        except ValueError as error:
            raise SystemExit(f"nnScd_benchmark: {error}")
    for name in args.tr:
        check_trainer_name(name)
    if args.worker:
        result = measure_trainer(args, args.tr[0])
        with atomic_path(args.worker) as tmp, open(tmp, "w") as f:
            json.dump(result, f)
        return
    report = run_predict_mode(args) if args.predict else run_dataset_mode(args)
    if args.json:
        write_json(args.json, report)
    if args.csv:
        (write_predict_csv(args.csv, report["cases"]) if args.predict
         else write_csv(args.csv, report["results"], (*RESULT_KEYS, *PIPELINE_KEYS)))
    if args.plot and not args.predict:
        write_plot(args.plot, report)
