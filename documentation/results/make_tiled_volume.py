"""A paper-size multi-tile case from a small one: tile a Hippocampus image (MSD Task04, 1 mm spacing) to 160^3.

    python documentation/results/make_tiled_volume.py IMAGE.nii.gz OUT_FOLDER [--size 160]

writes OUT_FOLDER/tiled_000_0000.nii.gz (nnU-Net's naming, one channel) for `nnScd_benchmark --predict -i OUT_FOLDER`:
with Hippocampus' 40 x 56 x 40 patch and nnU-Net's half-patch step that is 7 x 5 x 7 = 245 sliding-window tiles.
"""
import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=160)
    args = parser.parse_args()
    source = sitk.ReadImage(str(args.image))
    array = sitk.GetArrayFromImage(source).astype(np.float32)
    reps = [-(-args.size // s) for s in array.shape]  # ceil: enough copies per axis
    tiled = np.tile(array, reps)[:args.size, :args.size, :args.size]
    image = sitk.GetImageFromArray(tiled)
    image.SetSpacing(source.GetSpacing())
    args.out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(args.out / "tiled_000_0000.nii.gz"))


if __name__ == "__main__":
    main()
