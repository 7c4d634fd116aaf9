"""nnscd's predictor: nnU-Net's, with batched sliding-window tiles and mirrors, and exports a kill cannot leave
half-written."""
import itertools
import os
import time
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.helpers import empty_cache
from nnscd.core import nnunet_hooks
from nnscd.core.atomic_plans_manager import AtomicWritePlansManager
from nnscd.core.device import synchronize
from nnscd.core.errors import UserError
from nnscd.core.onnx_models import OnnxRuntimeNetwork, read_export

# Largest forward batch at inference, as a multiple of the plans' training batch: a forward without gradients
# keeps no activations for backward, so it fits where training fit. Setting `nnScd_predict_batch_factor` fixes the
# forward batch at that multiple; unset, the predictor times this largest batch against batch 1 on its first
# tiles and keeps the faster (on a CPU large 3D inputs can run slower batched than one by one).
BATCH_FACTOR_ENV, DEFAULT_BATCH_FACTOR = "nnScd_predict_batch_factor", 2.0
# The timing keeps a way after one turn each when it is this much faster per input; closer calls get a second turn.
# Where batching loses on a CPU it loses by far (the ViT ran batch 8 at half the speed per input of batch 1), so it
# costs one batched group, not two.
CLEAR_MARGIN = 1.25

# nnU-Net runs the network under fp16 autocast on a GPU and in fp32 on a CPU, since autocast is slow on CPUs
# without bf16 instructions. `nnScd_cpu_bf16=1` runs it under bf16 autocast on a CPU that has them (oneDNN's bf16
# kernels: AVX-512 or AMX); opt-in, as labels can then differ from nnUNetv2_predict's on boundary voxels.
CPU_BF16_ENV = "nnScd_cpu_bf16"


def cpu_has_bf16() -> bool:
    """Whether oneDNN, PyTorch's CPU kernel library, runs bf16 natively on this CPU."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_bf16_requested() -> bool:
    """Whether `nnScd_cpu_bf16=1`; ValueError, saying what to set, for another value or a CPU without bf16."""
    value = os.environ.get(CPU_BF16_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{CPU_BF16_ENV}={value!r}: set it to 1 (bf16 autocast on the CPU) or 0 (fp32, nnU-Net's).")
    if value == "1" and not cpu_has_bf16():
        raise ValueError(f"{CPU_BF16_ENV}=1, but this CPU has no bf16 instructions PyTorch uses (AVX-512 or AMX): "
                         f"bf16 would run slower than fp32 here. Unset {CPU_BF16_ENV}.")
    return value == "1"


def batch_factor_from_environment() -> Optional[float]:
    """`nnScd_predict_batch_factor` as a number, None if unset; ValueError, saying what to set, if it is no
    positive number."""
    value = os.environ.get(BATCH_FACTOR_ENV)
    try:
        factor = None if value is None else float(value)
    except ValueError:
        factor = -1.0
    if factor is not None and not factor > 0:
        raise ValueError(f"{BATCH_FACTOR_ENV}={value!r}: set it to a positive multiple of the plans' batch size "
                         f"(e.g. 2), or unset it to let the predictor time batching.")
    return factor


def check_predictor_environment() -> None:
    """ValueError for a bad nnscd predictor variable, before a run starts rather than at its first tile."""
    cpu_bf16_requested()
    batch_factor_from_environment()


def trainer_for_checkpoints(checkpoints: Sequence[str], trainer_name: str) -> type:
    """The class that builds the network these checkpoints hold: nnU-Net's lookup of `trainer_name`, then, where
    the class has one, its `for_weights` (a trainer whose network changed keeps its older folds predicting).
    UserError when the folds hold networks of different layouts."""
    trainer = recursive_find_trainer_class_by_name(trainer_name)
    if not hasattr(trainer, "for_weights"):
        return trainer
    layouts = {path: trainer.for_weights(torch.load(path, map_location="cpu", weights_only=False,
                                                    mmap=True)["network_weights"]) for path in checkpoints}
    if len(set(layouts.values())) > 1:
        old = [path for path, layout in layouts.items() if layout is not trainer]
        raise UserError(f"{', '.join(old)} hold(s) an older {trainer_name} network than the other folds "
                        f"({', '.join(p for p in checkpoints if p not in old)}): predict them in separate runs (-f) "
                        f"and ensemble the probabilities (nnScd_ensemble), or retrain the older folds.")
    return layouts[checkpoints[0]]


class nnScdPredictor(nnUNetPredictor):
    """nnUNetPredictor that batches sliding-window tiles and their mirrored copies, and whose segmentation files
    appear only when complete.

    nnU-Net runs one tile and one mirror at a time (batch 1: on a GPU the card idles between small kernels, on a
    CPU PyTorch takes its slow batch-1 path for 3D convolutions; nnU-Net issue 2504). Here each forward takes up to
    `forward_batch` inputs: every mirrored copy of as many tiles as fit. Tiles are accumulated in nnU-Net's order
    with nnU-Net's Gaussian and fp16 buffers, so outputs agree with nnUNetv2_predict up to floating-point order.
    Unless `nnScd_predict_batch_factor` is set, the first groups of tiles with more than one input take turns
    between one by one and one batch (two groups when one way is clearly faster, else four, best of two), and the
    faster way per input is kept for the rest of the run: the timing costs no forwards the run does not need.
    With `nnScd_cpu_bf16=1` a CPU runs the network under bf16 autocast.

    `--continue_prediction` skips a case whose segmentation exists; since that file is renamed into place after
    everything else of the case (probabilities included) was written, a rerun after a kill redoes exactly the
    unfinished cases.
    """

    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds,
                                             checkpoint_name: str = "checkpoint_final.pth") -> None:
        if use_folds is None:
            use_folds = self.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
        folds = [use_folds] if isinstance(use_folds, str) else list(use_folds)
        checkpoints = [os.path.join(model_training_output_dir, f"fold_{f}", checkpoint_name) for f in folds]
        with nnunet_hooks.predictor_trainer_lookup(partial(trainer_for_checkpoints, checkpoints)):
            super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        self.plans_manager = AtomicWritePlansManager(self.plans_manager.plans)

    def manual_initialization(self, network, plans_manager, configuration_manager, parameters, dataset_json: dict,
                              trainer_name: str, inference_allowed_mirroring_axes) -> None:
        super().manual_initialization(network, AtomicWritePlansManager(plans_manager.plans), configuration_manager,
                                      parameters, dataset_json, trainer_name, inference_allowed_mirroring_axes)

    part: Tuple[int, int] = (0, 1)  # (part_id, num_parts) of the cases, for the sequential prediction

    @classmethod
    def for_part(cls, part_id: int, num_parts: int) -> type:
        """This predictor for part `part_id` of `num_parts` of the cases (nnU-Net's -part_id / -num_parts)."""
        return type(cls.__name__, (cls,), {"part": (part_id, num_parts)})

    def _manage_input_and_output_lists(self, sources, outputs, previous_stage=None, overwrite: bool = True,
                                       part_id: int = 0, num_parts: int = 1, save_probabilities: bool = False):
        # nnU-Net 2.8's sequential prediction (-npp 0 -nps 0) asks for part 0 of 1 whatever -part_id and
        # -num_parts say, so every part would predict every case
        if (part_id, num_parts) == (0, 1):
            part_id, num_parts = self.part
        return super()._manage_input_and_output_lists(sources, outputs, previous_stage, overwrite, part_id,
                                                      num_parts, save_probabilities)

    def predict_from_files(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                           save_probabilities: bool = False, overwrite: bool = True,
                           num_processes_preprocessing: int = default_num_processes,
                           num_processes_segmentation_export: int = default_num_processes,
                           folder_with_segs_from_prev_stage: Optional[str] = None, num_parts: int = 1,
                           part_id: int = 0):
        # -npp 0 -nps 0: nnU-Net's predict_entry_point predicts sequentially, its model-folder twin (the command for
        # ONNX exports) passes the zeros on and fails in multiprocessing.Pool(0)
        if num_processes_preprocessing == 0 and num_processes_segmentation_export == 0:
            return self.predict_from_files_sequential(list_of_lists_or_source_folder,
                                                      output_folder_or_list_of_truncated_output_files,
                                                      save_probabilities, overwrite, folder_with_segs_from_prev_stage)
        return super().predict_from_files(list_of_lists_or_source_folder,
                                          output_folder_or_list_of_truncated_output_files, save_probabilities,
                                          overwrite, num_processes_preprocessing, num_processes_segmentation_export,
                                          folder_with_segs_from_prev_stage, num_parts, part_id)

    timed_forward_batch: Optional[int] = None  # set once the timing decided; per predictor, so per network
    _seconds_per_input: Optional[Dict[int, List[float]]] = None  # the timing so far

    @property
    def forward_batch(self) -> int:
        """Inputs per forward: the timed choice, else the factor (environment or default) x the plans' batch."""
        factor = batch_factor_from_environment()
        if factor is None and self.timed_forward_batch is not None:
            return self.timed_forward_batch
        return max(1, int((factor or DEFAULT_BATCH_FACTOR) * self.configuration_manager.batch_size))

    def _forward(self, inputs: torch.Tensor, batch: int) -> torch.Tensor:
        """fp32 logits of inputs (N, C, *patch), `batch` at a time (bf16 autocast if asked for on a CPU)."""
        bf16 = self.device.type == "cpu" and cpu_bf16_requested()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return torch.cat([self.network(chunk) for chunk in inputs.split(batch)]).float()

    def _run_network(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of inputs (N, C, *patch), forward_batch at a time. Until that is decided, groups of more than one
        input take turns: one by one, then in one batch. A way that is CLEAR_MARGIN faster per input is kept at
        once; a close call gets a second turn each, and the faster per input (best of two, so one hiccup of a busy
        machine does not decide) is kept. Every timed input is one the run needs anyway, and the run's first
        forward, which pays one-off set-up, is part of the first group but not timed."""
        undecided = batch_factor_from_environment() is None and self.timed_forward_batch is None
        if not undecided or self.forward_batch == 1 or len(inputs) == 1:
            return self._forward(inputs, self.forward_batch)
        first = self._seconds_per_input is None
        if first:
            self._seconds_per_input = {1: [], min(self.forward_batch, len(inputs)): []}
        timings = self._seconds_per_input  # {batch: [seconds per input, ...]}; the batch measured is the batch kept
        size = min(timings, key=lambda batch: len(timings[batch]))  # in turns, one by one first
        untimed = [self._forward(inputs[:1], 1)] if first else []
        timed = inputs[len(untimed):]
        synchronize(self.device)
        start = time.perf_counter()
        logits = self._forward(timed, size)
        synchronize(self.device)
        timings[size].append((time.perf_counter() - start) / len(timed))
        if all(timings.values()):
            best = {batch: min(seconds) for batch, seconds in timings.items()}
            if max(best.values()) >= CLEAR_MARGIN * min(best.values()) or all(len(s) == 2 for s in timings.values()):
                self.timed_forward_batch = min(best, key=best.get)
                if self.verbose:
                    print(f"nnScdPredictor: per input one by one {best[1]:.4f} s, in batches of {max(best)} "
                          f"{best[max(best)]:.4f} s; forward batch {self.timed_forward_batch}")
        return torch.cat([*untimed, logits])

    def mirror_axes_combinations(self, ndim: int) -> List[Tuple[int, ...]]:
        """() for the unmirrored input, then nnU-Net's combinations of mirroring axes (tensor dimensions)."""
        if not self.use_mirroring or self.allowed_mirroring_axes is None:
            return [()]
        assert max(self.allowed_mirroring_axes) <= ndim - 3, "mirror_axes does not match the dimension of the input!"
        axes = [a + 2 for a in self.allowed_mirroring_axes]
        return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over mirrors of the logits of a batch of tiles x (B, C, *patch), mirrored copies batched too."""
        combinations = self.mirror_axes_combinations(x.ndim)
        copies = torch.cat([torch.flip(x, axes) if axes else x for axes in combinations])  # (M * B, C, *patch)
        logits = self._run_network(copies)
        per_mirror = logits.view(len(combinations), x.shape[0], *logits.shape[1:])
        prediction = per_mirror[0].clone()
        for axes, mirrored in zip(combinations[1:], per_mirror[1:]):
            prediction += torch.flip(mirrored, axes)
        return prediction / len(combinations) if len(combinations) > 1 else prediction

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers,
                                                       do_on_device: bool = True) -> torch.Tensor:
        results_device = self.device if do_on_device else torch.device("cpu")
        predicted_logits: Optional[torch.Tensor] = None
        try:
            empty_cache(self.device)
            data = data.to(results_device)
            predicted_logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]),
                                           dtype=torch.half, device=results_device)
            n_predictions = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
            gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                        value_scaling_factor=10, device=results_device) if self.use_gaussian else 1
            mirrors = len(self.mirror_axes_combinations(len(self.configuration_manager.patch_size) + 2))
            tiles_per_step = max(1, self.forward_batch // mirrors)
            with tqdm(total=len(slicers), disable=not self.allow_tqdm) as progress:
                for start in range(0, len(slicers), tiles_per_step):
                    group = slicers[start:start + tiles_per_step]
                    tiles = torch.stack([data[s] for s in group]).to(self.device)
                    prediction = self._internal_maybe_mirror_and_predict(tiles).to(results_device)
                    for tile_prediction, s in zip(prediction, group):
                        predicted_logits[s] += tile_prediction * gaussian
                        n_predictions[s[1:]] += gaussian
                    progress.update(len(group))
            torch.div(predicted_logits, n_predictions, out=predicted_logits)
            if torch.any(torch.isinf(predicted_logits)):
                raise RuntimeError("Encountered inf in predicted array. Aborting... If this problem persists, reduce "
                                   "value_scaling_factor in compute_gaussian or increase the dtype of "
                                   "predicted_logits to fp32")
            return predicted_logits
        except Exception:
            del predicted_logits
            empty_cache(self.device)
            empty_cache(results_device)
            raise


class nnScdOnnxPredictor(nnScdPredictor):
    """nnScdPredictor whose network is an ONNX export (nnScd_export_onnx) run by onnxruntime on the CPU: the model
    folder it is initialised from is the export folder. Preprocessing, sliding window, batching, mirroring,
    ensembling of folds and export are the torch predictor's, so labels agree with it up to floating-point order.
    """

    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds,
                                             checkpoint_name: str = "checkpoint_final.pth") -> None:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        if self.device.type != "cpu":
            raise UserError(f"-device {self.device.type} with an ONNX export: onnxruntime runs it on the CPU here "
                            f"(the onnxruntime package has no GPU provider). Pass -device cpu, or predict with the "
                            f"trained model folder (nnScd_predict) on the GPU.")
        if cpu_bf16_requested():
            raise UserError(f"{CPU_BF16_ENV}=1 sets torch's bf16 autocast, which an ONNX model run by onnxruntime "
                            f"does not use. Unset {CPU_BF16_ENV}.")
        folds = [str(f) for f in ([use_folds] if isinstance(use_folds, str) else use_folds or [])]
        export = read_export(model_training_output_dir, folds)
        folds = folds or list(export.folds)
        plans_manager = PlansManager(export.plans)
        self.manual_initialization(OnnxRuntimeNetwork(model_training_output_dir, export, folds), plans_manager,
                                   plans_manager.get_configuration(export.configuration),
                                   OnnxRuntimeNetwork.parameters_of(folds), export.dataset_json,
                                   export.trainer_name, export.inference_allowed_mirroring_axes)
