"""nnscd's predictor: nnU-Net's, with batched sliding-window tiles and mirrors, and exports a kill cannot leave
half-written."""
import itertools
import os
import time
from typing import List, Optional, Tuple

import torch
from tqdm import tqdm

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.helpers import empty_cache
from nnscd.atomic_plans_manager import AtomicWritePlansManager
from nnscd.benchmark import synchronize

# Largest forward batch at inference, as a multiple of the plans' training batch: a forward without gradients
# keeps no activations for backward, so it fits where training fit. Setting `nnScd_predict_batch_factor` fixes the
# forward batch at that multiple; unset, the predictor times this largest batch against batch 1 on its first
# tiles and keeps the faster (on a CPU large 3D inputs can run slower batched than one by one).
BATCH_FACTOR_ENV, DEFAULT_BATCH_FACTOR = "nnScd_predict_batch_factor", 2.0


class nnScdPredictor(nnUNetPredictor):
    """nnUNetPredictor that batches sliding-window tiles and their mirrored copies, and whose segmentation files
    appear only when complete.

    nnU-Net runs one tile and one mirror at a time (batch 1: on a GPU the card idles between small kernels, on a
    CPU PyTorch takes its slow batch-1 path for 3D convolutions; nnU-Net issue 2504). Here each forward takes up to
    `forward_batch` inputs: every mirrored copy of as many tiles as fit. Tiles are accumulated in nnU-Net's order
    with nnU-Net's Gaussian and fp16 buffers, so outputs agree with nnUNetv2_predict up to floating-point order.
    Unless `nnScd_predict_batch_factor` is set, the first tiles with more than one input are run both one by one
    and in one batch, twice each in turns, and the faster way (best of two) is kept for the rest of the run.

    `--continue_prediction` skips a case whose segmentation exists; since that file is renamed into place after
    everything else of the case (probabilities included) was written, a rerun after a kill redoes exactly the
    unfinished cases.
    """

    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds,
                                             checkpoint_name: str = "checkpoint_final.pth") -> None:
        super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        self.plans_manager = AtomicWritePlansManager(self.plans_manager.plans)

    def manual_initialization(self, network, plans_manager, configuration_manager, parameters, dataset_json: dict,
                              trainer_name: str, inference_allowed_mirroring_axes) -> None:
        super().manual_initialization(network, AtomicWritePlansManager(plans_manager.plans), configuration_manager,
                                      parameters, dataset_json, trainer_name, inference_allowed_mirroring_axes)

    timed_forward_batch: Optional[int] = None  # set by the first timing; per predictor, so per network

    @property
    def forward_batch(self) -> int:
        """Inputs per forward: the timed choice, else the factor (environment or default) x the plans' batch."""
        factor = os.environ.get(BATCH_FACTOR_ENV)
        if factor is None and self.timed_forward_batch is not None:
            return self.timed_forward_batch
        return max(1, int(float(factor or DEFAULT_BATCH_FACTOR) * self.configuration_manager.batch_size))

    def _run_network(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of inputs (N, C, *patch), forward_batch at a time; the first time, choose forward_batch."""
        undecided = os.environ.get(BATCH_FACTOR_ENV) is None and self.timed_forward_batch is None
        if not undecided or self.forward_batch == 1 or len(inputs) == 1:
            return torch.cat([self.network(chunk) for chunk in inputs.split(self.forward_batch)])
        batched = min(self.forward_batch, len(inputs))  # the batch that is measured is the batch that is kept
        self.network(inputs[:1])  # warm-up, so first-call set-up counts against neither way
        seconds = {1: [], batched: []}
        for size in (1, batched, 1, batched):  # in turns, best of two: one hiccup of a busy machine does not decide
            synchronize(self.device)
            start = time.perf_counter()
            logits = torch.cat([self.network(chunk) for chunk in inputs.split(size)])
            synchronize(self.device)
            seconds[size].append(time.perf_counter() - start)
        best = {size: min(times) for size, times in seconds.items()}
        self.timed_forward_batch = min(best, key=best.get)
        if self.verbose:
            print(f"nnScdPredictor: {len(inputs)} inputs one by one {best[1]:.3f} s, in batches of {batched} "
                  f"{best[batched]:.3f} s; forward batch {self.timed_forward_batch}")
        return logits

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
