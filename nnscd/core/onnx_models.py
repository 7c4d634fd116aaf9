"""Exported ONNX models: the sidecar that describes an export folder, and a fold's network run by onnxruntime.

An export folder (written by nnScd_export_onnx) holds `fold_K.onnx` per fold: the network nnScd_predict builds
for that fold, at the plans' patch, with a dynamic batch axis. Beside them SIDECAR, one JSON file with what
prediction needs: the plans, dataset.json, configuration, trainer, patch, channels, mirroring axes, and per fold
the file's sha256 and the largest difference between onnxruntime and torch measured after the export.

In prediction OnnxRuntimeNetwork stands in for the torch network inside nnU-Net's predictor, so preprocessing,
sliding window, mirroring, ensembling and export stay nnU-Net's.
"""
import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from nnscd.core.errors import UserError

SIDECAR = "nnscd_onnx.json"
FORMAT_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "image", "logits"
EXPORT_AGAIN = "Export it again with nnScd_export_onnx"


@dataclass(frozen=True)
class OnnxExport:
    """What an export folder holds: the model's nnU-Net description and, per fold, its ONNX file."""
    trainer_name: str
    plans_identifier: str
    configuration: str
    patch_size: Tuple[int, ...]
    num_input_channels: int
    num_segmentation_heads: int
    inference_allowed_mirroring_axes: Optional[Tuple[int, ...]]
    folds: Dict[str, dict]  # fold -> {"file", "sha256", "relative_difference", "quantization"}
    plans: dict
    dataset_json: dict
    opset: int
    format_version: int = FORMAT_VERSION

    def sidecar(self) -> dict:
        return asdict(self)


def is_export(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, SIDECAR))


def sha256(path: str) -> str:
    """The file's sha256, computed once per version of the file in a process: the command's input check and the
    predictor both check every fold, and a ViT-B fold is hundreds of MB."""
    stat = os.stat(path)
    return _sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse_sidecar(folder: str) -> Tuple[Optional[OnnxExport], List[str]]:
    path = os.path.join(folder, SIDECAR)
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [f"{path}: unreadable or not JSON ({e}). {EXPORT_AGAIN}."]
    if not isinstance(content, dict):
        return None, [f"{path}: not a JSON object. {EXPORT_AGAIN}."]
    if content.get("format_version") != FORMAT_VERSION:
        return None, [f"{path}: format_version {content.get('format_version')!r}, this nnscd reads "
                      f"{FORMAT_VERSION}. {EXPORT_AGAIN}."]
    fields = set(OnnxExport.__dataclass_fields__)
    missing = sorted(fields - set(content))
    if missing:
        return None, [f"{path}: lacks {', '.join(missing)}. {EXPORT_AGAIN}."]
    try:
        axes = content["inference_allowed_mirroring_axes"]
        export = OnnxExport(**{**{k: content[k] for k in fields}, "patch_size": tuple(content["patch_size"]),
                               "inference_allowed_mirroring_axes": None if axes is None else tuple(axes)})
        broken = [f for f, entry in export.folds.items() if not {"file", "sha256"} <= set(entry)]
    except (TypeError, AttributeError) as e:
        return None, [f"{path}: malformed ({e}). {EXPORT_AGAIN}."]
    return export, [f"{path}: the entry of fold {f} lacks file or sha256. {EXPORT_AGAIN}." for f in broken]


def _fold_problems(folder: str, export: OnnxExport, folds: Sequence[str]) -> List[str]:
    problems = []
    for fold in folds:
        if fold not in export.folds:
            problems.append(f"-f {fold}: {folder} holds no export of fold {fold}; it holds fold(s) "
                            f"{', '.join(export.folds)}. Pass those with -f, or export fold {fold}.")
            continue
        path = os.path.join(folder, export.folds[fold]["file"])
        if not os.path.isfile(path):
            problems.append(f"{path}: missing. {EXPORT_AGAIN}.")
        elif sha256(path) != export.folds[fold]["sha256"]:
            problems.append(f"{path}: changed since the export (its sha256 is not the one in {SIDECAR}). "
                            f"{EXPORT_AGAIN}.")
    return problems


def _checked(folder: str, folds: Sequence[str]) -> Tuple[Optional[OnnxExport], List[str]]:
    if not is_export(folder):
        return None, [f"{folder} holds no {SIDECAR}: it is not an nnscd ONNX export. Write one with "
                      f"nnScd_export_onnx."]
    export, problems = _parse_sidecar(folder)
    return export, problems if export is None or problems else _fold_problems(folder, export, folds)


def export_problems(folder: str, folds: Sequence[str]) -> List[str]:
    """Every problem of the export folder for a prediction with `folds`: an unreadable or incomplete sidecar, a
    fold that was not exported, a fold file that is missing or changed since the export (sha256)."""
    return _checked(folder, folds)[1]


def read_export(folder: str, folds: Sequence[str] = ()) -> OnnxExport:
    """The export in `folder`, checked for `folds`; UserError listing every problem."""
    export, problems = _checked(folder, folds)
    if problems:
        raise UserError("the ONNX export cannot be used:\n  " + "\n  ".join(problems))
    return export


def inference_session(path: str):
    """An onnxruntime session on the CPU with all graph optimisations (constant folding, node fusions)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class OnnxRuntimeNetwork(nn.Module):
    """The exported folds run by onnxruntime, in the place of the torch network in nnU-Net's predictor.

    nnU-Net's predictor loads each fold with `network.load_state_dict(parameters)` before its sliding window; here
    a fold's parameters are {"fold": K}, and loading them picks that fold's session. Inputs (N, C, *patch) fp32.
    """

    def __init__(self, folder: str, export: OnnxExport, folds: Sequence[str]):
        super().__init__()
        self.sessions = {f: inference_session(os.path.join(folder, export.folds[f]["file"])) for f in folds}
        self.fold = folds[0]

    @staticmethod
    def parameters_of(folds: Sequence[str]) -> List[dict]:
        return [{"fold": f} for f in folds]

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False) -> None:
        self.fold = state_dict["fold"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.sessions[self.fold].run([OUTPUT_NAME], {INPUT_NAME: image})
        return torch.from_numpy(logits).to(x.device)
