"""Token-sparse Primus: STP token pruning and MTA token completion on nnU-Net's PrimusV3.

The dense network is `dynamic_network_architectures.architectures.primus.PrimusV3X` (what nnunetv2's
`nnUNet_PrimusV3{S,B,M,L}_Trainer` train): a convolutional stem to 8^3 tokens, EVA blocks with 3D RoPE, SwiGLU and
LayerScale, then Primus' patch decoder. `TokenSparsePrimus` is that class with a forward that runs the same Eva
blocks one by one and prunes between them. Size "Light" with stem "patch" is the light network: the first
Primus' one-conv patch embedding and 6 Eva blocks 192 wide (`LIGHT`).

  stem -> + abs. positions -> blocks 1..p1 -> STP (keep K1, gather tokens AND their RoPE rows) -> blocks ...
  [`context_tokens`: the live tokens also attend to the pruned ones, frozen] -> eva.norm -> infill (every grid
  position gets the features of the deepest block it reached) [+ MTA correction] -> scatter to the grid -> PatchDecode

Read top to bottom: 1. configuration, 2. RoPE rows of live tokens, 3. Eva blocks with context tokens, 4. MTA,
5. the network.

Weight compatibility: `down_projection.*`, `eva.*` and `up_projection.*` are Primus' own modules, so a dense
PrimusV3 state dict loads with `strict=False`, missing only `stages.*` and `mta.*` (`fresh_modules`). MTA's output
projection starts at zero, so right after such a warm start the network computes the MTA-off infill, and with keep
ratio 1 exactly the dense Primus output.

Shapes: B batch, L tokens of the grid, K live tokens, M context tokens, D Primus width, W MTA width, R RoPE width
(2 x head dim).
Nothing here imports nnU-Net.
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.primus import _PRIMUS_CONFIGS, PrimusV3, PrimusV3X
from dynamic_network_architectures.building_blocks.patch_encode_decode import PatchEmbed
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from timm.layers import RotaryEmbeddingCat, apply_keep_indices_nlc, apply_rot_embed_cat
from timm.models.eva import EvaBlock
from torch import Tensor, nn

from nnscd.networks.layers import gather_tokens, scatter_tokens
from nnscd.networks.soft_topk import ESTIMATORS
from nnscd.networks.token_sparse_vit import SoftTopKPruning, TokenAssembly, TokenSet, merge_token_sets

PRIMUS_TOKEN = (8, 8, 8)  # nnunetv2's Primus trainers use 8^3 tokens
# Primus' sizes (the table PrimusV3X itself reads), and nnscd's light one: the small ViT's width and depth, a size
# whose Eva blocks cost about what its one-conv stem and patch decoder cost.
PRIMUS_CONFIGS = {**_PRIMUS_CONFIGS, "Light": {"eva_depth": 6, "eva_numheads": 4, "embed_dim": 192}}
PRIMUS_SIZES = tuple(PRIMUS_CONFIGS)
STEMS = ("v3", "patch")  # PrimusV3's residual conv stem; the first Primus' one-conv patch embedding
# The light network's settings (fields of SparsePrimusConfig): STP as the small ViT's STPMTATrainer has it
LIGHT = {"size": "Light", "stem": "patch", "prune_after": (2, 4), "keep_ratios": (0.5, 0.5)}


def primus_width(size: str) -> int:
    return PRIMUS_CONFIGS[size]["embed_dim"]


def primus_depth(size: str) -> int:
    return PRIMUS_CONFIGS[size]["eva_depth"]


# ---------------------------------------------------------------------------------------------------------------
# 1. configuration
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SparsePrimusConfig:
    """What STP + MTA add to a PrimusV3 of size `size`. `prune_after` are 1-based Eva block numbers; keep ratios
    compound ((0.25, 0.25): 25% then 6.25% of the tokens stay live). `mta=False`: no completion attention, every
    position is decoded from the deepest features it reached (the ablation, and the dense model's exact twin at
    keep 1). `stem="patch"`: one conv with kernel = stride = token instead of PrimusV3's conv stem (the light
    network). The field names of the STP settings are those `SoftTopKPruning` reads."""
    size: str = "S"
    stem: str = "v3"
    prune_after: tuple[int, ...] = (3, 6)
    keep_ratios: tuple[float, ...] = (0.25, 0.25)
    min_tokens: int = 4
    sigma: float = 0.25
    num_samples: int = 128
    estimator: str = "perturbed"
    scorer_hidden: int = 96
    mta: bool = True
    cumulative_weights: bool = False  # True: weight by the product of all a token's indicators (see encode)
    straight_through: bool = False  # True: the indicators scale no features in training, only gradients (STP)
    context_tokens: bool = False  # True: pruned tokens stay keys and values of the later blocks (not updated)
    mta_dim: int = 192
    mta_depth: int = 1
    mta_heads: int = 4  # head 48 -> RoPE over 32 channels (Eva's rule: head / 1.5, divisible by 4)
    drop_path_rate: float = 0.2  # Primus' default

    def __post_init__(self):
        if self.size not in PRIMUS_SIZES:
            raise ValueError(f"Primus size {self.size!r} unknown; choose one of {PRIMUS_SIZES}")
        if self.stem not in STEMS:
            raise ValueError(f"stem {self.stem!r} unknown; choose one of {STEMS}")
        if len(self.prune_after) != len(self.keep_ratios):
            raise ValueError(f"one keep ratio per pruning stage: prune_after={self.prune_after}, "
                             f"keep_ratios={self.keep_ratios}")
        if list(self.prune_after) != sorted(set(self.prune_after)) or not all(p >= 1 for p in self.prune_after):
            raise ValueError(f"prune_after={self.prune_after} must be increasing block numbers >= 1")
        if not all(0 < k <= 1 for k in self.keep_ratios):
            raise ValueError(f"keep ratios must lie in (0, 1], got {self.keep_ratios}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        head = self.mta_dim / self.mta_heads
        if head != int(head) or (head / 1.5) != int(head / 1.5) or int(head / 1.5) % 4:
            raise ValueError(f"MTA width {self.mta_dim} / {self.mta_heads} heads = {head}: the head width must be "
                             f"a multiple of 6 whose 2/3 is divisible by 4 (3D RoPE), e.g. 192 / 4")

    @property
    def sparse(self) -> bool:
        return bool(self.prune_after)


def primus_config_of(network: nn.Module) -> Optional[SparsePrimusConfig]:
    """The configuration of a TokenSparsePrimus, the no-pruning one of a dense PrimusV3X (found by its width),
    None for anything else: what the FLOP model needs."""
    if isinstance(network, TokenSparsePrimus):
        return network.config
    if isinstance(network, PrimusV3X):
        size = next(s for s, c in _PRIMUS_CONFIGS.items() if c["embed_dim"] == network.embed_dim)
        return SparsePrimusConfig(size=size, prune_after=(), keep_ratios=())
    return None


# ---------------------------------------------------------------------------------------------------------------
# 2. RoPE rows of live tokens
# ---------------------------------------------------------------------------------------------------------------

def live_rope(table: Tensor, x: Tensor, positions: Tensor) -> Tensor:
    """RoPE table (L, R) -> the rows of each sample's live tokens, (B, 1, K, R): timm's PatchDropout gather, with
    the head axis that timm's Eva adds so the rows broadcast over heads."""
    return apply_keep_indices_nlc(x, table, positions).unsqueeze(1)


def grid_rope(dim: int, heads: int, grid: Sequence[int]) -> RotaryEmbeddingCat:
    """3D RoPE of a width-`dim` attention over the token grid, built as Eva builds its own."""
    return RotaryEmbeddingCat(round(dim / heads / 1.5), in_pixels=False, feat_shape=list(grid),
                              ref_feat_shape=list(grid))


# ---------------------------------------------------------------------------------------------------------------
# 3. Eva blocks with context tokens
# ---------------------------------------------------------------------------------------------------------------

def eva_block_with_context(block: EvaBlock, x: Tensor, rope: Tensor, context: Tensor, context_rope: Tensor) -> Tensor:
    """`block` on the live tokens x (B, K, D) whose attention also reads keys and values of the context tokens
    (B, M, D), which the block does not update: what `block(cat([x, context]), rope=cat([rope, context_rope]))[:, :K]`
    computes, without the context's queries, attention output and MLP. rope (B, 1, K, R), context_rope (B, 1, M, R).
    timm's EvaAttention attends a sequence to itself only, so its steps are spelled out here on its own modules
    (Primus builds it with separate q, k, v projections and no prefix tokens)."""
    attn, (B, K, D) = block.attn, x.shape

    def heads(t: Tensor) -> Tensor:  # (B, N, D) -> (B, H, N, D / H)
        return t.reshape(B, t.shape[1], attn.num_heads, -1).transpose(1, 2)

    queries = block.norm1(x)
    everyone = torch.cat([queries, block.norm1(context)], dim=1)  # (B, K + M, D)
    half = getattr(attn, "rotate_half", False)
    q = apply_rot_embed_cat(attn.q_norm(heads(attn.q_proj(queries))), rope, half=half)
    k = apply_rot_embed_cat(attn.k_norm(heads(attn.k_proj(everyone))), torch.cat([rope, context_rope], dim=2),
                            half=half)
    v = heads(attn.v_proj(everyone))
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if block.training else 0.0)
    y = attn.proj_drop(attn.proj(attn.norm(y.transpose(1, 2).reshape(B, K, D))))  # (B, K, D)
    gamma_1 = 1.0 if block.gamma_1 is None else block.gamma_1
    gamma_2 = 1.0 if block.gamma_2 is None else block.gamma_2
    x = x + block.drop_path1(gamma_1 * y)
    return x + block.drop_path2(gamma_2 * block.mlp(block.norm2(x)))


# ---------------------------------------------------------------------------------------------------------------
# 4. MTA: multi-layer token assembly on Eva blocks
# ---------------------------------------------------------------------------------------------------------------

class PrimusTokenCompletion(nn.Module):
    """MTA for Primus: assemble every position's deepest features (per-source norm + linear + source embedding),
    run narrow Eva blocks with the RoPE of the whole grid, and return a correction (B, L, D) to the infill. The
    output projection starts at zero: a warm-started network begins from the dense model's decoder input."""

    def __init__(self, num_sources: int, dim: int, config: SparsePrimusConfig, grid: Sequence[int]):
        super().__init__()
        W = config.mta_dim
        self.assemble = TokenAssembly(num_sources, dim, W)
        self.rope = grid_rope(W, config.mta_heads, grid)
        self.blocks = nn.ModuleList(
            EvaBlock(W, config.mta_heads, qkv_bias=True, qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True,
                     scale_mlp=True, scale_attn_inner=True, init_values=0.1, num_prefix_tokens=0)
            for _ in range(config.mta_depth))
        self.norm, self.proj = nn.LayerNorm(W), nn.Linear(W, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, sources: Sequence[TokenSet], num_tokens: int) -> Tensor:  # -> (B, L, D)
        x = self.assemble(sources, num_tokens)  # (B, L, W), spatial order
        rope = self.rope.get_embed()  # (L, R)
        for block in self.blocks:
            x = block(x, rope=rope)
        return self.proj(self.norm(x))


# ---------------------------------------------------------------------------------------------------------------
# 5. the network
# ---------------------------------------------------------------------------------------------------------------

class TokenSparsePrimus(PrimusV3):
    """nnU-Net's PrimusV3 of `config.size` (built as PrimusV3X builds it) with STP stages between its Eva blocks
    and MTA before its decoder.

    After each forward `last_keep_indices[s]` holds the grid positions (B, K_s) kept by stage s (C order).
    """
    fresh_modules = ("stages.", "mta.")  # what a dense Primus checkpoint does not hold

    def __init__(self, input_channels: int, num_classes: int, patch_size: Sequence[int],
                 config: SparsePrimusConfig = SparsePrimusConfig()):
        size = PRIMUS_CONFIGS[config.size]
        super().__init__(input_channels, size["embed_dim"], PRIMUS_TOKEN, num_classes, size["eva_depth"],
                         size["eva_numheads"], tuple(patch_size), drop_path_rate=config.drop_path_rate,
                         init_values=0.1, scale_attn_inner=True)  # PrimusV3X's settings
        if config.stem == "patch":  # what dna's Primus builds before PrimusV3 replaces it
            self.down_projection = PatchEmbed(PRIMUS_TOKEN, input_channels, self.embed_dim)
            self.down_projection.apply(InitWeights_He(1e-2))
            self.keys_to_in_proj = ("down_projection.proj",)
        depth = len(self.eva.blocks)
        if config.prune_after and config.prune_after[-1] >= depth:
            raise ValueError(f"prune_after={config.prune_after}: Primus-{config.size} has {depth} blocks; prune "
                             f"after blocks 1..{depth - 1}")
        self.config = config
        self.token_size = PRIMUS_TOKEN
        self.grid = tuple(p // t for p, t in zip(patch_size, PRIMUS_TOKEN))
        self.stages = nn.ModuleList(SoftTopKPruning(keep, config, self.embed_dim) for keep in config.keep_ratios)
        self.mta = (PrimusTokenCompletion(len(config.prune_after) + 1, self.embed_dim, config, self.grid)
                    if config.sparse and config.mta else None)
        self.last_keep_indices: list[Tensor] = []

    def encode(self, tokens: Tensor) -> tuple[list[TokenSet], list[Tensor]]:
        """(B, L, D) embedded tokens -> the token sets that make up the grid after the last block (tokens pruned
        at each stage with that stage's features, then the survivors) and the kept positions of each stage.

        In training each set's `weights` is the soft indicator of the stage that last decided about its tokens
        (kept: indicator, pruned: 1 - indicator); `forward` applies them after eva.norm. With `cumulative_weights`
        it is the product over every decision about them, so that a stage-1 keep is rewarded after the norm too.
        With `context_tokens` every pruned token, as it was pruned, stays a key and value of the later blocks."""
        x, rope, _ = self.eva._pos_embed(tokens)  # abs. positions added; rope (L, R) for the whole grid
        B, L, _ = x.shape
        live = TokenSet(x, torch.arange(L, device=x.device).expand(B, L))
        live_rows: Optional[Tensor] = rope  # (L, R) while every token is live, then (B, 1, K, R)
        path = x.new_ones(B, L, 1) if self.training and self.config.cumulative_weights else None  # indicators so far
        pruned, kept_positions = [], []
        context, context_rows = None, None  # (B, M, D) pruned tokens the live ones still attend to, their RoPE
        for number, block in enumerate(self.eva.blocks, start=1):
            if context is None:
                live = live._replace(features=block(live.features, rope=live_rows))
            else:
                live = live._replace(features=eva_block_with_context(block, live.features, live_rows, context,
                                                                     context_rows))
            if number in self.config.prune_after:
                live, dropped = self.stages[self.config.prune_after.index(number)](live)
                if path is not None:
                    dropped = dropped._replace(weights=gather_tokens(path, dropped.positions) * dropped.weights)
                    path = scatter_tokens(path, live.positions, gather_tokens(path, live.positions) * live.weights)
                pruned.append(dropped)
                kept_positions.append(live.positions)
                if self.config.context_tokens:
                    context = torch.cat([p.features for p in pruned], dim=1)
                    context_rows = live_rope(rope, context, torch.cat([p.positions for p in pruned], dim=1))
                live_rows = None if rope is None else live_rope(rope, live.features, live.positions)
        if path is not None:
            live = live._replace(weights=gather_tokens(path, live.positions))
        return [*pruned, live], kept_positions

    def forward(self, x: Tensor) -> Tensor:  # (B, C, *patch) -> (B, num_classes, *patch)
        tokens = self.down_projection(x)  # (B, D, *grid)
        B, D, *grid = tokens.shape
        sources, kept_positions = self.encode(tokens.flatten(2).transpose(1, 2))
        self.last_keep_indices = [p.detach() for p in kept_positions]
        L = math.prod(grid)
        # eva.norm per token, then the soft indicators (after the norm, which would cancel them)
        normed = [s._replace(features=self.eva.norm(s.features) * (1 if s.weights is None else s.weights))
                  for s in sources]
        sequence = merge_token_sets(normed, L)  # (B, L, D)
        if self.mta is not None:
            sequence = sequence + self.mta(sources, L)
        return self.up_projection(sequence.transpose(1, 2).reshape(B, D, *grid))
