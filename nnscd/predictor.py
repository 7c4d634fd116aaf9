"""nnscd's predictor: nnU-Net's, with exports a kill cannot leave half-written."""
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnscd.atomic_plans_manager import AtomicWritePlansManager


class nnScdPredictor(nnUNetPredictor):
    """nnUNetPredictor whose segmentation files appear only when complete.

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
