"""The paper's CNN (U-Net) reference row: a MONAI DynUNet sized for the ROI, trained from scratch."""

from __future__ import annotations

from monai.networks.nets import DynUNet


def build_dynunet(in_channels: int, out_channels: int, roi):
    """MONAI DynUNet sized for the ROI: the paper's CNN (U-Net) reference row, trained from scratch."""
    # 3x3x3 kernels; stride 2 while every axis stays >= 8 voxels (at most 5 down-samplings)
    strides, size = [1], list(roi)
    while len(strides) < 6 and all(s // 2 >= 4 for s in size):
        strides.append(2)
        size = [s // 2 for s in size]
    return DynUNet(
        3,
        in_channels,
        out_channels,
        kernel_size=[3] * len(strides),
        strides=strides,
        upsample_kernel_size=strides[1:],
        norm_name="instance",
        res_block=True,
    )
