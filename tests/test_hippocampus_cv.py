"""The Hippocampus CV protocol's summaries, on tiny fake nnU-Net outputs (no training)."""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "documentation" / "experiments"))  # drivers, not package
from hippocampus_cv import _busy, markdown, plot, summarise  # noqa: E402

MODEL = "STPMTATrainer_budget__nnScdPlans__3d_fullres"


def _summary(anterior: float, posterior: float, cases: int = 2) -> dict:
    return {"mean": {"1": {"Dice": anterior}, "2": {"Dice": posterior}},
            "foreground_mean": {"Dice": (anterior + posterior) / 2}, "metric_per_case": [{}] * cases}


def _write(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def test_summary_markdown_and_plot(tmp_path):
    results = tmp_path / "Dataset004_Hippocampus"
    for fold in (0, 1):
        _write(results / MODEL / f"fold_{fold}" / "validation" / "summary.json", _summary(0.5 + fold / 10, 0.4))
    crossval = results / MODEL / "crossval_results_folds_0_1"
    _write(crossval / "summary.json", _summary(0.55, 0.4, cases=4))
    _write(crossval / "postprocessing.json", {
        "input_folder": _summary(0.55, 0.4), "postprocessed": _summary(0.57, 0.4),
        "postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"],
        "postprocessing_kwargs": [{"labels_or_regions": 1}]})
    info = {"all_results": {MODEL: 0.475}, "best_model_or_ensemble": {
        "postprocessing_file": str(crossval / "postprocessing.pkl"), "selected_model_or_models": []}}
    record = {"invocations": ["python documentation/experiments/hippocampus_cv.py --msd MSD --out OUT"],
              "steps": {"train STPMTATrainer_budget fold 1": {"command": "nnScd_train 4 3d_fullres 1", "wall_s": 60.0,
                                                              "load_average_1min": 2.1}},
              "epochs_s": {"STPMTATrainer_budget": {"1": 55.0}},
              "submission": {"command": "nnScd_msd_submission", "passed": True, "archive": "$nnUNet_results/x.zip",
                             "size_bytes": 1_500_000, "packager_output": ["Wrote x.zip: 1 task(s)."]}}

    summary = summarise(results, info, record, ["STPMTATrainer_budget"], [0, 1], "short CPU budget", "cpu")
    assert summary["per_fold"]["STPMTATrainer_budget"]["1"] == {"Anterior": 0.6, "Posterior": 0.4, "mean": 0.5,
                                                               "cases": 2, "epochs_s": 55.0}
    assert summary["cross_validation"][MODEL]["Anterior"] == 0.55
    assert summary["best"]["after_postprocessing"]["Anterior"] == 0.57
    assert summary["ensemble"].startswith("none")
    assert "short CPU budget" in summary["schedule"]

    text = markdown(summary)
    assert "| change | +0.0200 | +0.0000 | +0.0100 |" in text
    assert "passed" in text and "1.50 MB" in text
    plot(summary, tmp_path / "cv.png")
    assert (tmp_path / "cv.png").stat().st_size > 0


def test_busy_fold(tmp_path):
    fold = tmp_path / "fold_0"
    assert not _busy(fold)  # never started
    fold.mkdir()
    log = fold / "training_log_x.txt"
    log.write_text("epoch 0")
    assert _busy(fold)  # someone is writing its log
    os.utime(log, (time.time() - 3600,) * 2)
    assert not _busy(fold)  # stale: an interrupted run, resumed with --c
    log.touch()
    _write(fold / "validation" / "summary.json", {})
    assert not _busy(fold)  # finished
