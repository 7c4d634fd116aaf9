"""nnScd_attention_ablation -m MODEL -i IMAGES -ref LABELS -o OUT: how much the decoder's attention maps matter
(nnscd/tools/attention_ablation.py)."""
import argparse
from typing import Optional, Sequence

from nnscd.cli import console_script
from nnscd.core.device import prepare_run
from nnscd.tools.attention_ablation import MODES as ABLATIONS, attention_ablation


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nnScd_attention_ablation", description=__doc__.split("\n")[0])
    parser.add_argument("-m", required=True, help="trained model folder TRAINER__PLANS__CONFIGURATION")
    parser.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds to ensemble (default 0-4)")
    parser.add_argument("-i", required=True, help="folder of images (CASE_0000.nii.gz, ...)")
    parser.add_argument("-ref", required=True, help="folder of reference labels (CASE.nii.gz)")
    parser.add_argument("-o", required=True, help="output folder")
    parser.add_argument("--modes", nargs="+", choices=ABLATIONS, default=list(ABLATIONS),
                        help="ablations (default all); the unchanged prediction always runs as the reference")
    parser.add_argument("--keep", nargs="+", type=float, default=[], metavar="K",
                        help="sparse networks: also predict with every STP stage keeping K of its live tokens "
                             "(1: no pruning), to see what pruning at inference costs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token permutation (default 0)")
    parser.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (off for speed)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    parser.add_argument("-device", default="cuda", choices=("cpu", "cuda"), help="default cuda, as nnU-Net")
    parser.add_argument("-npp", type=int, default=3, help="preprocessing processes (default 3; 0 with -nps 0: "
                                                          "everything in this process)")
    parser.add_argument("-nps", type=int, default=3, help="export and evaluation processes (default 3)")
    return parser.parse_args(argv)


@console_script
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    prepare_run(args.device)  # settles nnU-Net's environment before its first import
    attention_ablation(args)
