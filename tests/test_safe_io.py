"""Atomic writes: a failure inside the block leaves neither a final nor a partial file."""
import numpy as np
import pytest

from nnscd.core.safe_io import atomic_path


def test_atomic_path_publishes_only_complete_files(tmp_path):
    target = tmp_path / "case.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            assert tmp.endswith("case.nii.gz")  # writers that pick the format from the ending still work
            open(tmp, "wb").write(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(str(target)) as tmp:
        open(tmp, "wb").write(b"whole")
    assert target.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]


def test_atomic_plans_manager_writes_segmentations_atomically(tmp_path, monkeypatch):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnscd.core.atomic_plans_manager import AtomicWritePlansManager

    rw = AtomicWritePlansManager({"image_reader_writer": "SimpleITKIO"}).image_reader_writer_class()
    props = {"sitk_stuff": {"spacing": (1, 1, 1), "origin": (0, 0, 0), "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)},
             "spacing": [1, 1, 1]}

    def dies(self, seg, output_fname, properties):
        open(output_fname, "wb").write(b"truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(SimpleITKIO, "write_seg", dies)
    with pytest.raises(KeyboardInterrupt):
        rw.write_seg(np.zeros((4, 5, 6), np.uint8), str(tmp_path / "a.nii.gz"), props)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    rw.write_seg(np.ones((4, 5, 6), np.uint8), str(tmp_path / "a.nii.gz"), props)
    seg, _ = SimpleITKIO().read_seg(str(tmp_path / "a.nii.gz"))
    assert seg.shape == (1, 4, 5, 6) and seg.min() == 1
