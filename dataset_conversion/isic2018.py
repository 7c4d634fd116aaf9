"""ISIC 2018 Task 1 lesion segmentation (dermoscopy, 2D RGB; APFormer's dataset) -> nnU-Net raw format.

nnU-Net's way for RGB 2D (its Dataset120_RoadSegmentation): one RGB PNG per case (CASE_0000.png, channels R, G,
B) read by NaturalImage2DIO. The release's JPEGs become lossless PNGs (NaturalImage2DIO refuses JPEG) and the
0/255 masks become 0/1. `-size H W` resizes both (image bilinear, mask nearest), for fixed-size training as in
APFormer-style 2D pipelines; the default keeps the native resolution.
"""
import argparse
import os
from typing import Optional, Sequence

import numpy as np
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from skimage import io
from skimage.transform import resize

from dataset_conversion.common import free_raw_dataset_folder, listed, require_folder, run_jobs, staged_dataset
from nnscd.core.errors import UserError

ISIC_LAYOUT = ("ISIC2018_Task1-2_Training_Input/ISIC_XXXXXXX.jpg and ISIC2018_Task1_Training_GroundTruth/"
               "ISIC_XXXXXXX_segmentation.png (the challenge's zips extracted side by side); optional test images in "
               "ISIC2018_Task1-2_Validation_Input/ and ISIC2018_Task1-2_Test_Input/, with masks in "
               "ISIC2018_Task1_Validation_GroundTruth/ and ISIC2018_Task1_Test_GroundTruth/.")
TRAIN_FOLDERS = ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth")
TEST_FOLDERS = (("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
                ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"))


def read_rgb(path: str, size: Optional[Sequence[int]]) -> np.ndarray:
    image = io.imread(path)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{path} is not an RGB image (shape {image.shape}). Re-extract the ISIC input zip.")
    if size is not None:
        image = np.round(resize(image, size, order=1, preserve_range=True, anti_aliasing=True)).astype(np.uint8)
    return image


def read_mask(path: str, size: Optional[Sequence[int]]) -> np.ndarray:
    mask = io.imread(path)
    values = np.unique(mask)
    if mask.ndim != 2 or not set(values.tolist()) <= {0, 255}:
        raise ValueError(f"{path} is not an ISIC mask (one channel, values 0 and 255; found shape {mask.shape}, "
                         f"values {values[:6]}). Re-extract the ground-truth zip.")
    if size is not None:
        mask = resize(mask, size, order=0, preserve_range=True, anti_aliasing=False)
    return (mask > 0).astype(np.uint8)


def convert_image(source: str, target: str, size: Optional[Sequence[int]]) -> None:
    io.imsave(target, read_rgb(source, size), check_contrast=False)


def convert_mask(source: str, target: str, size: Optional[Sequence[int]]) -> None:
    io.imsave(target, read_mask(source, size), check_contrast=False)


def convert_case(image: str, mask: str, image_target: str, mask_target: str, size: Optional[Sequence[int]]) -> None:
    rgb, label = read_rgb(image, size), read_mask(mask, size)
    if rgb.shape[:2] != label.shape:
        raise ValueError(f"{image} is {rgb.shape[:2]} but its mask {mask} is {label.shape}: they must match.")
    io.imsave(image_target, rgb, check_contrast=False)
    io.imsave(mask_target, label, check_contrast=False)


def convert_isic2018(source_folder: str, dataset_id: int = 18, num_processes: int = 1,
                     size: Optional[Sequence[int]] = None) -> str:
    """Convert the extracted ISIC 2018 Task 1 folders; returns the new $nnUNet_raw/DatasetXXX_ISIC2018 folder."""
    source_folder = os.path.abspath(source_folder)
    image_folder, mask_folder = (os.path.join(source_folder, f) for f in TRAIN_FOLDERS)
    require_folder(image_folder, ISIC_LAYOUT)
    require_folder(mask_folder, ISIC_LAYOUT)
    cases = [f[:-len(".jpg")] for f in listed(image_folder, ".jpg")]  # the input zip also holds LICENSE.txt etc.
    missing = sorted(set(cases) - {f[:-len("_segmentation.png")] for f in listed(mask_folder, "_segmentation.png")})
    if not cases or missing:
        raise UserError(f"every {image_folder}/ISIC_XXXXXXX.jpg needs {mask_folder}/ISIC_XXXXXXX_segmentation.png; "
                        f"missing masks for: {', '.join(missing) or 'no images at all'}. Expected layout: "
                        f"{ISIC_LAYOUT}")

    final = free_raw_dataset_folder(dataset_id, "ISIC2018")
    with staged_dataset(final) as target:
        jobs = [(convert_case, os.path.join(image_folder, f"{c}.jpg"), os.path.join(mask_folder, f"{c}_segmentation.png"),
                 os.path.join(target, "imagesTr", f"{c}_0000.png"), os.path.join(target, "labelsTr", f"{c}.png"), size)
                for c in cases]
        for test_images, test_masks in TEST_FOLDERS:
            if not os.path.isdir(os.path.join(source_folder, test_images)):
                continue
            os.makedirs(os.path.join(target, "imagesTs"), exist_ok=True)
            for f in listed(os.path.join(source_folder, test_images), ".jpg"):
                jobs.append((convert_image, os.path.join(source_folder, test_images, f),
                             os.path.join(target, "imagesTs", f.replace(".jpg", "_0000.png")), size))
            if os.path.isdir(os.path.join(source_folder, test_masks)):  # released after the challenge
                os.makedirs(os.path.join(target, "labelsTs"), exist_ok=True)
                for f in listed(os.path.join(source_folder, test_masks), "_segmentation.png"):
                    jobs.append((convert_mask, os.path.join(source_folder, test_masks, f),
                                 os.path.join(target, "labelsTs", f.replace("_segmentation", "")), size))
        run_jobs(jobs, num_processes, "ISIC 2018")
        generate_dataset_json(target, {0: "R", 1: "G", 2: "B"}, {"background": 0, "lesion": 1}, len(cases), ".png",
                              dataset_name="ISIC2018", overwrite_image_reader_writer="NaturalImage2DIO",
                              reference="https://challenge.isic-archive.com/data/#2018",
                              citation=["Codella et al. 2019, arXiv:1902.03368", "Tschandl et al. 2018, Sci. Data 5:180161"],
                              description="ISIC 2018 Task 1: skin lesion segmentation in dermoscopy, RGB",
                              license="CC-BY-NC 4.0", converted_by="nnscd dataset_conversion.isic2018")
    return final


def main() -> None:
    from nnscd.core.paths import settle_environment

    settle_environment()
    parser = argparse.ArgumentParser(description="Convert ISIC 2018 Task 1 to nnU-Net raw format "
                                                 "($nnUNet_raw/DatasetXXX_ISIC2018): RGB PNGs, masks 0/1.")
    parser.add_argument("-i", type=str, required=True, help="folder holding the extracted ISIC2018_Task1* folders")
    parser.add_argument("-d", type=int, default=18, help="dataset id (default 18)")
    parser.add_argument("-np", type=int, default=4, help="number of processes (default 4)")
    parser.add_argument("-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="resize every image and mask to H x W (default: keep the native resolution)")
    args = parser.parse_args()
    convert_isic2018(args.i, args.d, args.np, args.size)

