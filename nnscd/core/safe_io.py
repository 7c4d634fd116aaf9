"""Writes that a kill cannot leave half done: write beside the target, then rename over it."""
import csv
import json
import os
import shutil
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

PARTIAL_PREFIX = ".partial_"


@contextmanager
def atomic_path(final_path: str) -> Iterator[str]:
    """Yield a temporary path in the target's folder; if the block succeeds and wrote it, rename it to `final_path`.

    Works for a folder too (a dataset written whole into the temporary path), as long as `final_path` is absent.

    The prefix keeps the file ending, so writers that pick the format from it (SimpleITK) still work, and the
    leading dot keeps the partial file out of nnU-Net's folder listings.
    """
    folder, name = os.path.split(os.path.abspath(final_path))
    tmp = os.path.join(folder, f"{PARTIAL_PREFIX}{os.getpid()}_{name}")
    try:
        yield tmp
        if os.path.exists(tmp):
            os.replace(tmp, final_path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


def make_parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_json(path: str, content: Any, indent: int = 2) -> None:
    """`content` as JSON at `path` (its folder made if needed), atomically."""
    make_parent(path)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(content, f, indent=indent)


def write_csv(path: str, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
    """Rows as CSV with the columns `fields` (other keys left out), atomically."""
    make_parent(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
