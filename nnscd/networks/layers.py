"""Building blocks shared by the network families (token-sparse ViT, token-sparse Primus, APFormer).

One definition each, so a fix reaches every network and the checkpoints of all of them keep the same keys:
moving a block here must not change its submodule names, its parameters or the order they are created in.
Pure torch: nothing here imports nnU-Net or the rest of nnscd.

Shapes: B batch, L tokens of the full sequence, n tokens picked out of it, D channels.
"""
import torch.nn as nn
from torch import Tensor


def conv_ops(ndim: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """(Conv, ConvTranspose, InstanceNorm) classes for 2D or 3D: one lookup, so 2D and 3D nets build alike."""
    if ndim == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d
    if ndim == 3:
        return nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d
    raise ValueError(f"patches must be 2D or 3D, got {ndim} axes")


class ConvBlock(nn.Sequential):
    """nnU-Net's stage: two (3x3(x3) conv -> instance norm -> leaky ReLU); the first conv may downsample by its
    stride. (B, cin, *S) -> (B, cout, *S / stride). Keys 0.*, 1.*, 3.*, 4.* (the convs and norms)."""

    def __init__(self, ndim: int, cin: int, cout: int, stride: int = 1):
        conv, _, norm = conv_ops(ndim)
        super().__init__(
            conv(cin, cout, 3, stride, 1), norm(cout, affine=True), nn.LeakyReLU(0.01, inplace=True),
            conv(cout, cout, 3, 1, 1), norm(cout, affine=True), nn.LeakyReLU(0.01, inplace=True),
        )


class Mlp(nn.Sequential):
    """A transformer block's feed-forward part: Linear -> GELU -> Linear, (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Each sample's tokens at `index`: x (B, L, D), index (B, n) int64 -> (B, n, D). How pruned networks shorten
    a sequence to its live tokens."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(x: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """The inverse of gather_tokens: x (B, L, D) with its rows at `index` (B, n) replaced by src (B, n, D) ->
    (B, L, D), a new tensor. How the tokens of a shorter sequence go back to their places in the full one."""
    return x.scatter(1, index.unsqueeze(-1).expand_as(src), src)
