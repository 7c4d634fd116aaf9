"""Forward FLOPs predicted from a configuration's sizes, before anything is built or trained.

It counts what `torch.utils.flop_counter.FlopCounterMode` counts, with the same conventions (2 FLOPs per
multiply-add; linear layers, attention QK^T and AV, convolutions and transposed convolutions; no norms,
activations, top-K, gathers or scatters), so measured and modelled agree exactly. The ratio sparse / dense is
then the best-case speed-up: what pruning saves if nothing else costs time.
"""
import math
from functools import partial
from typing import Callable, Sequence

from nnscd.networks.plain_unet import nnunet_unet_plan
from nnscd.networks.soft_topk import num_kept
from nnscd.networks.token_sparse_vit import (TokenSparseConfig, light_decoder_channels, tap_blocks, token_grid,
                                             token_sizes, upsampling_strides)


def linear_flops(tokens: int, cin: int, cout: int) -> int:
    return 2 * tokens * cin * cout


def conv_flops(positions: int, kernel: Sequence[int], cin: int, cout: int) -> int:
    """Convolution: `positions` output voxels; transposed convolution: input voxels (FlopCounterMode's rule)."""
    return 2 * positions * math.prod(kernel) * cin * cout


def block_flops(batch: int, tokens: int, dim: int, mlp_ratio: float) -> int:
    """Pre-norm transformer block: qkv, proj and the MLP, plus QK^T and AV (2 * L^2 * D each)."""
    hidden = int(dim * mlp_ratio)
    linears = linear_flops(batch * tokens, dim, 3 * dim) + linear_flops(batch * tokens, dim, dim)
    mlp = linear_flops(batch * tokens, dim, hidden) + linear_flops(batch * tokens, hidden, dim)
    return linears + mlp + 4 * batch * tokens * tokens * dim


def scaled(size: Sequence[int], stride: Sequence[int]) -> list[int]:
    return [n * s for n, s in zip(size, stride)]


def unetr_decoder_flops(batch: int, in_channels: int, num_classes: int, dim: int, grid: Sequence[int],
                        strides: Sequence[Sequence[int]], features: int) -> int:
    n, ndim = len(strides), len(grid)
    ch = [features * 2 ** r for r in range(n)] + [dim]
    res = [list(grid)]  # res[i]: resolution after i upsamplings from the grid
    for stride in strides:
        res.append(scaled(res[-1], stride))
    k3 = (3,) * ndim
    full = batch * math.prod(res[n])
    flops = conv_flops(full, k3, in_channels, ch[0]) + conv_flops(full, k3, ch[0], ch[0])  # image skip
    for r in range(1, n):  # skip of level r: n - r transposed convs from the grid
        flops += sum(conv_flops(batch * math.prod(res[i]), strides[i], ch[r] if i else dim, ch[r])
                     for i in range(n - r))
    for r in reversed(range(n)):  # up path: level r + 1 -> r, then a conv block on the concatenation
        i = n - 1 - r
        flops += conv_flops(batch * math.prod(res[i]), strides[i], ch[r + 1], ch[r])
        positions = batch * math.prod(res[i + 1])
        flops += conv_flops(positions, k3, 2 * ch[r], ch[r]) + conv_flops(positions, k3, ch[r], ch[r])
    return flops + conv_flops(full, (1,) * ndim, ch[0], num_classes)


def light_decoder_flops(batch: int, num_classes: int, dim: int, grid: Sequence[int],
                        strides: Sequence[Sequence[int]]) -> int:
    ch = light_decoder_channels(dim, num_classes, len(strides))
    flops, size = 0, list(grid)
    for i, stride in enumerate(strides):
        flops += conv_flops(batch * math.prod(size), stride, ch[i], ch[i + 1])
        size = scaled(size, stride)
    return flops


def token_sparse_flop_breakdown(config: TokenSparseConfig, in_channels: int, num_classes: int,
                                patch_size: Sequence[int], batch_size: int = 1) -> dict[str, int]:
    """Forward FLOPs of a TokenSparseSegmenter by part: encoder (patch embedding + blocks), scorers, skip
    assemblies, mta, decoder."""
    B, D = batch_size, config.dim
    tokens = token_sizes(config.token_size, len(patch_size))
    grid = token_grid(patch_size, tokens)
    strides = upsampling_strides(tokens)
    L = math.prod(grid)
    parts = dict.fromkeys(("encoder", "scorers", "skip_assemblies", "mta", "decoder"), 0)
    if config.stem == "linear":
        parts["encoder"] = conv_flops(B * L, tokens, in_channels, D)
    else:
        from nnscd.networks.token_sparse_vit import patch_embedding
        parts["encoder"] = counted_flops(lambda: patch_embedding(in_channels, config, tokens),
                                         (B, in_channels, *patch_size))[0]
    live, hidden = L, config.scorer_hidden or D // 4
    for number in range(1, config.depth + 1):
        parts["encoder"] += block_flops(B, live, D, config.mlp_ratio)
        if number in config.prune_after:
            parts["scorers"] += (linear_flops(B * live, D, hidden) + linear_flops(B * live, 2 * hidden, hidden)
                                 + linear_flops(B * live, hidden, 1))
            live = num_kept(live, config.keep_ratios[config.prune_after.index(number)], config.min_tokens)
    if config.decoder == "unetr":
        taps = tap_blocks(config.depth, len(strides))
        parts["skip_assemblies"] = sum(linear_flops(B * L, D, D) for t in taps[:-1]
                                       if any(p < t for p in config.prune_after) and config.assembly == "projected")
        parts["decoder"] = unetr_decoder_flops(B, in_channels, num_classes, D, grid, strides, config.decoder_features)
    else:
        parts["decoder"] = light_decoder_flops(B, num_classes, D, grid, strides)
    if config.sparse:
        W = config.mta_dim
        parts["mta"] = (2 * linear_flops(B * L, D, W) + config.mta_depth * block_flops(B, L, W, config.mlp_ratio))
    return parts


def token_sparse_forward_flops(config: TokenSparseConfig, in_channels: int, num_classes: int,
                               patch_size: Sequence[int], batch_size: int = 1) -> int:
    return sum(token_sparse_flop_breakdown(config, in_channels, num_classes, patch_size, batch_size).values())


def nnunet_unet_forward_flops(in_channels: int, num_classes: int, patch_size: Sequence[int],
                              batch_size: int = 1) -> int:
    """Forward FLOPs of nnU-Net's PlainConvUNet for the patch (see plain_unet.nnunet_unet_plan)."""
    plan = nnunet_unet_plan(patch_size)
    feats, kernels, strides, n_conv = plan["features"], plan["kernel_sizes"], plan["strides"], plan["n_conv_per_stage"]
    sizes, size = [], list(patch_size)
    for stride in strides:
        size = [n // s for n, s in zip(size, stride)]
        sizes.append(size)
    flops, cin = 0, in_channels
    for f, k, size in zip(feats, kernels, sizes):  # encoder: the first conv of a stage strides
        positions = batch_size * math.prod(size)
        flops += conv_flops(positions, k, cin, f) + (n_conv - 1) * conv_flops(positions, k, f, f)
        cin = f
    for s in range(len(feats) - 2, -1, -1):  # decoder: transposed conv up, then convs on the concatenation
        positions = batch_size * math.prod(sizes[s])
        flops += conv_flops(batch_size * math.prod(sizes[s + 1]), strides[s + 1], feats[s + 1], feats[s])
        flops += conv_flops(positions, kernels[s], 2 * feats[s], feats[s])
        flops += (n_conv - 1) * conv_flops(positions, kernels[s], feats[s], feats[s])
    return flops + conv_flops(batch_size * math.prod(sizes[0]), (1,) * len(patch_size), feats[0], num_classes)


# ---------------------------------------------------------------------------------------------------------------
# Primus (nnU-Net's PrimusV3) and its token-sparse twin
# ---------------------------------------------------------------------------------------------------------------

def eva_block_flops(batch: int, tokens: int, dim: int, mlp_ratio: float = 4 * 2 / 3) -> int:
    """Eva block: q, k, v and proj linears, SwiGLU (two input linears and one output), QK^T and AV."""
    hidden, n = int(dim * mlp_ratio), batch * tokens
    return (linear_flops(n, dim, 3 * dim) + linear_flops(n, dim, dim) + 2 * linear_flops(n, dim, hidden)
            + linear_flops(n, hidden, dim) + 4 * batch * tokens * tokens * dim)


def counted_flops(build: Callable[[], "torch.nn.Module"], input_shape: Sequence[int]) -> tuple[int, tuple]:
    """FlopCounterMode's count of a module's forward, built and run on the meta device (no memory, no compute), and
    the output shape: for convolutional parts (stems, Primus' decoder) that would take many lines to model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        module = build()
        with FlopCounterMode(display=False) as counter:
            y = module(torch.empty(*input_shape))
    return counter.get_total_flops(), tuple(y.shape)


def primus_conv_flops(config: "SparsePrimusConfig", in_channels: int, num_classes: int, patch_size: Sequence[int],
                      batch_size: int = 1) -> dict[str, int]:
    """FLOPs of the stem (PrimusV3's conv stem or the one-conv patch embedding) and Primus' patch decoder, which see
    every token whatever the keep ratio."""
    import torch
    from dynamic_network_architectures.building_blocks.patch_encode_decode import (LayerNormNd, PatchDecode, PatchEmbed,
                                                                                   PatchEmbedDeeperControlled)

    from nnscd.networks.token_sparse_primus import PRIMUS_TOKEN, primus_width

    width = primus_width(config.size)
    stem = (partial(PatchEmbed, PRIMUS_TOKEN, in_channels, width) if config.stem == "patch" else
            partial(PatchEmbedDeeperControlled, input_channels=in_channels, embed_dim=width, depth_per_level=(1, 1, 1),
                    ch_per_level=(32, 64, 256, 1024), add_skips=True, nonlin=torch.nn.LeakyReLU))
    stem_flops, tokens = counted_flops(stem, (batch_size, in_channels, *patch_size))
    decoder_flops, _ = counted_flops(
        partial(PatchDecode, PRIMUS_TOKEN, width, num_classes, norm=LayerNormNd, activation=torch.nn.GELU), tokens)
    return {"stem": stem_flops, "decoder": decoder_flops}


def sparse_primus_flop_breakdown(config: "SparsePrimusConfig", in_channels: int, num_classes: int,
                                 patch_size: Sequence[int], batch_size: int = 1) -> dict[str, int]:
    """Forward FLOPs of a TokenSparsePrimus (or, with no pruning stages, of nnU-Net's PrimusV3) by part: stem,
    encoder (Eva blocks on the live tokens, and on the context tokens' keys and values), scorers, mta, decoder."""
    from nnscd.networks.token_sparse_primus import PRIMUS_TOKEN, primus_depth, primus_width

    B, D, depth = batch_size, primus_width(config.size), primus_depth(config.size)
    L = math.prod(token_grid(patch_size, PRIMUS_TOKEN))
    parts = {"stem": 0, "encoder": 0, "scorers": 0, "mta": 0, "decoder": 0}
    parts.update(primus_conv_flops(config, in_channels, num_classes, patch_size, batch_size))
    live, context, hidden = L, 0, config.scorer_hidden or D // 4
    for number in range(1, depth + 1):
        # context tokens: their keys and values, and the live queries' QK^T and AV over them
        parts["encoder"] += (eva_block_flops(B, live, D) + 2 * linear_flops(B * context, D, D)
                             + 4 * B * live * context * D)
        if number in config.prune_after:
            parts["scorers"] += (linear_flops(B * live, D, hidden) + linear_flops(B * live, 2 * hidden, hidden)
                                 + linear_flops(B * live, hidden, 1))
            kept = num_kept(live, config.keep_ratios[config.prune_after.index(number)], config.min_tokens)
            context += (live - kept) if config.context_tokens else 0
            live = kept
    if config.sparse and config.mta:
        W = config.mta_dim
        parts["mta"] = (linear_flops(B * L, D, W) + config.mta_depth * eva_block_flops(B, L, W)
                        + linear_flops(B * L, W, D))
    return parts


def sparse_primus_forward_flops(config: "SparsePrimusConfig", in_channels: int, num_classes: int,
                                patch_size: Sequence[int], batch_size: int = 1) -> int:
    return sum(sparse_primus_flop_breakdown(config, in_channels, num_classes, patch_size, batch_size).values())
