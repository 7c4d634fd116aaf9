"""Every place where nnscd extends nnU-Net beyond subclassing, each a named hook.

nnscd extends nnU-Net through its own extension points wherever nnU-Net has one: trainer subclasses found through
`nnUNet_extTrainer`, class attributes, the plans. A few of nnU-Net's entry points build a class they name as a
module global (the predictor in `nnUNetTrainer.perform_actual_validation` and in the predict entry points, the
augmenter in `get_dataloaders`, the pretrained-weights loader of `run_training`, ...), so the only way to give them
nnscd's class is to swap that global while the call runs. All of those swaps are here, made by one context
manager, `swapped`; `HOOKED` lists every attribute they touch, and tests/test_architecture.py fails when an
nnunetv2 release renames one. The range of nnunetv2 these hooks are tested with is pinned in pyproject.toml.
"""
import contextlib
import importlib
import io
import sys
from typing import Any, Callable, Iterator, List, Tuple

NNUNET_PREFIX, NNSCD_PREFIX = "nnUNetv2_", "nnScd_"
TRAINER_MODULE = "nnunetv2.training.nnUNetTrainer.nnUNetTrainer"
PREDICT_MODULE = "nnunetv2.inference.predict_from_raw_data"
RUN_TRAINING_MODULE = "nnunetv2.run.run_training"
FIND_BEST_MODULE = "nnunetv2.evaluation.find_best_configuration"
PLANS_MODULE = "nnunetv2.utilities.plans_handling.plans_handler"
PLANNER_MODULE = "nnunetv2.experiment_planning.experiment_planners.default_experiment_planner"

# (module, attribute) of nnunetv2 that a hook below swaps or reads
HOOKED: List[Tuple[str, str]] = [
    (TRAINER_MODULE, "NonDetMultiThreadedAugmenter"), (TRAINER_MODULE, "nnUNetPredictor"), (TRAINER_MODULE, "DDP"),
    (PREDICT_MODULE, "nnUNetPredictor"), (PREDICT_MODULE, "predict_entry_point"),
    (PREDICT_MODULE, "predict_entry_point_modelfolder"), (PREDICT_MODULE, "recursive_find_trainer_class_by_name"),
    (RUN_TRAINING_MODULE, "load_pretrained_weights"),
    (FIND_BEST_MODULE, "print_inference_instructions"), (PLANS_MODULE, "ConfigurationManager"),
    (PLANNER_MODULE, "get_allowed_n_proc_DA"),
]


@contextlib.contextmanager
def swapped(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    """Set `owner.name` to `replacement` for the duration of the block (nnU-Net reads it by name when it runs)."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _module(name: str):
    return importlib.import_module(name)


def trainer_augmenter(augmenter: type) -> contextlib.AbstractContextManager:
    """nnUNetTrainer.get_dataloaders builds `augmenter` where it builds NonDetMultiThreadedAugmenter (seeds=None)."""
    return swapped(_module(TRAINER_MODULE), "NonDetMultiThreadedAugmenter", augmenter)


def trainer_predictor(predictor: type) -> contextlib.AbstractContextManager:
    """nnUNetTrainer.perform_actual_validation predicts with `predictor` instead of nnUNetPredictor."""
    return swapped(_module(TRAINER_MODULE), "nnUNetPredictor", predictor)


def trainer_ddp_wrapper(wrap: Callable) -> contextlib.AbstractContextManager:
    """nnUNetTrainer.initialize wraps the network with `wrap(network, device_ids=...)` instead of DDP (nnU-Net's
    device_ids=[RANK] holds only on one node of GPUs)."""
    return swapped(_module(TRAINER_MODULE), "DDP", wrap)


def entry_point_predictor(predictor: type) -> contextlib.AbstractContextManager:
    """nnUNetv2_predict and nnUNetv2_predict_from_modelfolder build `predictor` instead of nnUNetPredictor."""
    return swapped(_module(PREDICT_MODULE), "nnUNetPredictor", predictor)


def predictor_trainer_lookup(find: Callable[[str], type]) -> contextlib.AbstractContextManager:
    """nnUNetPredictor.initialize_from_trained_model_folder takes the trainer class that builds the network from
    `find(trainer_name)`."""
    return swapped(_module(PREDICT_MODULE), "recursive_find_trainer_class_by_name", find)


def pretrained_weights_loader(load: Callable) -> contextlib.AbstractContextManager:
    """nnUNetv2_train's `-pretrained_weights` loads through `load` (same signature as nnU-Net's)."""
    return swapped(_module(RUN_TRAINING_MODULE), "load_pretrained_weights", load)


def preprocessor_for_default(preprocessor: type) -> contextlib.AbstractContextManager:
    """Plans naming nnU-Net's DefaultPreprocessor get `preprocessor`; other preprocessors are untouched.

    ConfigurationManager.preprocessor_class is a property that looks the name up, so the property is swapped."""
    manager = _module(PLANS_MODULE).ConfigurationManager
    lookup = manager.preprocessor_class
    chosen = property(lambda self: preprocessor if self.preprocessor_name == "DefaultPreprocessor"
                      else lookup.fget(self))
    return swapped(manager, "preprocessor_class", chosen)


def planner_threads_at_least_one() -> contextlib.AbstractContextManager:
    """nnU-Net's ExperimentPlanner sets torch's thread count to nnUNet_n_proc_DA while it sizes networks, and
    nnU-Net documents nnUNet_n_proc_DA=0 as the way to turn augmentation workers off: torch refuses 0 threads, so
    planning died after the fingerprint was written. The planner gets at least one thread."""
    module = _module(PLANNER_MODULE)
    allowed = module.get_allowed_n_proc_DA
    return swapped(module, "get_allowed_n_proc_DA", lambda: max(1, allowed()))


def inference_instructions_naming_nnscd() -> contextlib.AbstractContextManager:
    """nnUNetv2_find_best_configuration's inference_instructions.txt names the nnScd_ commands (they find nnscd's
    trainers; nnU-Net's would not)."""
    from nnscd.core.safe_io import atomic_path

    module = _module(FIND_BEST_MODULE)
    print_instructions = module.print_inference_instructions

    def write_instructions(inference_info_dict: dict, instructions_file: str = None) -> None:
        print_instructions(inference_info_dict, instructions_file)
        if instructions_file is not None:
            with open(instructions_file) as f:
                text = f.read().replace(NNUNET_PREFIX, NNSCD_PREFIX)
            with atomic_path(instructions_file) as tmp, open(tmp, "w") as f:
                f.write(text)
    return swapped(module, "print_inference_instructions", write_instructions)


class _RenamingStream(io.TextIOBase):
    """stdout that tells the user nnScd_ commands where nnU-Net says nnUNetv2_ ones."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(text.replace(NNUNET_PREFIX, NNSCD_PREFIX))

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()


def command_names_in_output() -> contextlib.AbstractContextManager:
    """What nnU-Net's entry point prints for the user to run next ("run nnUNetv2_plan_experiment ...") names the
    nnScd_ twin: nnU-Net has no setting for its command names, so its stdout is rewritten while it runs."""
    return contextlib.redirect_stdout(_RenamingStream(sys.stdout))


def add_log_series(trainer: Any, key: str) -> None:
    """Give nnU-Net's training logger a per-epoch series `key`: its `log` takes only keys it knows, and it has no
    call to add one. The series is stored in checkpoints with nnU-Net's own, so it survives `--c`."""
    trainer.logger.local_logger.my_fantastic_logging.setdefault(key, [])
