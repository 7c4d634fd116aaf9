"""Settle nnU-Net's environment before the first nnunetv2 import.

nnunetv2 2.8 reads nnUNet_raw/preprocessed/results when it uses them (and raises if they are unset), and reads
its process counts (nnUNet_def_n_proc, nnUNet_n_proc_DA) at import time. nnscd's commands therefore call
`settle_environment()` first: unset data folders get a default under one root, announced once on stderr, and
nnscd's trainers are made visible to nnU-Net's trainer lookup through `nnUNet_extTrainer`.
"""
import os
import sys
from pathlib import Path

from nnscd.core.errors import UserError

DATA_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
# nnU-Net's process counts and the least each may be (nnUNet_n_proc_DA=0 runs augmentation in the main process)
PROCESS_VARIABLES = {"nnUNet_n_proc_DA": 0, "nnUNet_def_n_proc": 1}
TRAINER_LOOKUP_FOLDER = str(Path(__file__).resolve().parents[1] / "trainer_lookup")  # nnU-Net reads it
_ANNOUNCED = "NNSCD_ENV_ANNOUNCED"  # inherited by child processes, so the notice appears once per command


def default_data_root() -> Path:
    """Where the nnUNet_* folders live when the user did not set them: $NNSCD_DATA or ~/nnscd_data."""
    return Path(os.environ.get("NNSCD_DATA", Path.home() / "nnscd_data")).expanduser().resolve()


def check_process_variables() -> None:
    """UserError for an nnU-Net process count that is no whole number or too small, before nnunetv2 reads it
    (nnunetv2 would fail at import with a bare ValueError, or hours in)."""
    for name, least in PROCESS_VARIABLES.items():
        value = os.environ.get(name)
        if value is None:
            continue
        try:
            valid = int(value) >= least
        except ValueError:
            valid = False
        if not valid:
            meaning = "0 runs nnU-Net's data augmentation in the main process" if least == 0 else \
                "the number of processes nnU-Net starts for preprocessing and export"
            raise UserError(f"{name}={value!r}: set it to a whole number >= {least} ({meaning}), or unset it.")


def settle_environment(cpu: bool = False) -> None:
    """Fill in unset nnU-Net variables, register nnscd's trainers and, on a CPU, use few worker processes;
    UserError for a bad process count."""
    check_process_variables()
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
