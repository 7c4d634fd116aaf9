"""nnU-Net plans whose segmentation writer is atomic, so no export of nnU-Net's can leave a truncated file."""
from functools import partial

import numpy as np

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnscd.core.safe_io import atomic_path


class AtomicSegWriter:
    """An nnU-Net image reader/writer whose `write_seg` is atomic; everything else is the wrapped class's."""

    def __init__(self, reader_writer_class: type) -> None:
        self._rw = reader_writer_class()

    def __getattr__(self, name: str):
        if name.startswith("__"):  # keep copy/pickle protocols from recursing into a missing `_rw`
            raise AttributeError(name)
        return getattr(self._rw, name)

    def write_seg(self, seg, output_fname: str, properties: dict) -> None:
        with atomic_path(output_fname) as tmp:
            self._rw.write_seg(seg, tmp, properties)
            # SimpleITK reports no error when the disk fills (it leaves an empty or cut-off file, and reads a
            # cut-off .nii.gz padded with zeros): only reading the file back shows that it holds the segmentation
            written, _ = self._rw.read_seg(tmp)
            if written.size != seg.size or not np.array_equal(written.reshape(seg.shape), seg):
                raise RuntimeError(f"{tmp} does not read back as the segmentation written to it")


class AtomicWritePlansManager(PlansManager):
    """PlansManager whose reader/writer writes segmentations atomically.

    Every nnU-Net export (validation, prediction) gets its writer from `plans_manager.image_reader_writer_class()`,
    so swapping the plans manager makes all of them safe without touching nnU-Net's export code. Segmentations
    are written last (after .npz/.pkl), so a finished segmentation file means the case is complete.
    """

    @property
    def image_reader_writer_class(self):
        return partial(AtomicSegWriter, super().image_reader_writer_class)
