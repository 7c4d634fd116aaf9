"""nnScd_attention_ablation: does the decoder use the transformer, or work around it?

Predicts a folder with a trained token-sparse ViT (nnU-Net's predictor and sliding window) once per mode:
  none     the network unchanged (the reference)
  zeros    every transformer feature map the decoder receives replaced by zeros
  shuffle  the token positions of those maps permuted (one seeded permutation, the same for all maps and tiles)
and evaluates each against the labels with nnU-Net's metrics. The replacement is a forward pre-hook on
`network.decoder`, so the network's code is untouched. A small Dice drop means the decoder ignores the
transformer (the Primus paper found many hybrids do); a sparsity claim means little then.

`--keep K ...` adds one mode per K (`keep1`, `keep0.75`, ...) for a sparse network: every STP stage keeps K of its
live tokens at inference, the weights unchanged. `keep1` prunes nothing: its drop from `none` is what pruning at
inference costs, which separates that cost from a network that learned less in a sparse training.

Writes OUT/MODE/ (predictions and nnU-Net's summary.json), OUT/ablation.json and OUT/ablation.csv (Dice per class
and mode, and the drop from the unchanged prediction), and prints the table.
"""
import argparse
import json
import math
import os
from contextlib import contextmanager
from typing import Dict, Iterator, List, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from nnscd.core.errors import UserError
from nnscd.core.safe_io import write_csv, write_json
from nnscd.networks.token_sparse_vit import TokenSparseSegmenter, stp_stages
from nnscd.tools.trained_models import load_model

MODES = ("none", "zeros", "shuffle")


# ---------------------------------------------------------------------------------------------------------------
# the ablation: what the decoder receives
# ---------------------------------------------------------------------------------------------------------------

def ablate_maps(maps: Sequence[Tensor], mode: str, seed: int) -> List[Tensor]:
    """Transformer maps (B, D, *grid) -> zeros, or the same token permutation applied to every map."""
    if mode == "zeros":
        return [torch.zeros_like(m) for m in maps]
    if mode == "shuffle":
        num_tokens = math.prod(maps[0].shape[2:])
        order = torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed)).to(maps[0].device)
        return [m.flatten(2)[:, :, order].reshape(m.shape) for m in maps]
    raise ValueError(f"unknown ablation {mode!r}; choose one of {MODES}")


@contextmanager
def ablated_decoder(network: TokenSparseSegmenter, mode: str, seed: int = 0) -> Iterator[None]:
    """Inside the block, `network.decoder(image, maps)` receives ablated maps; mode "none" changes nothing."""
    if mode == "none":
        yield
        return

    def replace_maps(decoder: torch.nn.Module, args: tuple) -> tuple:
        image, maps = args
        return image, ablate_maps(maps, mode, seed)

    handle = network.decoder.register_forward_pre_hook(replace_maps)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def inference_keep(network: TokenSparseSegmenter, keep: float) -> Iterator[None]:
    """Inside the block every STP stage keeps `keep` of its live tokens; the network's ratios come back after."""
    stages = stp_stages(network)
    ratios = [s.keep for s in stages]
    for stage in stages:
        stage.keep = keep
    try:
        yield
    finally:
        for stage, ratio in zip(stages, ratios):
            stage.keep = ratio


def keep_mode(keep: float) -> str:
    return f"keep{keep:g}"


def check_keep_ratios(keeps: Sequence[float], network: TokenSparseSegmenter, trainer_name: str) -> None:
    if keeps and not network.config.sparse:
        raise UserError(f"--keep: trainer {trainer_name} builds a dense network (no STP stages), so there is no "
                        f"keep ratio to change; use it with a token-sparse model (e.g. STPMTATrainer).")
    bad = [k for k in keeps if not 0 < k <= 1]
    if bad:
        raise UserError(f"--keep {' '.join(map(str, bad))}: a keep ratio is the share of live tokens a stage keeps, "
                        f"in (0, 1] (1 prunes nothing).")


# ---------------------------------------------------------------------------------------------------------------
# prediction and evaluation with nnU-Net's functions
# ---------------------------------------------------------------------------------------------------------------

def check_folders(images: str, reference: str, file_ending: str) -> None:
    """Every image case needs a reference label; say which do not before predicting three times."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    if not os.path.isdir(images):
        raise UserError(f"image folder {images} does not exist (-i).")
    cases = get_identifiers_from_splitted_dataset_folder(images, file_ending)
    if not len(cases):
        raise UserError(f"no images ending in {file_ending} in {images} (-i): nothing to predict.")
    missing = [str(c) for c in cases if not os.path.isfile(os.path.join(reference, f"{c}{file_ending}"))]
    if missing:
        raise UserError(f"no reference label in {reference} (-ref) for case(s) {', '.join(missing)} "
                        f"(expected CASE{file_ending} beside the images' CASE_0000{file_ending}).")


def predict_folder(predictor, images: str, output: str, npp: int, nps: int) -> None:
    """nnU-Net's prediction of a folder; `-npp 0 -nps 0` runs it in this process, as nnScd_predict does."""
    os.makedirs(output, exist_ok=True)
    if npp == 0 and nps == 0:
        predictor.predict_from_files_sequential(images, output)
    else:
        predictor.predict_from_files(images, output, num_processes_preprocessing=npp,
                                     num_processes_segmentation_export=nps)


def evaluate_folder(reference: str, predictions: str, num_processes: int) -> dict:
    """nnU-Net's evaluation with the plans and dataset.json the predictor wrote beside the predictions
    (labels or regions, ignore label); returns its summary.json."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder2

    summary = os.path.join(predictions, "summary.json")
    compute_metrics_on_folder2(reference, predictions, os.path.join(predictions, "dataset.json"),
                               os.path.join(predictions, "plans.json"), summary, max(1, num_processes), chill=True)
    with open(summary) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------

def class_names(dataset_json: dict) -> Dict[str, str]:
    """nnU-Net's summary keys (str of a label, or of a region tuple) -> class names of dataset.json."""
    return {str(tuple(v)) if isinstance(v, list) else str(v): name for name, v in dataset_json["labels"].items()}


def dice_drops(summaries: Dict[str, dict], names: Dict[str, str]) -> Dict[str, dict]:
    """Per mode: Dice per class and the foreground mean, and their drop from the unchanged ("none") prediction."""
    dice = {mode: {**{names.get(k, k): v["Dice"] for k, v in s["mean"].items()},
                   "mean": s["foreground_mean"]["Dice"]} for mode, s in summaries.items()}
    return {mode: {"dice": d, "dice_drop": {c: dice["none"][c] - v for c, v in d.items()}} for mode, d in dice.items()}


def format_table(results: Dict[str, dict]) -> str:
    classes = list(results["none"]["dice"])
    rows = [f"{'mode':<9}" + "".join(f"{c[:12]:>13}" for c in classes) + f"{'mean drop':>11}"]
    for mode, r in results.items():
        rows.append(f"{mode:<9}" + "".join(f"{r['dice'][c]:>13.3f}" for c in classes)
                    + f"{r['dice_drop']['mean']:>11.3f}")
    return "Dice per class (mean: foreground mean)\n" + "\n".join(rows)


def attention_ablation(args: argparse.Namespace) -> Dict[str, dict]:
    predictor, network = load_model(args.m, args.f, args.chk, args.device, "nnScd_attention_ablation",
                                    use_mirroring=args.tta, primus=False)  # ablates the ViT decoder's input maps
    check_folders(args.i, args.ref, predictor.dataset_json["file_ending"])
    check_keep_ratios(args.keep, network, predictor.trainer_name)
    modes = {mode: ablated_decoder(network, mode, args.seed)  # the reference ("none") always runs, first
             for mode in ["none"] + [m for m in dict.fromkeys(args.modes) if m != "none"]}
    modes.update({keep_mode(k): inference_keep(network, k) for k in dict.fromkeys(args.keep)})
    summaries = {}
    for mode, context in tqdm(modes.items(), desc="nnScd_attention_ablation", unit="mode"):
        with context:
            predict_folder(predictor, args.i, os.path.join(args.o, mode), args.npp, args.nps)
        summaries[mode] = evaluate_folder(args.ref, os.path.join(args.o, mode), args.nps)
    results = dice_drops(summaries, class_names(predictor.dataset_json))
    write_json(os.path.join(args.o, "ablation.json"), indent=1, content={
        "model": os.path.abspath(args.m), "trainer": predictor.trainer_name, "folds": args.f, "checkpoint": args.chk,
        "sparse": network.config.sparse, "keep_ratios": [s.keep for s in stp_stages(network)],
        "tta": args.tta, "seed": args.seed, "images": os.path.abspath(args.i),
        "reference": os.path.abspath(args.ref), "modes": results})
    write_csv(os.path.join(args.o, "ablation.csv"), [{"mode": mode, "class": c, "dice": r["dice"][c],
                                                      "dice_drop": r["dice_drop"][c]}
                                                     for mode, r in results.items() for c in r["dice"]],
              ("mode", "class", "dice", "dice_drop"))
    print(format_table(results))
    return results
