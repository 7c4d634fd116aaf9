"""The nnScd_* console scripts: nnU-Net's own commands, same flags, with nnscd's trainers and safe outputs.

Each command settles the environment (nnscd.paths) before nnunetv2 is imported, checks what nnU-Net would
only find out late or obscurely, then hands over to nnunetv2's own entry point. What nnU-Net prints for the
user to run next names the nnScd_ commands, which find nnscd's trainers.
"""
import contextlib
import importlib
import json
import io
import os
import sys
from typing import Callable, ContextManager, Iterator, List, NoReturn, Optional

from nnscd.paths import settle_environment
from nnscd.safe_io import PARTIAL_PREFIX, atomic_path

NNUNET_PREFIX, NNSCD_PREFIX = "nnUNetv2_", "nnScd_"


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


def fail(message: str) -> NoReturn:
    """Stop a command with a message for the user (no traceback) and exit status 2."""
    print(f"nnscd: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _flag(argv: List[str], flag: str, default: str) -> str:
    """The value after one nnU-Net flag, read before nnU-Net parses the command line.

    An exact token match: argparse would read `-device` as `-d evice` when only `-d` is declared.
    """
    position = argv.index(flag) + 1 if flag in argv else len(argv)
    return argv[position] if position < len(argv) else default


def _flag_values(argv: List[str], flag: str) -> Optional[List[str]]:
    """The values after a flag that takes several (`-d 4 5`, `-f 0 1`), or None if it is absent."""
    if flag not in argv:
        return None
    values = argv[argv.index(flag) + 1:]
    return values[:next((i for i, a in enumerate(values) if a.startswith("-")), len(values))]


def _prepare(argv: List[str], takes_device: bool = False) -> None:
    """Settle the environment; refuse a CUDA run on a machine without CUDA before any work starts."""
    import torch

    device = _flag(argv, "-device", "cuda") if takes_device else None
    settle_environment(cpu=device == "cpu" or not torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available() and "-h" not in argv and "--help" not in argv:
        fail("CUDA is not available on this machine. Add `-device cpu` (nnU-Net's flag) to run on the CPU.")


@contextlib.contextmanager
def _patched(module, name: str, replacement) -> Iterator[None]:
    """Swap one global of an nnunetv2 module for the duration of a command (its entry point reads it by name)."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def _nnscd_names() -> Iterator[None]:
    with contextlib.redirect_stdout(_RenamingStream(sys.stdout)):
        yield


def _delegate(module: str, function: str, before: Optional[Callable[[List[str]], None]] = None,
              after: Optional[Callable[[List[str]], None]] = None,
              context: Callable[[], ContextManager] = contextlib.nullcontext) -> Callable[[], None]:
    """A console script that runs nnunetv2's `module.function` entry point under nnscd's environment and
    `context()`, after `before(argv)` (checks; skipped for -h) and before `after(argv)` if given."""

    def command() -> None:
        argv = sys.argv[1:]
        _prepare(argv)
        if before is not None and "-h" not in argv and "--help" not in argv:
            before(argv)
        entry = getattr(importlib.import_module(module), function)
        with context(), _nnscd_names():
            entry()
        if after is not None:
            after(argv)

    command.__doc__ = f"nnScd_ twin of nnunetv2's {module}.{function}"
    return command


def _write_token_plans(argv: List[str]) -> None:
    """After nnU-Net planned: record the token-aware plans (nnscd.token_planning) as nnScdPlans.json."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnscd.token_planning import PLANS_NAME, describe_token_plans, write_token_plans

    if "-pl" in argv and "-overwrite_plans_name" not in argv:
        print(f"nnscd: {PLANS_NAME}.json is derived from nnUNetPlans; with -pl, add -overwrite_plans_name NAME to "
              f"get NAME_nnScd.json. Token-sparse trainers plan their tokens from any plans when they start.")
        return
    source = _flag(argv, "-overwrite_plans_name", "nnUNetPlans")
    target = PLANS_NAME if source == "nnUNetPlans" else f"{source}_nnScd"
    for dataset in _flag_values(argv, "-d"):
        folder = os.path.join(str(nnUNet_preprocessed), maybe_convert_to_dataset_name(dataset))
        with open(write_token_plans(folder, source, target)) as f:
            table = describe_token_plans(json.load(f))
        print(f"\nnnscd: token-aware plans for transformer trainers written to {folder}/{target}.json "
              f"(train with -p {target}; nnU-Net's {source}.json is unchanged)\n{table}")


def _check_raw_datasets(argv: List[str]) -> None:
    """Before fingerprinting: every problem of each -d dataset (nnscd.input_checks), in one message per dataset."""
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnscd.input_checks import check_raw_dataset, describe

    for dataset in _flag_values(argv, "-d") or []:
        try:
            folder = os.path.join(str(nnUNet_raw), maybe_convert_to_dataset_name(dataset))
        except (RuntimeError, ValueError) as e:
            fail(f"-d {dataset}: {e} Put the dataset in {nnUNet_raw} as DatasetXXX_Name (nnScd_convert_MSD_dataset "
                 f"or dataset_conversion) or fix -d.")
        problems = check_raw_dataset(folder, num_threads=int(_flag(argv, "-npfp", "4")))
        if problems:
            fail(describe(problems, folder))


@contextlib.contextmanager
def _atomic_preprocessing() -> Iterator[None]:
    """Plans that name nnU-Net's DefaultPreprocessor get nnscd's, which writes each case atomically."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    from nnscd.atomic_preprocessor import nnScdPreprocessor

    lookup = ConfigurationManager.preprocessor_class
    atomic = property(lambda self: nnScdPreprocessor if self.preprocessor_name == "DefaultPreprocessor"
                      else lookup.fget(self))
    with _patched(ConfigurationManager, "preprocessor_class", atomic):
        yield


plan_and_preprocess = _delegate("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                                "plan_and_preprocess_entry", before=_check_raw_datasets, after=_write_token_plans,
                                context=_atomic_preprocessing)
extract_fingerprint = _delegate("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                                "extract_fingerprint_entry", before=_check_raw_datasets)
plan_experiment = _delegate("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "plan_experiment_entry",
                            after=_write_token_plans)
preprocess = _delegate("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "preprocess_entry",
                       context=_atomic_preprocessing)
determine_postprocessing = _delegate("nnunetv2.postprocessing.remove_connected_components",
                                     "entry_point_determine_postprocessing_folder")
apply_postprocessing = _delegate("nnunetv2.postprocessing.remove_connected_components",
                                 "entry_point_apply_postprocessing")
ensemble = _delegate("nnunetv2.ensembling.ensemble", "entry_point_ensemble_folders")
evaluate_folder = _delegate("nnunetv2.evaluation.evaluate_predictions", "evaluate_folder_entry_point")
export_model_to_zip = _delegate("nnunetv2.model_sharing.entry_points", "export_pretrained_model_entry")
install_pretrained_model_from_zip = _delegate("nnunetv2.model_sharing.entry_points", "install_from_zip_entry_point")
convert_msd_dataset = _delegate("dataset_conversion.msd", "main")  # nnunetv2's converter, fixed


def check_trainer_name(name: str) -> type:
    """The trainer class of `name`, found by nnU-Net's lookup (nnunetv2, nnUNet_extTrainer); if it finds none,
    fail with the list of nnscd's trainers."""
    import nnscd_trainers
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    if "__" in name:
        fail(f"trainer name '{name}' contains '__', which nnU-Net uses to separate trainer, plans and "
             f"configuration in result folder names. Rename the class.")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the lookup narrates every folder it searches
            return recursive_find_trainer_class_by_name(name)
    except RuntimeError:
        fail(f"unknown trainer '{name}'. nnscd's trainers: {', '.join(sorted(nnscd_trainers.__all__))}. "
             f"nnU-Net's own trainers (nnUNetTrainer, nnUNetTrainer_5epochs, ...) work too; for your own class, "
             f"put its folder in the nnUNet_extTrainer environment variable.")


def train() -> None:
    """nnScd_train DATASET CONFIGURATION FOLD [-tr TRAINER] [--c] [--npz] [-device cpu] ... as nnUNetv2_train."""
    argv = sys.argv[1:]
    _prepare(argv, takes_device=True)
    if "-h" not in argv and "--help" not in argv:
        trainer_class = check_trainer_name(_flag(argv, "-tr", "nnUNetTrainer"))
        from nnscd_trainers.nnscd_trainer import seed_from_environment
        _check_environment(seed_from_environment)  # final validation predicts with nnScdPredictor
        if len(argv) >= 3 and not any(a.startswith("-") for a in argv[:2]):  # else nnU-Net's parser explains
            from nnscd.input_checks import check_training_setup, describe

            dataset, configuration, fold = argv[:3]
            problems = check_training_setup(dataset, configuration, fold, trainer_class,
                                            _flag(argv, "-p", "nnUNetPlans"), "--c" in argv)
            if problems:
                fail(describe(problems, f"nnScd_train {' '.join(argv[:3])}"))
    from nnunetv2.run import run_training as nnunet_run_training
    from nnscd.pretrained_weights import load_pretrained_weights
    with _patched(nnunet_run_training, "load_pretrained_weights", load_pretrained_weights), _nnscd_names():
        nnunet_run_training.run_training_entry()


def _check_environment(*extra_checks: Callable[[], object]) -> None:
    """Fail on a bad nnscd environment variable (nnScd_cpu_bf16, nnScd_predict_batch_factor, ...) before any work."""
    from nnscd.predictor import check_predictor_environment

    try:
        for check in (check_predictor_environment, *extra_checks):
            check()
    except ValueError as error:
        fail(str(error))


def _check_prediction_folders(input_folder: str, output_folder: str) -> None:
    if not os.path.isdir(input_folder):
        fail(f"input folder {input_folder} does not exist. Pass the folder holding the images (-i).")
    if not [f for f in os.listdir(input_folder) if not f.startswith(".")]:
        fail(f"input folder {input_folder} is empty: nothing to predict. Put the images there "
             f"(CASE_0000.nii.gz, ...) or point -i at the right folder.")
    if os.path.abspath(input_folder) == os.path.abspath(output_folder):
        fail(f"output folder equals the input folder ({input_folder}). Predictions would mix with the images; "
             f"choose another -o.")
    if os.path.isdir(output_folder):  # leftovers of a killed run; finished cases are never partial files
        for name in os.listdir(output_folder):
            if name.startswith(PARTIAL_PREFIX):
                os.remove(os.path.join(output_folder, name))


def _check_prediction_input(argv: List[str], model_folder: str) -> None:
    """Before the network is loaded: checkpoints, channels, dimensions and intensities of every input case."""
    from nnscd.input_checks import check_prediction_input, describe

    input_folder = _flag(argv, "-i", "")
    continuing = "--continue_prediction" in argv or "--c" in argv
    folds = _flag_values(argv, "-f") or ["0", "1", "2", "3", "4"]  # nnU-Net's default
    problems = check_prediction_input(input_folder, model_folder, folds, _flag(argv, "-chk", "checkpoint_final.pth"),
                                      continue_in=_flag(argv, "-o", "") if continuing else None)
    if problems:
        fail(describe(problems, f"the prediction of {input_folder} with {model_folder}"))


def _nnscd_predictor():
    """Make nnunetv2's predict entry points build nnscd's predictor (same flags, safe exports)."""
    from nnunetv2.inference import predict_from_raw_data
    from nnscd.predictor import nnScdPredictor

    return _patched(predict_from_raw_data, "nnUNetPredictor", nnScdPredictor)


def predict() -> None:
    """nnScd_predict -i IN -o OUT -d DATASET -c CONFIGURATION [-tr TRAINER] [-f FOLDS] ... as nnUNetv2_predict."""
    argv = sys.argv[1:]
    _prepare(argv, takes_device=True)
    if "-h" not in argv and "--help" not in argv:
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        _check_environment()
        _check_prediction_folders(_flag(argv, "-i", ""), _flag(argv, "-o", ""))
        trainer = _flag(argv, "-tr", "nnUNetTrainer")
        check_trainer_name(trainer)
        dataset, plans, configuration = _flag(argv, "-d", ""), _flag(argv, "-p", "nnUNetPlans"), _flag(argv, "-c", "")
        try:
            model_folder = get_output_folder(dataset, trainer, plans, configuration)
        except RuntimeError as e:  # maybe_convert_to_dataset_name: no such dataset anywhere
            fail(f"{e} Check -d.")
        if not os.path.isdir(model_folder):
            parent = os.path.dirname(model_folder)
            trained = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
            fail(f"no trained model at {model_folder}. Train it first (nnScd_train {dataset} {configuration} FOLD "
                 f"-tr {trainer} -p {plans}), or pick one of the trained models in {parent}: "
                 f"{', '.join(trained) or 'none'}.")
        _check_prediction_input(argv, model_folder)
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point
    with _nnscd_predictor(), _nnscd_names():
        predict_entry_point()


def predict_from_modelfolder() -> None:
    """nnScd_predict_from_modelfolder -i IN -o OUT -m MODEL_FOLDER ... as nnUNetv2_predict_from_modelfolder."""
    argv = sys.argv[1:]
    _prepare(argv, takes_device=True)
    if "-h" not in argv and "--help" not in argv:
        _check_environment()
        _check_prediction_folders(_flag(argv, "-i", ""), _flag(argv, "-o", ""))
        model_folder = _flag(argv, "-m", "")
        if not os.path.isfile(os.path.join(model_folder, "plans.json")):
            fail(f"{model_folder} is not a trained model folder (no plans.json). Pass the folder "
                 f"TRAINER__PLANS__CONFIGURATION that holds fold_X subfolders (-m).")
        _check_prediction_input(argv, model_folder)
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder
    with _nnscd_predictor(), _nnscd_names():
        predict_entry_point_modelfolder()


def _instructions_naming_nnscd(print_inference_instructions: Callable) -> Callable:
    def write_instructions(inference_info_dict: dict, instructions_file: str = None) -> None:
        print_inference_instructions(inference_info_dict, instructions_file)
        if instructions_file is not None:
            with open(instructions_file) as f:
                text = f.read().replace(NNUNET_PREFIX, NNSCD_PREFIX)
            with atomic_path(instructions_file) as tmp, open(tmp, "w") as f:
                f.write(text)
    return write_instructions


def find_best_configuration() -> None:
    """nnScd_find_best_configuration DATASET -c ... -tr ... as nnUNetv2_find_best_configuration.

    nnU-Net writes inference_instructions.txt naming its own commands; nnscd's names the nnScd_ commands,
    which also find nnscd's trainers.
    """
    _prepare(sys.argv[1:])
    from nnunetv2.evaluation import find_best_configuration as fbc

    rewrite = _instructions_naming_nnscd(fbc.print_inference_instructions)
    with _patched(fbc, "print_inference_instructions", rewrite), _nnscd_names():
        fbc.find_best_configuration_entry_point()
