"""APFormer: a light CNN U-Net whose 1/8-resolution bottleneck is a transformer with adaptive pruning.

After "The Lighter The Better: Rethinking Transformers in Medical Image Segmentation Through Adaptive Pruning"
(Lin et al., 2022), in 2D and 3D. Read top to bottom:

- `RelativeGrid`     token coordinates and per-axis relative offsets of the bottleneck grid (buffers, shared).
- `ssa_loss`         SSA: self-supervised target for each layer's content attention (symmetric, sharper).
- `prune_dependencies` DP: drop each attention row's weakest entries below a learned threshold, renormalise.
- `GRPEAttention`    attention with GRPE (relative bias + Gaussian prior), SSA and DP.
- `Block`, `PrunedTransformer`  pre-norm blocks; QP (query-wise pruning) computes only kept queries at inference.
- `APFormer`         the U-Net around it; `apformer_aux_loss` and the builders for trainers.

Fixes against the published code (see documentation/apformer.md):
- SSA is a KL divergence with no clamp, so it has gradient from the first step.
- The Gaussian prior enters the logits as log G (attention is multiplied by the heatmap), not as 0.01 * G.
- Grid tables are non-persistent buffers built once per network (no `.cuda()` in `__init__`); the 3D relative
  bias is a sum of per-axis tables, never an N^2 index.
- QP inference works for any batch size (kept queries gathered per sample, padded to the batch maximum).
- The DP gate learns from the segmentation loss through a straight-through sigmoid relaxation.

Honest limit of DP: a row's min and max need the full QK^T, so DP changes accuracy, not speed; and layers that
need explicit attention maps (SSA in training, DP always) cannot use fused SDPA kernels.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nnscd.networks.layers import ConvBlock, Mlp, conv_ops, gather_tokens, scatter_tokens

BOTTLENECK_STRIDE = 8  # three stride-2 stages


# ---------------------------------------------------------------------------------------------- CNN parts

class UpBlock(nn.Module):
    """Transposed-conv upsampling by 2, concatenation with the encoder skip, ConvBlock."""

    def __init__(self, dim: int, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        _, up, _ = conv_ops(dim)
        self.up = up(in_ch, out_ch, 2, 2)
        self.conv = ConvBlock(dim, out_ch + skip_ch, out_ch)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([self.up(x), skip], 1))


# ---------------------------------------------------------------------------------------------- GRPE

class RelativeGrid(nn.Module):
    """Coordinates of the bottleneck grid and per-axis relative offsets, built once and shared by all layers.

    Non-persistent buffers: they follow `.to()` and are rebuilt from the patch size, so checkpoints stay clean.
    Memory is O(N + sum_a L_a^2), not O(N^2): the relative bias is a sum of per-axis terms.
    """

    def __init__(self, grid: tuple[int, ...]):
        super().__init__()
        self.grid = grid
        coords = torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")
        self.register_buffer("coords", torch.stack(coords, -1).flatten(0, -2), persistent=False)  # (N, d)
        for a, n in enumerate(grid):
            offset = torch.arange(n)[:, None] - torch.arange(n)[None, :]                         # (L_a, L_a) q - k
            self.register_buffer(f"rel_index_{a}", offset + n - 1, persistent=False)           # into 2L_a - 1 table
            self.register_buffer(f"rel_dist2_{a}", (offset.float() / n) ** 2, persistent=False)  # normalised

    def bias(self, tables: nn.ParameterList, sigma: Tensor, q_pos: Tensor | None) -> Tensor:
        """GRPE bias (B|1, h, K, N) for queries at flat positions q_pos (B, K) (None: all N) against all keys.

        bias(q, k) = sum_a [ table_a[q_a - k_a] - ((q_a - k_a) / L_a)^2 / (2 sigma_h^2) ]
                   = relative bias + log of a Gaussian of the normalised distance with width sigma_h per head.
        """
        q_coords = self.coords[None] if q_pos is None else self.coords[q_pos]                   # (B|1, K, d)
        total = 0
        for a, (table, n) in enumerate(zip(tables, self.grid)):
            axis = table[:, getattr(self, f"rel_index_{a}")]                                  # (h, L_a, L_a)
            axis = axis - getattr(self, f"rel_dist2_{a}") / (2 * sigma[:, None, None] ** 2)
            rows = axis[:, q_coords[..., a]]                                                   # (h, B, K, L_a)
            key_shape = [1] * len(self.grid)
            key_shape[a] = n
            total = total + rows.reshape(*rows.shape[:3], *key_shape)                          # broadcast over keys
        return total.flatten(3).transpose(0, 1)                                                # (B, h, K, N)


# ---------------------------------------------------------------------------------------------- SSA and DP

def ssa_loss(scores: Tensor, temperature: float) -> Tensor:
    """SSA: KL(target || softmax(scores)) over the content scores (B, h, N, N), no position terms.

    The target is the layer's own scores made symmetric and sharper (divided by temperature < 1), detached:
    a converged dependency map is symmetric and far from uniform. No clamp, so the gradient is non-zero as
    soon as the map differs from its target (the published clamp zeroed it from the first step).
    """
    target = torch.softmax((scores + scores.transpose(-1, -2)).detach() / (2 * temperature), -1)
    return F.kl_div(torch.log_softmax(scores, -1), target, reduction="none").sum(-1).mean()


def prune_dependencies(attn: Tensor, gate: Tensor, relax: float | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """DP: remove attention at or below min + sigmoid(gate_h) * (max - min) of its row, renormalise the row.

    attn (B, h, K, N) fp32, gate (h,). Forward uses the hard mask. With relax set (training), backward uses a
    sigmoid of width relax * (max - min) around the threshold (straight-through), so the gate learns from the
    task loss. Returns the pruned attention, the hard mask and the soft mask (None without relax).
    """
    lo, hi = attn.detach().amin(-1, keepdim=True), attn.detach().amax(-1, keepdim=True)        # (B, h, K, 1)
    span = hi - lo
    thr = lo + torch.sigmoid(gate)[:, None, None] * span
    hard = (attn > thr) | (attn >= hi)                                          # the row max always survives
    if relax is None:
        kept, soft = torch.where(hard, attn, 0.0), None
    else:
        soft = torch.sigmoid((attn - thr) / (relax * span + 1e-12))
        kept = attn * (hard + soft - soft.detach())
    return kept / kept.sum(-1, keepdim=True), hard, soft


def _row_mean(values: Tensor, rows: Tensor | None) -> Tensor:
    """Mean of (B, h, K) over heads and the queries that count (rows (B, K) bool; None: all); 0 if none count."""
    if rows is None:
        return values.mean()
    w = rows[:, None].to(values.dtype).expand_as(values)
    return (values * w).sum() / w.sum().clamp(min=1)


class AttnAux(NamedTuple):
    ssa: Tensor | None          # scalar, training only
    dp_pruned: Tensor | None    # scalar, share of dependencies removed (detached)
    dp_kept_soft: Tensor | None  # scalar, relaxed share kept (differentiable sparsity term), training only


class GRPEAttention(nn.Module):
    """Multi-head attention of K queries over N keys with GRPE, SSA (training) and optional DP."""

    def __init__(self, grid: tuple[int, ...], dim: int, num_heads: int, dependency_pruning: bool,
                 ssa_temperature: float = 0.5, dp_init: float = 0.1, dp_relax: float = 0.1):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)   # separate from q: at inference only kept queries are projected
        self.proj = nn.Linear(dim, dim)
        self.rel_tables = nn.ParameterList(
            nn.Parameter(nn.init.trunc_normal_(torch.zeros(num_heads, 2 * n - 1), std=0.02)) for n in grid)
        # Gaussian widths per head, in units of the grid side: heads start from local (0.2) to broad (0.8)
        self.log_sigma = nn.Parameter(torch.linspace(math.log(0.2), math.log(0.8), num_heads))
        self.dp_gate = nn.Parameter(torch.full((num_heads,), math.log(dp_init / (1 - dp_init)))) \
            if dependency_pruning else None
        self.ssa_temperature, self.dp_relax = ssa_temperature, dp_relax

    def qkv(self, q_in: Tensor, kv_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head q (B, h, K, d), k, v (B, h, N, d)."""
        B, K, C = q_in.shape
        q = self.q(q_in).view(B, K, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(kv_in).view(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def position_bias(self, grid: RelativeGrid, q_pos: Tensor | None) -> Tensor:
        return grid.bias(self.rel_tables, self.log_sigma.exp(), q_pos)                         # (B|1, h, K, N)

    def forward(self, q_in: Tensor, kv_in: Tensor, grid: RelativeGrid, q_pos: Tensor | None,
                rows: Tensor | None) -> tuple[Tensor, AttnAux]:
        """q_in (B, K, C) queries at flat positions q_pos (None: all N), kv_in (B, N, C); rows (B, K) bool marks
        queries that count for statistics. Returns (B, K, C)."""
        B, K, C = q_in.shape
        q, k, v = self.qkv(q_in, kv_in)
        bias = self.position_bias(grid, q_pos)
        if not self.training and self.dp_gate is None:   # no map needed: fused kernel
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
            return self.proj(out.transpose(1, 2).reshape(B, K, C)), AttnAux(None, None, None)
        scores = ((q * self.scale) @ k.transpose(-2, -1)).float()                             # (B, h, K, N) fp32
        attn = torch.softmax(scores + bias, -1)
        ssa = ssa_loss(scores, self.ssa_temperature) if self.training else None   # all queries in training
        dp_pruned = dp_kept_soft = None
        if self.dp_gate is not None:
            attn, hard, soft = prune_dependencies(attn, self.dp_gate, self.dp_relax if self.training else None)
            dp_pruned = _row_mean(1 - hard.float().mean(-1), rows)
            dp_kept_soft = None if soft is None else _row_mean(soft.mean(-1), rows)
        out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(B, K, C)
        return self.proj(out), AttnAux(ssa, dp_pruned, dp_kept_soft)


# ---------------------------------------------------------------------------------------------- transformer

class Block(nn.Module):
    """Pre-norm transformer block over the queries in idx (None: all); queries with rows False pass unchanged."""

    def __init__(self, grid: tuple[int, ...], dim: int, num_heads: int, mlp_ratio: float,
                 dependency_pruning: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GRPEAttention(grid, dim, num_heads, dependency_pruning)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, grid: RelativeGrid, idx: Tensor | None,
                rows: Tensor | None) -> tuple[Tensor, AttnAux]:
        n = self.norm1(x)                                                                      # keys: every position
        xq, nq = (x, n) if idx is None else (gather_tokens(x, idx), gather_tokens(n, idx))     # (B, K, C)
        a, aux = self.attn(nq, n, grid, idx, rows)
        h = xq + a
        h = h + self.mlp(self.norm2(h))
        if rows is not None:
            h = torch.where(rows[..., None], h, xq)                                            # pruned: identity
        return (h if idx is None else scatter_tokens(x, idx, h)), aux


class PrunedTransformer(nn.Module):
    """Transformer over the bottleneck positions with query-wise pruning (QP).

    keep (B, N) bool marks queries to update; the rest keep their input features in every block, and all
    positions stay keys and values. Training computes every query (full N x N maps for SSA, fixed shapes) and
    masks the update of pruned ones, so it trains exactly the function inference runs. Inference gathers the
    kept queries per sample, padded to the batch's largest count with pruned positions (their update is
    discarded), so attention and MLP cost scales with the kept share, for any batch size.
    """

    def __init__(self, grid: tuple[int, ...], dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 dependency_pruning: bool):
        super().__init__()
        self.grid = RelativeGrid(grid)
        self.blocks = nn.ModuleList(Block(grid, dim, num_heads, mlp_ratio, dependency_pruning) for _ in range(depth))

    def forward(self, x: Tensor, keep: Tensor | None) -> tuple[Tensor, list[AttnAux]]:
        """x (B, N, C) -> (B, N, C) and one AttnAux per block."""
        idx, rows = None, keep
        # an exported graph has fixed shapes, and the kept count depends on the image: there every query is computed
        # and pruned ones masked (the training path: the same output, without QP's saving)
        if keep is not None and not self.training and not torch.onnx.is_in_onnx_export():
            k = int(keep.sum(1).max())  # one host sync per forward: the batch's largest kept count sizes the gather
            idx = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :k]          # (B, k) kept first
            rows = keep.gather(1, idx)
        aux = []
        for blk in self.blocks:
            x, a = blk(x, self.grid, idx, rows)
            aux.append(a)
        return x, aux


# ---------------------------------------------------------------------------------------------- APFormer

@dataclass
class APFormerAux:
    """What a trainer reads from `APFormer.aux` after a forward."""
    ssa_loss: Tensor               # scalar, mean over layers; 0 outside training
    sparsity: Tensor               # scalar, relaxed share of dependencies kept (minimise to prune more); training
    fg_logits: Tensor | None       # (B, 1, *patch / 8) foreground-head logits; None without pruning
    qp_pruned_fraction: Tensor     # scalar, share of queries pruned in the batch (detached)
    dp_pruned_fraction: Tensor     # (depth,), share of dependencies removed per layer (detached)


class APFormer(nn.Module):
    """Light CNN U-Net (2D or 3D by len(patch_size)) with a GRPE/SSA transformer at 1/8 resolution.

    enable_pruning=False is the APFormerNoPrune ablation: no foreground head, no QP, no DP; SSA and GRPE stay.
    forward(x (B, in_channels, *patch_size)) -> logits (B, num_classes, *patch_size); then `self.aux`.
    """

    def __init__(self, in_channels: int, num_classes: int, patch_size: tuple[int, ...], features: int = 16,
                 embed_dim: int = 128, depth: int = 2, num_heads: int = 4, mlp_ratio: float = 2.0,
                 qp_threshold: float = 0.9, enable_pruning: bool = True):
        super().__init__()
        self.patch_size, dim = tuple(patch_size), len(patch_size)
        conv, _, _ = conv_ops(dim)
        for axis, side in enumerate(self.patch_size):
            if side % BOTTLENECK_STRIDE:
                raise ValueError(
                    f"APFormer: patch size {self.patch_size} axis {axis} is {side}, not divisible by "
                    f"{BOTTLENECK_STRIDE} (the bottleneck stride); use a patch side that is a multiple of "
                    f"{BOTTLENECK_STRIDE}, e.g. {math.ceil(side / BOTTLENECK_STRIDE) * BOTTLENECK_STRIDE}")
        if embed_dim % num_heads:
            raise ValueError(f"APFormer: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.grid = tuple(s // BOTTLENECK_STRIDE for s in self.patch_size)
        self.qp_threshold = qp_threshold
        chans = [features, 2 * features, 4 * features]
        self.encoder = nn.ModuleList([ConvBlock(dim, in_channels, chans[0]),                   # 1
                                      ConvBlock(dim, chans[0], chans[1], 2),                   # 1/2
                                      ConvBlock(dim, chans[1], chans[2], 2),                   # 1/4
                                      ConvBlock(dim, chans[2], embed_dim, 2)])                 # 1/8 bottleneck
        self.fg_head = conv(embed_dim, 1, 1) if enable_pruning else None                       # QP: coarse foreground
        self.transformer = PrunedTransformer(self.grid, embed_dim, depth, num_heads, mlp_ratio, enable_pruning)
        self.decoder = nn.ModuleList([UpBlock(dim, embed_dim, chans[2], chans[2]),
                                      UpBlock(dim, chans[2], chans[1], chans[1]),
                                      UpBlock(dim, chans[1], chans[0], chans[0])])
        self.head = conv(chans[0], num_classes, 1)
        self.aux: APFormerAux | None = None

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[2:]) != self.patch_size:
            raise ValueError(f"APFormer was built for patch size {self.patch_size} (its relative-position tables "
                             f"depend on it); got input of spatial size {tuple(x.shape[2:])}")
        skips = []
        for stage in self.encoder[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.encoder[-1](x)                                                                # (B, E, *grid)
        fg_logits = None if self.fg_head is None else self.fg_head(x)                          # (B, 1, *grid)
        keep = None if fg_logits is None else (torch.sigmoid(-fg_logits.float()) <= self.qp_threshold).flatten(1)
        tokens, layer_aux = self.transformer(x.flatten(2).transpose(1, 2), keep)               # (B, N, E)
        x = tokens.transpose(1, 2).reshape(x.shape)
        for up, skip in zip(self.decoder, reversed(skips)):
            x = up(x, skip)
        self.aux = self._collect_aux(layer_aux, fg_logits, keep, x.device)
        return self.head(x)

    @staticmethod
    def _collect_aux(layer_aux: list[AttnAux], fg_logits: Tensor | None, keep: Tensor | None,
                     device: torch.device) -> APFormerAux:
        zero = torch.zeros((), device=device)

        def mean(values: list[Tensor | None]) -> Tensor:
            present = [v for v in values if v is not None]
            return torch.stack(present).mean() if present else zero

        return APFormerAux(
            ssa_loss=mean([a.ssa for a in layer_aux]),
            sparsity=mean([a.dp_kept_soft for a in layer_aux]),
            fg_logits=fg_logits,
            qp_pruned_fraction=zero if keep is None else 1 - keep.float().mean(),
            dp_pruned_fraction=torch.stack([zero if a.dp_pruned is None else a.dp_pruned for a in layer_aux]),
        )


def apformer_aux_loss(net: APFormer, target_labels: Tensor, ssa_weight: float, fg_weight: float,
                      sparsity_weight: float = 0.0) -> Tensor:
    """Auxiliary loss of the last forward, to add to Dice + CE.

    ssa_weight * SSA + fg_weight * BCE(foreground head, label > 0 max-pooled to 1/8: a position is foreground
    if any voxel in its cell is) + sparsity_weight * relaxed share of dependencies kept.
    target_labels: (B, 1, *patch) or (B, *patch) integer labels at full resolution (unwrap DDP/compile first).
    """
    aux = net.aux
    if aux is None:
        raise RuntimeError("apformer_aux_loss needs a forward pass of the network first")
    loss = ssa_weight * aux.ssa_loss + sparsity_weight * aux.sparsity
    if aux.fg_logits is not None:
        fg = (target_labels > 0).float()
        if fg.ndim == aux.fg_logits.ndim - 1:
            fg = fg.unsqueeze(1)
        pool = F.max_pool2d if fg.ndim == 4 else F.max_pool3d
        fg = pool(fg, BOTTLENECK_STRIDE)
        loss = loss + fg_weight * F.binary_cross_entropy_with_logits(aux.fg_logits.float(), fg)
    return loss


def build_apformer(in_channels: int, num_classes: int, patch_size: tuple[int, ...], **kwargs) -> APFormer:
    """APFormer with the small CPU-trainable defaults (features 16, width 128, depth 2, 4 heads)."""
    return APFormer(in_channels, num_classes, patch_size, **kwargs)


def build_apformer_noprune(in_channels: int, num_classes: int, patch_size: tuple[int, ...], **kwargs) -> APFormer:
    """The ablation baseline: same network, no QP and no DP (SSA and GRPE stay)."""
    return APFormer(in_channels, num_classes, patch_size, enable_pruning=False, **kwargs)
