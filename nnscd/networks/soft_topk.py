"""Soft top-K: a differentiable stand-in for "keep the K highest-scoring tokens".

The hard top-K indicator y(s) in {0, 1}^L is piecewise constant in the scores s, so autograd through it gives
zero gradient. The perturbed optimiser (Berthet et al. 2020) smooths it: E_Z[y(s + sigma Z)] with Z ~ N(0, I)
is differentiable, and its Jacobian has the unbiased Monte-Carlo estimate

    d E[y] / d s  ~  1 / (N sigma) * sum_n y(s + sigma Z_n) Z_n^T.

Every sample's y holds K ones, so the part of the upstream gradient common to the kept tokens multiplies a fresh
Z_n and reaches the scores, and through the scorer the encoder, as pure noise. Subtracting the samples' mean y (a
control variate: E[Z] = 0) and dividing by N - 1 keeps the estimate unbiased and removes that part
("perturbed_centered"; "perturbed" stays the published estimator). In STPMTATrainer's network on Hippocampus it
halves the noise STP adds to the patch embedding's gradient (documentation/results/stp_gradient_noise_cpu.json).

STP standardises scores per sample before this, so that sigma means the same thing all through training;
otherwise the scorer escapes the noise by inflating its scores. The Gumbel straight-through estimator (one
noisy sample, sigmoid relaxation around the K-th value) is here for ablation against the published code.
"hard" is no estimator: the hard indicator itself, so training scales no token and sends the scores no gradient;
only an auxiliary loss on the raw scores (nnscd_trainers.foreground_prior) teaches such a scorer.
"""
import torch
from torch import Tensor

ESTIMATORS = ("perturbed", "perturbed_centered", "gumbel", "hard")


def num_kept(live: int, keep: float, min_tokens: int) -> int:
    """K = max(min_tokens, round(keep * live)), never 0 and never more than the live tokens.

    int(live): under ONNX export the sequence length is a traced size; K stays a constant of the exported graph,
    which is right, since the patch (hence the token count) is fixed there and only the batch axis varies.
    """
    live = int(live)
    return max(1, min(live, max(min_tokens, round(keep * live))))


def standardise(scores: Tensor, eps: float = 1e-6) -> Tensor:
    """Zero mean, unit standard deviation over the tokens of each sample: (B, L) -> (B, L)."""
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, keepdim=True, unbiased=False)
    return (scores - mean) / (std + eps)


def hard_topk_indicator(scores: Tensor, k: int) -> Tensor:
    """1 at the K highest scores of the last axis, 0 elsewhere; same shape as `scores`."""
    return torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)


class PerturbedTopK(torch.autograd.Function):
    """Mean of the hard top-K indicator over N Gaussian perturbations of the scores, with the perturbed-optimiser
    gradient (`centered`: minus the samples' mean indicator, the control variate above). Works on the scores as
    given (no standardisation), so the closed forms of E[y] apply to them."""

    @staticmethod
    def forward(ctx, scores: Tensor, k: int, num_samples: int, sigma: float, centered: bool = False) -> Tensor:
        noise = torch.randn(scores.shape[0], num_samples, scores.shape[1], device=scores.device, dtype=scores.dtype)
        y = hard_topk_indicator(scores.unsqueeze(1) + sigma * noise, k)  # (B, N, L)
        mean = y.mean(dim=1)  # (B, L)
        ctx.save_for_backward(y - mean.unsqueeze(1) if centered else y, noise)
        ctx.sigma, ctx.divisor = sigma, num_samples - 1 if centered else num_samples
        return mean

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        y, noise = ctx.saved_tensors
        # grad_s = J^T g with J = 1/(N sigma) sum_n y_n Z_n^T, so grad_s = 1/(N sigma) sum_n <g, y_n> Z_n
        weight = (y * grad_output.unsqueeze(1)).sum(dim=2, keepdim=True)  # (B, N, 1)
        grad_scores = (weight * noise).sum(dim=1) / (ctx.divisor * ctx.sigma)
        return grad_scores, None, None, None, None


def gumbel_topk_straight_through(scores: Tensor, k: int, tau: float) -> Tensor:
    """One Gumbel-perturbed sample: the hard indicator forward, the gradient of a sigmoid relaxation around the
    threshold between the K-th and (K+1)-th perturbed score backward (B, L) -> (B, L)."""
    gumbel = -torch.log(-torch.log(torch.rand_like(scores).clamp_min(1e-20)))
    perturbed = scores + gumbel
    hard = hard_topk_indicator(perturbed, k)
    top = perturbed.topk(min(k + 1, scores.shape[1]), dim=1).values.detach()
    threshold = (top[:, k - 1:k] + top[:, -1:]) / 2
    soft = torch.sigmoid((perturbed - threshold) / tau)
    return hard + (soft - soft.detach())  # exactly hard in the forward pass


def soft_topk(scores: Tensor, k: int, sigma: float, num_samples: int, estimator: str = "perturbed") -> Tensor:
    """Soft top-K indicator of (already standardised) scores (B, L) -> (B, L), computed in fp32."""
    scores = scores.float()
    if estimator in ("perturbed", "perturbed_centered"):
        return PerturbedTopK.apply(scores, k, num_samples, sigma, estimator == "perturbed_centered")
    if estimator == "gumbel":
        return gumbel_topk_straight_through(scores, k, tau=sigma)
    if estimator == "hard":
        return hard_topk_indicator(scores.detach(), k)
    raise ValueError(f"unknown soft top-K estimator {estimator!r}; choose one of {ESTIMATORS}")
