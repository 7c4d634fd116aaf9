"""nnScd_benchmark in network mode: the CLI writes JSON (the schema other tools read), CSV and PNG."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnscd.cli.benchmark import main, parse_args, with_mode
from nnscd.tools.benchmark_networks import RESULT_KEYS, measure_network
from nnscd.networks.registry import build_network

BIN = Path(sys.executable).parent


def test_cli_writes_json_csv_and_png_at_a_tiny_size(tmp_path):
    out = tmp_path / "results"  # not there yet: the benchmark makes it
    nets = ["stpmta-light", "vit-light"]
    cmd = [str(BIN / "nnScd_benchmark"), "--patch", "16", "16", "16", "--channels", "1", "--classes", "2",
           "--batch", "2", "--net", *nets, "--device", "cpu", "--iters", "1", "--warmup", "0",
           "--json", str(out / "b.json"), "--csv", str(out / "b.csv"), "--plot", str(out / "b.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((out / "b.json").read_text())
    assert set(report) == {"device", "torch", "patch_size", "batch_size", "results"}
    assert report["patch_size"] == [16, 16, 16] and report["batch_size"] == 2 and report["torch"] == torch.__version__
    assert [r["name"] for r in report["results"]] == nets
    for r in report["results"]:
        assert set(r) == set(RESULT_KEYS)
        assert isinstance(r["params"], int) and r["params"] > 0
        assert r["gflops_forward"] == pytest.approx(r["gflops_model"], rel=1e-12)  # the FLOP model is exact
        assert r["train_step_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["train_samples_per_s"] == pytest.approx(2 / r["train_step_s"]) and r["infer_samples_per_s"] > 0
    sparse, dense = report["results"]
    assert sparse["gflops_forward"] < dense["gflops_forward"]

    with open(out / "b.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(RESULT_KEYS) and [r["name"] for r in rows] == nets
    assert float(rows[0]["gflops_forward"]) == pytest.approx(sparse["gflops_forward"])
    assert (out / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["b.csv", "b.json", "b.png"]  # no partial files left


def test_measure_network_reports_every_timing():
    torch.manual_seed(0)
    net = build_network("stpmta-light", 1, 2, (16, 16, 16))
    x, y = torch.randn(1, 1, 16, 16, 16), torch.randint(0, 2, (1, 16, 16, 16))
    result = measure_network(net, x, y, iters=1, warmup=0, device=torch.device("cpu"))
    assert set(result) == set(RESULT_KEYS) - {"name", "gflops_model"}
    assert all(v > 0 for v in result.values())


def test_unknown_network_is_refused_with_the_known_names(capsys):
    with pytest.raises(SystemExit):
        main(["--patch", "16", "16", "16", "--net", "no-such-net", "--device", "cpu"])
    assert "stpmta" in capsys.readouterr().err


def test_modes_are_named_and_the_older_spellings_still_work():
    assert with_mode(["networks", "--patch", "8", "8"]) == ["networks", "--patch", "8", "8"]
    assert with_mode(["--patch", "8", "8", "--net", "unetr"])[0] == "networks"
    assert with_mode(["-d", "4", "-c", "3d_fullres", "-tr", "STPMTATrainer"])[0] == "dataset"
    assert with_mode(["--predict", "-i", "x", "-d", "4"]) == ["predict", "-i", "x", "-d", "4"]
    args = parse_args(["dataset", "-d", "4", "-c", "3d_fullres", "-tr", "A", "B", "--device", "cpu"])
    assert args.mode == "dataset" and args.tr == ["A", "B"] and args.warmup == 3
