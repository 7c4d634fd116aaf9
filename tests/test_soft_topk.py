"""Soft top-K (STP's selection): the perturbed estimator against its closed form, K rules, inference top-K."""
import math

import pytest
import torch

from nnscd.networks.soft_topk import (PerturbedTopK, gumbel_topk_straight_through, hard_topk_indicator, num_kept,
                                      soft_topk, standardise)
from nnscd.networks.token_sparse_vit import SoftTopKPruning, TokenSet, TokenSparseConfig, TokenSparseSegmenter


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def normal_pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-x ** 2 / 2) / math.sqrt(2 * math.pi)


@pytest.mark.parametrize("centered", [False, True])
def test_perturbed_topk_matches_closed_form_for_two_tokens_keep_one(centered):
    """L=2, K=1 on RAW scores (PerturbedTopK does not standardise; with L=2 standardising would map every pair
    to (+1, -1)): y_1 = 1 iff s1 + sigma Z1 > s2 + sigma Z2, and Z2 - Z1 ~ N(0, 2), so
    E[y_1] = Phi((s1 - s2) / (sigma sqrt 2)) and dE[y_1]/ds1 = -dE[y_1]/ds2 = phi(.) / (sigma sqrt 2).
    Tolerance: 5 Monte-Carlo standard errors (sqrt(p(1-p)/N) for the mean, 1/(sigma sqrt N) for the gradient).
    The centered estimate (control variate) must be unbiased too."""
    torch.manual_seed(0)
    sigma, n = 0.7, 200_000
    diffs = torch.tensor([-1.5, -0.4, 0.0, 0.3, 1.1])
    scores = torch.stack([diffs + 0.2, torch.full_like(diffs, 0.2)], dim=1).requires_grad_(True)  # (5, 2)
    y = PerturbedTopK.apply(scores, 1, n, sigma, centered)
    z = diffs / (sigma * math.sqrt(2))
    expected = normal_cdf(z)
    assert torch.allclose(y.sum(1), torch.ones(5))
    mean_err = 5 * torch.sqrt(expected * (1 - expected) / n) + 1e-4
    assert torch.all((y[:, 0].detach() - expected).abs() <= mean_err), (y[:, 0], expected)

    y[:, 0].sum().backward()  # gradient of E[y_1] w.r.t. both scores, row by row
    slope = normal_pdf(z) / (sigma * math.sqrt(2))
    grad_err = 5 / (sigma * math.sqrt(n))
    assert torch.all((scores.grad[:, 0] - slope).abs() <= grad_err), (scores.grad[:, 0], slope)
    assert torch.all((scores.grad[:, 1] + slope).abs() <= grad_err), (scores.grad[:, 1], -slope)


def test_centered_estimate_drops_the_noise_of_the_gradient_common_to_kept_tokens():
    """An upstream gradient shared by every token (g = 1) moves no expectation: sum_l E[y_l] = K always. The
    published estimate still returns noise for it, the centered one returns 0 exactly; for a per-token gradient
    both agree in expectation and the centered one scatters far less over draws."""
    torch.manual_seed(6)
    scores = standardise(torch.randn(1, 175)).requires_grad_(True)

    def gradient(centered: bool, upstream: torch.Tensor) -> torch.Tensor:
        scores.grad = None
        (PerturbedTopK.apply(scores, 88, 128, 0.25, centered) * upstream).sum().backward()
        return scores.grad.clone()

    common = torch.ones(1, 175)
    assert gradient(False, common).abs().mean() > 1
    assert torch.allclose(gradient(True, common), torch.zeros(1, 175), atol=1e-4)
    upstream = common + 0.3 * torch.randn(1, 175)
    draws = {c: torch.stack([gradient(c, upstream) for _ in range(200)]) for c in (False, True)}
    assert draws[True].std(0).mean() < draws[False].std(0).mean() / 20
    spread = draws[False].std(0) / math.sqrt(200)  # the published estimate's standard error per token
    assert ((draws[True].mean(0) - draws[False].mean(0)).abs() < 5 * spread).all()


@pytest.mark.parametrize("k", [1, 3, 7, 10])
def test_exactly_k_selected(k):
    torch.manual_seed(1)
    scores = torch.randn(4, 10)
    hard = hard_topk_indicator(scores, k)
    assert torch.equal(hard.sum(1), torch.full((4,), float(k)))
    assert torch.equal(hard.gather(1, scores.topk(k, dim=1).indices), torch.ones(4, k))
    soft = soft_topk(scores, k, sigma=0.3, num_samples=64)
    assert torch.allclose(soft.sum(1), torch.full((4,), float(k)))  # every noisy copy keeps exactly K
    assert soft.min() >= 0 and soft.max() <= 1


def test_k_rule_never_zero_and_never_more_than_live():
    assert num_kept(1728, 0.25, 4) == 432
    assert num_kept(10, 0.1, 4) == 4  # min_tokens wins
    assert num_kept(10, 0.001, 0) == 1  # never 0
    assert num_kept(3, 0.5, 8) == 3  # never more than the live tokens
    assert num_kept(7, 1.0, 1) == 7


def test_tiny_keep_ratio_still_keeps_a_token_in_the_network():
    config = TokenSparseConfig(dim=32, depth=3, heads=2, token_size=4, prune_after=(1, 2), keep_ratios=(0.01, 0.01),
                               min_tokens=0, mta_dim=16, mta_heads=2, decoder="light")
    net = TokenSparseSegmenter(1, 2, (8, 8, 8), config).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 8, 8, 8))
    assert [k.shape[1] for k in net.last_keep_indices] == [1, 1]
    assert torch.isfinite(out).all()


def test_standardised_scores_cannot_be_inflated():
    """Zero mean, unit std per sample; scaling and shifting the scores changes nothing, so the scorer cannot
    escape the fixed noise width by inflating them."""
    torch.manual_seed(2)
    s = torch.randn(3, 50) * 4 + 1
    z = standardise(s)
    assert torch.allclose(z.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std(1, unbiased=False), torch.ones(3), atol=1e-4)
    assert torch.allclose(standardise(100 * s + 7), z, atol=1e-4)


def test_gumbel_straight_through_is_hard_forward_and_has_gradient():
    torch.manual_seed(3)
    scores = torch.randn(2, 12, requires_grad=True)
    y = gumbel_topk_straight_through(scores, 5, tau=0.5)
    assert set(y.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(y.detach().sum(1), torch.full((2,), 5.0))
    (y * torch.arange(12.0)).sum().backward()
    assert scores.grad.abs().sum() > 0


def pruning_stage(seed: int = 4) -> tuple[SoftTopKPruning, TokenSet]:
    torch.manual_seed(seed)
    stage = SoftTopKPruning(0.25, TokenSparseConfig(dim=16, heads=2, mta_dim=16, mta_heads=2))
    x = torch.randn(3, 20, 16)
    return stage, TokenSet(x, torch.arange(20).expand(3, 20) + 100)


def test_inference_is_deterministic_ordered_hard_topk_of_clean_scores():
    stage, live = pruning_stage()
    stage.eval()
    kept, dropped = stage(live)
    kept_again, _ = stage(live)
    assert torch.equal(kept.positions, kept_again.positions) and torch.equal(kept.features, kept_again.features)
    scores = stage.scorer(live.features)
    expected = scores.topk(5, dim=1).indices  # K = round(0.25 * 20), highest score first
    assert torch.equal(kept.positions, expected + 100)
    assert torch.all(scores.gather(1, expected).diff(dim=1) <= 0)  # ordered by descending score
    assert torch.equal(kept.features, live.features.gather(1, expected.unsqueeze(-1).expand(-1, -1, 16)))  # unscaled
    union = torch.cat([kept.positions, dropped.positions], 1).sort(1).values
    assert torch.equal(union, live.positions)


def test_training_keeps_the_clean_topk_set_and_scales_by_the_soft_indicator():
    stage, live = pruning_stage()
    stage.eval()
    eval_kept, _ = stage(live)
    stage.train()
    kept, dropped = stage(live)
    assert torch.equal(kept.positions, eval_kept.positions)  # the set inference will use, no noise in the choice
    ratio = kept.features / eval_kept.features  # soft indicator in (0, 1]
    assert torch.all(ratio <= 1 + 1e-6) and torch.all(ratio > 0)
    assert not torch.allclose(ratio, torch.ones_like(ratio))


def test_the_hard_estimator_trains_on_the_inference_tokens_and_sends_the_scores_nothing():
    scores = torch.randn(3, 20, requires_grad=True)
    indicator = soft_topk(scores, 5, sigma=0.25, num_samples=16, estimator="hard")
    assert torch.equal(indicator, hard_topk_indicator(scores.detach(), 5)) and not indicator.requires_grad

    stage, live = pruning_stage()
    stage.config = TokenSparseConfig(dim=16, heads=2, mta_dim=16, mta_heads=2, estimator="hard")
    eval_kept, eval_dropped = stage.eval()(live)
    kept, dropped = stage.train()(live)
    assert torch.equal(kept.features, eval_kept.features) and torch.equal(dropped.features, eval_dropped.features)


@pytest.mark.parametrize("estimator", ["perturbed", "perturbed_centered", "gumbel"])
def test_scorers_learn_from_the_segmentation_loss(estimator):
    torch.manual_seed(5)
    config = TokenSparseConfig(dim=32, depth=4, heads=2, token_size=4, prune_after=(1, 2), keep_ratios=(0.5, 0.5),
                               mta_dim=16, mta_heads=2, estimator=estimator, num_samples=32)
    net = TokenSparseSegmenter(1, 3, (16, 16, 16), config).train()
    x, target = torch.randn(2, 1, 16, 16, 16), torch.randint(0, 3, (2, 16, 16, 16))
    torch.nn.functional.cross_entropy(net(x), target).backward()
    for stage in net.encoder.stages:
        grads = [p.grad for p in stage.scorer.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
