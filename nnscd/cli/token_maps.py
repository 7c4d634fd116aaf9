"""nnScd_token_maps -m MODEL -f FOLD -i CASE_FILES_OR_FOLDER -o OUT: which tokens STP keeps, drawn on the image
(nnscd/tools/token_maps.py)."""
import argparse
from typing import Optional, Sequence

from nnscd.cli import console_script
from nnscd.core.device import prepare_run


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nnScd_token_maps", description=__doc__.split("\n")[0])
    parser.add_argument("-m", required=True, help="trained model folder TRAINER__PLANS__CONFIGURATION")
    parser.add_argument("-f", required=True, help="fold whose checkpoint to use (0-4 or all)")
    parser.add_argument("-i", nargs="+", required=True,
                        help="one case's channel files (CASE_0000.nii.gz ...), or a folder of cases")
    parser.add_argument("-o", required=True, help="output folder for CASE_tokens.png and CASE_tokens.json")
    parser.add_argument("--cases", nargs="+", help="with a folder as -i: only these case ids")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    parser.add_argument("-device", default="cuda", choices=("cpu", "cuda"), help="default cuda, as nnU-Net")
    parser.add_argument("--slices", type=int, default=4, help="axial slices per stage, 3D only (default 4)")
    args = parser.parse_args(argv)
    if args.slices < 1:
        parser.error("--slices must be at least 1")
    return args


@console_script
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    prepare_run(args.device)  # settles nnU-Net's environment before its first import
    from nnscd.tools.token_maps import token_maps
    token_maps(args)
