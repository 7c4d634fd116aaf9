"""The dataset converters' console scripts (their command lines live with them, in dataset_conversion/)."""
import importlib
from typing import Callable

from nnscd.cli import console_script
from nnscd.core import nnunet_hooks
from nnscd.core.device import prepare_run


def _converter(module: str) -> Callable[[], None]:
    """A converter's `main` run like the nnU-Net twins: nnU-Net's environment settled before its first import (CPU
    defaults for the process count included), and what nnU-Net prints naming the nnScd_ commands."""

    def command() -> None:
        prepare_run()
        main = importlib.import_module(module).main
        with nnunet_hooks.command_names_in_output():
            main()

    command.__doc__ = f"nnScd_ console script of {module}.main"
    return console_script(command)


convert_msd_dataset = _converter("dataset_conversion.msd")  # nnUNetv2_convert_MSD_dataset's flags, its bugs fixed
convert_btcv_dataset = _converter("dataset_conversion.btcv")
convert_isic2018_dataset = _converter("dataset_conversion.isic2018")
