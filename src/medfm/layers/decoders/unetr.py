"""A SwinUNETR-style convolutional decoder over five encoder feature maps, built from MONAI's UNETR blocks.

Topology of SwinUNETR (Hatamizadeh et al., "Swin UNETR", BrainLes 2021) and of MiM's ``ConvViT3dUNETR``
(Zhuang et al., "MiM: Mask in Mask Self-Supervised Pre-Training for 3D Medical Image Analysis", IEEE TMI
2025; spec §4.1). With feature size ``F`` and encoder maps ``hs0..hs4`` at 1/2 ... 1/32 of the input:

=============  ===============================  ===========  ============
module         input                            out channels resolution
=============  ===============================  ===========  ============
``encoder1``   the image                        F            1
``encoder2``   hs0                              F            1/2
``encoder3``   hs1                              2F           1/4
``encoder4``   hs2                              4F           1/8
``encoder10``  hs4                              16F          1/32
``decoder5``   up(encoder10) + hs3 (raw)        8F           1/16
``decoder4``   up(decoder5) + encoder4          4F           1/8
``decoder3``   up(decoder4) + encoder3          2F           1/4
``decoder2``   up(decoder3) + encoder2          F            1/2
``decoder1``   up(decoder2) + encoder1          F            1
``out``        decoder1                         classes      1
=============  ===============================  ===========  ============

Module names are MiM's upstream names, so its decoder keys load unchanged, for example
``encoder1.layer.conv{1,2,3}.conv.weight``, ``encoder{2,3,4,10}.layer.conv{1,2}.conv.weight`` (no ``conv3``:
in and out widths agree in MiM), ``decoder{1..5}.transp_conv.conv.weight``,
``decoder{1..5}.conv_block.conv{1,2,3}.conv.weight`` and ``out.conv.conv.{weight,bias}``. InstanceNorm is
non-affine, so it has no keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

__all__ = ["UnetrDecoder"]


class UnetrDecoder(nn.Module):
    """Decode the image and five encoder maps (finest first) to segmentation logits at the input size.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Channels of the image (``encoder1``'s input).
        feature_channels: Channels of the five encoder maps ``hs0..hs4``, at strides 2, 4, 8, 16 and 32.
            ``hs3`` enters ``decoder5`` as it is, so it must have ``8 * feature_size`` channels.
        feature_size: ``F``, the decoder width at full resolution.
        out_channels: Classes.
        norm_name: MONAI norm name of the residual blocks (MiM: ``"instance"``, non-affine).
        res_block: Residual UNet blocks (``UnetResBlock``) rather than plain ones.

    Raises:
        ValueError: Not five feature maps, or ``feature_channels[3] != 8 * feature_size``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        feature_channels: Sequence[int],
        feature_size: int,
        out_channels: int,
        norm_name: tuple | str = "instance",
        res_block: bool = True,
    ):
        super().__init__()
        channels = [int(c) for c in feature_channels]
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3; got {spatial_dims}")
        if len(channels) != 5:
            raise ValueError(
                f"UnetrDecoder takes five encoder maps (strides 2 to 32); got {len(channels)} widths"
            )
        width = feature_size
        if channels[3] != 8 * width:
            raise ValueError(
                f"the stride-16 map enters decoder5 without a projection, so it needs 8 * feature_size = "
                f"{8 * width} channels; got {channels[3]}"
            )
        self.spatial_dims = spatial_dims
        self.feature_channels = tuple(channels)

        def basic(cin: int, cout: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(
                spatial_dims, cin, cout, kernel_size=3, stride=1, norm_name=norm_name, res_block=res_block
            )

        def up(cin: int, cout: int) -> UnetrUpBlock:
            return UnetrUpBlock(
                spatial_dims,
                cin,
                cout,
                kernel_size=3,
                upsample_kernel_size=2,
                norm_name=norm_name,
                res_block=res_block,
            )

        self.encoder1 = basic(in_channels, width)
        self.encoder2 = basic(channels[0], width)
        self.encoder3 = basic(channels[1], 2 * width)
        self.encoder4 = basic(channels[2], 4 * width)
        self.encoder10 = basic(channels[4], 16 * width)
        self.decoder5 = up(16 * width, 8 * width)
        self.decoder4 = up(8 * width, 4 * width)
        self.decoder3 = up(4 * width, 2 * width)
        self.decoder2 = up(2 * width, width)
        self.decoder1 = up(width, width)
        self.out = UnetOutBlock(spatial_dims, width, out_channels)

    def forward(self, pixel_values: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits ``(B, out_channels, *spatial)`` from the image and the maps ``[hs0, ..., hs4]``."""
        if len(features) != 5:
            raise ValueError(f"expected five encoder maps (finest first); got {len(features)}")
        if pixel_values.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a {self.spatial_dims}D image (B, C, *spatial); got {tuple(pixel_values.shape)}"
            )
        for i, (feature, expected) in enumerate(zip(features, self.feature_channels)):
            stride = 2 ** (i + 1)
            size = tuple(s // stride for s in pixel_values.shape[2:])
            if feature.shape[1] != expected or tuple(feature.shape[2:]) != size:
                raise ValueError(
                    f"encoder map {i} should be (B, {expected}, *{size}) (stride {stride}); got {tuple(feature.shape)}"
                )
        hs0, hs1, hs2, hs3, hs4 = features
        enc1 = self.encoder1(pixel_values)
        enc2 = self.encoder2(hs0)
        enc3 = self.encoder3(hs1)
        enc4 = self.encoder4(hs2)
        dec = self.decoder5(self.encoder10(hs4), hs3)
        dec = self.decoder4(dec, enc4)
        dec = self.decoder3(dec, enc3)
        dec = self.decoder2(dec, enc2)
        dec = self.decoder1(dec, enc1)
        return self.out(dec)
