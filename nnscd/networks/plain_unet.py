"""nnU-Net's default U-Net for a given patch, without nnU-Net plans: the reference every speed claim is made
against. The topology follows nnU-Net's planner for isotropic spacing (get_pool_and_conv_props): an axis is
halved while it is even and at least 8 (so it stays >= 4, nnU-Net's minimum feature map size); features start
at 32 and double up to 320 (3D) or 512 (2D); 3x3(x3) kernels, 2 convs per stage, instance norm, leaky ReLU.
"""
from typing import Sequence

from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn


def nnunet_unet_plan(patch_size: Sequence[int]) -> dict:
    """Stages of nnU-Net's PlainConvUNet for `patch_size`: features, kernel sizes and strides per stage."""
    ndim = len(patch_size)
    sizes, strides = list(patch_size), [(1,) * ndim]
    while True:
        stride = tuple(2 if n % 2 == 0 and n >= 8 else 1 for n in sizes)
        if max(stride) == 1:
            break
        strides.append(stride)
        sizes = [n // s for n, s in zip(sizes, stride)]
    max_features = 320 if ndim == 3 else 512
    return {"features": [min(32 * 2 ** i, max_features) for i in range(len(strides))],
            "kernel_sizes": [(3,) * ndim] * len(strides), "strides": strides, "n_conv_per_stage": 2}


def build_nnunet_unet(in_channels: int, num_classes: int, patch_size: Sequence[int]) -> nn.Module:
    """PlainConvUNet as nnU-Net 2.8 builds it for 3d_fullres / 2d, no deep supervision."""
    plan = nnunet_unet_plan(patch_size)
    ndim, n = len(patch_size), len(plan["strides"])
    return PlainConvUNet(
        in_channels, n, plan["features"], nn.Conv3d if ndim == 3 else nn.Conv2d, plan["kernel_sizes"],
        plan["strides"], [plan["n_conv_per_stage"]] * n, num_classes, [plan["n_conv_per_stage"]] * (n - 1),
        conv_bias=True, norm_op=nn.InstanceNorm3d if ndim == 3 else nn.InstanceNorm2d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=False)
