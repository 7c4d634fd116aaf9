"""Token-sparse ViT segmentation: sparse encoding -> token completion -> dense decoding (Zhou et al., IPMI 2023).

Read top to bottom:
  1. configuration and the grid arithmetic (token grid, decoder levels, which blocks feed the decoder)
  2. ViT parts: patch embedding, sin-cos positions, pre-norm blocks with fused attention
  3. STP: a light scorer and the soft top-K pruning stage (real gathers into shorter sequences)
  4. MTA: token assembly back to spatial order, then narrow full-sequence attention
  5. decoders: UNETR-style conv path with skips, and a light Primus-like patch decoder
  6. TokenSparseSegmenter: the whole network; with no pruning stages it is the dense twin (UNETR / ViT-light)

Shapes: B batch, L tokens (all of them), K live tokens after a pruning stage, D encoder width, W MTA width.
Nothing here imports nnU-Net; a network takes (B, C, *patch) and returns (B, num_classes, *patch) logits.
"""
import math
from dataclasses import dataclass, replace
from typing import Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from torch import Tensor, nn

from nnscd.networks.layers import ConvBlock, Mlp, conv_ops, gather_tokens, scatter_tokens
from nnscd.networks.soft_topk import ESTIMATORS, num_kept, soft_topk, standardise

DECODERS = ("unetr", "light")
STEMS = ("linear", "conv")
DECODER_INITS = ("torch", "he")
ASSEMBLIES = ("projected", "infill")
CONV_STEM_CHANNELS = (16, 32, 64, 128)  # PrimusV3's stem shape (3 stride-2 residual levels), narrower


# ---------------------------------------------------------------------------------------------------------------
# 1. configuration and grid arithmetic
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenSparseConfig:
    """Sizes of a token-sparse (or, with `prune_after=()`, dense) ViT segmentation network.

    `prune_after` are 1-based block numbers; an STP stage after block p keeps `keep_ratios[i]` of the tokens
    still live there, so ratios compound: (0.5, 0.5) keeps 50% then 25% of all tokens.
    `token_size` is one int for every axis or one per axis (e.g. (4, 16, 16)); each must be a power of two.
    """
    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    token_size: int | tuple[int, ...] = 8
    prune_after: tuple[int, ...] = (2, 4)
    keep_ratios: tuple[float, ...] = (0.5, 0.5)
    min_tokens: int = 4
    sigma: float = 0.25  # noise width of the soft top-K in standardised-score units (gumbel: its temperature)
    num_samples: int = 128  # noisy copies per soft top-K
    estimator: str = "perturbed"  # "perturbed_centered" (its control variate), "gumbel" (the published code's)
    scorer_hidden: int = 0  # 0: dim // 4
    mta_dim: int = 96
    mta_depth: int = 1
    mta_heads: int = 3
    decoder: str = "unetr"  # or "light"
    decoder_features: int = 16  # UNETR: channels at full resolution, doubling per level
    stem: str = "linear"  # one conv, kernel = stride = token; "conv": PrimusV3's residual conv stem (3D, token 8)
    decoder_init: str = "torch"  # "he": Primus' init of its decoder (He normal, a = 1e-2, zero biases)
    layer_scale: float = 0.0  # > 0: LayerScale on the encoder blocks' residual branches, initialised to it
    straight_through: bool = False  # True: training scales no features (as inference); gradients see the indicators
    # "projected": each skip level assembled by per-source norm + linear, the deepest map is MTA's output (the
    # paper's). "infill": every map puts each position's raw features from the deepest block it reached, the deepest
    # one normalised as the dense twin's, plus MTA's correction (zero at init): at keep 1 the dense twin exactly.
    assembly: str = "projected"

    def __post_init__(self):
        if self.dim % self.heads or self.mta_dim % self.mta_heads:
            raise ValueError(f"widths must divide into heads: dim {self.dim}/{self.heads}, "
                             f"mta_dim {self.mta_dim}/{self.mta_heads}")
        if len(self.prune_after) != len(self.keep_ratios):
            raise ValueError(f"one keep ratio per pruning stage: prune_after={self.prune_after}, "
                             f"keep_ratios={self.keep_ratios}")
        if list(self.prune_after) != sorted(set(self.prune_after)) or not all(
                1 <= p < self.depth for p in self.prune_after):
            raise ValueError(f"prune_after={self.prune_after} must increase strictly within 1..depth-1={self.depth - 1}")
        if not all(0 < k <= 1 for k in self.keep_ratios):
            raise ValueError(f"keep ratios must lie in (0, 1], got {self.keep_ratios}")
        if self.estimator not in ESTIMATORS or self.decoder not in DECODERS:
            raise ValueError(f"estimator must be one of {ESTIMATORS} and decoder one of {DECODERS}")
        if self.stem not in STEMS or self.decoder_init not in DECODER_INITS or self.assembly not in ASSEMBLIES:
            raise ValueError(f"stem must be one of {STEMS}, decoder_init one of {DECODER_INITS} and assembly one of "
                             f"{ASSEMBLIES}")

    @property
    def sparse(self) -> bool:
        return bool(self.prune_after)


def token_sizes(token_size: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Broadcast an int token size to every axis; check a per-axis one has one entry per axis."""
    sizes = (token_size,) * ndim if isinstance(token_size, int) else tuple(token_size)
    if len(sizes) != ndim:
        raise ValueError(f"token size {sizes} has {len(sizes)} axes but the patch has {ndim}")
    if not all(s >= 1 and s & (s - 1) == 0 for s in sizes) or max(sizes) < 2:
        raise ValueError(f"token size {sizes}: every axis must be a power of two and one axis at least 2")
    return sizes


def token_grid(patch_size: Sequence[int], token_size: Sequence[int]) -> tuple[int, ...]:
    """Tokens per axis; a clear error when the patch does not tile into tokens."""
    for axis, (p, t) in enumerate(zip(patch_size, token_size)):
        if p % t:
            raise ValueError(
                f"patch size {tuple(patch_size)} is not divisible by token size {tuple(token_size)} along axis "
                f"{axis} ({p} % {t} = {p % t}); use a patch size that is a multiple of {t} on that axis "
                f"(e.g. {p - p % t + t}) or a token size that divides {p}")
    return tuple(p // t for p, t in zip(patch_size, token_size))


def upsampling_strides(token_size: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-level upsampling strides, coarsest first. The number of levels follows the LARGEST token side
    (16: 4 levels, 8: 3, 4: 2); an axis with a smaller token doubles only at the coarsest levels, as nnU-Net
    pools an anisotropic axis only in its deepest stages. (4, 16, 16) -> [(2,2,2), (2,2,2), (1,2,2), (1,2,2)]."""
    levels = int(math.log2(max(token_size)))
    return [tuple(2 if level < math.log2(t) else 1 for t in token_size) for level in range(levels)]


def tap_blocks(depth: int, levels: int) -> tuple[int, ...]:
    """Blocks whose outputs feed the decoder, evenly spaced and ending at the last block:
    depth 12 -> 4 levels: 3/6/9/12, 3 levels: 4/8/12, 2 levels: 6/12; the light decoder uses one (12)."""
    if depth < levels:
        raise ValueError(f"a decoder with {levels} levels needs at least {levels} blocks, got depth {depth}")
    return tuple(round(depth * (j + 1) / levels) for j in range(levels))


def light_decoder_channels(dim: int, num_classes: int, levels: int) -> list[int]:
    """Primus' rule: channels shrink geometrically from the token width to about 2x the classes, rounded to 8."""
    shrink = (dim / (2 * num_classes)) ** (1 / levels)
    channels = [dim] + [max(8, round(dim / shrink ** (i + 1) / 8) * 8) for i in range(levels)]
    channels[-1] = num_classes
    return channels


def patch_embedding(in_channels: int, config: TokenSparseConfig, token_size: Sequence[int]) -> nn.Module:
    """(B, C, *patch) -> (B, D, *grid). "linear": one conv with kernel = stride = token (ViT). "conv": the residual
    conv stem of nnU-Net's PrimusV3 (dynamic_network_architectures), narrower, with Primus' He init; it strides 8 on
    each of 3 axes, so it needs 8^3 tokens."""
    if config.stem == "linear":
        return conv_ops(len(token_size))[0](in_channels, config.dim, token_size, token_size)
    if tuple(token_size) != (8, 8, 8):
        raise ValueError(f"the conv stem strides 8 along each of 3 axes; token size {tuple(token_size)} needs "
                         f"stem='linear'")
    from dynamic_network_architectures.building_blocks.patch_encode_decode import PatchEmbedDeeperControlled
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    stem = PatchEmbedDeeperControlled(in_channels, config.dim, (1, 1, 1), CONV_STEM_CHANNELS)
    stem.apply(InitWeights_He(1e-2))
    return stem


# ---------------------------------------------------------------------------------------------------------------
# 2. ViT parts
# ---------------------------------------------------------------------------------------------------------------

def sincos_position_embedding(grid: Sequence[int], dim: int) -> Tensor:
    """Fixed sin-cos embedding (L, dim) for any grid: one band of frequencies per axis; channels left over when
    dim is not a multiple of 2 * axes stay zero."""
    per_axis = dim // (2 * len(grid))
    omega = 1.0 / 10000 ** (torch.arange(per_axis, dtype=torch.float32) / per_axis)
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in grid], indexing="ij")
    angles = [c.reshape(-1, 1) * omega for c in coords]  # each (L, per_axis)
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


class SinCosPositions(nn.Module):
    """The table for the built grid is cached; inputs of another size get theirs computed on the fly."""

    def __init__(self, dim: int, grid: Sequence[int]):
        super().__init__()
        self.dim, self.grid = dim, tuple(grid)
        self.register_buffer("table", sincos_position_embedding(grid, dim), persistent=False)

    def forward(self, grid: Sequence[int]) -> Tensor:  # -> (L, dim)
        if tuple(grid) == self.grid:
            return self.table
        return sincos_position_embedding(grid, self.dim).to(self.table.device)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, L, D)
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # fused kernels keep the softmax in fp32 under autocast
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm runs in fp32 under autocast). `layer_scale` > 0: each residual
    branch is scaled per channel by timm's LayerScale, initialised to that value (Primus: 0.1), so a deep stack
    starts close to the identity and the tokens keep their patch content."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, layer_scale: float = 0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))
        self.ls1, self.ls2 = ((LayerScale(dim, layer_scale), LayerScale(dim, layer_scale)) if layer_scale
                              else (nn.Identity(), nn.Identity()))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------------------------------
# 3. STP: soft top-K token pruning
# ---------------------------------------------------------------------------------------------------------------

class TokenSet(NamedTuple):
    features: Tensor  # (B, n, D)
    positions: Tensor  # (B, n) int64: each token's index in the full, spatially ordered sequence
    weights: Optional[Tensor] = None  # (B, n, 1) soft indicator the features were scaled by (training only)


class TokenScorer(nn.Module):
    """Per-token features concatenated with their mean over the live tokens (the global context that says what
    is worth keeping in this image), then an MLP to one score per token."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.local = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU())
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:  # (B, K, D) -> (B, K)
        h = self.local(x)  # (B, K, h)
        pooled = h.mean(dim=1, keepdim=True).expand_as(h)
        return self.head(torch.cat([h, pooled], dim=-1)).squeeze(-1)


class SoftTopKPruning(nn.Module):
    """One STP stage: keep the top-K live tokens by standardised score, gathered into a shorter sequence.

    The kept set is always the hard top-K of the clean scores (the set inference uses), in descending score
    order. In training, kept tokens are multiplied by their soft top-K indicator and pruned ones by
    (1 - indicator), so both sets pass gradient to the scorer; at inference the indicator is hard (1 / 0), so
    neither set is scaled.

    After a training forward `last_scores` holds the raw scores and grid positions of the tokens it ranked, each
    (B, L_live), for a loss on the scorer (nnscd_trainers.foreground_prior); None after an inference forward.

    `train_keep`, when set, replaces `keep` in training forwards only: a curriculum that starts with more tokens
    live (nnscd_trainers.keep_warmup); inference always keeps `keep`.
    """

    def __init__(self, keep: float, config: TokenSparseConfig, dim: Optional[int] = None):
        super().__init__()
        self.keep, self.config = keep, config  # config: any object with TokenSparseConfig's STP fields
        self.train_keep: Optional[float] = None
        dim = dim or config.dim
        self.scorer = TokenScorer(dim, config.scorer_hidden or dim // 4)
        self.last_scores: Optional[tuple[Tensor, Tensor]] = None

    def forward(self, live: TokenSet) -> tuple[TokenSet, TokenSet]:  # -> kept (B, K, D), pruned (B, L_live-K, D)
        x, positions = live.features, live.positions
        keep = self.train_keep if self.training and self.train_keep is not None else self.keep
        k = num_kept(x.shape[1], keep, self.config.min_tokens)
        raw = self.scorer(x).float()  # (B, L_live), fp32: the noise scale must mean the same
        self.last_scores = (raw, positions) if self.training else None
        scores = standardise(raw)
        order = scores.argsort(dim=1, descending=True)  # not stable=True: ONNX has no stable sort; ties are measure zero
        keep_idx, drop_idx = order[:, :k], order[:, k:]
        kept, dropped = gather_tokens(x, keep_idx), gather_tokens(x, drop_idx)
        kept_weight = dropped_weight = None
        if self.training:
            c = self.config
            indicator = soft_topk(scores, k, c.sigma, c.num_samples, c.estimator).to(x.dtype)  # (B, L_live)
            kept_weight = indicator.gather(1, keep_idx).unsqueeze(-1)
            dropped_weight = (1 - indicator.gather(1, drop_idx)).unsqueeze(-1)
            if c.straight_through:  # value 1, gradient of the indicator: the scorer learns as before
                kept_weight = kept_weight - kept_weight.detach() + 1
                dropped_weight = dropped_weight - dropped_weight.detach() + 1
            kept, dropped = kept * kept_weight, dropped * dropped_weight
        return (TokenSet(kept, positions.gather(1, keep_idx), kept_weight),
                TokenSet(dropped, positions.gather(1, drop_idx), dropped_weight))


def stp_stages(network: nn.Module) -> list[SoftTopKPruning]:
    """The STP stages of any network (ViT or Primus family), in order; none for a dense twin."""
    return [m for m in network.modules() if isinstance(m, SoftTopKPruning)]


class TokenSparseEncoder(nn.Module):
    """ViT blocks with STP stages after the chosen blocks. For every tap block it returns the token sets that
    make up the sequence at that depth: the tokens pruned so far (features of the block they were pruned
    after) and the live ones (features of the tap block)."""

    def __init__(self, config: TokenSparseConfig, taps: Sequence[int]):
        super().__init__()
        self.taps, self.prune_after = tuple(taps), config.prune_after
        self.blocks = nn.ModuleList(Block(config.dim, config.heads, config.mlp_ratio, config.layer_scale)
                                    for _ in range(config.depth))
        self.stages = nn.ModuleList(SoftTopKPruning(keep, config) for keep in config.keep_ratios)

    def forward(self, x: Tensor) -> tuple[list[list[TokenSet]], list[Tensor]]:
        B, L, _ = x.shape
        live = TokenSet(x, torch.arange(L, device=x.device).expand(B, L))
        pruned, taps, kept_positions = [], [], []
        for number, block in enumerate(self.blocks, start=1):
            live = TokenSet(block(live.features), live.positions)
            if number in self.taps:  # tap before pruning: the block's full output feeds the decoder
                taps.append([*pruned, live])
            if number in self.prune_after:
                live, dropped = self.stages[self.prune_after.index(number)](live)
                pruned.append(dropped)
                kept_positions.append(live.positions)
        return taps, kept_positions


# ---------------------------------------------------------------------------------------------------------------
# 4. MTA: multi-layer token assembly
# ---------------------------------------------------------------------------------------------------------------

def assembly_of(network_weights: Mapping[str, Tensor]) -> Optional[str]:
    """The assembly a TokenSparseSegmenter's weights were trained with (None: a dense network's). Only an "infill"
    sparse network holds both MTA and the dense twin's final norm."""
    if not any(k.startswith("mta.") for k in network_weights):
        return None
    return "infill" if "norm.weight" in network_weights else "projected"


def merge_token_sets(sources: Sequence[TokenSet], num_tokens: int) -> Tensor:
    """Token sets whose positions partition 0..L-1 -> one (B, L, D) sequence in spatial order: the infill, where
    each position carries the features of the deepest block it reached."""
    x = torch.cat([s.features for s in sources], dim=1)
    positions = torch.cat([s.positions for s in sources], dim=1)
    return scatter_tokens(x.new_zeros(x.shape[0], num_tokens, x.shape[2]), positions, x)


class TokenAssembly(nn.Module):
    """Token sets from different depths -> one full, spatially ordered sequence. Each source has its own
    norm + linear (features of different depths live on different scales) and a learned source embedding."""

    def __init__(self, num_sources: int, dim_in: int, dim_out: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim_in) for _ in range(num_sources))
        self.projs = nn.ModuleList(nn.Linear(dim_in, dim_out) for _ in range(num_sources))
        self.source_embed = nn.Parameter(torch.zeros(num_sources, dim_out))
        nn.init.trunc_normal_(self.source_embed, std=0.02)

    def forward(self, sources: Sequence[TokenSet], num_tokens: int) -> Tensor:  # -> (B, L, dim_out)
        projected = [s._replace(features=proj(norm(s.features)) + e.to(s.features.dtype))
                     for norm, proj, e, s in zip(self.norms, self.projs, self.source_embed, sources)]
        return merge_token_sets(projected, num_tokens)


class MultiLayerTokenAssembly(nn.Module):
    """MTA: assemble the deepest features of every position, add positions, then narrow full-sequence attention
    to complete the pruned tokens from the kept ones; projected back to the encoder width for the decoder."""

    def __init__(self, num_sources: int, config: TokenSparseConfig, grid: Sequence[int]):
        super().__init__()
        W = config.mta_dim
        self.assemble = TokenAssembly(num_sources, config.dim, W)
        self.pos = SinCosPositions(W, grid)
        self.blocks = nn.Sequential(*[Block(W, config.mta_heads, config.mlp_ratio) for _ in range(config.mta_depth)])
        self.norm, self.proj = nn.LayerNorm(W), nn.Linear(W, config.dim)

    def forward(self, sources: Sequence[TokenSet], grid: Sequence[int]) -> Tensor:  # -> (B, L, D)
        x = self.assemble(sources, math.prod(grid))
        x = self.blocks(x + self.pos(grid).to(x.dtype))
        return self.proj(self.norm(x))


# ---------------------------------------------------------------------------------------------------------------
# 5. decoders: (image, per-tap token maps (B, D, *grid), shallowest first) -> logits
# ---------------------------------------------------------------------------------------------------------------

def up_block(ndim: int, cin: int, cout: int, stride: Sequence[int]) -> nn.Sequential:
    _, ConvT, Norm = conv_ops(ndim)
    return nn.Sequential(ConvT(cin, cout, stride, stride), Norm(cout, affine=True), nn.LeakyReLU(0.01, inplace=True))


class UNETRDecoder(nn.Module):
    """UNETR's conv path. Level r (0 = full resolution, n = token grid) has `features * 2**r` channels. The
    deepest token map is upsampled level by level; at level r >= 1 it meets a skip made from tap r-1 by n-r
    transposed convs, at level 0 a conv block on the image itself."""

    def __init__(self, in_channels: int, num_classes: int, dim: int, strides: Sequence[tuple[int, ...]],
                 features: int):
        super().__init__()
        ndim, n = len(strides[0]), len(strides)
        Conv, ConvT, _ = conv_ops(ndim)
        ch = [features * 2 ** r for r in range(n)] + [dim]
        self.image_skip = ConvBlock(ndim, in_channels, ch[0])
        self.skips = nn.ModuleList(  # level r = 1 .. n-1
            nn.Sequential(*[up_block(ndim, ch[r] if i else dim, ch[r], strides[i]) for i in range(n - r)])
            for r in range(1, n))
        self.ups = nn.ModuleList(ConvT(ch[r + 1], ch[r], strides[n - 1 - r], strides[n - 1 - r])
                                 for r in reversed(range(n)))  # deepest first
        self.blocks = nn.ModuleList(ConvBlock(ndim, 2 * ch[r], ch[r]) for r in reversed(range(n)))
        self.head = Conv(ch[0], num_classes, 1)

    def forward(self, image: Tensor, maps: Sequence[Tensor]) -> Tensor:
        skips = [self.image_skip(image)] + [skip(m) for skip, m in zip(self.skips, maps[:-1])]  # level 0 .. n-1
        x = maps[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of every voxel of a (B, C, *spatial) map (Primus' LayerNormNd)."""

    def forward(self, x: Tensor) -> Tensor:
        last = x.ndim - 1  # not -1: ONNX export writes a negative axis into Transpose, which onnxruntime rejects
        return super().forward(x.movedim(1, last)).movedim(last, 1)


class LightDecoder(nn.Module):
    """Primus-like patch decoder: transposed convs (kernel = stride) from the deepest token map straight to
    full resolution, no conv skips, so the transformer carries almost all the compute."""

    def __init__(self, dim: int, num_classes: int, strides: Sequence[tuple[int, ...]]):
        super().__init__()
        _, ConvT, _ = conv_ops(len(strides[0]))
        ch = light_decoder_channels(dim, num_classes, len(strides))
        layers = []
        for i, stride in enumerate(strides):
            layers.append(ConvT(ch[i], ch[i + 1], stride, stride))
            if i < len(strides) - 1:
                layers += [ChannelLayerNorm(ch[i + 1]), nn.GELU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, image: Tensor, maps: Sequence[Tensor]) -> Tensor:
        return self.layers(maps[-1])


# ---------------------------------------------------------------------------------------------------------------
# 6. the network
# ---------------------------------------------------------------------------------------------------------------

def init_transformer_weights(module: nn.Module) -> None:
    """timm's ViT init: truncated-normal linears, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


class TokenSparseSegmenter(nn.Module):
    """STP + MTA segmentation network (SCD), or its dense twin when `config.prune_after` is empty.

    Sparse, assembly "projected": ViT with STP stages -> per-tap assembly (UNETR skips: norm + linear + scatter,
    one per tap, so each skip level sees its own depth; the deepest tap: MTA with attention) -> decoder.
    Sparse, assembly "infill": every tap's tokens scattered back raw (pruned positions keep the features of the block
    they were pruned after), the deepest map normalised, plus MTA's output as a correction that starts at zero.
    Dense: the same ViT, raw block outputs to the decoder (UNETR) and a final norm on the deepest one.
    After each forward, `last_keep_indices[s]` holds the kept token positions (B, K_s) of stage s, indices into
    the token grid flattened in C order.

    An "infill" network holds every module of its dense twin under the same name: a dense checkpoint loads with
    only `fresh_modules` (scorers, MTA) new, and at keep 1 the warm-started network computes the dense output.
    Those modules also start with the dense twin's weights for the same seed (they are copied from a twin built
    from the same random state), so twins trained at one seed differ only in what pruning and MTA do.
    """

    def __init__(self, in_channels: int, num_classes: int, patch_size: Sequence[int],
                 config: TokenSparseConfig = TokenSparseConfig()):
        super().__init__()
        random_state = torch.get_rng_state()
        self.config = config
        self.token_size = token_sizes(config.token_size, len(patch_size))
        self.grid = token_grid(patch_size, self.token_size)
        strides = upsampling_strides(self.token_size)
        self.taps = tap_blocks(config.depth, len(strides) if config.decoder == "unetr" else 1)
        self.patch_embed = patch_embedding(in_channels, config, self.token_size)
        self.pos = SinCosPositions(config.dim, self.grid)
        self.encoder = TokenSparseEncoder(config, self.taps)

        def sources_at(tap: int) -> int:
            return 1 + sum(p < tap for p in config.prune_after)

        self.infill = config.assembly == "infill"
        self.fresh_modules = ("encoder.stages.", "mta.") if self.infill and config.sparse else ()
        self.skip_assemblies = nn.ModuleDict({str(t): TokenAssembly(sources_at(t), config.dim, config.dim)
                                              for t in self.taps[:-1] if sources_at(t) > 1 and not self.infill})
        if config.sparse:
            self.mta = MultiLayerTokenAssembly(sources_at(config.depth), config, self.grid)
        if self.infill or not config.sparse:
            self.norm = nn.LayerNorm(config.dim)
        if config.decoder == "unetr":
            self.decoder = UNETRDecoder(in_channels, num_classes, config.dim, strides, config.decoder_features)
        else:
            self.decoder = LightDecoder(config.dim, num_classes, strides)
        self.apply(init_transformer_weights)
        if config.decoder_init == "he":  # larger than torch's default: the light decoder escapes "all background"
            from dynamic_network_architectures.initialization.weight_init import InitWeights_He
            self.decoder.apply(InitWeights_He(1e-2))
        if self.infill and config.sparse:  # MTA corrects the infill: zero at first, the dense twin's decoder input
            nn.init.zeros_(self.mta.proj.weight)
            nn.init.zeros_(self.mta.proj.bias)
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(random_state)
                twin = TokenSparseSegmenter(in_channels, num_classes, patch_size,
                                            replace(config, prune_after=(), keep_ratios=()))
            self.load_state_dict(twin.state_dict(), strict=False)
        self.last_keep_indices: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:  # (B, C, *patch) -> (B, num_classes, *patch)
        grid = token_grid(x.shape[2:], self.token_size)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, L, D)
        tokens = tokens + self.pos(grid).to(tokens.dtype)
        taps, kept_positions = self.encoder(tokens)
        self.last_keep_indices = [p.detach() for p in kept_positions]

        L = tokens.shape[1]
        sequences = [sources[0].features if len(sources) == 1  # no pruning yet: positions in spatial order
                     else merge_token_sets(sources, L) if self.infill else self.skip_assemblies[str(t)](sources, L)
                     for t, sources in zip(self.taps[:-1], taps[:-1])]
        if not self.config.sparse:
            sequences.append(self.norm(taps[-1][0].features))
        elif self.infill:
            sequences.append(self.norm(merge_token_sets(taps[-1], L)) + self.mta(taps[-1], grid))
        else:
            sequences.append(self.mta(taps[-1], grid))
        maps = [s.transpose(1, 2).reshape(x.shape[0], -1, *grid) for s in sequences]  # (B, D, *grid) each
        return self.decoder(x, maps)
