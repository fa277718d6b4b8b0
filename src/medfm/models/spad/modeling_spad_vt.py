"""SPAD-VT: the spacing-adaptive soft visual tokenizer of PUMIT (spec §a).

An encoder of SPAD-convs (total stride 16) maps a ``2x - 1`` RGB volume to latents; the soft quantizer
turns each latent into a distribution over a codebook (``softmax(Linear(z))``) and a soft code
``z_q = p @ codebook``; a decoder of SPAD transposed convs reconstructs the input. The distributions are
the targets of SPAD-ViT's masked image modeling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from ...layers.anisotropy import grid_anisotropy
from ...layers.norm import ChannelsFirstLayerNorm
from ..modeling_utils import MedfmPreTrainedModel, as_volume
from .configuration_spad import SpadVTConfig
from .spad_conv import SpadConv3d, SpadConvTranspose3d, aniso_d_from_spacing

__all__ = ["SpadVTEncoderOutput", "SpadVTModel", "SpadVTOutput", "SpadVTPreTrainedModel"]


@dataclass
class SpadVTEncoderOutput(ModelOutput):
    """What :meth:`SpadVTModel.encode` returns.

    Attributes:
        z: Encoder output ``(B, C, d, h, w)`` before the quantizer.
        logits: Code logits, channels last ``(B, d, h, w, K)``.
        z_q: Soft-quantised latent ``softmax(logits) @ codebook``, channels first ``(B, C, d, h, w)``.
        probabilities: ``softmax(logits)`` ``(B, d, h, w, K)``: the soft tokens.
    """

    z: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    z_q: torch.Tensor | None = None
    probabilities: torch.Tensor | None = None


@dataclass
class SpadVTOutput(SpadVTEncoderOutput):
    """What :meth:`SpadVTModel.forward` returns: the encoding, the reconstruction and the codebook regularisers.

    Attributes:
        reconstruction: Decoder output, the input's shape.
        quant_loss: ``sum_k pbar_k log pbar_k`` over the batch's mean code use (minimising it spreads code use).
        entropy: Mean per-token entropy of the code distributions (minimising it makes tokens confident).
    """

    reconstruction: torch.Tensor | None = None
    quant_loss: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


class SpadVTUpBlock(nn.Module):
    """A SPAD transposed conv (x2), then SPAD-conv 3x3x3, GroupNorm, LeakyReLU."""

    def __init__(self, config: SpadVTConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.transposed_conv = SpadConvTranspose3d(in_channels, out_channels, stride=2)
        self.conv = nn.Sequential(
            SpadConv3d(out_channels, out_channels, 3, padding=1),
            nn.GroupNorm(config.group_norm_groups, out_channels, eps=config.group_norm_eps),
            nn.LeakyReLU(0.01),
        )

    def spad_forward(self, x: torch.Tensor, aniso_d: int, n: int) -> tuple[torch.Tensor, int]:
        x, n = self.transposed_conv.spad_forward(x, aniso_d, n)
        return _run(self.conv, x, aniso_d, n)


def _run(layers: nn.Module, x: torch.Tensor, aniso_d: int, n: int) -> tuple[torch.Tensor, int]:
    """Run a sequence in which SPAD layers also take and update the downsampling count ``n``."""
    for layer in layers:
        if hasattr(layer, "spad_forward"):
            x, n = layer.spad_forward(x, aniso_d, n)
        else:
            x = layer(x)
    return x, n


class SpadVTQuantizer(nn.Module):
    """Soft vector quantizer: ``p = softmax(proj(z))``, ``z_q = p @ codebook`` (no argmax, no straight-through)."""

    def __init__(self, config: SpadVTConfig):
        super().__init__()
        self.proj = nn.Linear(config.embedding_dim, config.codebook_size)
        self.embedding = nn.Embedding(config.codebook_size, config.embedding_dim)

    def forward(self, z: torch.Tensor) -> SpadVTEncoderOutput:
        logits = self.proj(z.movedim(1, -1))
        probabilities = logits.softmax(dim=-1)
        z_q = (probabilities @ self.embedding.weight).movedim(-1, 1)
        return SpadVTEncoderOutput(z=z, logits=logits, z_q=z_q, probabilities=probabilities)


class SpadVTPreTrainedModel(MedfmPreTrainedModel):
    """Initialisation and the medfm contract of the SPAD-VT tokenizer (volumes and 2D images, spacing-aware;
    it has no pooled output, being a tokenizer rather than a backbone)."""

    config_class = SpadVTConfig
    config: SpadVTConfig
    base_model_prefix = "spad_vt"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    _no_split_modules = ["SpadVTUpBlock"]
    input_spatial_dims = (2, 3)
    accepts_spacing = True
    pooling = "mean"

    def input_padding_step(self) -> dict:
        """Pads depth to the total stride at the grid's anisotropy (``P >> aniso_d``)."""
        stride = self.config.total_stride
        return {"name": "pad_to_multiple", "multiple": stride, "anisotropy_stride": stride, "value": "min"}

    def required_input_multiple(self, spacing=None) -> tuple[int, ...]:
        """The tokenizer's total stride, in depth at the input's anisotropy level."""
        stride = self.config.total_stride
        level = aniso_d_from_spacing(spacing, max_stride=stride) if spacing is not None else 0
        return (max(stride >> level, 1), stride, stride)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
            init.kaiming_normal_(module.weight, nonlinearity="leaky_relu", a=0.01)
            init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm | nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=1.0 / module.weight.shape[1] ** 0.5)


class SpadVTModel(SpadVTPreTrainedModel):
    r"""The SPAD-VT tokenizer.

    ``encode(pixel_values, spacing)`` gives the soft tokens, ``decode(z_q, aniso_d)`` the reconstruction,
    and ``forward`` both plus the codebook regularisers. ``pixel_values`` is ``(B, 3, D, H, W)`` in ``[-1, 1]``
    (``(B, 3, H, W)`` for 2D, which uses ``aniso_d = 5``); every size must be a multiple of the effective
    stride (16 in-plane, ``max(16 >> aniso_d, 1)`` in depth).
    """

    def __init__(self, config: SpadVTConfig):
        super().__init__(config)
        config.validate_architecture()
        down, up = config.downsample_channels, config.upsample_channels
        encoder: list[nn.Module] = []
        channels = config.in_channels
        for level, width in enumerate(down):
            stride = config.start_stride if level == 0 else 2
            encoder += [
                SpadConv3d(channels, width, stride, stride=stride),
                ChannelsFirstLayerNorm(width, eps=config.layer_norm_eps),
                nn.GELU(),
            ]
            channels = width
        for width in (channels, config.embedding_dim):
            encoder += self._conv_block(config, channels, width)
            channels = width
        self.encoder = nn.ModuleList(encoder)
        self.quantize = SpadVTQuantizer(config)
        decoder = self._conv_block(config, config.embedding_dim, up[-1]) + self._conv_block(
            config, up[-1], up[-1]
        )
        decoder += [SpadVTUpBlock(config, up[i], up[i - 1]) for i in range(len(up) - 1, 0, -1)]
        decoder.append(SpadConvTranspose3d(up[0], config.in_channels, stride=config.start_stride))
        self.decoder = nn.ModuleList(decoder)
        self.post_init()

    @staticmethod
    def _conv_block(config: SpadVTConfig, in_channels: int, out_channels: int) -> list[nn.Module]:
        return [
            SpadConv3d(in_channels, out_channels, 3, padding=1),
            nn.GroupNorm(config.group_norm_groups, out_channels, eps=config.group_norm_eps),
            nn.LeakyReLU(0.01),
        ]

    @property
    def downsample_steps(self) -> int:
        return self.config.total_stride.bit_length() - 1

    def resolve_aniso_d(self, pixel_values: torch.Tensor, spacing=None, aniso_d: int | None = None) -> int:
        if aniso_d is not None:
            return int(aniso_d)
        if spacing is not None or pixel_values.shape[2] == 1:
            return grid_anisotropy(pixel_values.shape[2], spacing, max_stride=self.config.total_stride)
        raise ValueError("SPAD-VT needs the spacing of a 3D input: pass spacing=(z, y, x) mm or aniso_d")

    def _check_size(self, volume: torch.Tensor, aniso_d: int) -> None:
        stride = self.config.total_stride
        depth = max(stride >> aniso_d, 1)
        if any(n % s for n, s in zip(volume.shape[2:], (depth, stride, stride))):
            raise ValueError(
                f"input size {tuple(volume.shape[2:])} is not a multiple of the tokenizer stride "
                f"{(depth, stride, stride)} at aniso_d {aniso_d}"
            )

    def encode(
        self, pixel_values: torch.Tensor, spacing: torch.Tensor | None = None, aniso_d: int | None = None
    ) -> SpadVTEncoderOutput:
        """Soft tokens of ``pixel_values`` (``(B, 3, D, H, W)`` or ``(B, 3, H, W)`` in ``[-1, 1]``)."""
        volume, _ = as_volume(pixel_values)
        level = self.resolve_aniso_d(volume, spacing, aniso_d)
        self._check_size(volume, level)
        z, _ = _run(self.encoder, volume.to(self.quantize.proj.weight.dtype), level, 0)
        return self.quantize(z)

    def decode(self, z_q: torch.Tensor, aniso_d: int) -> torch.Tensor:
        """Reconstruct from soft codes ``(B, C, d, h, w)``; ``aniso_d`` must be the one used to encode."""
        reconstruction, _ = _run(self.decoder, z_q, int(aniso_d), self.downsample_steps)
        return reconstruction

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        spacing: torch.Tensor | None = None,
        aniso_d: int | None = None,
        **kwargs,
    ) -> SpadVTOutput | tuple:
        volume, is_2d = as_volume(pixel_values)
        level = self.resolve_aniso_d(volume, spacing, aniso_d)
        encoded = self.encode(volume, aniso_d=level)
        reconstruction = self.decode(encoded.z_q, level)
        if is_2d:
            reconstruction = reconstruction[:, :, 0]
        probabilities = encoded.probabilities.flatten(0, -2).float()
        mean_use = probabilities.mean(dim=0)
        quant_loss = (mean_use * mean_use.clamp_min(1e-12).log()).sum()
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=-1).mean()
        return SpadVTOutput(
            z=encoded.z,
            logits=encoded.logits,
            z_q=encoded.z_q,
            probabilities=encoded.probabilities,
            reconstruction=reconstruction,
            quant_loss=quant_loss,
            entropy=entropy,
        )
