"""Token-aware planning: patch, token size and batch for transformer trainers, derived from nnU-Net's plans.

nnU-Net sizes patch and batch for U-Nets (a memory model of conv feature maps, patches divisible by the pooling
strides). A ViT needs a patch that tiles into tokens, and its memory grows with the token count, so:
- token size per axis: `TOKEN_SIZE` voxels along the finest axis, fewer along coarser axes so a token covers
  about the same physical extent (spacing 3 x 0.8 x 0.8 mm -> 2 x 8 x 8), a power of two, never larger than
  the patch side;
- patch: nnU-Net's patch rounded UP to a multiple of the token size (never cropped: nnU-Net pads images
  smaller than the patch, so a larger patch loses nothing);
- batch: nnU-Net's batch, lowered if needed so a batch holds at most `TOKEN_BUDGET` tokens (at least 2).

`write_token_plans` records this as a plans file of its own (`nnScdPlans.json`) beside nnU-Net's, which stays
untouched; it reuses nnU-Net's preprocessed data (same data identifiers). Token-sparse trainers apply the same
rule to whatever plans they are given, so `-p nnUNetPlans` and `-p nnScdPlans` train the same network.
"""
import copy
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from nnscd.networks.soft_topk import num_kept
from nnscd.core.safe_io import write_json

TOKEN_SIZE = 8
TOKEN_BUDGET = 8192  # tokens per batch; ViT-B at 8^3 tokens of a 96^3 patch: 1728 tokens/sample -> batch 4
PLANS_NAME = "nnScdPlans"


@dataclass(frozen=True)
class TokenPlan:
    patch_size: List[int]
    token_size: List[int]
    batch_size: int

    @property
    def grid(self) -> List[int]:
        return [p // t for p, t in zip(self.patch_size, self.token_size)]

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)


def _power_of_two_at_most(x: float) -> int:
    return 2 ** max(0, math.floor(math.log2(max(x, 1))))


def plan_tokens(patch_size: Sequence[int], spacing: Sequence[float], batch_size: int,
                token_size: int = TOKEN_SIZE, tokens: Optional[Sequence[int]] = None) -> TokenPlan:
    """The token plan for one configuration (rule in the module docstring); `tokens` fixes the token size."""
    if tokens is None:
        finest = min(spacing)
        tokens = [min(_power_of_two_at_most(token_size * finest / s), _power_of_two_at_most(p))
                  for p, s in zip(patch_size, spacing)]
    patch = [math.ceil(p / t) * t for p, t in zip(patch_size, tokens)]
    per_sample = math.prod(p // t for p, t in zip(patch, tokens))
    return TokenPlan(patch, list(tokens), max(2, min(int(batch_size), TOKEN_BUDGET // per_sample)))


def apply_token_plan(configuration: dict, plan: TokenPlan) -> None:
    """Write a token plan into one configuration of a plans dict (in place)."""
    configuration.update(patch_size=plan.patch_size, token_size=plan.token_size, batch_size=plan.batch_size)


def token_plan_for(configuration: dict, token_size: int = TOKEN_SIZE) -> TokenPlan:
    """The plan of a resolved configuration; a token size already recorded in it (by hand, say) is kept."""
    return plan_tokens(configuration["patch_size"], configuration["spacing"], configuration["batch_size"],
                       token_size, tokens=configuration.get("token_size"))


Planner = Callable[[dict], TokenPlan]  # a trainer's `token_plan` classmethod: resolved configuration -> plan


def write_token_plans(preprocessed_dataset_folder: str, planner: Planner, source_plans: str = "nnUNetPlans",
                      target_plans: str = PLANS_NAME) -> str:
    """Write `target_plans`.json: `source_plans` with `planner`'s plan in every configuration that has a patch.

    The planner is the trainer's own `token_plan` hook, so the plans file and the training agree by construction."""
    with open(os.path.join(preprocessed_dataset_folder, f"{source_plans}.json")) as f:
        plans = json.load(f)
    token_plans = copy.deepcopy(plans)
    token_plans["plans_name"] = target_plans
    for name, configuration in token_plans["configurations"].items():
        if "patch_size" in configuration:  # configurations that inherit it get it from their parent
            apply_token_plan(configuration, planner(configuration))
    target = os.path.join(preprocessed_dataset_folder, f"{target_plans}.json")
    write_json(target, token_plans, indent=4)
    return target


def live_tokens(num_tokens: int, keep_ratios: Sequence[float], min_tokens: int) -> List[int]:
    """Live tokens per sample before the first pruning stage and after each (ratios compound)."""
    live = [num_tokens]
    for keep in keep_ratios:
        live.append(num_kept(live[-1], keep, min_tokens))
    return live


def describe_token_plans(plans: dict, pruning: Dict[str, Tuple[Sequence[float], int]]) -> str:
    """A table of patch, token size, token grid and batch per configuration, and the live tokens per sample after
    each pruning stage of each trainer in `pruning` ({trainer name: (keep ratios, min tokens)})."""
    columns = [f"{trainer} (keep {' x '.join(map(str, keep))})" for trainer, (keep, _) in pruning.items()]
    lines = [f"{'configuration':<22}{'patch':<16}{'token':<12}{'grid':<14}{'batch':>6}" +
             "".join(f"  {c}" for c in columns)]
    for name, configuration in plans["configurations"].items():
        if "token_size" not in configuration:
            continue
        plan = TokenPlan(configuration["patch_size"], configuration["token_size"], configuration["batch_size"])
        stages = [" -> ".join(map(str, live_tokens(plan.num_tokens, keep, minimum)))
                  for keep, minimum in pruning.values()]
        lines.append(f"{name:<22}{'x'.join(map(str, plan.patch_size)):<16}{'x'.join(map(str, plan.token_size)):<12}"
                     f"{'x'.join(map(str, plan.grid)):<14}{plan.batch_size:>6}" +
                     "".join(f"  {s:<{len(c)}}" for s, c in zip(stages, columns)).rstrip())
    return "\n".join(lines)
