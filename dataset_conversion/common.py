"""What the converters share: a dataset folder that appears whole or not at all, integer label maps, and a
process pool with a progress bar."""
import glob
import multiprocessing
import os
import shutil
from contextlib import contextmanager
from typing import Callable, Iterator, List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnscd.core.errors import UserError
from nnscd.core.safe_io import PARTIAL_PREFIX, atomic_path


def require_folder(folder: str, layout: str) -> None:
    if not os.path.isdir(folder):
        raise UserError(f"{folder} does not exist. Expected layout: {layout}")


def free_raw_dataset_folder(dataset_id: int, name: str) -> str:
    """$nnUNet_raw/DatasetXXX_name, after checking that no dataset (raw, preprocessed or trained) uses the id."""
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets

    taken = list(find_candidate_datasets(dataset_id))  # a numpy array
    if taken:
        raise UserError(f"dataset id {dataset_id} is taken ({', '.join(taken)} in nnUNet_raw, nnUNet_preprocessed or "
                        f"nnUNet_results). Pick a free id (-overwrite_id of nnScd_convert_MSD_dataset, "
                        f"-d of the other converters) or delete the old dataset first.")
    return os.path.join(str(nnUNet_raw), f"Dataset{dataset_id:03d}_{name}")


@contextmanager
def staged_dataset(final: str) -> Iterator[str]:
    """Yield a hidden staging folder with imagesTr/ and labelsTr/ that becomes `final` only when the block completes.

    A killed conversion leaves just the staging folder (removed by the next run), never a half dataset whose id
    then blocks the rerun, as nnU-Net's converters do.
    """
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    for leftover in glob.glob(os.path.join(parent, f"{PARTIAL_PREFIX}*_{os.path.basename(final)}")):
        shutil.rmtree(leftover, ignore_errors=True)
    with atomic_path(final) as staging:
        for sub in ("imagesTr", "labelsTr"):
            os.makedirs(os.path.join(staging, sub))
        yield staging
    print(f"Wrote {final}")


def write_integer_label(source: str, target: str) -> None:
    """Copy a label map; one stored as floats (two Hippocampus labels are float32) is rewritten as integers.

    Float values that are not whole numbers mean a broken or resampled file: refused, never rounded.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(source)
    try:
        reader.ReadImageInformation()
        if reader.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
            shutil.copyfile(source, target)
            return
        image = reader.Execute()
    except RuntimeError as e:
        raise ValueError(f"cannot read label {source}: {str(e).strip().splitlines()[-1]}. Re-extract the download.")
    values = sitk.GetArrayViewFromImage(image)
    if not np.array_equal(values, np.round(values)):
        raise ValueError(f"label {source} holds non-integer values ({np.unique(values)[:6]} ...): it is not a label "
                         f"map. Replace it with the original file from the release.")
    small = values.min() >= 0 and values.max() <= 255
    sitk.WriteImage(sitk.Cast(image, sitk.sitkUInt8 if small else sitk.sitkInt16), target)


def _run(job: Tuple) -> None:
    job[0](*job[1:])


def run_jobs(jobs: Sequence[Tuple[Callable, ...]], num_processes: int, description: str) -> None:
    """Run every `(function, *args)` job with a progress bar, in a spawn pool (as nnU-Net) when num_processes > 1.

    A job's ValueError is a problem with one input file: it stops the conversion with its message.
    """
    try:
        if num_processes <= 1:
            for job in tqdm(jobs, desc=description):
                _run(job)
        else:
            with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                for _ in tqdm(pool.imap_unordered(_run, jobs), total=len(jobs), desc=description):
                    pass
    except ValueError as e:
        raise UserError(str(e))


def listed(folder: str, ending: str) -> List[str]:
    """File names with `ending` in `folder`, without hidden files (macOS `._*` resource forks ride along in zips)."""
    return sorted(f for f in os.listdir(folder) if f.endswith(ending) and not f.startswith("."))
