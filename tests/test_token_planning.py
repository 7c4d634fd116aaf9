"""Token-aware planning: divisible patches for isotropic and anisotropic data, never a cropped patch."""
import json

import pytest

from conftest import DATASET
from nnscd.core.token_planning import TOKEN_BUDGET, plan_tokens, token_plan_for


@pytest.mark.parametrize("patch, spacing, tokens", [
    ([40, 56, 40], [1.0, 1.0, 1.0], [8, 8, 8]),          # Hippocampus 3d_fullres
    ([20, 192, 160], [3.0, 0.8, 0.8], [2, 8, 8]),        # anisotropic: thick slices get thinner tokens
    ([37, 50, 33], [1.0, 1.0, 1.0], [8, 8, 8]),          # odd sizes are rounded up
    ([6, 64], [1.0, 1.0], [4, 8]),                        # a side smaller than a token: a smaller token
    ([56, 40], [1.0, 1.0], [8, 8]),                       # 2d
])
def test_patch_tiles_into_tokens_and_is_never_cropped(patch, spacing, tokens):
    plan = plan_tokens(patch, spacing, batch_size=2)
    assert plan.token_size == tokens
    assert all(p % t == 0 for p, t in zip(plan.patch_size, plan.token_size))
    assert all(new >= old and new - old < t for new, old, t in zip(plan.patch_size, patch, plan.token_size))


def test_batch_follows_the_token_budget():
    big = plan_tokens([192, 192, 192], [1.0] * 3, batch_size=8)  # 13824 tokens a sample
    assert big.batch_size == 2  # never below nnU-Net's minimum
    small = plan_tokens([64, 64, 64], [1.0] * 3, batch_size=12)  # 512 tokens a sample
    assert small.batch_size == min(12, TOKEN_BUDGET // 512)


def test_recorded_token_size_is_kept():
    plan = token_plan_for({"patch_size": [40, 56, 40], "spacing": [1, 1, 1], "batch_size": 9,
                           "token_size": [4, 8, 8]})
    assert plan.token_size == [4, 8, 8] and plan.patch_size == [40, 56, 40]


def test_plan_and_preprocess_writes_nnscd_plans_beside_untouched_nnunet_plans(nnunet_env, planned_dataset):
    folder = planned_dataset.parents[1] / "nnUNet_preprocessed" / DATASET
    nnunet = json.loads((folder / "nnUNetPlans.json").read_text())
    ours = json.loads((folder / "nnScdPlans.json").read_text())
    assert "token_size" not in nnunet["configurations"]["3d_fullres"]
    c = ours["configurations"]["3d_fullres"]
    assert ours["plans_name"] == "nnScdPlans" and c["token_size"] == [8, 8, 8] and c["patch_size"] == [32, 32, 32]
    assert c["data_identifier"] == nnunet["configurations"]["3d_fullres"]["data_identifier"]  # same preprocessed data


def test_printed_plan_uses_each_trainers_own_keep_ratios():
    from nnscd.core.token_planning import describe_token_plans
    from nnscd_trainers.token_sparse_trainers import STPMTATrainer, STPMTATrainer_paper

    plans = {"configurations": {"3d_fullres": {"patch_size": [40, 56, 40], "token_size": [8, 8, 8],
                                               "batch_size": 7}}}
    table = describe_token_plans(plans, {t.__name__: t.pruning() for t in (STPMTATrainer, STPMTATrainer_paper)})
    assert "STPMTATrainer (keep 0.5 x 0.5)" in table and "STPMTATrainer_paper (keep 0.25 x 0.25 x 0.25)" in table
    assert "175 -> 88 -> 44" in table and "175 -> 44 -> 11 -> 4" in table
