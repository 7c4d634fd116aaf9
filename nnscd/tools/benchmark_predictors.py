"""`nnScd_benchmark predict -i IMAGES -d DATASET -c CONFIG -tr TRAINER -f FOLD [--onnx EXPORT]`: nnunetv2's
predictor against nnscd's (and against onnxruntime running an export of the same model).

Every case is preprocessed once, then predicted by nnunetv2's `nnUNetPredictor`, by `nnScdPredictor` and, with
--onnx, by `nnScdOnnxPredictor`, in turns (sliding window, mirroring as `nnScd_predict` does, `--disable_tta` to
turn it off); per case the seconds of each, the speed-ups over nnU-Net, and how far each segmentation agrees with
nnU-Net's (identical voxels, Dice per class).
"""
import argparse
import os
import statistics
import time
from typing import Dict, List, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nnscd.core.device import device_description, synchronize
from nnscd.core.errors import UserError
from nnscd.core.safe_io import write_csv

CSV_FIELDS = ("case", "tiles", "nnunet_s", "nnscd_s", "speedup", "identical_fraction", "min_dice")
ONNX_CSV_FIELDS = ("onnx_s", "onnx_speedup", "onnx_identical_fraction", "onnx_min_dice")


def load_predictors(args: argparse.Namespace) -> Dict[str, object]:
    """name -> predictor of the same fold: nnunet, nnscd, and onnx with --onnx."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from nnscd.core.predictor import nnScdOnnxPredictor, nnScdPredictor

    model = get_output_folder(args.d, args.tr, args.p, args.c)
    sources = {"nnunet": (nnUNetPredictor, model), "nnscd": (nnScdPredictor, model)}
    if args.onnx:
        sources["onnx"] = (nnScdOnnxPredictor, args.onnx)
    predictors = {}
    for name, (cls, folder) in sources.items():
        predictor = cls(use_mirroring=not args.disable_tta, device=torch.device(args.device),
                        perform_everything_on_device=args.device == "cuda", allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(folder, (args.f,), args.chk)
        predictors[name] = predictor
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
    from nnscd.core.predictor import batch_factor_from_environment, cpu_bf16_requested

    predictors = load_predictors(args)
    ours = predictors["nnscd"]
    device = torch.device(args.device)
    cases = create_lists_from_splitted_dataset_folder(args.i, ours.dataset_json["file_ending"])
    if not cases:
        raise UserError(f"no images ending in {ours.dataset_json['file_ending']} in {args.i} (-i)")
    preprocessor = ours.configuration_manager.preprocessor_class(verbose=False)
    labels = [int(v) for v in ours.label_manager.all_labels if v > 0]
    names, rows = list(predictors), []
    for files in tqdm(cases, desc="cases", unit="case"):
        data, _, _ = preprocessor.run_case(files, None, ours.plans_manager, ours.configuration_manager,
                                           ours.dataset_json)
        data = torch.from_numpy(data).float()
        if not rows:  # untimed, up to 2 tiles per axis: first-call set-up, nnscd's batch timing
            corner = data[(slice(None), *(slice(0, int(1.5 * p)) for p in ours.configuration_manager.patch_size))]
            for predictor in predictors.values():
                predictor.predict_sliding_window_return_logits(corner)
        seconds: Dict[str, List[float]] = {name: [] for name in names}
        logits = {}
        for repeat in range(args.iters):  # in turns, each starting in its turn, so all see the same load on average
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                synchronize(device)
                start = time.perf_counter()
                logits[name] = predictors[name].predict_sliding_window_return_logits(data)
                synchronize(device)
                seconds[name].append(time.perf_counter() - start)
        segmentation = {n: np.asarray(ours.label_manager.convert_logits_to_segmentation(l.float().cpu()))
                        for n, l in logits.items()}
        padded = pad_nd_image(data, ours.configuration_manager.patch_size, "constant", {"value": 0})
        median = {name: statistics.median(seconds[name]) for name in names}
        row = {"case": os.path.basename(files[0]), "shape": list(data.shape[1:]),
               "tiles": len(ours._internal_get_sliding_window_slicers(padded.shape[1:])),
               "nnunet_s": median["nnunet"], "nnscd_s": median["nnscd"], "speedup": median["nnunet"] / median["nnscd"],
               **agreement(segmentation["nnscd"], segmentation["nnunet"], labels)}
        if "onnx" in predictors:
            onnx = agreement(segmentation["onnx"], segmentation["nnunet"], labels)
            row.update(onnx_s=median["onnx"], onnx_speedup=median["nnunet"] / median["onnx"],
                       onnx_identical_fraction=onnx["identical_fraction"], onnx_dice=onnx["dice"])
        rows.append(row)
    print(f"{'case':<28}{'shape':>16}{'tiles':>6}" + "".join(f"{n + ' s':>10}" for n in names) +
          f"{'speed-up':>9}{'identical':>10}")
    for r in rows:
        print(f"{r['case']:<28}{'x'.join(map(str, r['shape'])):>16}{r['tiles']:>6}" +
              "".join(f"{r[n + '_s']:>10.3f}" for n in names) + f"{r['speedup']:>9.2f}{r['identical_fraction']:>10.5f}")
    summary = {"median_speedup": statistics.median(r["speedup"] for r in rows),
               "min_dice_between_predictors": min(min(r["dice"].values()) for r in rows)}
    print(f"nnscd: median speed-up {summary['median_speedup']:.2f}x over {len(rows)} cases; lowest Dice against "
          f"nnU-Net's labels: {summary['min_dice_between_predictors']:.5f}")
    if "onnx" in predictors:
        summary.update(onnx_median_speedup=statistics.median(r["onnx_speedup"] for r in rows),
                       onnx_min_dice=min(min(r["onnx_dice"].values()) for r in rows), onnx_export=args.onnx)
        print(f"onnxruntime: median speed-up {summary['onnx_median_speedup']:.2f}x; lowest Dice against nnU-Net's "
              f"labels: {summary['onnx_min_dice']:.5f}")
    return {"device": device_description(args.device), "torch": torch.__version__, "dataset": args.d,
            "configuration": args.c, "plans": args.p, "trainer": args.tr, "fold": args.f,
            "mirroring": not args.disable_tta, "nnscd_cpu_bf16": device.type == "cpu" and cpu_bf16_requested(),
            "forward_batch": ours.forward_batch,
            "forward_batch_from": "timing" if batch_factor_from_environment() is None else "nnScd_predict_batch_factor",
            "repeats": args.iters, **summary, "cases": rows}


def write_predict_csv(path: str, rows: Sequence[dict]) -> None:
    onnx = "onnx_s" in rows[0]
    write_csv(path, [{**r, "min_dice": min(r["dice"].values()),
                      **({"onnx_min_dice": min(r["onnx_dice"].values())} if onnx else {})} for r in rows],
              CSV_FIELDS + (ONNX_CSV_FIELDS if onnx else ()))
