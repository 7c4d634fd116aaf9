"""nnScd_export_onnx -d DATASET -c CONFIG -tr TRAINER -p PLANS [-f FOLD ...] [-o FOLDER]: a trained model's folds as
ONNX models for onnxruntime, checked against torch (nnscd/tools/onnx_export.py); predict with
nnScd_predict_from_modelfolder -m FOLDER -device cpu."""
import argparse
import os
from typing import Optional, Sequence

from nnscd.cli import console_script
from nnscd.core.device import prepare_run
from nnscd.core.errors import UserError
from nnscd.tools.onnx_export import QUANTIZATIONS, export_model_folder


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nnScd_export_onnx", description=__doc__.split("\n")[0])
    parser.add_argument("-d", required=True, help="dataset name or id, as for nnScd_train")
    parser.add_argument("-c", required=True, help="configuration (3d_fullres, 2d, ...)")
    parser.add_argument("-tr", default="nnUNetTrainer", help="trainer (default nnUNetTrainer)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-f", nargs="+", help="folds to export (default: every fold with the checkpoint)")
    parser.add_argument("-o", help="output folder (default: onnx in the trained model folder); an export there is "
                                   "replaced once the new one is complete")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                        help="int8: onnxruntime's dynamic int8 quantisation of the linear layers' weights (smaller, "
                             "faster on some CPUs, labels may differ; see documentation/deployment.md)")
    return parser.parse_args(argv)


@console_script
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    prepare_run("cpu")  # settles nnU-Net's environment before its first import
    from nnscd.checks.input_checks import trained_folds
    from nnscd.cli.nnunet_commands import trained_model_folder
    from nnscd.core.safe_io import disk_errors_explained

    model_folder = trained_model_folder(args.d, args.tr, args.p, args.c)
    folds = args.f or trained_folds(model_folder, args.chk)
    if not folds:
        raise UserError(f"no fold of {model_folder} has {args.chk}: train one first (nnScd_train {args.d} {args.c} "
                        f"FOLD -tr {args.tr} -p {args.p}), or name the checkpoint with -chk.")
    output_folder = args.o or os.path.join(model_folder, "onnx")
    with disk_errors_explained(os.path.dirname(os.path.abspath(output_folder))):
        export = export_model_folder(model_folder, folds, output_folder, args.chk, args.quantize)
    print(f"exported fold(s) {', '.join(export.folds)} of {args.tr} to {output_folder}. Predict with:\n"
          f"  nnScd_predict_from_modelfolder -i INPUT -o OUTPUT -m {output_folder} -f {' '.join(export.folds)} "
          f"-device cpu")
