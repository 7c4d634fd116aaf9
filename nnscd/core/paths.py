"""Settle nnU-Net's environment before the first nnunetv2 import.

nnunetv2 2.8 reads nnUNet_raw/preprocessed/results when it uses them (and raises if they are unset), and reads
its process counts (nnUNet_def_n_proc, nnUNet_n_proc_DA) at import time. nnscd's commands therefore call
`settle_environment()` first: unset data folders get a default under one root, announced once on stderr, and
nnscd's trainers are made visible to nnU-Net's trainer lookup through `nnUNet_extTrainer`.
"""
import os
import sys
from pathlib import Path

DATA_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
TRAINER_LOOKUP_FOLDER = str(Path(__file__).resolve().parents[1] / "trainer_lookup")  # nnU-Net reads it
_ANNOUNCED = "NNSCD_ENV_ANNOUNCED"  # inherited by child processes, so the notice appears once per command


def default_data_root() -> Path:
    """Where the nnUNet_* folders live when the user did not set them: $NNSCD_DATA or ~/nnscd_data."""
    return Path(os.environ.get("NNSCD_DATA", Path.home() / "nnscd_data")).expanduser().resolve()


def settle_environment(cpu: bool = False) -> None:
    """Fill in unset nnU-Net variables, register nnscd's trainers and, on a CPU, use few worker processes."""
    missing = [name for name in DATA_FOLDERS if not os.environ.get(name)]
    for name in missing:
        folder = default_data_root() / name
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)
    if missing and not os.environ.get(_ANNOUNCED):
        print(f"nnscd: {', '.join(missing)} not set; using {default_data_root()}/<name>. "
              f"Export them (as for nnU-Net) or set NNSCD_DATA to choose another place.", file=sys.stderr)
        os.environ[_ANNOUNCED] = "1"

    lookup = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if TRAINER_LOOKUP_FOLDER not in lookup:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([TRAINER_LOOKUP_FOLDER, *lookup])

    if cpu:
        # nnU-Net's defaults (8 preprocessing/export processes, 12 augmentation workers) thrash a small CPU.
        n = os.cpu_count() or 1
        os.environ.setdefault("nnUNet_def_n_proc", str(min(n, 8)))
        os.environ.setdefault("nnUNet_n_proc_DA", str(max(1, n // 2)))
