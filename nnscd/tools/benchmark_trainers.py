"""`nnScd_benchmark dataset -d DATASET -c CONFIG -tr TRAINER [TRAINER ...]`: trainers as training builds them.

Each trainer is built by nnU-Net's `get_trainer_from_args` from the dataset's plans and initialised (network, loss,
optimiser, data loaders with nnU-Net's augmentation workers), in a fresh subprocess of its own (its peak memory is
its own; its log files go to a temporary nnUNet_results). Reported with the network benchmark's fields, on one real
batch: training step (nnU-Net's `train_step`: forward, loss, backward, clipping, optimiser) and inference, params,
FLOPs, peak memory; plus the time per iteration with the data loaders feeding each step (`iter_s_with_loading`)
against the same step on a batch already in memory (`iter_s_without_loading`), and both scaled to the trainer's
training iterations per epoch (validation not included).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from nnscd.core.device import device_description, unwrap
from nnscd.core.errors import UserError
from nnscd.core.paths import settle_environment
from nnscd.core.safe_io import write_json
from nnscd.tools.benchmark_networks import RESULT_KEYS, forward_flops, interleaved_medians, peak_memory_mb

PIPELINE_KEYS = ("iter_s_with_loading", "iter_s_without_loading", "iterations_per_epoch", "epoch_s_with_loading",
                 "epoch_s_without_loading")


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
        command = [sys.executable, "-m", "nnscd.tools.benchmark_trainers", out, trainer_name, json.dumps(vars(args))]
        env = {**os.environ, "nnUNet_results": os.path.join(tmp, "results")}  # the trainer's logs, not the user's
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise UserError(f"measuring {trainer_name} failed (exit {proc.returncode}); its output ends with:\n"
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


def _worker(out: str, trainer_name: str, namespace: str) -> None:
    """In a fresh interpreter: one trainer measured (the arguments as JSON)."""
    args = argparse.Namespace(**json.loads(namespace))
    settle_environment(cpu=args.device == "cpu")  # before nnunetv2's first import: folders, nnscd's trainers
    write_json(out, measure_trainer(args, trainer_name))


if __name__ == "__main__":
    _worker(*sys.argv[1:])
