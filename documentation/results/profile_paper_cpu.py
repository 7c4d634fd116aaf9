"""Where the time goes in the paper networks at 96^3 on a CPU (documentation/benchmarks.md, "Where the time goes").

Inference: wall time per part (patch embedding, ViT blocks, STP stages = scorer + top-K + gathers, skip
assemblies, MTA, decoder) from forward hooks, the minimum over repeats (robust to other load on a shared
machine). Training step: self CPU time per op category from torch.profiler (one step, fused AdamW).

    python documentation/results/profile_paper_cpu.py [NAME ...]
"""
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from nnscd.networks.registry import build_network

PATCH, CLASSES, REPEATS = (96, 96, 96), 14, 3
CATEGORIES = {  # category -> fragments of aten op names
    "linear layers (mm/addmm)": ("addmm", "aten::mm", "bmm"),
    "attention (SDPA)": ("scaled_dot_product", "flash_attention"),
    "convolutions": ("convolution", "conv3d", "conv_transpose", "slow_conv"),
    "norms": ("batch_norm", "layer_norm", "instance_norm"),
    "copies and fills": ("copy_", "fill_", "aten::cat"),
    "top-k / sort / gather / scatter": ("topk", "sort", "gather", "scatter"),
    "AdamW (fused)": ("adamw",),
}


def part_of(name: str) -> str:
    """encoder.blocks.3 -> encoder.blocks, skip_assemblies.4 -> skip_assemblies."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "encoder" else parts[0]


def inference_parts(net: torch.nn.Module, x: torch.Tensor) -> tuple[float, dict[str, float]]:
    names = (["patch_embed"] + [f"encoder.blocks.{i}" for i in range(len(net.encoder.blocks))]
             + [f"encoder.stages.{i}" for i in range(len(net.encoder.stages))]
             + [f"skip_assemblies.{k}" for k in net.skip_assemblies]
             + (["mta"] if net.config.sparse else []) + ["decoder"])
    start, best, best_total = {}, defaultdict(lambda: float("inf")), float("inf")
    for name in names:
        module = net.get_submodule(name)
        module.register_forward_pre_hook(lambda m, a, name=name: start.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(lambda m, a, o, name=name: seconds.__setitem__(
            part_of(name), seconds[part_of(name)] + time.perf_counter() - start[name]))
    with torch.inference_mode():
        net(x)  # warm-up
        for _ in range(REPEATS):
            seconds = defaultdict(float)
            t = time.perf_counter()
            net(x)
            best_total = min(best_total, time.perf_counter() - t)
            for part, s in seconds.items():
                best[part] = min(best[part], s)
    return best_total, dict(best)


def training_categories(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)

    def step():
        net.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    sums = defaultdict(float)
    for event in prof.key_averages():
        category = next((c for c, keys in CATEGORIES.items() if any(k in event.key for k in keys)), "other")
        sums[category] += event.self_cpu_time_total / 1e6
    return dict(sums)


if __name__ == "__main__":
    torch.manual_seed(0)
    x, y = torch.randn(1, 1, *PATCH), torch.randint(0, CLASSES, (1, *PATCH))
    for name in sys.argv[1:] or ["unetr-paper", "stpmta-paper", "vit-light-paper", "stpmta-light-paper"]:
        net = build_network(name, 1, CLASSES, PATCH).eval()
        total, parts = inference_parts(net, x)
        print(f"\n{name}: inference forward {total:.2f} s (best of {REPEATS})")
        for part, seconds in parts.items():
            print(f"  {part:<34}{seconds:8.3f} s {100 * seconds / total:5.1f}%")
        categories = training_categories(net, x, y)
        step = sum(categories.values())
        print(f"  training step, self CPU time under the profiler: {step:.2f} s")
        for category, seconds in sorted(categories.items(), key=lambda kv: -kv[1]):
            print(f"    {category:<32}{seconds:8.3f} s {100 * seconds / step:5.1f}%")
