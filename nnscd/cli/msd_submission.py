"""nnScd_msd_submission -i MSD_TASK=PREDICTIONS ... -o submission.zip (nnscd/tools/msd_submission.py)."""
import argparse
import os

from nnscd.cli import console_script
from nnscd.core.errors import UserError
from nnscd.tools.msd_submission import MSD_TASKS, write_submission


@console_script
def main() -> None:
    parser = argparse.ArgumentParser(
        description="Write the Medical Segmentation Decathlon submission zip from nnU-Net predictions, after checking "
                    "that every test case is predicted, in the test image's geometry, with the task's labels.")
    parser.add_argument("-i", nargs="+", required=True, metavar="MSD_TASK_FOLDER=PREDICTION_FOLDER",
                        help="one pair per task: the extracted MSD task (its imagesTs and dataset.json) and the "
                             "folder of its test predictions, e.g. /data/Task04_Hippocampus=/preds/hippocampus")
    parser.add_argument("-o", required=True, help="submission zip to write, e.g. submission.zip")
    args = parser.parse_args()
    pairs = [pair.split("=", 1) for pair in args.i]
    if any(len(pair) != 2 for pair in pairs):
        raise UserError(f"-i takes MSD_TASK_FOLDER=PREDICTION_FOLDER pairs; got {' '.join(args.i)}.")
    problems = write_submission([(os.path.abspath(t), os.path.abspath(p)) for t, p in pairs], args.o)
    if problems:
        raise UserError(f"{len(problems)} problem(s), no zip written:\n" + "\n".join(f"  - {p}" for p in problems))
    names = {os.path.basename(t.rstrip("/\\")) for t, _ in pairs}
    print(f"Wrote {args.o}: {len(names)} task(s).")
    if names != set(MSD_TASKS):
        print(f"Note: the Decathlon scores all ten tasks; not in this zip: {', '.join(sorted(set(MSD_TASKS) - names))}.")
