"""nnScd_benchmark: `networks` side by side on one input, `dataset` trainers as training builds them, `predict`
nnunetv2's predictor against nnscd's on a folder of cases.

The mode is the first argument. Without one the older spellings still work: `-d ...` is `dataset`, `--predict ...`
is `predict`, anything else `networks`.
"""
import argparse
import os
import sys
from typing import Optional, Sequence

import torch

from nnscd.cli import check_environment, console_script

MODES = ("networks", "dataset", "predict")


def _common(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=10, help="timed repeats (the median is reported)"
                        + ("; per case" if what == "predict" else ""))
    parser.add_argument("--json", help="write the results as JSON")
    parser.add_argument("--csv", help="write the results as CSV")
    if what != "predict":
        parser.add_argument("--warmup", type=int, default=3, help="untimed repeats first")
        parser.add_argument("--plot", help="write a PNG with throughput and FLOPs per " + what)


def _dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans", help="plans name (nnscd's token trainers: nnScdPlans)")
    parser.add_argument("-f", type=int, default=0, help="fold (its split feeds the loaders; predict: its model)")


def build_parser() -> argparse.ArgumentParser:
    from nnscd.networks.registry import NETWORKS

    parser = argparse.ArgumentParser(prog="nnScd_benchmark", description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    networks = modes.add_parser("networks", help="networks side by side on one input, in one process, in turns")
    networks.add_argument("--patch", type=int, nargs="+", required=True, help="patch size, 2 or 3 ints")
    networks.add_argument("--channels", type=int, default=1, help="input channels")
    networks.add_argument("--classes", type=int, default=2, help="output classes (with background)")
    networks.add_argument("--batch", type=int, default=2)
    networks.add_argument("--net", nargs="+", required=True, metavar="NAME",
                          help=f"networks: {', '.join(sorted(NETWORKS))}")
    networks.add_argument("--amp", action="store_true", help="fp16 autocast + GradScaler, as nnU-Net on CUDA")
    _common(networks, "network")
    dataset = modes.add_parser("dataset", help="trainers on a dataset: steps with and without data loading")
    _dataset_arguments(dataset)
    dataset.add_argument("-tr", nargs="+", required=True, help="trainer(s)")
    _common(dataset, "trainer")
    predict = modes.add_parser("predict", help="nnunetv2's and nnscd's predictors on a folder of images")
    _dataset_arguments(predict)
    predict.add_argument("-tr", required=True, help="trainer of the model")
    predict.add_argument("-i", required=True, help="folder of images (CASE_0000.nii.gz, ...)")
    predict.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")
    predict.add_argument("--disable_tta", action="store_true", help="no mirroring")
    predict.add_argument("--onnx", metavar="EXPORT", help="also onnxruntime on this nnScd_export_onnx folder of the "
                                                           "same model (CPU)")
    _common(predict, "predict")
    predict.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)  # accepted, as before: unused
    predict.add_argument("--plot", help=argparse.SUPPRESS)  # accepted, as before: predict mode draws none
    return parser


def with_mode(argv: Sequence[str]) -> list:
    """argv with the mode first; the older spellings (no mode word) get theirs from their flags."""
    argv = list(argv)
    if argv and argv[0] in MODES or not argv or argv[0] in ("-h", "--help"):
        return argv
    if "--predict" in argv:
        return ["predict", *[a for a in argv if a != "--predict"]]
    return ["dataset" if "-d" in argv else "networks", *argv]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(with_mode(argv))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    if args.iters < 1 or getattr(args, "warmup", 0) < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if args.mode == "networks":
        from nnscd.networks.registry import NETWORKS

        unknown = [n for n in args.net if n not in NETWORKS]
        if unknown:
            parser.error(f"unknown network(s) {unknown}; known: {', '.join(sorted(NETWORKS))}")
        if len(args.patch) not in (2, 3):
            parser.error(f"--patch takes 2 or 3 sizes, got {args.patch}")
        if args.amp and args.device != "cuda":
            parser.error("--amp is for --device cuda (fp16 autocast is how nnU-Net trains there)")
    if args.mode == "predict" and not os.path.isdir(args.i):
        parser.error(f"-i {args.i} is not a folder")
    if args.mode == "predict" and args.onnx and args.device != "cpu":
        parser.error("--onnx runs onnxruntime on the CPU: add --device cpu")
    return args


def _networks(args: argparse.Namespace) -> None:
    from nnscd.core.device import device_description
    from nnscd.core.safe_io import write_csv, write_json
    from nnscd.tools.benchmark_networks import RESULT_KEYS, format_table, run_benchmark, write_plot

    results = run_benchmark(args)
    report = {"device": device_description(args.device), "torch": torch.__version__, "patch_size": args.patch,
              "batch_size": args.batch, "results": results}
    print(format_table(results))
    if args.json:
        write_json(args.json, report)
    if args.csv:
        write_csv(args.csv, results, RESULT_KEYS)
    if args.plot:
        write_plot(args.plot, report)


def _on_dataset(args: argparse.Namespace) -> None:
    from nnscd.checks.trainer_names import find_trainer
    from nnscd.core.paths import settle_environment
    from nnscd.core.safe_io import write_csv, write_json
    from nnscd.tools.benchmark_networks import RESULT_KEYS, write_plot

    settle_environment(cpu=args.device == "cpu")
    for name in [args.tr] if args.mode == "predict" else args.tr:
        find_trainer(name)
    if args.mode == "predict":
        from nnscd.tools.benchmark_predictors import run_predict_mode, write_predict_csv
        check_environment()
        report = run_predict_mode(args)
        if args.csv:
            write_predict_csv(args.csv, report["cases"])
    else:
        from nnscd.tools.benchmark_trainers import PIPELINE_KEYS, run_dataset_mode
        report = run_dataset_mode(args)
        if args.csv:
            write_csv(args.csv, report["results"], (*RESULT_KEYS, *PIPELINE_KEYS))
        if args.plot:
            write_plot(args.plot, report)
    if args.json:
        write_json(args.json, report)


@console_script
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    (_networks if args.mode == "networks" else _on_dataset)(args)
