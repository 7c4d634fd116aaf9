"""Medical Segmentation Decathlon (all ten tasks) -> nnU-Net raw format.

nnunetv2's `convert_MSD_dataset` is right about the layout: it splits 4D multi-modal images into one file per
channel (`split_4d_nifti`, reused here), skips macOS `._*` files and turns `modality` into `channel_names`.
What it gets wrong, fixed here:
- labels are copied as stored, so Hippocampus' float32 label files stay float32: written as integers here;
- it writes straight into nnUNet_raw, so a killed run leaves a half dataset whose id blocks the rerun: staged
  here and renamed into place when complete;
- `numTraining` is copied from the release's dataset.json instead of counted from the converted cases;
- a wrong folder gives a bare assertion or unpacking error: here it names the expected layout.
Mixed image dtypes (Hippocampus: float32 and uint8) need no fix: images are copied unchanged and nnU-Net reads
every image as float32.
"""
import argparse
import os
import re
from typing import Optional

from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.dataset_conversion.convert_MSD_dataset import split_4d_nifti

from dataset_conversion.common import (free_raw_dataset_folder, listed, require_folder, run_jobs, staged_dataset,
                                       write_integer_label)
from nnscd.core.errors import UserError

MSD_LAYOUT = ("TaskXX_Name/{dataset.json, imagesTr/NAME.nii.gz, labelsTr/NAME.nii.gz, imagesTs/NAME.nii.gz}, "
              "the extracted Decathlon tar (e.g. Task04_Hippocampus).")


def split_image(source: str, target_folder: str) -> None:
    """nnunetv2's split (3D: copied as CASE_0000; 4D: one CASE_XXXX per channel), with a readable error."""
    try:
        split_4d_nifti(source, target_folder)
    except RuntimeError as e:
        raise ValueError(f"cannot convert image {source}: {str(e).strip().splitlines()[-1]}. "
                         f"Re-extract the task's tar file.")


def convert_msd_dataset(source_folder: str, overwrite_target_id: Optional[int] = None,
                        num_processes: int = 1) -> str:
    """Convert one MSD task folder; returns the new $nnUNet_raw/DatasetXXX_Name folder."""
    source_folder = os.path.abspath(source_folder.rstrip("/\\"))
    match = re.fullmatch(r"Task(\d+)_([A-Za-z0-9]+)", os.path.basename(source_folder))
    if match is None:
        raise UserError(f"{source_folder}: the folder name must be the task's, TaskXX_Name (e.g. "
                        f"Task04_Hippocampus); nnU-Net takes the dataset id and name from it. Expected layout: "
                        f"{MSD_LAYOUT}")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        require_folder(os.path.join(source_folder, sub), MSD_LAYOUT)
    if not os.path.isfile(os.path.join(source_folder, "dataset.json")):
        raise UserError(f"{source_folder}/dataset.json is missing. Expected layout: {MSD_LAYOUT}")
    source_json = load_json(os.path.join(source_folder, "dataset.json"))
    if "modality" not in source_json or "labels" not in source_json:
        raise UserError(f"{source_folder}/dataset.json has no 'modality' or 'labels': it is not an MSD dataset.json "
                        f"(an nnU-Net v1 or v2 dataset needs no conversion).")

    images = listed(os.path.join(source_folder, "imagesTr"), ".nii.gz")
    labels = listed(os.path.join(source_folder, "labelsTr"), ".nii.gz")
    tests = listed(os.path.join(source_folder, "imagesTs"), ".nii.gz")
    if not images:
        raise UserError(f"{source_folder}/imagesTr holds no .nii.gz images. Expected layout: {MSD_LAYOUT}")
    unpaired = sorted(set(images) ^ set(labels))
    if unpaired:
        raise UserError(f"imagesTr and labelsTr of {source_folder} must hold the same file names; unpaired: "
                        f"{', '.join(unpaired)}. Re-extract the task or remove the stray files.")

    dataset_id = int(match.group(1)) if overwrite_target_id is None else overwrite_target_id
    final = free_raw_dataset_folder(dataset_id, match.group(2))
    with staged_dataset(final) as target:
        os.makedirs(os.path.join(target, "imagesTs"))
        jobs = [(split_image, os.path.join(source_folder, "imagesTr", f), os.path.join(target, "imagesTr"))
                for f in images]
        jobs += [(split_image, os.path.join(source_folder, "imagesTs", f), os.path.join(target, "imagesTs"))
                 for f in tests]
        jobs += [(write_integer_label, os.path.join(source_folder, "labelsTr", f), os.path.join(target, "labelsTr", f))
                 for f in labels]
        run_jobs(jobs, num_processes, match.group(0))

        dataset_json = {k: v for k, v in source_json.items() if k not in ("modality", "training", "test")}
        dataset_json["channel_names"] = source_json["modality"]
        dataset_json["labels"] = {name: int(value) for value, name in source_json["labels"].items()}
        dataset_json["numTraining"] = len(images)
        dataset_json["file_ending"] = ".nii.gz"
        save_json(dataset_json, os.path.join(target, "dataset.json"), sort_keys=False)
    return final


def main() -> None:
    from nnscd.core.paths import settle_environment

    settle_environment()
    from nnunetv2.configuration import default_num_processes

    parser = argparse.ArgumentParser(description="Convert a Medical Segmentation Decathlon task to nnU-Net raw format "
                                                 "($nnUNet_raw/DatasetXXX_Name); nnUNetv2_convert_MSD_dataset's flags.")
    parser.add_argument("-i", type=str, required=True, help="extracted MSD task folder, e.g. /data/Task04_Hippocampus")
    parser.add_argument("-overwrite_id", type=int, default=None,
                        help="dataset id to use instead of the task's number (XX of TaskXX_Name)")
    parser.add_argument("-np", type=int, default=default_num_processes,
                        help=f"number of processes (default {default_num_processes})")
    args = parser.parse_args()
    convert_msd_dataset(args.i, args.overwrite_id, args.np)

