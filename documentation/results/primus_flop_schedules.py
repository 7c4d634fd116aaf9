"""How far token pruning can speed up PrimusV3-B: the FLOP model of pruning schedules at the issue's patches.

PrimusV3's convolutional stem runs at full resolution before any token exists, so no schedule removes its FLOPs;
"bound" is the speed-up with free Eva blocks (stem and decoder only). Forward GFLOPs from
`nnscd.networks.flop_model.sparse_primus_flop_breakdown`, batch 1, 1 channel, 14 classes (documentation/benchmarks.md).

    python documentation/results/primus_flop_schedules.py   # writes primus_flop_schedules.{json,md} beside itself
"""
import json
from pathlib import Path

from nnscd.networks.flop_model import sparse_primus_flop_breakdown
from nnscd.networks.token_sparse_primus import SparsePrimusConfig

PATCHES = (96, 128, 160)
SCHEDULES = (  # (prune after blocks, keep ratios); the first is STPMTAPrimusV3BTrainer's
    ((3, 6), (0.25, 0.25)),
    ((1, 3, 6), (0.25, 0.5, 0.5)),
    ((1,), (0.125,)),
    ((1, 2), (0.25, 0.25)),
)


def rows() -> list:
    out = []
    for side in PATCHES:
        patch = (side,) * 3
        dense = sum(sparse_primus_flop_breakdown(SparsePrimusConfig(size="B", prune_after=(), keep_ratios=()),
                                                 1, 14, patch).values())
        for prune_after, keep_ratios in SCHEDULES:
            parts = sparse_primus_flop_breakdown(SparsePrimusConfig(size="B", prune_after=prune_after,
                                                                    keep_ratios=keep_ratios), 1, 14, patch)
            out.append({"patch": side, "prune_after": prune_after, "keep_ratios": keep_ratios,
                        **{f"{k}_gflops": round(v / 1e9, 1) for k, v in parts.items()},
                        "dense_gflops": round(dense / 1e9, 1),
                        "speedup_modelled": round(dense / sum(parts.values()), 2),
                        "bound_free_eva_blocks": round(dense / (parts["stem"] + parts["decoder"]), 2)})
    return out


def main() -> None:
    here = Path(__file__).parent
    table = rows()
    (here / "primus_flop_schedules.json").write_text(json.dumps(table, indent=1))
    lines = ["| patch | prune after blocks | keep ratios | stem | Eva blocks | scorers + MTA | decoder | dense total "
             "| modelled speed-up | bound (free Eva blocks) |", "|" + "---|" * 10]
    for r in table:
        lines.append(f"| {r['patch']}^3 | {', '.join(map(str, r['prune_after']))} | "
                     f"{', '.join(map(str, r['keep_ratios']))} | {r['stem_gflops']} | {r['encoder_gflops']} | "
                     f"{round(r['scorers_gflops'] + r['mta_gflops'], 1)} | {r['decoder_gflops']} | "
                     f"{r['dense_gflops']} | {r['speedup_modelled']:.2f}x | {r['bound_free_eva_blocks']:.2f}x |")
    (here / "primus_flop_schedules.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
