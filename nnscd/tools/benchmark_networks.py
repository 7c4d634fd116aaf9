"""`nnScd_benchmark networks`: speed, memory and FLOPs of networks side by side, on the same input.
(Trainers on a dataset: nnscd/tools/benchmark_trainers.py; the two predictors: nnscd/tools/benchmark_predictors.py.)

For each network: training step (forward, backward, AdamW step) and inference (torch.inference_mode) as the
median of repeats after warm-up, peak memory, forward FLOPs measured by FlopCounterMode and predicted by the
FLOP model, and parameters.

Timing runs all networks in this process on one input, taking turns every repeat, so that each sees the same
machine load on average (a shared CPU, GPU clocks): the ratios stay fair when absolute times drift. Peak memory
is measured per network alone: on CUDA as max allocated over one training step and one inference; on CPU in a
fresh subprocess (ru_maxrss), so that it is that network's own peak (the interpreter with torch included).

`measure_network` measures one network end to end on any batch.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from nnscd.networks.registry import build_network, modelled_forward_flops
from nnscd.core.device import synchronize
from nnscd.core.safe_io import atomic_path, make_parent, write_json

RESULT_KEYS = ("name", "params", "gflops_forward", "gflops_model", "train_step_s", "train_samples_per_s",
               "infer_samples_per_s", "peak_memory_mb")
Loss = Callable[[Tensor, Tensor], Tensor]


def train_step_fn(net: nn.Module, x: Tensor, target: Tensor, amp: bool, loss_fn: Loss) -> Callable[[], None]:
    """One training step: forward, loss, backward, AdamW. With `amp`, fp16 autocast + GradScaler (nnU-Net on CUDA).

    AdamW is the fused kernel: the default per-tensor loop costs seconds per step for a ViT-B on a CPU, the same
    for every network, and would hide the differences being measured.
    """
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler(x.device.type, enabled=amp)

    def step() -> None:
        net.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
            loss = loss_fn(net(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def infer_step_fn(net: nn.Module, x: Tensor, amp: bool) -> Callable[[], None]:
    def step() -> None:
        net.eval()
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
            net(x)
    return step


def interleaved_medians(steps: Mapping[str, Callable[[], None]], iters: int, warmup: int, device: torch.device,
                        on_step: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median wall seconds of each step over `iters` repeats after `warmup` untimed ones; the steps take turns
    every repeat, so a load change on the machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(warmup + iters):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if repeat >= warmup:
                times[name].append(time.perf_counter() - start)
            on_step()
    return {name: statistics.median(t) for name, t in times.items()}


def measure_timings(nets: Mapping[str, nn.Module], x: Tensor, target: Tensor, iters: int, warmup: int,
                    device: torch.device, amp: bool = False, loss_fn: Loss = F.cross_entropy,
                    on_step: Callable[[], None] = lambda: None) -> dict[str, dict]:
    """Training-step and inference timings of several networks on one batch, interleaved."""
    x, target = x.to(device), target.to(device)
    train = interleaved_medians({n: train_step_fn(net, x, target, amp, loss_fn) for n, net in nets.items()},
                                iters, warmup, device, on_step)
    infer = interleaved_medians({n: infer_step_fn(net, x, amp) for n, net in nets.items()},
                                iters, warmup, device, on_step)
    batch = x.shape[0]
    return {n: {"train_step_s": train[n], "train_samples_per_s": batch / train[n],
                "infer_samples_per_s": batch / infer[n]} for n in nets}


def forward_flops(net: nn.Module, x: Tensor) -> int:
    """Forward FLOPs in eval mode, as FlopCounterMode counts them (matmuls, attention, convolutions)."""
    net.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x)
    return counter.get_total_flops()


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset. CPU: this process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_static(net: nn.Module, x: Tensor, target: Tensor, device: torch.device, amp: bool = False,
                   loss_fn: Loss = F.cross_entropy) -> dict:
    """Parameters, measured forward FLOPs, and peak memory over one training step and one inference."""
    net, x, target = net.to(device), x.to(device), target.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flops = forward_flops(net, x)
    train_step_fn(net, x, target, amp, loss_fn)()
    infer_step_fn(net, x, amp)()
    synchronize(device)
    return {"params": sum(p.numel() for p in net.parameters()), "gflops_forward": flops / 1e9,
            "peak_memory_mb": peak_memory_mb(device)}


def measure_network(net: nn.Module, x: Tensor, target: Tensor, iters: int, warmup: int, device: torch.device,
                    amp: bool = False, loss_fn: Loss = F.cross_entropy) -> dict:
    """Everything about one network on the batch (x, target): params, FLOPs, peak memory, timings."""
    static = measure_static(net, x, target, device, amp, loss_fn)
    return {**static, **measure_timings({"net": net}, x, target, iters, warmup, device, amp, loss_fn)["net"]}


def seeded_batch(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    """The input every network of a run gets, in this process or a worker."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.channels, *args.patch, generator=generator)
    return x, torch.randint(0, args.classes, (args.batch, *args.patch), generator=generator)


def static_in_process(name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    net = build_network(name, args.channels, args.classes, args.patch)
    result = measure_static(net, *seeded_batch(args), torch.device(args.device), args.amp)
    del net
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def static_in_subprocess(name: str, args: argparse.Namespace) -> dict:
    """Measure one network in a fresh interpreter, so its peak RSS is not any other network's."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "nnscd.tools.benchmark_networks", out, json.dumps({**vars(args), "net": [name]})]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark of {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    static_of = static_in_subprocess if args.device == "cpu" else static_in_process
    static = {name: static_of(name, args) for name in tqdm(args.net, desc="memory and FLOPs", unit="network")}
    torch.manual_seed(0)
    nets = {name: build_network(name, args.channels, args.classes, args.patch).to(args.device) for name in args.net}
    with tqdm(total=2 * (args.warmup + args.iters) * len(nets), desc="timing (interleaved)", unit="step") as bar:
        timings = measure_timings(nets, *seeded_batch(args), args.iters, args.warmup, torch.device(args.device),
                                  args.amp, on_step=bar.update)
    results = []
    for name in args.net:
        modelled = modelled_forward_flops(name, args.channels, args.classes, args.patch, args.batch)
        results.append({"name": name, **static[name], **timings[name],
                        "gflops_model": None if modelled is None else modelled / 1e9})
    return [{k: r[k] for k in RESULT_KEYS} for r in results]


def write_plot(path: str, report: dict) -> None:
    """Panels: train samples/s, inference samples/s, forward GFLOPs (measured and modelled) and, for trainers on a
    dataset, epoch seconds with nnU-Net's data loading and with the batch in memory."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = [r["name"] for r in results]
    pos = range(len(names))
    pairs = [("gflops_forward", "gflops_model", "forward GFLOPs", "measured", "modelled")]
    if "epoch_s_with_loading" in results[0]:
        pairs.append(("epoch_s_with_loading", "epoch_s_without_loading", "epoch s", "data loading", "in memory"))
    panel_width = max(2.8, 0.8 * len(names) + 1)  # room for the rotated names and a legend inside each panel
    fig, axes = plt.subplots(1, 2 + len(pairs), figsize=(panel_width * (2 + len(pairs)), 4.5))
    for ax, key, title in ((axes[0], "train_samples_per_s", "training samples/s"),
                           (axes[1], "infer_samples_per_s", "inference samples/s")):
        ax.bar(pos, [r[key] for r in results], color="tab:blue" if key.startswith("train") else "tab:green")
        ax.set_title(title)
    for ax, (left, right, title, left_label, right_label) in zip(axes[2:], pairs):
        ax.bar([p - 0.2 for p in pos], [r[left] or 0 for r in results], 0.4, label=left_label)
        ax.bar([p + 0.2 for p in pos], [r[right] or 0 for r in results], 0.4, label=right_label)
        ax.set_title(title)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
        ax.legend(fontsize="small", loc="upper right")
    for ax in axes:
        ax.set_xticks(list(pos), names, rotation=30, ha="right")
    fig.suptitle(f"{report['device']}, patch {report['patch_size']}, batch {report['batch_size']}, "
                 f"torch {report['torch']}")
    fig.tight_layout()
    make_parent(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")  # the rotated names stay whole
    plt.close(fig)


def format_table(results: Sequence[dict]) -> str:
    rows = [f"{'network':<22}{'params M':>10}{'GFLOPs':>10}{'model':>10}{'train s':>10}{'train/s':>10}"
            f"{'infer/s':>10}{'peak MB':>10}"]
    for r in results:
        model = "-" if r["gflops_model"] is None else f"{r['gflops_model']:.1f}"
        rows.append(f"{r['name']:<22}{r['params'] / 1e6:>10.2f}{r['gflops_forward']:>10.1f}{model:>10}"
                    f"{r['train_step_s']:>10.3f}{r['train_samples_per_s']:>10.3f}{r['infer_samples_per_s']:>10.3f}"
                    f"{r['peak_memory_mb']:>10.0f}")
    return "\n".join(rows)


def _worker(out: str, namespace: str) -> None:
    """In a fresh interpreter: params, FLOPs and peak memory of one network (the arguments as JSON)."""
    args = argparse.Namespace(**json.loads(namespace))
    write_json(out, static_in_process(args.net[0], args))


if __name__ == "__main__":
    _worker(*sys.argv[1:])
