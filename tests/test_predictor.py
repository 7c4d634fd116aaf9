"""nnScdPredictor against nnunetv2's predictor on the same trained models and a multi-tile case: same output,
fewer and larger forwards."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import CONFIG, DATASET_ID, run_command


def _predictors(model: Path, fold: int, mirroring: bool):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnscd.core.paths import settle_environment
    from nnscd.core.predictor import nnScdPredictor

    settle_environment()  # registers nnscd's trainers for nnU-Net's lookup by name
    made = []
    for cls in (nnUNetPredictor, nnScdPredictor):
        predictor = cls(tile_step_size=0.5, use_mirroring=mirroring, device=torch.device("cpu"),
                        perform_everything_on_device=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model), (fold,), "checkpoint_final.pth")
        made.append(predictor)
    return made


def _multi_tile_case(planned_dataset: Path) -> torch.Tensor:
    """A held-out case tiled 2 x 2 in-plane and z-scored: (1, 32, 64, 64) against a 32^3 patch -> 9 tiles."""
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(sorted((planned_dataset / "imagesTs").iterdir())[0])))
    image = np.tile(image.astype(np.float32), (1, 2, 2))
    return torch.from_numpy((image - image.mean()) / image.std())[None]


def _count_forwards(predictor) -> list:
    """Batch sizes of every forward the predictor's network runs."""
    sizes = []
    predictor.network.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    return 2 * ((a == label) & (b == label)).sum() / ((a == label).sum() + (b == label).sum())


# forward batch 4 (2 x the plans' batch): 2 tiles with their mirrored copies per forward, or 4 tiles unmirrored.
# One mirroring axis (2 copies) keeps the test short; all 8 copies: 72 forwards against 18, same labels (measured).
@pytest.mark.parametrize("model_fixture, fold, mirroring, nnscd_forwards", [("trained_model", 0, True, [4] * 4 + [2]),
                                                                            ("trained_stpmta", 3, False, [4, 4, 1])])
def test_batched_tiles_and_mirrors_give_nnunets_output_in_fewer_forwards(request, planned_dataset, model_fixture,
                                                                           fold, mirroring, nnscd_forwards,
                                                                           monkeypatch):
    monkeypatch.setenv("nnScd_predict_batch_factor", "2")  # fixed: no timing forwards
    reference, ours = _predictors(request.getfixturevalue(model_fixture), fold, mirroring)
    reference.allowed_mirroring_axes = ours.allowed_mirroring_axes = (0,)
    data = _multi_tile_case(planned_dataset)
    tiles = len(ours._internal_get_sliding_window_slicers(data.shape[1:]))
    assert tiles == 9
    forwards = {name: _count_forwards(p) for name, p in (("nnunet", reference), ("nnscd", ours))}
    logits = {name: p.predict_sliding_window_return_logits(data).float()
              for name, p in (("nnunet", reference), ("nnscd", ours))}

    assert forwards["nnunet"] == [1] * tiles * (2 if mirroring else 1)
    assert forwards["nnscd"] == nnscd_forwards

    torch.testing.assert_close(logits["nnscd"], logits["nnunet"], atol=2e-2, rtol=1e-2)  # fp16 accumulators
    labels = {name: l.argmax(0).numpy() for name, l in logits.items()}
    for label in (1, 2):
        assert _dice(labels["nnscd"], labels["nnunet"], label) >= 0.999


class _CostPerCall(torch.nn.Module):
    """The network, with a cost per forward on a simulated clock (the predictor's `time.perf_counter`, patched), so
    that what the machine is doing beside the test cannot change the choice: batching pays (0.2 s per call), costs
    (0.3 s x batch^2: 4.8 s for 4 inputs against 4 x 0.3 s) or neither (0.6 s per input one by one or batched, with
    zero logits; that case checks the turns only). The real forward still runs, so the logits are the network's."""

    def __init__(self, network: torch.nn.Module, cost: str, classes: int, clock: SimpleNamespace):
        super().__init__()
        self.network, self.cost, self.classes, self.clock = network, cost, classes, clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += {"pays": 0.2, "costs": 0.3 * len(x) ** 2, "neutral": 0.6 * len(x)}[self.cost]
        if self.cost == "neutral":
            return x.new_zeros(len(x), self.classes, *x.shape[2:])
        return self.network(x)


# 9 tiles x 2 mirrors = 18 inputs in 5 groups of up to 2 tiles (4 inputs): the first group one by one (its first
# forward untimed), the second batched; a clear winner is kept from the third group on, a close call gets a second
# turn each (groups 3 and 4) first.
@pytest.mark.parametrize("cost, chosen, timing, later_forwards", [
    ("pays", 4, [1, 1, 1, 1, 4], [4, 4, 1]),
    ("costs", 1, [1, 1, 1, 1, 4], [1] * 9),
    ("neutral", None, [1, 1, 1, 1, 4, 1, 1, 1, 1, 4], None)])
def test_unset_factor_times_both_ways_on_the_first_tiles_and_keeps_the_faster(trained_model, planned_dataset,
                                                                              monkeypatch, cost, chosen, timing,
                                                                              later_forwards):
    monkeypatch.delenv("nnScd_predict_batch_factor", raising=False)
    reference, ours = _predictors(trained_model, 0, True)
    reference.allowed_mirroring_axes = ours.allowed_mirroring_axes = (0,)  # 2 inputs per tile
    clock = SimpleNamespace(now=0.0)
    clock.perf_counter = lambda: clock.now
    monkeypatch.setattr("nnscd.core.predictor.time", clock)
    ours.network = _CostPerCall(ours.network, cost, ours.label_manager.num_segmentation_heads, clock)
    data = _multi_tile_case(planned_dataset)
    forwards = _count_forwards(ours)
    first = ours.predict_sliding_window_return_logits(data)
    batch = ours.timed_forward_batch
    assert batch in ((chosen,) if chosen else (1, 4)) and ours.forward_batch == batch
    rest = 18 - sum(timing)
    assert forwards == timing + [batch] * (rest // batch) + ([rest % batch] if rest % batch else []), forwards
    assert sum(forwards) == 9 * 2, "no input is run twice, and there is no extra warm-up forward"
    if later_forwards is None:
        return

    forwards.clear()
    reference.use_mirroring = ours.use_mirroring = False  # 9 inputs
    ours.predict_sliding_window_return_logits(data)
    assert forwards == later_forwards, "decided once per predictor"
    expected = reference.predict_sliding_window_return_logits(data).float()
    torch.testing.assert_close(ours.predict_sliding_window_return_logits(data).float(), expected, atol=2e-2, rtol=1e-2)
    assert first.shape == expected.shape


def test_forward_batch_follows_plans_and_environment(trained_model, monkeypatch):
    monkeypatch.delenv("nnScd_predict_batch_factor", raising=False)
    _, ours = _predictors(trained_model, 0, False)
    assert ours.configuration_manager.batch_size == 2 and ours.forward_batch == 4
    monkeypatch.setenv("nnScd_predict_batch_factor", "0.5")
    assert ours.forward_batch == 1
    monkeypatch.setenv("nnScd_predict_batch_factor", "0.1")
    assert ours.forward_batch == 1, "never below one input per forward"


def test_cpu_bf16_runs_the_network_in_bf16_and_agrees_with_nnunets_fp32_labels(trained_model, planned_dataset,
                                                                                monkeypatch):
    from nnscd.core.predictor import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions PyTorch uses")
    monkeypatch.setenv("nnScd_predict_batch_factor", "2")
    monkeypatch.setenv("nnScd_cpu_bf16", "1")
    reference, ours = _predictors(trained_model, 0, False)
    dtypes = []
    ours.network.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    data = _multi_tile_case(planned_dataset)
    logits = {name: p.predict_sliding_window_return_logits(data).float()
              for name, p in (("nnunet", reference), ("nnscd", ours))}
    assert set(dtypes) == {torch.bfloat16}
    assert not torch.equal(logits["nnscd"], logits["nnunet"])
    labels = {name: l.argmax(0).numpy() for name, l in logits.items()}
    for label in (1, 2):
        assert _dice(labels["nnscd"], labels["nnunet"], label) >= 0.99


@pytest.mark.parametrize("variables, message", [
    ({"nnScd_cpu_bf16": "yes"}, "nnScd_cpu_bf16='yes': set it to 1"),
    ({"nnScd_predict_batch_factor": "two"}, "nnScd_predict_batch_factor='two': set it to a positive multiple"),
    ({"nnScd_predict_batch_factor": "0"}, "nnScd_predict_batch_factor='0': set it to a positive multiple")])
def test_bad_predictor_variable_stops_nnscd_predict_before_any_output(nnunet_env, planned_dataset, tmp_path,
                                                                       variables, message):
    proc = run_command(["nnScd_predict", "-i", str(planned_dataset / "imagesTs"), "-o", str(tmp_path / "o"),
                        "-d", str(DATASET_ID), "-c", CONFIG, "-tr", "nnScdTrainer", "-device", "cpu"],
                       {**nnunet_env, **variables}, check=False, in_process=True)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_cpu_bf16_on_a_cpu_without_bf16_names_the_variable_to_unset(monkeypatch):
    from nnscd.core import predictor

    monkeypatch.setattr(predictor, "cpu_has_bf16", lambda: False)
    monkeypatch.setenv("nnScd_cpu_bf16", "1")
    with pytest.raises(ValueError, match="no bf16 instructions .* Unset nnScd_cpu_bf16"):
        predictor.check_predictor_environment()
    monkeypatch.setenv("nnScd_cpu_bf16", "0")
    predictor.check_predictor_environment()
