"""nnU-Net's preprocessor with cases that a kill cannot leave half-written."""
import os
import shutil

from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

from nnscd.core.safe_io import PARTIAL_PREFIX, disk_errors_explained


class nnScdPreprocessor(DefaultPreprocessor):
    """DefaultPreprocessor whose preprocessed cases appear only when complete.

    nnU-Net writes a case as CASE.b2nd, CASE_seg.b2nd and CASE.pkl in turn, and training lists the cases by
    their CASE.b2nd: a kill after the first file leaves a case that training would load with a truncated or
    missing segmentation. Here a case is written into a hidden folder beside the others and moved into place,
    CASE.b2nd last, so a listed case is always complete. nnU-Net's `run` empties the output folder first, so a
    rerun also removes what a killed run left behind. A full disk or a folder that cannot be written stops the
    run with a UserError naming the folder (raised in the worker, re-raised by nnU-Net's pool in the command).
    """

    def run_case_save(self, output_filename_truncated: str, *args, **kwargs) -> None:
        folder, case = os.path.split(output_filename_truncated)
        staging = os.path.join(folder, f"{PARTIAL_PREFIX}{os.getpid()}_{case}")
        try:
            with disk_errors_explained(folder):
                os.makedirs(staging, exist_ok=True)
                super().run_case_save(os.path.join(staging, case), *args, **kwargs)
                for name in sorted(os.listdir(staging), key=lambda n: n == f"{case}.b2nd"):
                    os.replace(os.path.join(staging, name), os.path.join(folder, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
