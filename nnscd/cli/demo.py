"""nnScd_demo: the whole nnU-Net workflow with nnscd's commands on a synthetic dataset (nnscd/tools/demo.py)."""
import argparse

from nnscd.cli import console_script
from nnscd.tools.demo import DEMO_TRAINER, run_demo


@console_script
def main() -> None:
    import nnscd.tools.demo

    parser = argparse.ArgumentParser(prog="nnScd_demo", description=nnscd.tools.demo.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-id", type=int, default=990, help="nnU-Net dataset id to write (default 990)")
    parser.add_argument("-tr", default=DEMO_TRAINER, help=f"trainer to train (default {DEMO_TRAINER})")
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    if not run_demo(parser.parse_args()):
        raise SystemExit(1)  # the model did not learn (run_demo said why)
