"""`-tr NAME`: the trainer class nnU-Net's lookup finds, or an error listing nnscd's trainers."""
import contextlib
import io

from nnscd.core.errors import UserError


def find_trainer(name: str) -> type:
    """The trainer class of `name`, found by nnU-Net's lookup (nnunetv2, nnUNet_extTrainer, which
    nnscd.core.paths.settle_environment points at nnscd's trainers); UserError listing nnscd's trainers if none."""
    import nnscd_trainers
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    if "__" in name:
        raise UserError(f"trainer name '{name}' contains '__', which nnU-Net uses to separate trainer, plans and "
                        f"configuration in result folder names. Rename the class.")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the lookup narrates every folder it searches
            return recursive_find_trainer_class_by_name(name)
    except RuntimeError:
        raise UserError(f"unknown trainer '{name}'. nnscd's trainers: {', '.join(sorted(nnscd_trainers.__all__))}. "
                        f"nnU-Net's own trainers (nnUNetTrainer, nnUNetTrainer_5epochs, ...) work too; for your own "
                        f"class, put its folder in the nnUNet_extTrainer environment variable.") from None
