"""How much of STP's soft top-K gradient is noise, for the published estimate and its control variate.

STPMTATrainer's network (Hippocampus plans: patch 40 x 56 x 40, token 8, STP keeping 50% then 25%) gets the same
batch of real training cases R times in training mode; only the soft top-K's Gaussian perturbations differ between
the R backward passes (the network has no dropout or drop path), so whatever varies is the estimator's noise. For
each estimator and each STP stage it reports the noise-to-signal ratio of the gradient at the scorer's raw scores
(RMS over elements of the standard deviation over the R draws / RMS of the expected gradient), and the same for the
patch embedding's weights, the first layer every gradient from the scorers reaches. Loss: nnU-Net's Dice + CE.
Weights: at init (seed 0) and, with --checkpoint, a trained STPMTATrainer fold.

    python documentation/results/stp_gradient_noise.py --images ../shared/data/Task04_Hippocampus/imagesTr \
        --labels ../shared/data/Task04_Hippocampus/labelsTr [--checkpoint FOLD/checkpoint_final.pth] \
        --json documentation/results/stp_gradient_noise_cpu.json
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import SimpleITK as sitk
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from tqdm import tqdm

from nnscd.networks.token_sparse_vit import TokenSparseSegmenter, stp_stages
from nnscd_trainers.token_sparse_trainers import STPMTATrainer

PATCH, TOKEN = (40, 56, 40), (8, 8, 8)


def centre_to_patch(volume: np.ndarray) -> np.ndarray:
    """Crop or zero-pad every axis symmetrically to PATCH (Hippocampus crops are about 35 x 50 x 35)."""
    starts = [int((size - target) / 2) for size, target in zip(volume.shape, PATCH)]  # < 0: pad before
    return crop_and_pad_nd(volume, [[start, start + target] for start, target in zip(starts, PATCH)])


def load_batch(images: Path, labels: Path, cases: int) -> tuple[torch.Tensor, torch.Tensor]:
    names = sorted(p.name for p in labels.glob("*.nii.gz") if not p.name.startswith("."))[:cases]
    if len(names) < cases:
        raise SystemExit(f"{labels}: {len(names)} label files, need {cases}")
    x, y = [], []
    for name in names:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(images / name))).astype(np.float32)
        x.append(centre_to_patch((image - image.mean()) / (image.std() + 1e-8)))
        y.append(centre_to_patch(sitk.GetArrayFromImage(sitk.ReadImage(str(labels / name))).astype(np.int64)))
    return torch.from_numpy(np.stack(x))[:, None], torch.from_numpy(np.stack(y))[:, None]


def noise_to_signal(draws: torch.Tensor) -> float:
    """(R, ...) gradients of R draws -> RMS over elements of the per-draw standard deviation / of the expected
    gradient. The mean of R draws still holds 1/R of the noise's variance, which is taken out of its square."""
    noise_sq = draws.var(0).mean()
    signal_sq = draws.mean(0).pow(2).mean() - noise_sq / len(draws)
    return float((noise_sq / signal_sq.clamp_min(1e-30)).sqrt())


def measure(network: TokenSparseSegmenter, x: torch.Tensor, y: torch.Tensor, repeats: int) -> Dict[str, float]:
    loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    stages = stp_stages(network)
    scores: List[List[torch.Tensor]] = [[] for _ in stages]
    embed: List[torch.Tensor] = []
    network.train()
    for _ in tqdm(range(repeats), desc=stages[0].config.estimator, leave=False):
        network.zero_grad(set_to_none=True)
        out = network(x)
        raws = [stage.last_scores[0] for stage in stages]
        for raw in raws:
            raw.retain_grad()
        loss_fn(out, y).backward()
        for s, raw in enumerate(raws):
            scores[s].append(raw.grad.detach().clone())
        embed.append(next(network.patch_embed.parameters()).grad.detach().clone())
    result = {f"scores_stage{s + 1}": noise_to_signal(torch.stack(g)) for s, g in enumerate(scores)}
    result["patch_embedding"] = noise_to_signal(torch.stack(embed))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, help="a trained STPMTATrainer fold's checkpoint (optional)")
    parser.add_argument("--cases", type=int, default=7, help="the batch: the first N labelled cases (plans: 7)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    x, y = load_batch(args.images, args.labels, args.cases)
    results = {"command": "python " + " ".join(sys.argv), "patch": PATCH, "token": TOKEN, "cases": args.cases,
               "repeats": args.repeats, "measure": "RMS of the per-draw std / RMS of the expected gradient",
               "weights": {}}
    trained = (torch.load(args.checkpoint, map_location="cpu", weights_only=False)["network_weights"]
               if args.checkpoint else None)
    for weights in ["init"] + (["trained"] if trained else []):
        results["weights"][weights] = {}
        for estimator in ("perturbed", "perturbed_centered"):
            torch.manual_seed(0)
            config = dataclasses.replace(STPMTATrainer.network_config(list(TOKEN)), estimator=estimator)
            network = TokenSparseSegmenter(1, 3, PATCH, config)
            if weights == "trained":
                network.load_state_dict(trained)
            results["weights"][weights][estimator] = measure(network, x, y, args.repeats)
            print(weights, estimator, results["weights"][weights][estimator])
    if args.checkpoint:
        results["checkpoint"] = str(args.checkpoint)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
