"""The nnScd_* console scripts: nnU-Net's own commands, same flags, with nnscd's trainers and safe outputs.

Each command settles the environment (nnscd.core.paths) before nnunetv2 is imported, checks what nnU-Net would
only find out late or obscurely, then hands over to nnunetv2's own entry point. What nnU-Net prints for the
user to run next names the nnScd_ commands, which find nnscd's trainers.
"""
import contextlib
import importlib
import json
import os
import sys
from typing import Callable, ContextManager, Iterator, List, Optional

from nnscd.cli import check_environment, console_script
from nnscd.core import distributed, nnunet_hooks
from nnscd.core.device import prepare_run
from nnscd.core.folder_lock import folder_lock, held_locks
from nnscd.core.onnx_models import SIDECAR, is_export
from nnscd.core.errors import UserError
from nnscd.core.safe_io import PARTIAL_PREFIX, disk_errors_explained
from nnscd.checks.trainer_names import find_trainer


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


def _asks_help(argv: List[str]) -> bool:
    return "-h" in argv or "--help" in argv


def _prepare(argv: List[str], takes_device: bool = False) -> None:
    """Settle the environment; refuse a CUDA run on a machine without CUDA before any work starts (not for -h)."""
    prepare_run(None if _asks_help(argv) or not takes_device else _flag(argv, "-device", "cuda"))


def _delegate(module: str, function: str, before: Optional[Callable[[List[str]], None]] = None,
              after: Optional[Callable[[List[str]], None]] = None,
              context: Callable[[], ContextManager] = contextlib.nullcontext) -> Callable[[], None]:
    """A console script that runs nnunetv2's `module.function` entry point under nnscd's environment and
    `context()`, after `before(argv)` (checks; skipped for -h) and before `after(argv)` if given."""

    def command() -> None:
        argv = sys.argv[1:]
        _prepare(argv)
        if before is not None and not _asks_help(argv):
            before(argv)
        entry = getattr(importlib.import_module(module), function)
        with context(), nnunet_hooks.command_names_in_output():
            entry()
        if after is not None:
            after(argv)

    command.__doc__ = f"nnScd_ twin of nnunetv2's {module}.{function}"
    return console_script(command)


def _write_token_plans(argv: List[str]) -> None:
    """After nnU-Net planned: record the token-aware plans (nnscd.core.token_planning) as nnScdPlans.json."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnscd.core.token_planning import PLANS_NAME, describe_token_plans, write_token_plans
    from nnscd_trainers.token_sparse_trainers import STPMTATrainer, STPMTATrainer_paper

    if "-pl" in argv and "-overwrite_plans_name" not in argv:
        print(f"nnscd: {PLANS_NAME}.json is derived from nnUNetPlans; with -pl, add -overwrite_plans_name NAME to "
              f"get NAME_nnScd.json. Token-sparse trainers plan their tokens from any plans when they start.")
        return
    source = _flag(argv, "-overwrite_plans_name", "nnUNetPlans")
    target = PLANS_NAME if source == "nnUNetPlans" else f"{source}_nnScd"
    for dataset in _flag_values(argv, "-d"):
        folder = os.path.join(str(nnUNet_preprocessed), maybe_convert_to_dataset_name(dataset))
        with open(write_token_plans(folder, STPMTATrainer.token_plan, source, target)) as f:
            table = describe_token_plans(json.load(f), {t.__name__: t.pruning() for t in
                                                        (STPMTATrainer, STPMTATrainer_paper)})
        print(f"\nnnscd: token-aware plans for transformer trainers written to {folder}/{target}.json "
              f"(train with -p {target}; nnU-Net's {source}.json is unchanged)\n{table}")


def _check_raw_datasets(argv: List[str]) -> None:
    """Before fingerprinting: every problem of each -d dataset (nnscd.checks.input_checks), in one message per dataset."""
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnscd.checks.input_checks import check_raw_dataset, describe

    for dataset in _flag_values(argv, "-d") or []:
        try:
            folder = os.path.join(str(nnUNet_raw), maybe_convert_to_dataset_name(dataset))
        except (RuntimeError, ValueError) as e:
            raise UserError(f"-d {dataset}: {e} Put the dataset in {nnUNet_raw} as DatasetXXX_Name "
                            f"(nnScd_convert_MSD_dataset or dataset_conversion) or fix -d.") from None
        problems = check_raw_dataset(folder, num_threads=int(_flag(argv, "-npfp", "4")))
        if problems:
            raise UserError(describe(problems, folder))


@contextlib.contextmanager
def _planning_and_preprocessing() -> Iterator[None]:
    """Plans that name nnU-Net's DefaultPreprocessor get nnscd's, which writes each case atomically; the planner
    runs with nnUNet_n_proc_DA=0 too; a full or read-only nnUNet_preprocessed is named."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnscd.core.atomic_preprocessor import nnScdPreprocessor

    with nnunet_hooks.preprocessor_for_default(nnScdPreprocessor), nnunet_hooks.planner_threads_at_least_one(), \
            disk_errors_explained(str(nnUNet_preprocessed), atomic=False):
        yield


plan_and_preprocess = _delegate("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                                "plan_and_preprocess_entry", before=_check_raw_datasets, after=_write_token_plans,
                                context=_planning_and_preprocessing)
extract_fingerprint = _delegate("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                                "extract_fingerprint_entry", before=_check_raw_datasets)
plan_experiment = _delegate("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "plan_experiment_entry",
                            after=_write_token_plans, context=_planning_and_preprocessing)
preprocess = _delegate("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "preprocess_entry",
                       context=_planning_and_preprocessing)
determine_postprocessing = _delegate("nnunetv2.postprocessing.remove_connected_components",
                                     "entry_point_determine_postprocessing_folder")
apply_postprocessing = _delegate("nnunetv2.postprocessing.remove_connected_components",
                                 "entry_point_apply_postprocessing")
ensemble = _delegate("nnunetv2.ensembling.ensemble", "entry_point_ensemble_folders")
evaluate_folder = _delegate("nnunetv2.evaluation.evaluate_predictions", "evaluate_folder_entry_point")
export_model_to_zip = _delegate("nnunetv2.model_sharing.entry_points", "export_pretrained_model_entry")
install_pretrained_model_from_zip = _delegate("nnunetv2.model_sharing.entry_points", "install_from_zip_entry_point")


@console_script
def train() -> None:
    """nnScd_train DATASET CONFIGURATION FOLD [-tr TRAINER] [--c] [--npz] [-device cpu] ... as nnUNetv2_train.

    Under torchrun every process runs this command and joins one DDP training (nnscd.core.distributed);
    `-num_gpus N` starts N such processes on this machine (GPUs, or CPU processes with -device cpu)."""
    argv = sys.argv[1:]
    _prepare(argv, takes_device=True)
    device_type = _flag(argv, "-device", "cuda")
    processes = int(_flag(argv, "-num_gpus", "1"))
    lock, disk_errors = contextlib.nullcontext(), contextlib.nullcontext()
    if not _asks_help(argv):
        trainer_class = find_trainer(_flag(argv, "-tr", "nnUNetTrainer"))
        _check_distributed_setup(trainer_class, device_type, processes)
        from nnscd_trainers.nnscd_trainer import seed_from_environment
        check_environment(seed_from_environment)  # final validation predicts with nnScdPredictor
        if len(argv) >= 3 and not any(a.startswith("-") for a in argv[:2]):  # else nnU-Net's parser explains
            from nnscd.checks.input_checks import check_training_setup, describe

            dataset, configuration, fold = argv[:3]
            problems = check_training_setup(dataset, configuration, fold, trainer_class,
                                            _flag(argv, "-p", "nnUNetPlans"), "--c" in argv)
            if problems:
                raise UserError(describe(problems, f"nnScd_train {' '.join(argv[:3])}"))
            if processes > 1:
                _start_processes(argv, processes)
                return
            if distributed.rank() == 0:  # one lock for the whole job; every rank writes only below rank 0's
                from nnunetv2.utilities.file_path_utilities import get_output_folder
                fold_folder = get_output_folder(dataset, trainer_class.__name__, _flag(argv, "-p", "nnUNetPlans"),
                                                configuration, fold)
                lock = folder_lock(fold_folder, "nnscd_train", "nnScd_train of this fold")
                disk_errors = disk_errors_explained(fold_folder, atomic=False)
    from nnunetv2.run.run_training import run_training_entry
    from nnscd.core.pretrained_weights import load_pretrained_weights
    with lock, disk_errors, nnunet_hooks.pretrained_weights_loader(load_pretrained_weights), \
            nnunet_hooks.command_names_in_output(), _process_group(device_type):
        run_training_entry()


def _check_distributed_setup(trainer_class: type, device_type: str, processes: int) -> None:
    """UserError for a DDP run that cannot work, before any process starts."""
    from nnscd_trainers.nnscd_trainer import nnScdTrainer

    if processes > 1 and distributed.launched_by_torchrun():
        raise UserError(f"-num_gpus {processes} under torchrun: torchrun already started "
                        f"{distributed.world_size()} processes. Drop -num_gpus (torchrun's --nproc_per_node and "
                        f"--nnodes set the processes).")
    several = processes > 1 or distributed.launched_by_torchrun()
    multi_node = distributed.world_size() > distributed.local_world_size()
    if several and not issubclass(trainer_class, nnScdTrainer) and (device_type != "cuda" or multi_node):
        raise UserError(f"{trainer_class.__name__} is one of nnU-Net's own trainers, which run DDP only on the GPUs "
                        f"of one node (they put rank R on GPU R). Train nnscd's twin (nnScdTrainer for nnU-Net's "
                        f"U-Net) or use -device cuda on one node.")


def _start_processes(argv: List[str], processes: int) -> None:
    """`-num_gpus N`: this command again in N processes on this machine, through torchrun (nnU-Net's mp.spawn
    would start them without nnscd's hooks)."""
    from torch.distributed.run import main as torchrun

    script = os.path.join(os.path.dirname(sys.executable), "nnScd_train")
    position = argv.index("-num_gpus")
    torchrun(["--standalone", f"--nproc_per_node={processes}", script, *argv[:position], *argv[position + 2:]])


@contextlib.contextmanager
def _process_group(device_type: str) -> Iterator[None]:
    """Under torchrun: this process in the job's process group for the block; a collective that timed out (a rank
    died or hangs) ends it with a message naming this rank and the way to resume."""
    if not distributed.launched_by_torchrun():
        yield
        return
    distributed.start_process_group(device_type)
    try:
        yield
    except Exception as error:
        if not distributed.is_timeout(error):
            raise
        raise UserError(f"rank {distributed.rank()} of {distributed.world_size()}: the other ranks did not answer "
                        f"within {distributed.collective_timeout_s():g} s ({distributed.TIMEOUT_ENV}); one of them "
                        f"died or hangs (torchrun's summary names the rank that failed). Every finished epoch is in "
                        f"checkpoint_latest.pth: rerun with --c. ({error})") from None
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def check_prediction_folders(input_folder: str, output_folder: str) -> None:
    """UserError for an input folder that is missing, empty or the output folder."""
    if not os.path.isdir(input_folder):
        raise UserError(f"input folder {input_folder} does not exist. Pass the folder holding the images (-i).")
    if not [f for f in os.listdir(input_folder) if not f.startswith(".")]:
        raise UserError(f"input folder {input_folder} is empty: nothing to predict. Put the images there "
                        f"(CASE_0000.nii.gz, ...) or point -i at the right folder.")
    if os.path.abspath(input_folder) == os.path.abspath(output_folder):
        raise UserError(f"output folder equals the input folder ({input_folder}). Predictions would mix with the "
                        f"images; choose another -o.")


def remove_partial_files(output_folder: str, own_lock: str) -> None:
    """Remove the leftovers of killed runs from the output folder (finished cases are never partial files), unless
    another part of this prediction (-num_parts) is running there and writing its own."""
    if set(held_locks(output_folder)) - {own_lock}:
        return
    for name in os.listdir(output_folder):
        if name.startswith(PARTIAL_PREFIX):
            os.remove(os.path.join(output_folder, name))


def _check_prediction_input(argv: List[str], model_folder: str) -> None:
    """Before the network is loaded: checkpoints, channels, dimensions and intensities of every input case."""
    from nnscd.checks.input_checks import check_prediction_input, describe

    input_folder = _flag(argv, "-i", "")
    continuing = "--continue_prediction" in argv or "--c" in argv
    folds = _flag_values(argv, "-f") or ["0", "1", "2", "3", "4"]  # nnU-Net's default
    problems = check_prediction_input(input_folder, model_folder, folds, _flag(argv, "-chk", "checkpoint_final.pth"),
                                      continue_in=_flag(argv, "-o", "") if continuing else None)
    if problems:
        raise UserError(describe(problems, f"the prediction of {input_folder} with {model_folder}"))


def trained_model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> str:
    """The model folder of a trained model named as nnU-Net names it (-d, -tr, -p, -c); UserError if absent."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    find_trainer(trainer)
    try:
        model_folder = get_output_folder(dataset, trainer, plans, configuration)
    except RuntimeError as e:  # maybe_convert_to_dataset_name: no such dataset anywhere
        raise UserError(f"{e} Check -d.") from None
    if not os.path.isdir(model_folder):
        parent = os.path.dirname(model_folder)
        trained = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
        raise UserError(f"no trained model at {model_folder}. Train it first (nnScd_train {dataset} {configuration} "
                        f"FOLD -tr {trainer} -p {plans}), or pick one of the trained models in {parent}: "
                        f"{', '.join(trained) or 'none'}.")
    return model_folder


def _model_folder_of_trainer(argv: List[str]) -> str:
    """nnScd_predict: the model folder that -d, -tr, -p and -c name, which must exist."""
    return trained_model_folder(_flag(argv, "-d", ""), _flag(argv, "-tr", "nnUNetTrainer"),
                                _flag(argv, "-p", "nnUNetPlans"), _flag(argv, "-c", ""))


def _model_folder_flag(argv: List[str]) -> str:
    """nnScd_predict_from_modelfolder: the folder -m names, which must hold plans.json or be an ONNX export."""
    model_folder = _flag(argv, "-m", "")
    if not os.path.isfile(os.path.join(model_folder, "plans.json")) and not is_export(model_folder):
        raise UserError(f"{model_folder} is neither a trained model folder (no plans.json) nor an ONNX export (no "
                        f"{SIDECAR}). Pass the folder TRAINER__PLANS__CONFIGURATION that holds fold_X subfolders, "
                        f"or a folder written by nnScd_export_onnx (-m).")
    return model_folder


@contextlib.contextmanager
def _claim_output_folder(output_folder: str, part_id: str, num_parts: str) -> Iterator[None]:
    """Hold this run's lock on the output folder, then remove what killed runs left there.

    A second run of the same part refuses; the parts of one prediction (-num_parts N -part_id K, nnU-Net's way to
    spread cases over processes) take one lock each and run side by side."""
    name, what = ("nnscd_predict", "nnScd_predict") if num_parts == "1" else \
        (f"nnscd_predict_part{part_id}of{num_parts}", f"nnScd_predict of part {part_id} of {num_parts}")
    with folder_lock(output_folder, name, what):
        remove_partial_files(output_folder, own_lock=name)
        yield


def _prediction_command(entry_point: str, model_folder_of: Callable[[List[str]], str]) -> Callable[[], None]:
    """A console script running nnunetv2's predict `entry_point` with nnscd's predictor (same flags, safe exports),
    after checking the environment, the folders, the model (`model_folder_of`) and every input case."""

    def command() -> None:
        argv = sys.argv[1:]
        _prepare(argv, takes_device=True)
        output_folder, claim, onnx = _flag(argv, "-o", ""), contextlib.nullcontext(), False
        part_id, num_parts = _flag(argv, "-part_id", "0"), _flag(argv, "-num_parts", "1")
        if not _asks_help(argv):
            check_environment()
            check_prediction_folders(_flag(argv, "-i", ""), output_folder)
            model_folder = model_folder_of(argv)
            _check_prediction_input(argv, model_folder)
            onnx = is_export(model_folder)
            claim = _claim_output_folder(output_folder, part_id, num_parts)
        from nnscd.core.predictor import nnScdOnnxPredictor, nnScdPredictor

        entry = getattr(importlib.import_module(nnunet_hooks.PREDICT_MODULE), entry_point)
        predictor = nnScdOnnxPredictor if onnx else nnScdPredictor
        if part_id.isdigit() and num_parts.isdigit():  # else nnU-Net's parser explains
            predictor = predictor.for_part(int(part_id), int(num_parts))
        with claim, disk_errors_explained(output_folder, atomic=False), \
                nnunet_hooks.entry_point_predictor(predictor), nnunet_hooks.command_names_in_output():
            entry()

    command.__doc__ = f"nnScd_ twin of nnunetv2's {entry_point}: same flags, nnscd's predictor and checks"
    return console_script(command)


predict = _prediction_command("predict_entry_point", _model_folder_of_trainer)
predict_from_modelfolder = _prediction_command("predict_entry_point_modelfolder", _model_folder_flag)
find_best_configuration = _delegate("nnunetv2.evaluation.find_best_configuration",
                                    "find_best_configuration_entry_point",
                                    context=nnunet_hooks.inference_instructions_naming_nnscd)
find_best_configuration.__doc__ = ("nnScd_find_best_configuration DATASET -c ... -tr ...: nnU-Net writes "
                                   "inference_instructions.txt naming its own commands; nnscd's names the nnScd_ "
                                   "commands, which also find nnscd's trainers.")
