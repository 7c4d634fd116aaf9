"""nnScd_msd_submission: predictions of Decathlon tasks -> the Decathlon's submission zip, checked before zipping.

The zip holds one folder per task (Task04_Hippocampus/, ...) with one segmentation per test image, named as that
image in the task's imagesTs (hippocampus_002.nii.gz). nnU-Net names a prediction after the case id, which for
datasets converted by nnScd_convert_MSD_dataset is the MSD file name without `.nii.gz`, so names carry over.
Every problem is listed (file and fix) and nothing is written unless all tasks pass.
"""
import json
import os
import re
import zipfile
from typing import List, Tuple

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnscd.core.safe_io import atomic_path

MSD_TASKS = ("Task01_BrainTumour", "Task02_Heart", "Task03_Liver", "Task04_Hippocampus", "Task05_Prostate",
             "Task06_Lung", "Task07_Pancreas", "Task08_HepaticVessel", "Task09_Spleen", "Task10_Colon")
ENDING = ".nii.gz"


def _header(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def _text(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _geometry_problems(prediction: str, test_image: str) -> List[str]:
    """Size, spacing, origin and direction of the prediction against the test image's first three axes
    (BrainTumour and Prostate test images are 4D: modalities on the fourth)."""
    pred, image = _header(prediction), _header(test_image)
    if pred.GetDimension() != 3:
        return [f"is {pred.GetDimension()}D; a segmentation is 3D"]
    n = image.GetDimension()
    expected = {"size": image.GetSize()[:3], "spacing": image.GetSpacing()[:3], "origin": image.GetOrigin()[:3],
                "direction": np.reshape(image.GetDirection(), (n, n))[:3, :3].ravel()}
    found = {"size": pred.GetSize(), "spacing": pred.GetSpacing(), "origin": pred.GetOrigin(),
             "direction": pred.GetDirection()}
    return [f"{key} {_text(found[key])} differs from the test image's {_text(value)}"
            for key, value in expected.items() if not np.allclose(found[key], value, rtol=1e-5, atol=1e-3)]


def check_task(task_folder: str, prediction_folder: str) -> Tuple[List[str], List[str]]:
    """The prediction files to zip (in imagesTs order) and every problem found, as 'file: problem. Fix.' lines."""
    task = os.path.basename(task_folder.rstrip("/\\"))
    test_folder = os.path.join(task_folder, "imagesTs")
    if not os.path.isdir(test_folder) or not os.path.isfile(os.path.join(task_folder, "dataset.json")):
        return [], [f"{task_folder}: not an MSD task folder (needs dataset.json and imagesTs/). Pass the extracted "
                    f"Decathlon task, e.g. /data/Task04_Hippocampus."]
    if not os.path.isdir(prediction_folder):
        return [], [f"{prediction_folder}: no such prediction folder for {task}. Run nnScd_predict for the task."]
    with open(os.path.join(task_folder, "dataset.json")) as f:
        allowed = {int(value) for value in json.load(f)["labels"]}
    tests = sorted(f for f in os.listdir(test_folder) if f.endswith(ENDING) and not f.startswith("."))
    predicted = {f for f in os.listdir(prediction_folder) if f.endswith(ENDING) and not f.startswith(".")}

    problems = [f"{prediction_folder}/{f}: not a test case of {task} (its imagesTs has no {f}). Remove it, or check "
                f"that this folder holds {task}'s test predictions." for f in sorted(predicted - set(tests))]
    files = []
    for name in tqdm(tests, desc=task):
        prediction = os.path.join(prediction_folder, name)
        if name not in predicted:
            problems.append(f"{prediction}: missing; {task} has test image imagesTs/{name}. Predict it (nnScd_predict "
                            f"on the converted imagesTs, --continue_prediction fills in missing cases).")
            continue
        try:
            geometry = _geometry_problems(prediction, os.path.join(test_folder, name))
            values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(prediction))).tolist())
        except RuntimeError:
            problems.append(f"{prediction}: cannot be read (truncated or not NIfTI). Predict this case again.")
            continue
        problems += [f"{prediction}: {g}. Predict from {task}'s converted imagesTs without resampling; nnU-Net "
                     f"writes predictions in the test image's geometry." for g in geometry]
        if not values <= allowed:
            problems.append(f"{prediction}: label values {sorted(values - allowed)} are not {task}'s labels "
                            f"{sorted(allowed)}. Check that the model was trained on {task}.")
        files.append(prediction)
    return files, problems


def write_submission(tasks: List[Tuple[str, str]], output_zip: str) -> List[str]:
    """Check every (MSD task folder, prediction folder) pair and, if all pass, write the zip; returns the problems."""
    names = [os.path.basename(t.rstrip("/\\")) for t, _ in tasks]
    problems = [f"{name}: given more than once. Pass each task once." for name in sorted(set(names))
                if names.count(name) > 1]
    problems += [f"{name}: not a Decathlon task folder name (TaskXX_Name, e.g. Task04_Hippocampus). The zip's "
                 f"folders must be named as the tasks; pass the extracted task folder." for name in names
                 if not re.fullmatch(r"Task\d\d_[A-Za-z]+", name)]
    entries = []
    for (task_folder, prediction_folder), name in zip(tasks, names):
        files, task_problems = check_task(task_folder, prediction_folder)
        problems += task_problems
        entries += [(f, f"{name}/{os.path.basename(f)}") for f in files]
    if problems:
        return problems
    os.makedirs(os.path.dirname(os.path.abspath(output_zip)), exist_ok=True)
    with atomic_path(output_zip) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for source, arcname in entries:  # stored: .nii.gz is compressed already
            archive.write(source, arcname)
    return []
