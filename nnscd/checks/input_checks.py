"""Checks of what a user feeds nnU-Net, run before any work: a raw dataset, a training setup, prediction input.

nnU-Net finds many bad inputs only hours in (a NaN patch, a label value it never planned for), reports them as a
bare assertion or traceback, stops at the first, or does not notice at all (inf, a truncated .nii.gz, which
SimpleITK reads as zeros, a file with the wrong ending, which it skips). Each check here returns every problem it
finds as one line that names the file or argument and the fix; the commands print them together (`describe`).
Headers are read where they suffice; pixels only for finite intensities and label values.
nnU-Net's own `--verify_dataset_integrity` still runs when asked for.
"""
import gzip
import json
import math
import os
import pickle
import re
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnscd.core.errors import UserError
from nnscd.core.onnx_models import export_problems, is_export, read_export

MAX_REPORTED = 20  # problems listed in one message; the rest are counted
REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
SPACING_TOLERANCE = 1e-3  # relative, also for direction cosines (NIfTI headers store float32)
ORIGIN_TOLERANCE = 1e-2  # in voxels
CHANNEL_FILE = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})$")


class Header(NamedTuple):
    """What SimpleITK reads from a header, in x, y, z order."""
    dimension: int
    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]
    components: int


def describe(problems: Sequence[str], subject: str) -> str:
    """One message listing the problems (at most MAX_REPORTED) found in `subject`."""
    lines = [f"{len(problems)} problem{'s' * (len(problems) > 1)} in {subject}; fix them and rerun:"]
    lines += [f"  - {p}" for p in problems[:MAX_REPORTED]]
    if len(problems) > MAX_REPORTED:
        lines.append(f"  ... and {len(problems) - MAX_REPORTED} more of the same kinds.")
    return "\n".join(lines)


def _rel(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def _no_duplicate_keys(pairs: List[Tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:  # json.load would silently keep the last one
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def load_dataset_json(path: str) -> Tuple[Optional[dict], List[str]]:
    """dataset.json and what is wrong with it: unreadable, duplicate keys, missing keys, unusable labels/channels."""
    if not os.path.isfile(path):
        return None, [f"{path}: missing. Write a dataset.json with {', '.join(REQUIRED_KEYS)} "
                      f"(nnU-Net's dataset_conversion/generate_dataset_json.py)."]
    try:
        with open(path) as f:
            content = json.load(f, object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, ValueError, UnicodeDecodeError) as e:
        return None, [f"{path}: not valid JSON ({e}). Fix the syntax; each case, label and channel once."]
    problems = []
    if not isinstance(content, dict):
        return None, [f"{path}: holds a {type(content).__name__}, not an object with {', '.join(REQUIRED_KEYS)}."]
    if "modality" in content and "channel_names" not in content:  # nnU-Net v1 name, still accepted by v2
        content["channel_names"] = content["modality"]
    missing = [k for k in REQUIRED_KEYS if k not in content]
    if missing:
        return None, [f"{path}: missing keys {missing}. Add them (e.g. \"channel_names\": {{\"0\": \"CT\"}}, "
                      f"\"labels\": {{\"background\": 0, \"tumour\": 1}}, \"numTraining\": 10, "
                      f"\"file_ending\": \".nii.gz\")."]
    channels = content["channel_names"]
    if not isinstance(channels, dict) or sorted(channels) != [str(i) for i in range(len(channels))] or not channels:
        problems.append(f"{path}: channel_names keys are {list(channels) if isinstance(channels, dict) else channels}. "
                        f"Number them \"0\", \"1\", ..., one per channel file _0000, _0001, ...")
    labels = content["labels"]
    values = [v for v in labels.values() if isinstance(v, int)] if isinstance(labels, dict) else []
    if not isinstance(labels, dict) or labels.get("background") != 0:
        problems.append(f"{path}: labels has no \"background\": 0 (got {labels}). Map names to integer values, "
                        f"background first, e.g. {{\"background\": 0, \"tumour\": 1}}.")
    elif len(set(values)) < len(values):
        problems.append(f"{path}: labels gives one value several names ({labels}). Give each value one name "
                        f"(regions are lists of values, nnU-Net's region format).")
    elif sorted(set(values)) != list(range(len(set(values)))):
        problems.append(f"{path}: label values {sorted(values)} are not consecutive 0, 1, 2, ... Renumber them "
                        f"(in dataset.json and the label files).")
    if not isinstance(content["numTraining"], int):
        problems.append(f"{path}: numTraining is {content['numTraining']!r}. Set it to the number of training cases.")
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES
    endings = sorted({e for rw in LIST_OF_IO_CLASSES for e in rw.supported_file_endings})
    if content["file_ending"] not in endings:
        problems.append(f"{path}: file_ending {content['file_ending']!r} has no nnU-Net reader. Use one of "
                        f"{endings} (convert the files if needed).")
    return (None if problems else content), problems


def _expected_labels(dataset_json: dict) -> List[int]:
    """Label values a label file may hold: nnU-Net's LabelManager's, with the ignore label."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    manager = LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
    return [int(v) for v in manager.all_labels + ([manager.ignore_label] if manager.has_ignore_label else [])]


def group_channel_files(folder: str, file_ending: str, channel_names: Dict[str, str]
                        ) -> Tuple[Dict[str, List[str]], List[str]]:
    """Cases of an nnU-Net image folder (CASE_XXXX + ending): {case: one file per channel}, and problems.

    A case is listed only when all its channel files exist; missing, extra and misnamed files are problems.
    """
    problems, found = [], {}
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))
    where = os.path.basename(folder)
    for name in names:
        if not name.endswith(file_ending):
            stem = name.split(".")[0]
            problems.append(f"{where}/{name}: wrong file ending; dataset.json says {file_ending}, so nnU-Net skips "
                            f"this file. Convert it to {file_ending} (SimpleITK reads and writes both), "
                            f"e.g. {stem}{file_ending}.")
            continue
        match = CHANNEL_FILE.fullmatch(name[:-len(file_ending)])
        if match is None:
            problems.append(f"{where}/{name}: name lacks the 4-digit channel number nnU-Net needs. Rename it to "
                            f"{name[:-len(file_ending)]}_0000{file_ending} (channel 0).")
            continue
        found.setdefault(match["case"], {})[int(match["channel"])] = os.path.join(folder, name)
    cases = {}
    for case, files in found.items():
        missing = [c for c in range(len(channel_names)) if c not in files]
        extra = sorted(set(files) - set(range(len(channel_names))))
        for c in missing:
            problems.append(f"{where}/{case}_{c:04d}{file_ending}: missing: channel {c} "
                            f"('{channel_names[str(c)]}') of case {case}. Add it, or leave out the case.")
        for c in extra:
            problems.append(f"{where}/{case}_{c:04d}{file_ending}: channel {c}, but the model/dataset has "
                            f"{len(channel_names)} channel(s) ({', '.join(channel_names.values())}). Remove it, "
                            f"or name the channels in dataset.json channel_names.")
        if not missing and not extra:
            cases[case] = [files[c] for c in range(len(channel_names))]
    return cases, problems


def _gzip_nifti_truncated(path: str) -> bool:
    """Whether a .nii.gz holds fewer bytes than its header promises (SimpleITK pads the missing voxels).

    Reads the header and the gzip trailer (the stream's length mod 2^32) only: no decompression of the data.
    """
    try:
        with gzip.open(path, "rb") as f:
            header = f.read(540)
    except (OSError, EOFError):
        return True
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        stored = struct.unpack("<I", f.read(4))[0]
    for e in "<>":
        if len(header) >= 348 and struct.unpack(e + "i", header[:4])[0] == 348:  # NIfTI-1
            dims, bitpix = struct.unpack(e + "8h", header[40:56]), struct.unpack(e + "h", header[72:74])[0]
            offset = int(struct.unpack(e + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(e + "i", header[:4])[0] == 540:  # NIfTI-2
            dims, bitpix = struct.unpack(e + "8q", header[16:80]), struct.unpack(e + "h", header[14:16])[0]
            offset = struct.unpack(e + "q", header[168:176])[0]
            break
    else:
        return len(header) < 348  # not NIfTI: nothing to compare
    expected = offset + math.prod(dims[1:1 + dims[0]]) * bitpix // 8
    return expected % 2 ** 32 != stored


def read_header(path: str, root: str) -> Tuple[Optional[Header], Optional[str]]:
    """The header of one image file, or the problem that keeps it from being read."""
    rel = _rel(path, root)
    if os.path.getsize(path) == 0:
        return None, f"{rel}: empty file (0 bytes). Copy or convert it again; an earlier write was cut off."
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].replace("sitk::ERROR: ", "")
        return None, f"{rel}: cannot be read ({reason}). Copy or convert it again."
    if path.endswith(".nii.gz") and _gzip_nifti_truncated(path):
        return None, (f"{rel}: truncated (the file ends before the voxels its header promises). Copy or convert "
                      f"it again.")
    header = Header(reader.GetDimension(), reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(),
                    reader.GetDirection(), reader.GetNumberOfComponents())
    if header.dimension not in (2, 3):
        return None, (f"{rel}: {header.dimension}D image of size {header.size}; nnU-Net takes 2D or 3D files, one "
                      f"per channel. Split it into CASE_0000, CASE_0001, ... (one per channel) and name each in "
                      f"dataset.json channel_names.")
    if header.components > 1 and not path.lower().endswith((".png", ".bmp", ".tif")):  # RGB is fine there
        return None, (f"{rel}: {header.components} values per voxel (a vector image); nnU-Net takes one channel per "
                      f"file. Save each component as its own channel file (CASE_0000, CASE_0001, ...).")
    return header, None


def _geometry_problems(rel: str, header: Header, ref_rel: str, ref: Header) -> List[str]:
    fix = ("Resample one onto the other's voxel grid, or if only the header is wrong copy the geometry "
           "(SimpleITK: img.CopyInformation(ref)).")
    if header.size != ref.size or header.dimension != ref.dimension:
        return [f"{rel}: size {header.size} differs from {ref_rel} {ref.size} (x, y, z). {fix}"]
    problems = []
    if not np.allclose(header.spacing, ref.spacing, rtol=SPACING_TOLERANCE, atol=0):
        problems.append(f"{rel}: spacing {header.spacing} differs from {ref_rel} {ref.spacing}. {fix}")
    if not np.allclose(header.direction, ref.direction, rtol=0, atol=SPACING_TOLERANCE):
        problems.append(f"{rel}: orientation (direction {np.round(header.direction, 3).tolist()}) differs from "
                        f"{ref_rel} ({np.round(ref.direction, 3).tolist()}): one is flipped or rotated. {fix}")
    if np.any(np.abs(np.subtract(header.origin, ref.origin)) > ORIGIN_TOLERANCE * np.asarray(ref.spacing)):
        problems.append(f"{rel}: origin {np.round(header.origin, 3).tolist()} differs from {ref_rel} "
                        f"{np.round(ref.origin, 3).tolist()} (mm): the two do not overlap voxel by voxel. {fix}")
    return problems


def nifti_non_finite(path: str, chunk_bytes: int = 1 << 24) -> int:
    """NaN/inf voxels as a NIfTI file stores them, whatever reader the dataset uses: SimpleITK hands NaN and inf
    over as 0, so nnU-Net would train on them unseen. Streams the voxel bytes in chunks (a large CT costs 16 MB)."""
    import nibabel as nib

    header = nib.load(path).header  # the header only: the voxels stay on disk
    dtype = header.get_data_dtype()
    if not np.issubdtype(dtype, np.floating):
        return 0
    remaining = math.prod(header.get_data_shape()) * dtype.itemsize
    step = chunk_bytes - chunk_bytes % dtype.itemsize
    bad = 0
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        f.seek(int(header.get_data_offset()))
        while remaining > 0:
            data = f.read(min(step, remaining))
            if not data:
                break
            bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(data, dtype))))
            remaining -= len(data)
    return bad


def _non_finite(path: str, array: np.ndarray) -> int:
    """NaN/inf voxels of a file: in the file itself for NIfTI, else in what nnU-Net's reader returned."""
    if path.endswith((".nii", ".nii.gz")):
        return nifti_non_finite(path)
    return int(np.count_nonzero(~np.isfinite(array))) if np.issubdtype(array.dtype, np.floating) else 0


def _image_problems(path: str, rel: str, reader) -> List[str]:
    """Non-finite intensities of an image."""
    bad = _non_finite(path, reader.read_images((path,))[0])
    return [f"{rel}: {bad} NaN/inf voxel(s). Replace them (e.g. by the image minimum) and save the file again: "
            f"nnU-Net's normalisation spreads them over the whole image."] if bad else []


def _label_problems(path: str, rel: str, reader, expected_labels: List[int]) -> Tuple[List[str], bool]:
    """Values of a label file that are NaN/inf, not integers or not in dataset.json; and whether it holds any
    foreground (a value other than 0)."""
    import pandas as pd

    array = reader.read_seg(path)[0]
    bad = _non_finite(path, array)
    if bad:
        return [f"{rel}: {bad} NaN/inf label voxel(s) (SimpleITK reads them as background). Labels must be "
                f"integers: set them to a label value and save as an integer type."], True
    values = np.sort(pd.unique(array.ravel()))  # hash-based, much faster than np.unique on large volumes
    foreground = bool(np.any(values != 0))
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values) & (values == np.round(values))):
        return [f"{rel}: non-integer label values ({values[:8].tolist()}...). Labels must be integers: round or "
                f"threshold them and save as an integer type."], foreground
    unexpected = [int(v) for v in values if int(v) not in expected_labels]
    return [f"{rel}: label values {unexpected} are not in dataset.json labels {expected_labels}. Add them to "
            f"labels, or map them to known values in the label files."] if unexpected else [], foreground


def check_cases(cases: Dict[str, List[str]], labels: Dict[str, str], root: str, reader=None,
                expected_labels: Optional[List[int]] = None,
                num_threads: int = 4) -> Tuple[List[str], Dict[str, Header], List[str]]:
    """Headers (readable, 2D/3D, one geometry per case) and, given nnU-Net's `reader`, intensities and label values.

    Returns the problems, the first channel's header of each readable case, and the cases whose label holds
    foreground.
    """

    def check(case: str) -> Tuple[List[str], Optional[Header], bool]:
        files = cases[case] + ([labels[case]] if case in labels else [])
        headers, problems = [], []
        for path in files:
            header, problem = read_header(path, root)
            headers.append(header)
            problems += [problem] if problem else []
        if problems:
            return problems, None, False
        for path, header in zip(files[1:], headers[1:]):
            problems += _geometry_problems(_rel(path, root), header, _rel(files[0], root), headers[0])
        foreground = False
        for path in files if reader is not None else []:
            if path == labels.get(case):
                found, foreground = _label_problems(path, _rel(path, root), reader, expected_labels)
            else:
                found = _image_problems(path, _rel(path, root), reader)
            problems += found
        return problems, headers[0], foreground

    with ThreadPoolExecutor(num_threads) as pool:  # SimpleITK and numpy release the GIL while reading
        results = list(tqdm(pool.map(check, cases), total=len(cases), desc="nnscd: checking cases",
                            disable=len(cases) < 50, leave=False))
    problems = [p for found, _, _ in results for p in found]
    headers = {case: header for case, (_, header, _) in zip(cases, results) if header is not None}
    return problems, headers, [case for case, (_, _, foreground) in zip(cases, results) if foreground]


def _dimension_problems(headers: Dict[str, Header], cases: Dict[str, List[str]], root: str) -> List[str]:
    """Cases whose dimension (2D or 3D) differs from most others: nnU-Net plans one kind per dataset."""
    kinds = {case: _is_2d(h) for case, h in headers.items()}
    majority = sum(kinds.values()) * 2 > len(kinds)
    return [f"{_rel(cases[case][0], root)}: {'2D' if is_2d else '3D'} image in a dataset of mostly "
            f"{'2D' if majority else '3D'} images. Convert it, or leave it out." for case, is_2d in kinds.items()
            if is_2d != majority]


def _is_2d(header: Header) -> bool:
    return header.dimension == 2 or 1 in header.size


def check_raw_dataset(folder: str, num_threads: int = 4) -> List[str]:
    """Every problem of an nnU-Net raw dataset folder (dataset.json, imagesTr, labelsTr) that would stop or spoil
    fingerprinting, planning, preprocessing or training."""
    if not os.path.isdir(folder):
        return [f"{folder}: no such dataset folder. Convert your data into nnUNet_raw first."]
    dataset_json, problems = load_dataset_json(os.path.join(folder, "dataset.json"))
    if dataset_json is None:
        return problems
    ending, channel_names = dataset_json["file_ending"], dataset_json["channel_names"]
    if "dataset" in dataset_json:  # explicit file lists instead of imagesTr/labelsTr
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        listed = get_filenames_of_train_images_and_targets(folder, dataset_json)
        cases = {k: v["images"] for k, v in listed.items()}
        labels = {k: v["label"] for k, v in listed.items()}
        for case, files in cases.items():
            if len(files) != len(channel_names):
                problems.append(f"dataset.json: case {case} lists {len(files)} image(s) for {len(channel_names)} "
                                f"channel(s). List one file per channel.")
        missing = [f for f in [*sum(cases.values(), []), *labels.values()] if not os.path.isfile(f)]
        problems += [f"{_rel(f, folder)}: missing (listed in dataset.json). Add it or fix the path." for f in missing]
        seen: Dict[str, str] = {}
        for case, files in cases.items():
            for f in files:
                if f in seen:
                    problems.append(f"{_rel(f, folder)}: listed for cases {seen[f]} and {case}. Each case needs "
                                    f"its own files; remove the duplicate case.")
                seen[f] = case
        if problems:
            return problems
    else:
        for sub in ("imagesTr", "labelsTr"):
            if not os.path.isdir(os.path.join(folder, sub)):
                problems.append(f"{sub}: missing folder. Put the training {sub[:-2]} there (or list files under "
                                f"\"dataset\" in dataset.json).")
        if problems:
            return problems
        cases, problems = group_channel_files(os.path.join(folder, "imagesTr"), ending, channel_names)
        label_names = {n[:-len(ending)] for n in os.listdir(os.path.join(folder, "labelsTr"))
                       if n.endswith(ending) and not n.startswith(".")}
        labels = {case: os.path.join(folder, "labelsTr", case + ending) for case in cases if case in label_names}
        problems += [f"labelsTr/{case}{ending}: missing: case {case} has images but no label. Add the label, or "
                     f"move the case's images out of imagesTr (to imagesTs)." for case in cases if case not in labels]
        with_images = {m["case"] for n in os.listdir(os.path.join(folder, "imagesTr")) if n.endswith(ending)
                       and (m := CHANNEL_FILE.fullmatch(n[:-len(ending)]))}  # complete or not: reported above
        problems += [f"labelsTr/{case}{ending}: label without images (no imagesTr/{case}_0000{ending}). Add the "
                     f"images or remove the label." for case in sorted(label_names - with_images)]
        problems += [f"labelsTr/{n}: wrong file ending; dataset.json says {ending}. Convert it to {ending}."
                     for n in sorted(os.listdir(os.path.join(folder, "labelsTr")))
                     if not n.endswith(ending) and not n.startswith(".")]
        cases = {case: files for case, files in cases.items() if case in labels}
    if len(cases) != dataset_json["numTraining"] and not problems:
        problems.append(f"dataset.json: numTraining is {dataset_json['numTraining']}, but there are {len(cases)} "
                        f"training cases. Set numTraining to {len(cases)}.")
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    reader = determine_reader_writer_from_dataset_json(dataset_json, verbose=False)()
    case_problems, headers, foreground = check_cases(cases, labels, folder, reader, _expected_labels(dataset_json),
                                                     num_threads)
    if labels and not foreground and not case_problems:
        case_problems.append(f"labelsTr: all {len(labels)} label files hold only background (0): there is nothing "
                             f"to learn, and nnU-Net's planning fails on it. Check that the labels were exported "
                             f"with their values (not as empty masks) and that labelsTr holds the right files.")
    return problems + case_problems + _dimension_problems(headers, cases, folder)


def check_checkpoint(path: str) -> Optional[str]:
    """The problem with a checkpoint file (missing, truncated, corrupt), or None.

    torch.save writes a zip archive: a cut-off file lacks its central directory, a damaged one fails a CRC.
    """
    if not os.path.isfile(path):
        return f"{path}: missing"
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        return f"{path}: corrupt or truncated ({e})"
    return f"{path}: corrupt (bad CRC in {damaged})" if damaged else None


def _model_configuration(model_folder: str) -> Tuple[dict, dict, str]:
    """dataset.json, plans and configuration of a trained model folder or an ONNX export (UserError if its sidecar
    is unusable)."""
    if is_export(model_folder):
        export = read_export(model_folder)
        return export.dataset_json, export.plans, export.configuration
    with open(os.path.join(model_folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    with open(os.path.join(model_folder, "plans.json")) as f:
        plans = json.load(f)
    return dataset_json, plans, os.path.basename(os.path.normpath(model_folder)).split("__")[-1]


def trained_folds(model_folder: str, checkpoint_name: str) -> List[str]:
    """The folds (0, 1, ..., all) of a trained model folder that hold `checkpoint_name`, sorted."""
    return sorted(n[len("fold_"):] for n in os.listdir(model_folder)
                  if n.startswith("fold_") and os.path.isfile(os.path.join(model_folder, n, checkpoint_name)))


def _checkpoint_problems(model_folder: str, folds: Sequence[str], checkpoint_name: str) -> List[str]:
    trained = trained_folds(model_folder, checkpoint_name)
    problems = []
    for fold in folds:
        problem = check_checkpoint(os.path.join(model_folder, f"fold_{fold}", checkpoint_name))
        if problem:
            problems.append(f"-f {fold}: {problem}. Folds with {checkpoint_name}: {', '.join(trained) or 'none'}; "
                            f"pass those with -f (or finish training fold {fold}).")
    return problems


def check_prediction_input(input_folder: str, model_folder: str, folds: Sequence[str],
                           checkpoint_name: str = "checkpoint_final.pth", continue_in: Optional[str] = None,
                           num_threads: int = 4) -> List[str]:
    """Every problem of a prediction run that nnU-Net would hit only after loading the network, or never:
    checkpoints of the requested folds, file names and endings, channels per case compared with training,
    unreadable or truncated images, 2D/3D mismatch with the model, NaN/inf intensities.

    Cases already predicted in `continue_in` (--continue_prediction) are not read.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    problems = export_problems(model_folder, folds) if is_export(model_folder) else \
        _checkpoint_problems(model_folder, folds, checkpoint_name)
    try:
        dataset_json, plans, configuration = _model_configuration(model_folder)
    except UserError:  # an unusable sidecar, already among the problems
        return problems
    cases, found = group_channel_files(input_folder, dataset_json["file_ending"], dataset_json["channel_names"])
    problems += found
    ending = dataset_json["file_ending"]
    done = {n[:-len(ending)] for n in os.listdir(continue_in) if n.endswith(ending)} \
        if continue_in and os.path.isdir(continue_in) else set()
    cases = {case: files for case, files in cases.items() if case not in done}
    reader = PlansManager(plans).image_reader_writer_class()
    case_problems, headers, _ = check_cases(cases, {}, input_folder, reader, num_threads=num_threads)
    problems += case_problems
    model_2d = min(plans["original_median_shape_after_transp"]) == 1
    model_3d = len(PlansManager(plans).get_configuration(configuration).patch_size) == 3
    for case, header in headers.items():
        rel = _rel(cases[case][0], input_folder)
        if model_2d and not _is_2d(header):
            problems.append(f"{rel}: 3D image of size {header.size}, but the model was trained on 2D images. "
                            f"Predict 2D images (slices), or use a model trained on 3D data.")
        elif model_3d and _is_2d(header):
            problems.append(f"{rel}: 2D image of size {header.size}, but configuration {configuration} is 3D. "
                            f"Predict 3D volumes, or use a 2d model.")
    return problems


def _preprocessed_problems(folder: str, num_cases: int, rerun: str, expected_cases: Sequence[str] = ()) -> List[str]:
    """Cases of a preprocessed configuration that are missing, incomplete (a killed nnU-Net preprocessing) or
    damaged since (a truncated or unreadable file), found before training loads them hours in.

    `expected_cases` (from splits_final.json) names the missing ones. blosc2 finds a cut-off .b2nd when it opens
    it (the frame's index is at its end), in well under a millisecond.
    """
    import blosc2

    if not os.path.isdir(folder):
        return [f"{folder}: missing: this configuration was not preprocessed. Run {rerun}."]
    names = set(os.listdir(folder))
    cases = [n[:-len(".b2nd")] for n in names if n.endswith(".b2nd") and not n.endswith("_seg.b2nd")]
    incomplete = sorted(c for c in cases if not {f"{c}_seg.b2nd", f"{c}.pkl"} <= names)
    missing = sorted(set(expected_cases) - set(cases))
    if incomplete or missing or len(cases) < num_cases:
        named = (f", incomplete: {', '.join(incomplete[:5])}" if incomplete else "") + \
                (f", missing: {', '.join(missing[:5])}" if missing else "")
        return [f"{folder}: preprocessing did not finish ({len(cases) - len(incomplete)} of {num_cases} cases "
                f"complete{named}). Run {rerun}."]
    def open_b2nd(path: str) -> None:
        blosc2.open(path, mode="r")

    readers = (("_seg.b2nd", open_b2nd), (".b2nd", open_b2nd), (".pkl", _load_pickle))
    damaged = []
    for case in sorted(cases):
        for suffix, read in readers:
            try:
                read(os.path.join(folder, case + suffix))
            except Exception:  # blosc2 raises RuntimeError, pickle EOFError or UnpicklingError
                damaged.append(case + suffix)
                break
    if damaged:
        more = f" and {len(damaged) - 5} more" if len(damaged) > 5 else ""
        return [f"{folder}: damaged since preprocessing (truncated or unreadable): {', '.join(damaged[:5])}{more}. "
                f"Run {rerun} (it redoes every case), or restore these files from a backup."]
    return []


def _load_pickle(path: str) -> None:
    with open(path, "rb") as f:
        pickle.load(f)


def _split_cases(splits_file: str) -> List[str]:
    """Every case of the first split of splits_final.json (training and validation), none if there is no file."""
    if not os.path.isfile(splits_file):
        return []
    with open(splits_file) as f:
        first = json.load(f)[0]
    return [*first["train"], *first["val"]]


def _fold_problems(fold: str, splits_file: str) -> List[str]:
    if fold == "all":
        return []
    num_folds = 5
    if os.path.isfile(splits_file):
        with open(splits_file) as f:
            num_folds = len(json.load(f))
    if not fold.lstrip("-").isdigit() or not 0 <= int(fold) < num_folds:
        source = f"{splits_file} defines" if os.path.isfile(splits_file) else "nnU-Net's split has"
        return [f"fold {fold!r}: out of range; {source} {num_folds} folds. Use 0-{num_folds - 1} or all (nnU-Net "
                f"would silently train on a random 80:20 split instead); for more folds, add splits to "
                f"splits_final.json."]
    return []


def _network_problems(trainer_class: type, plans: dict, configuration: str, dataset_json: dict) -> List[str]:
    """Build the trainer's network on the meta device (no memory, no time): a patch it cannot take fails now."""
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnscd.core.token_planning import apply_token_plan

    manager = PlansManager(plans)
    resolved = manager.get_configuration(configuration)
    plan = getattr(trainer_class, "token_plan", lambda _: None)(resolved.configuration)
    if plan is not None:  # as the trainer's __init__ does: the patch rounded up to whole tokens
        apply_token_plan(resolved.configuration, plan)
    try:
        with torch.device("meta"):
            trainer_class.build_network_architecture(
                manager, resolved, determine_num_input_channels(manager, resolved, dataset_json),
                manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    except (ValueError, AssertionError) as e:  # dynamic_network_architectures asserts (Primus: patch % 8)
        return [f"-tr {trainer_class.__name__} cannot take configuration {configuration} of plans "
                f"{manager.plans_name}: {str(e) or _refused_patch(trainer_class, resolved.patch_size)}"]
    return []


def _refused_patch(trainer_class: type, patch_size: Sequence[int]) -> str:
    """What to say when a network asserts on a patch without a message (dynamic_network_architectures does)."""
    from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import AbstractPrimus

    if issubclass(trainer_class, AbstractPrimus):
        return (f"Primus needs a patch divisible by its 8^3 token on every axis, got {list(patch_size)}; "
                f"nnscd's PrimusV3STrainer_* / STPMTAPrimusV3*Trainer round the patch up, or plan another patch")
    return f"the network refuses patch {list(patch_size)}"


def check_training_setup(dataset: str, configuration: str, fold: str, trainer_class: type, plans_name: str,
                         continue_training: bool) -> List[str]:
    """Problems of `nnScd_train` arguments that nnU-Net reports late, obscurely or not at all: unknown dataset,
    plans or configuration, unfinished preprocessing, a fold outside the split, a patch the network cannot take,
    and for `--c` a corrupt checkpoint or one that another trainer, plans, configuration or fold wrote."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        return [f"dataset {dataset!r}: {e} Pass a dataset ID or name that exists in nnUNet_raw/nnUNet_preprocessed."]
    base = os.path.join(str(nnUNet_preprocessed), name)
    plans_file = os.path.join(base, f"{plans_name}.json")
    if not os.path.isfile(plans_file):
        others = sorted(n[:-5] for n in os.listdir(base) if n.endswith(".json") and n not in
                        ("dataset.json", "dataset_fingerprint.json", "splits_final.json")) if os.path.isdir(base) else []
        return [f"-p {plans_name}: no plans file {plans_file}. " +
                (f"Plans of {name}: {', '.join(others)}." if others else
                 f"Plan and preprocess first: nnScd_plan_and_preprocess -d {dataset}.")]
    with open(plans_file) as f:
        plans = json.load(f)
    with open(os.path.join(base, "dataset.json")) as f:
        dataset_json = json.load(f)
    available = PlansManager(plans).available_configurations
    if configuration not in available:
        return [f"configuration {configuration!r}: not in {plans_file}. Available: {', '.join(available)}."]
    data_folder = os.path.join(base, PlansManager(plans).get_configuration(configuration).data_identifier)
    splits_file = os.path.join(base, "splits_final.json")
    problems = _preprocessed_problems(data_folder, dataset_json["numTraining"],
                                      f"nnScd_preprocess -d {dataset} -c {configuration} -p {plans_name}",
                                      _split_cases(splits_file))
    problems += _fold_problems(fold, splits_file)
    problems += _network_problems(trainer_class, plans, configuration, dataset_json)
    if continue_training and not problems:
        fold_folder = os.path.join(str(nnUNet_results), name, f"{trainer_class.__name__}__{plans_name}__{configuration}",
                                   f"fold_{fold}")
        # the one nnU-Net's --c loads: final, else latest, else best
        candidates = [os.path.join(fold_folder, f"checkpoint_{k}.pth") for k in ("final", "latest", "best")]
        chosen = next((c for c in candidates if os.path.isfile(c)), None)
        problem = chosen and check_checkpoint(chosen)
        if problem:
            problems.append(f"--c: {problem}. Delete it to resume from the next checkpoint (final, latest, best), "
                            f"or start afresh without --c.")
        elif chosen:
            problems += _foreign_checkpoint_problems(chosen, {"trainer": trainer_class.__name__, "plans": plans_name,
                                                              "configuration": configuration, "fold": fold})
    return problems


def _foreign_checkpoint_problems(path: str, expected: Dict[str, str]) -> List[str]:
    """--c: a checkpoint in this fold folder that another trainer, plans, configuration or fold wrote (copied in
    by hand), which nnU-Net would load into the wrong network or resume with the wrong schedule."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    init_args = checkpoint.get("init_args", {})
    found = {"trainer": checkpoint.get("trainer_name"), "plans": init_args.get("plans", {}).get("plans_name"),
             "configuration": init_args.get("configuration"),
             "fold": None if init_args.get("fold") is None else str(init_args["fold"])}
    differ = {k: v for k, v in found.items() if v is not None and v != expected[k]}
    if not differ:
        return []
    written = ", ".join(f"{k} {v}" for k, v in found.items())
    wanted = ", ".join(f"{k} {expected[k]}" for k in differ)
    return [f"--c: {path} was written by {written}, but this run is {wanted}. Resume it with the command that wrote "
            f"it (in its own results folder), or move it away and start afresh without --c."]
