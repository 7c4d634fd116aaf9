"""nnScd_token_maps: which tokens STP keeps, drawn on the image, for a trained token-sparse model.

For each case: nnU-Net's preprocessing for prediction (the configuration's preprocessor, `run_case`), nnU-Net's
padding to the patch size, then ONE sliding-window tile: the one of nnU-Net's tiles whose centre is nearest to the
image centre (the network sees exactly what it sees during prediction; the whole image when it fits one patch).
The network (first checkpoint of `-f`) runs once on it in eval mode, as at inference: hard top-K, no noise.

Writes per case `CASE_tokens.png` (one row per pruning stage, a few axial slices through the tile: kept tokens
tinted, pruned tokens dimmed, the predicted segmentation outlined) and `CASE_tokens.json` (per stage: tokens live
before it, kept count, kept positions as indices into the token grid flattened in C order).
"""
import argparse
import os
from contextlib import nullcontext
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from nnscd.core.errors import UserError
from nnscd.core.safe_io import atomic_path, write_json
from nnscd.tools.trained_models import TokenSparseNetwork, load_model, require_pruning

PLOT_COLOURS = ("tab:cyan", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:pink")


# ---------------------------------------------------------------------------------------------------------------
# one case: preprocess, pick the tile, run the network
# ---------------------------------------------------------------------------------------------------------------

def central_tile(predictor, data: np.ndarray) -> Tuple[np.ndarray, tuple]:
    """nnU-Net's padding and sliding-window tiles; the tile whose centre is nearest the image centre."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    padded = pad_nd_image(data, predictor.configuration_manager.patch_size, "constant", {"constant_values": 0})
    centre = np.array(padded.shape[1:]) / 2

    def distance(slicer: tuple) -> float:
        middle = [s.start + (s.stop - s.start) / 2 if isinstance(s, slice) else s + 0.5 for s in slicer[1:]]
        return float(np.linalg.norm(np.array(middle) - centre))

    slicer = min(predictor._internal_get_sliding_window_slicers(padded.shape[1:]), key=distance)
    return padded[slicer], slicer


@torch.inference_mode()
def run_tile(predictor, network: TokenSparseNetwork, tile: np.ndarray) -> Tuple[List[np.ndarray], np.ndarray]:
    """Kept token positions per stage and the predicted segmentation of one tile (C, *patch), as at inference."""
    x = torch.from_numpy(np.ascontiguousarray(tile))[None].float().to(predictor.device)
    cuda = predictor.device.type == "cuda"
    with torch.autocast("cuda", enabled=True) if cuda else nullcontext():  # nnU-Net's inference precision
        logits = network(x)
    segmentation = predictor.label_manager.convert_logits_to_segmentation(logits[0].float().cpu())
    return [k[0].cpu().numpy() for k in network.last_keep_indices], np.asarray(segmentation)


def stage_report(network: TokenSparseNetwork, keep_positions: Sequence[np.ndarray]) -> List[dict]:
    """Per pruning stage: where it sits, how many tokens were live before it, which were kept (highest score
    first)."""
    live = [int(np.prod(network.grid))] + [len(p) for p in keep_positions[:-1]]
    return [{"stage": s + 1, "after_block": block, "keep_ratio": ratio, "live_before": before,
             "kept": len(positions), "positions": [int(p) for p in positions]}
            for s, (block, ratio, before, positions) in enumerate(
                zip(network.config.prune_after, network.config.keep_ratios, live, keep_positions))]


# ---------------------------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------------------------

def kept_voxels(positions: Sequence[int], grid: Sequence[int], token_size: Sequence[int]) -> np.ndarray:
    """Boolean voxel mask of the patch: True inside every kept token."""
    kept = np.zeros(int(np.prod(grid)), dtype=bool)
    kept[np.asarray(positions, dtype=int)] = True
    kept = kept.reshape(grid)
    for axis, size in enumerate(token_size):
        kept = kept.repeat(size, axis=axis)
    return kept


def slice_indices(depth_tokens: int, token_depth: int, count: int) -> List[int]:
    """`count` axial voxel slices through the middle of evenly spaced token layers."""
    layers = np.unique(np.linspace(0, depth_tokens - 1, min(count, depth_tokens)).round().astype(int))
    return [int(layer * token_depth + token_depth // 2) for layer in layers]


def draw_token_maps(image: np.ndarray, segmentation: np.ndarray, stages: List[dict], grid: Sequence[int],
                    token_size: Sequence[int], path: str, title: str, num_slices: int) -> None:
    """Rows: pruning stages; columns: axial slices. Kept tokens tinted, pruned ones dimmed, prediction outlined.

    2D tiles are drawn as a 3D tile one voxel deep, so both take the same path.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if image.ndim == 2:
        image, segmentation, grid, token_size = image[None], segmentation[None], (1, *grid), (1, *token_size)
    slices = slice_indices(grid[0], token_size[0], num_slices)
    low, high = np.percentile(image, (0.5, 99.5))
    labels = [v for v in np.unique(segmentation) if v > 0]
    fig, axes = plt.subplots(len(stages), len(slices), squeeze=False,
                             figsize=(max(4.0, 2.6 * len(slices) + 0.6), 2.6 * len(stages) + 0.8))
    for row, stage in zip(axes, stages):
        kept = kept_voxels(stage["positions"], grid, token_size)
        for ax, z in zip(row, slices):
            overlay = np.zeros((*kept.shape[1:], 4))
            overlay[kept[z]] = (1.0, 0.85, 0.0, 0.25)  # kept: amber tint
            overlay[~kept[z]] = (0.0, 0.0, 0.0, 0.7)  # pruned: dimmed
            ax.imshow(image[z], cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            ax.imshow(overlay, interpolation="nearest")
            for label, colour in zip(labels, PLOT_COLOURS):
                if (segmentation[z] == label).any():
                    ax.contour(segmentation[z] == label, levels=[0.5], colors=colour, linewidths=1)
            ax.set_xticks(np.arange(0, image.shape[2] + 1, token_size[2]) - 0.5, labels=[])
            ax.set_yticks(np.arange(0, image.shape[1] + 1, token_size[1]) - 0.5, labels=[])
            ax.grid(color="white", alpha=0.25, lw=0.5)
            ax.tick_params(length=0)
            if len(slices) > 1 or grid[0] > 1:  # a 2D tile is the whole picture
                ax.set_title(f"slice {z}", fontsize=8)
        row[0].set_ylabel(f"stage {stage['stage']} (after block {stage['after_block']})\n"
                          f"{stage['kept']}/{int(np.prod(grid))} tokens kept", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(h_pad=1.5)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------

def case_files(inputs: Sequence[str], file_ending: str, cases: Optional[Sequence[str]]) -> List[Tuple[str, List[str]]]:
    """(case id, channel files) per case: `-i` is one case's channel files, or a folder of cases (nnU-Net's
    CASE_XXXX naming), optionally restricted to `--cases`."""
    from nnunetv2.utilities.utils import (create_lists_from_splitted_dataset_folder,
                                          get_identifiers_from_splitted_dataset_folder)

    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        ids = [str(c) for c in cases or get_identifiers_from_splitted_dataset_folder(inputs[0], file_ending)]
        lists = create_lists_from_splitted_dataset_folder(inputs[0], file_ending, ids, num_processes=1)
        missing = [c for c, files in zip(ids, lists) if not files]
        if not ids or missing:
            raise UserError(f"no images ending in {file_ending} in {inputs[0]}"
                            f"{' for case(s) ' + ', '.join(missing) if missing else ''} (-i, --cases).")
        return list(zip(ids, lists))
    for path in inputs:
        if not (os.path.isfile(path) and path.endswith(file_ending)):
            raise UserError(f"{path} is neither an image file ending in {file_ending} nor a folder. -i takes one "
                            f"case's channel files (CASE_0000{file_ending}, CASE_0001{file_ending}, ...) or one folder "
                            f"of cases.")
    files = sorted(inputs)
    return [(os.path.basename(files[0])[:-len(file_ending) - 5], files)]


def token_maps(args: argparse.Namespace) -> None:
    predictor, network = load_model(args.m, [args.f], args.chk, args.device, "nnScd_token_maps")
    require_pruning(network, predictor.trainer_name)
    network.to(predictor.device).eval()
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    os.makedirs(args.o, exist_ok=True)
    cases = case_files(args.i, predictor.dataset_json["file_ending"], args.cases)
    for case, files in tqdm(cases, desc="nnScd_token_maps", unit="case"):
        data, _, _ = preprocessor.run_case(files, None, predictor.plans_manager, predictor.configuration_manager,
                                           predictor.dataset_json)
        tile, slicer = central_tile(predictor, data)
        keep_positions, segmentation = run_tile(predictor, network, tile)
        stages = stage_report(network, keep_positions)
        write_json(os.path.join(args.o, f"{case}_tokens.json"), indent=1, content={
            "case": case, "image_files": [os.path.abspath(f) for f in files], "model": os.path.abspath(args.m),
            "trainer": predictor.trainer_name, "fold": args.f, "checkpoint": args.chk,
            "preprocessed_shape": list(data.shape[1:]),
            "tile_start": [s if isinstance(s, int) else s.start for s in slicer[1:]],
            "tile_size": [s.stop - s.start for s in slicer[1:] if isinstance(s, slice)],
            "token_size": list(network.token_size), "grid": list(network.grid),
            "num_tokens": int(np.prod(network.grid)), "stages": stages})
        draw_token_maps(tile[0], segmentation, stages, network.grid, network.token_size,
                        os.path.join(args.o, f"{case}_tokens.png"),
                        f"{case}: tokens kept by STP ({predictor.trainer_name}, fold {args.f})\nkept: tinted, pruned: "
                        f"dimmed, prediction: outlined", args.slices)
