"""BTCV / Synapse multi-organ CT (MICCAI 2015 Beyond the Cranial Vault, "Abdomen" RawData) -> nnU-Net raw format.

The same 30 labelled and 20 unlabelled scans serve BTCV (13 organs) and TransUNet's "Synapse" benchmark (8 of
the 13 organs, 18/12 split of the 30). Images are copied unchanged as imgXXXX_0000.nii.gz, labelXXXX.nii.gz
becomes labelsTr/imgXXXX.nii.gz (integer labels), Testing/img goes to imagesTs.
"""
import argparse
import os
import shutil

from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from dataset_conversion.common import (free_raw_dataset_folder, listed, require_folder, run_jobs, staged_dataset,
                                       write_integer_label)
from nnscd.core.errors import UserError

BTCV_LAYOUT = ("Abdomen/RawData/{Training/img/imgXXXX.nii.gz, Training/label/labelXXXX.nii.gz, "
               "Testing/img/imgXXXX.nii.gz} (RawData.zip from synapse.org syn3193805; -i may point at the folder "
               "holding Abdomen/, at Abdomen/ or at RawData/).")
BTCV_LABELS = {"background": 0, "spleen": 1, "right kidney": 2, "left kidney": 3, "gallbladder": 4, "esophagus": 5,
               "liver": 6, "stomach": 7, "aorta": 8, "inferior vena cava": 9, "portal vein and splenic vein": 10,
               "pancreas": 11, "right adrenal gland": 12, "left adrenal gland": 13}


def find_raw_data(folder: str) -> str:
    for candidate in (os.path.join(folder, "Abdomen", "RawData"), os.path.join(folder, "RawData"), folder):
        if os.path.isdir(os.path.join(candidate, "Training", "img")):
            return candidate
    raise UserError(f"no Training/img folder in {folder}. Expected layout: {BTCV_LAYOUT}")


def convert_btcv(source_folder: str, dataset_id: int = 17, num_processes: int = 1) -> str:
    """Convert the BTCV RawData folder; returns the new $nnUNet_raw/DatasetXXX_BTCV folder."""
    raw = find_raw_data(os.path.abspath(source_folder))
    require_folder(os.path.join(raw, "Training", "label"), BTCV_LAYOUT)
    images = listed(os.path.join(raw, "Training", "img"), ".nii.gz")
    labels = listed(os.path.join(raw, "Training", "label"), ".nii.gz")
    unpaired = sorted(set(images) ^ {f.replace("label", "img", 1) for f in labels})
    if not images or unpaired:
        raise UserError(f"Training/img/imgXXXX.nii.gz and Training/label/labelXXXX.nii.gz in {raw} must pair up; "
                        f"unpaired: {', '.join(unpaired) or 'no images at all'}. Expected layout: {BTCV_LAYOUT}")
    test_folder = os.path.join(raw, "Testing", "img")
    tests = listed(test_folder, ".nii.gz") if os.path.isdir(test_folder) else []

    final = free_raw_dataset_folder(dataset_id, "BTCV")
    with staged_dataset(final) as target:
        os.makedirs(os.path.join(target, "imagesTs"))
        jobs = [(shutil.copyfile, os.path.join(raw, "Training", "img", f),
                 os.path.join(target, "imagesTr", f.replace(".nii.gz", "_0000.nii.gz"))) for f in images]
        jobs += [(write_integer_label, os.path.join(raw, "Training", "label", f.replace("img", "label", 1)),
                  os.path.join(target, "labelsTr", f)) for f in images]
        jobs += [(shutil.copyfile, os.path.join(test_folder, f),
                  os.path.join(target, "imagesTs", f.replace(".nii.gz", "_0000.nii.gz"))) for f in tests]
        run_jobs(jobs, num_processes, "BTCV")
        generate_dataset_json(target, {0: "CT"}, BTCV_LABELS, len(images), ".nii.gz", dataset_name="BTCV",
                              reference="https://www.synapse.org/#!Synapse:syn3193805",
                              description="Multi-atlas labeling beyond the cranial vault: 13 abdominal organs, CT",
                              license="see synapse.org syn3193805", converted_by="nnscd dataset_conversion.btcv")
    return final


def main() -> None:
    from nnscd.core.paths import settle_environment

    settle_environment()
    parser = argparse.ArgumentParser(description="Convert BTCV / Synapse (Abdomen RawData) to nnU-Net raw format "
                                                 "($nnUNet_raw/DatasetXXX_BTCV), 13 organs.")
    parser.add_argument("-i", type=str, required=True, help="folder holding Abdomen/RawData (or Abdomen/, RawData/)")
    parser.add_argument("-d", type=int, default=17, help="dataset id (default 17, nnU-Net v1's Task017 BTCV)")
    parser.add_argument("-np", type=int, default=4, help="number of processes (default 4)")
    args = parser.parse_args()
    convert_btcv(args.i, args.d, args.np)

