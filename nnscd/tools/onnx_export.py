"""nnScd_export_onnx: a trained model's folds as ONNX models, checked against torch with onnxruntime.

Each fold's network is the one nnScd_predict builds (nnU-Net's predictor initialised from the model folder, deep
supervision off, eval mode), traced at the plans' patch with a dynamic batch axis by torch's TorchScript-based
exporter. Token-sparse networks export with fixed K per pruning stage (TopK, GatherElements, ScatterElements);
APFormer's query pruning keeps a count that depends on the image, so its exported graph computes every query and
masks the pruned ones (the same output, without the saving). After export each model runs in onnxruntime on random
inputs at batch 1 and 2 beside torch; the largest logit difference goes into the sidecar, and an export that
differs by more than the tolerance is refused. The folder appears whole or not at all.
"""
import os
import shutil
import warnings
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from nnscd.core.errors import UserError
from nnscd.core.onnx_models import (INPUT_NAME, OUTPUT_NAME, SIDECAR, OnnxExport, inference_session, is_export,
                                    sha256)
from nnscd.core.safe_io import PARTIAL_PREFIX, atomic_path, write_json
from nnscd.tools.trained_models import check_model_folder

OPSET = 17
# Largest accepted |onnxruntime - torch| logit difference, relative to the largest |logit| (at least 1): fp32 kernels
# differ in summation order only; measured differences are about 1e-6.
RELATIVE_TOLERANCE = 1e-3
QUANTIZATIONS = ("none", "int8")


def check_output_folder(output_folder: str) -> None:
    """An existing -o is replaced only if it is an export; anything else there stays untouched."""
    if os.path.exists(output_folder) and not is_export(output_folder):
        raise UserError(f"{output_folder} exists and is not an nnscd ONNX export (no {SIDECAR}); it is left as it "
                        f"is. Choose another -o, or remove it.")


def export_network(network: torch.nn.Module, example: torch.Tensor, path: str, opset: int = OPSET) -> None:
    """`network` traced on `example` (N, C, *patch) into an ONNX file with a dynamic batch axis."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings: shapes become constants, which is intended (fixed patch)
        torch.onnx.export(network, (example,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                          dynamo=False)


def quantize_int8(path: str, output: str) -> None:
    """onnxruntime's dynamic int8 quantisation of the weights of MatMul and Gemm (the transformer's linear layers;
    its ConvInteger kernels are slower than fp32 convolutions on CPUs)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(path, output, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)


def max_difference(network: torch.nn.Module, path: str, input_shape: Sequence[int], seed: int = 0) -> float:
    """Largest |onnxruntime - torch| logit over random inputs at batch 1 and 2, relative to the largest |logit|
    (at least 1)."""
    session = inference_session(path)
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in (1, 2):
        x = torch.randn(batch, *input_shape, generator=generator)
        with torch.no_grad():
            reference = network(x).float().numpy()
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        worst = max(worst, float(np.abs(logits - reference).max() / max(1.0, np.abs(reference).max())))
    return worst


def _runs_at_patch(network: torch.nn.Module, example: torch.Tensor, what: str) -> None:
    try:
        with torch.no_grad():
            network(example)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise UserError(f"{what} does not run at the plans' patch {tuple(example.shape[2:])} ({e}). An export "
                        f"needs the patch the model trained with: check patch_size in plans.json.") from None


def export_model_folder(model_folder: str, folds: Sequence[str], output_folder: str,
                        checkpoint: str = "checkpoint_final.pth", quantization: str = "none",
                        verbose: bool = True) -> OnnxExport:
    """Export the `folds` of the trained `model_folder` to `output_folder` and check each with onnxruntime."""
    from nnscd.core.predictor import nnScdPredictor

    check_model_folder(model_folder, folds, checkpoint)
    check_output_folder(output_folder)
    predictor = nnScdPredictor(device=torch.device("cpu"), allow_tqdm=False)
    try:
        predictor.initialize_from_trained_model_folder(model_folder, list(folds), checkpoint)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise UserError(f"the network of {model_folder} cannot be built from its plans ({e}). Check patch_size "
                        f"and the architecture in plans.json, or train the model again.") from None
    network = predictor.network.eval()
    channels = len(predictor.dataset_json["channel_names"])
    patch = tuple(predictor.configuration_manager.patch_size)
    example = torch.zeros(2, channels, *patch)
    what = f"the network of {predictor.trainer_name} ({type(network).__name__})"
    _runs_at_patch(network, example, what)
    entries = {}
    previous = os.path.join(os.path.dirname(os.path.abspath(output_folder)),
                            f"{PARTIAL_PREFIX}{os.getpid()}_previous_{os.path.basename(output_folder)}")
    with atomic_path(output_folder) as staging:
        os.makedirs(staging)
        for fold, parameters in tqdm(list(zip(folds, predictor.list_of_parameters)), desc="ONNX export",
                                     disable=not verbose):
            network.load_state_dict(parameters)
            name = f"fold_{fold}.onnx"
            path = os.path.join(staging, name)
            try:
                export_network(network, example, path)
            except Exception as e:  # the exporter raises many types; its first line names the operator
                raise UserError(f"{what} cannot be exported to ONNX: {str(e).splitlines()[0]}") from None
            difference = max_difference(network, path, example.shape[1:])
            if difference > RELATIVE_TOLERANCE:
                raise UserError(f"fold {fold}: onnxruntime's logits differ from torch's by {difference:.2e} of the "
                                f"largest logit (at most {RELATIVE_TOLERANCE:.0e} accepted), so {what} exported "
                                f"wrongly; nothing was written.")
            entry = {"file": name, "relative_difference": difference, "quantization": quantization}
            if quantization == "int8":
                quantize_int8(path, path + ".int8")
                os.replace(path + ".int8", path)
                entry["relative_difference"] = max_difference(network, path, example.shape[1:])
            entries[fold] = {**entry, "sha256": sha256(path)}
            if verbose:
                tqdm.write(f"fold {fold}: {name}; onnxruntime vs torch ({quantization}): largest logit difference "
                           f"{entry['relative_difference']:.2e} of the largest logit")
        export = OnnxExport(
            trainer_name=predictor.trainer_name, plans_identifier=predictor.plans_manager.plans_name,
            configuration=_configuration_name(model_folder, folds[0], checkpoint), patch_size=patch,
            num_input_channels=channels, num_segmentation_heads=predictor.label_manager.num_segmentation_heads,
            inference_allowed_mirroring_axes=None if predictor.allowed_mirroring_axes is None
            else tuple(int(a) for a in predictor.allowed_mirroring_axes),
            folds=entries, plans=predictor.plans_manager.plans, dataset_json=predictor.dataset_json, opset=OPSET)
        write_json(os.path.join(staging, SIDECAR), export.sidecar())
        if os.path.exists(output_folder):  # a previous export: it goes only once the new one is complete
            os.replace(output_folder, previous)
    if os.path.exists(previous):
        shutil.rmtree(previous)
    return export


def _configuration_name(model_folder: str, fold: str, checkpoint: str) -> str:
    """The configuration the checkpoint was trained with (nnU-Net's predictor keeps only its manager)."""
    path = os.path.join(model_folder, f"fold_{fold}", checkpoint)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["init_args"]["configuration"]
