"""A fold's training curve as CSV, from the logging nnU-Net keeps in its checkpoint: per epoch the learning rate,
train and validation loss, pseudo Dice per class (nnU-Net's validation iterations, not the final validation) and
epoch time. The plot beside it is nnU-Net's own progress.png of the fold, copied.

    python documentation/results/training_curve.py $nnUNet_results/Dataset004_Hippocampus/TRAINER__nnUNetPlans__3d_fullres/fold_0 \
        --out documentation/results/TRAINER_curve_fold0_cpu
"""
import argparse
import shutil
from pathlib import Path

import torch

from nnscd.core.safe_io import write_csv


def curve(fold: Path) -> list[dict]:
    checkpoint = next(fold / name for name in ("checkpoint_final.pth", "checkpoint_latest.pth")
                      if (fold / name).is_file())
    log = torch.load(checkpoint, map_location="cpu", weights_only=False)["logging"]
    rows = []
    for epoch, end in enumerate(log["epoch_end_timestamps"]):
        row = {"epoch": epoch, "lr": round(log["lrs"][epoch], 8), "train_loss": round(log["train_losses"][epoch], 4),
               "val_loss": round(log["val_losses"][epoch], 4), "ema_pseudo_dice": round(log["ema_fg_dice"][epoch], 4),
               "epoch_s": round(end - log["epoch_start_timestamps"][epoch], 1)}
        row.update({f"pseudo_dice_{c + 1}": round(d, 4) for c, d in enumerate(log["dice_per_class_or_region"][epoch])})
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fold", type=Path, help="the fold folder (checkpoint_final.pth, else checkpoint_latest.pth)")
    parser.add_argument("--out", type=Path, required=True, help="path without suffix: writes OUT.csv and OUT.png")
    args = parser.parse_args()
    rows = curve(args.fold)
    write_csv(str(args.out.with_suffix(".csv")), rows, list(rows[0]))
    shutil.copyfile(args.fold / "progress.png", args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
