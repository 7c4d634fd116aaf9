"""A synthetic 3D dataset in nnU-Net raw format: a bright ball and a dark box in noise.

Small enough to plan, train and predict in minutes on a CPU, hard enough that only a trained model finds both
classes (the intensities overlap the noise, so thresholding alone does not separate them).
"""
import os
from typing import Tuple

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnscd.core.safe_io import atomic_path, write_json

LABELS = {"background": 0, "ball": 1, "box": 2}


def synthetic_case(rng: np.random.Generator, shape: Tuple[int, int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """One (image, label) pair, arrays in z, y, x order."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    label = np.zeros(shape, dtype=np.uint8)

    radius = rng.uniform(0.15, 0.22) * min(shape)
    centre = rng.uniform(radius + 1, np.array(shape) - radius - 1)
    label[np.linalg.norm(grid - centre, axis=-1) <= radius] = LABELS["ball"]

    half = rng.uniform(0.12, 0.2, size=3) * np.array(shape)
    corner = rng.uniform(1, np.array(shape) - 2 * half - 1)
    box = np.all((grid >= corner) & (grid < corner + 2 * half), axis=-1)
    label[box & (label == 0)] = LABELS["box"]

    image = rng.normal(0.0, 0.6, size=shape)
    image[label == LABELS["ball"]] += 1.0
    image[label == LABELS["box"]] -= 1.0
    return image.astype(np.float32), label


def _write_nifti(array: np.ndarray, path: str, spacing: Tuple[float, float, float]) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(spacing)))  # SimpleITK is x, y, z
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, tmp, True)


def write_synthetic_dataset(raw_folder: str, dataset_id: int, name: str = "NnscdDemo", num_train: int = 10,
                            num_test: int = 3, shape: Tuple[int, int, int] = (32, 32, 32),
                            spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0), seed: int = 0) -> str:
    """Write Dataset{id}_{name} under `raw_folder`: imagesTr/labelsTr, imagesTs and its labels in labelsTs.

    Returns the dataset folder. Re-running with the same arguments rewrites the same files.
    """
    folder = os.path.join(raw_folder, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = [("Tr", i) for i in range(num_train)] + [("Ts", i) for i in range(num_train, num_train + num_test)]
    for split, i in tqdm(cases, desc="Writing synthetic cases"):
        image, label = synthetic_case(rng, shape)
        _write_nifti(image, os.path.join(folder, f"images{split}", f"case_{i:03d}_0000.nii.gz"), spacing)
        _write_nifti(label, os.path.join(folder, f"labels{split}", f"case_{i:03d}.nii.gz"), spacing)
    dataset_json = {"channel_names": {"0": "synthetic"}, "labels": LABELS, "numTraining": num_train,
                    "file_ending": ".nii.gz", "name": name,
                    "description": "nnscd synthetic demo: a ball (1) and a box (2) in Gaussian noise"}
    write_json(os.path.join(folder, "dataset.json"), dataset_json)
    return folder
