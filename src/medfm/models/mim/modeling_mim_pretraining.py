"""MiM pre-training: hierarchical masked autoencoding at three levels of a crop, with cross-level alignment.

J. Zhuang et al., *MiM: Mask in Mask Self-Supervised Pre-Training for 3D Medical Image Analysis*, IEEE TMI
44(9), 2025 (arXiv 2404.15580). This reproduces upstream ``MaskedAutoencoderConvViT3d.forward``
(``Pretrain/models_convmae3d_v4.py``; spec `shared/specs/mim.md` §2) with its geometry generalised from the
config (96^3 levels, a 6^3 token grid, a 192^3 crop upstream) and every random draw replayable (:class:`MiMNoise`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from ...errors import InvalidConfigError, VolumeShapeError
from ...layers.losses import masked_reconstruction_loss
from ...layers.masking import gather_tokens, mask_from_noise, repeat_group_noise, scatter_tokens
from ...layers.patch_embed import patchify
from ...layers.position import sincos_position_table
from .configuration_mim import MiMConfig
from .modeling_mim import MiMLayer, MiMMlp, MiMModel, MiMPreTrainedModel

__all__ = [
    "MiMForPreTraining",
    "MiMForPreTrainingOutput",
    "MiMNoise",
    "byol_loss",
    "mim_loss_weights",
]

#: Octants of a crop (2 per axis) = token groups of the up-level mask.
NUM_GROUPS = 8


# --- noise, weights and the alignment criterion -------------------------------------------------------------


@dataclass
class MiMNoise:
    """Every random draw of one pre-training forward, in upstream's draw order (spec §2.2).

    ``B`` is the batch, ``su = num_mid_volumes``, ``sd = num_down_patches``, ``N`` the tokens of a level.

    Attributes:
        up_groups: ``(B, 8)`` group noise of the up level (repeated ``N / 8`` times to the tokens).
        select_mid: ``(B, 8)`` noise choosing the mid octants among the masked groups.
        mid: ``(B * su, N)`` token noise of the mid level.
        select_down: ``(B * su, N)`` noise choosing the down patches among the masked mid tokens.
        down: ``(B * su * sd, N)`` token noise of the down level.
    """

    up_groups: torch.Tensor
    select_mid: torch.Tensor
    mid: torch.Tensor
    select_down: torch.Tensor
    down: torch.Tensor

    @staticmethod
    def shapes(batch_size: int, config: MiMConfig) -> dict[str, tuple[int, int]]:
        """The shape of each draw for a batch of ``batch_size`` crops, in draw order."""
        su, sd, tokens = config.num_mid_volumes, config.num_down_patches, config.num_tokens
        return {
            "up_groups": (batch_size, NUM_GROUPS),
            "select_mid": (batch_size, NUM_GROUPS),
            "mid": (batch_size * su, tokens),
            "select_down": (batch_size * su, tokens),
            "down": (batch_size * su * sd, tokens),
        }

    @classmethod
    def resolve(
        cls,
        noise: MiMNoise | Mapping[str, torch.Tensor] | None,
        batch_size: int,
        config: MiMConfig,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> MiMNoise:
        """The noise to use: the given draws (a :class:`MiMNoise` or a mapping with its field names, a
        ``noise_`` prefix allowed) checked for shape, and ``torch.rand`` for the missing ones, drawn in
        upstream's order (so ``None`` consumes the global RNG as upstream's forward does).

        Raises:
            VolumeShapeError: Not a mapping, an unknown key, a draw that is not a real floating-point tensor of
                the right shape, or a draw with NaN or Inf (which would fix the mask instead of drawing it).
        """
        if noise is None:
            given: dict[str, torch.Tensor] = {}
        elif isinstance(noise, MiMNoise):
            given = {f.name: getattr(noise, f.name) for f in fields(noise)}
        elif isinstance(noise, Mapping):
            given = {str(k).removeprefix("noise_"): v for k, v in noise.items()}
        else:
            raise VolumeShapeError(
                f"noise must be a MiMNoise, a mapping of its fields or None; got {type(noise).__name__}"
            )
        shapes = cls.shapes(batch_size, config)
        unknown = sorted(set(given) - set(shapes))
        if unknown:
            raise VolumeShapeError(f"unknown noise keys {unknown}; expected some of {list(shapes)}")
        draws = {}
        for name, shape in shapes.items():
            value = given.get(name)
            if value is None:
                value = torch.rand(
                    shape, device=device if generator is None else generator.device, generator=generator
                )
            elif not isinstance(value, torch.Tensor) or not value.is_floating_point():
                kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise VolumeShapeError(f"noise {name!r} must be a real floating-point tensor; got {kind}")
            elif tuple(value.shape) != shape:
                raise VolumeShapeError(
                    f"noise {name!r} must have shape {shape} for {batch_size} crop(s) "
                    f"(num_mid_volumes={config.num_mid_volumes}, num_down_patches={config.num_down_patches}, "
                    f"{config.num_tokens} tokens); got {tuple(value.shape)}"
                )
            elif not torch.isfinite(value).all():
                raise VolumeShapeError(
                    f"noise {name!r} holds NaN or Inf; noise must be finite (uniform in [0, 1))"
                )
            draws[name] = value.to(device=device, dtype=torch.float32)
        return cls(**draws)


def mim_loss_weights(
    weights: list[float] | tuple[float, ...], mode: str = "concurrent", training_progress: float | None = None
) -> list[float]:
    """The five loss weights (up, mid, down, up-mid, mid-down) at ``training_progress`` ``p = e / E`` (spec §2.7).

    ``"concurrent"``: as given. ``"coarse_to_fine"``: ``w_up * (cos(pi p / 2) + 1)`` (2 -> 1) and
    ``w_down * sin(pi p / 2)`` (0 -> 1). ``"fine_to_coarse"``: ``w_up * sin(pi p / 2)`` and
    ``w_down * (cos(pi p / 2) + 1)``. (Upstream ``engine_pretrain.py`` with ``lr_sched.get_*_weight_*``.)

    Raises:
        InvalidConfigError: An unknown mode, or a scheduled mode without a progress in ``[0, 1]``.
    """
    weights = [float(w) for w in weights]
    if mode == "concurrent":
        return weights
    if mode not in ("coarse_to_fine", "fine_to_coarse"):
        raise InvalidConfigError(f"unknown loss_weight_mode {mode!r}")
    if training_progress is None or not 0.0 <= float(training_progress) <= 1.0:
        raise InvalidConfigError(
            f"loss_weight_mode={mode!r} needs training_progress (epoch / epochs) in [0, 1]; got {training_progress!r}"
        )
    angle = math.pi * float(training_progress) / 2
    lower, higher = math.cos(angle) + 1.0, math.sin(angle)
    if mode == "coarse_to_fine":
        weights[0], weights[2] = weights[0] * lower, weights[2] * higher
    else:
        weights[0], weights[2] = weights[0] * higher, weights[2] * lower
    return weights


def byol_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """BYOL's criterion ``2 - 2 <a / |a|, b / |b|>`` over the last axis (no temperature, spec §2.5)."""
    return 2 - 2 * (F.normalize(a, dim=-1, p=2) * F.normalize(b, dim=-1, p=2)).sum(dim=-1)


# --- output ----------------------------------------------------------------------------------------------


@dataclass
class MiMForPreTrainingOutput(ModelOutput):
    """Output of :class:`MiMForPreTraining`. ``B`` crops, ``su``/``sd`` mid volumes / down patches each, ``N``
    tokens per level, ``P = prod(patch_sizes)^3 * num_channels`` voxels per token.

    Attributes:
        loss: ``sum(loss_weights * losses)``.
        losses: ``(5,)`` float32: up, mid, down reconstruction (MSE over masked tokens), up-mid, mid-down
            alignment.
        loss_weights: ``(5,)`` the weights used (after ``loss_weight_mode`` at ``training_progress``).
        logits_up, logits_mid, logits_down: Predicted patches ``(B, N, P)``, ``(B su, N, P)``, ``(B su sd, N, P)``.
        mask_up, mask_mid, mask_down: ``(rows, N)`` float, 1 = masked, raster token order.
        ids_restore_up, ids_restore_mid, ids_restore_down: ``(rows, N)`` inverse shuffles (MAE's).
        labels_mid: ``(B su,)`` octant index (``4 h + 2 w + d``) of each mid volume, sample-major.
        labels_down: ``(B su sd,)`` token index of each down patch in its mid volume, mid-volume-major.
        latent_up, latent_mid, latent_down: Encoder outputs of the visible tokens ``(rows, V, C)``, in the order of
            ``argsort(ids_restore)[:, :V]``.
        decoder_hidden_up, decoder_hidden_mid, decoder_hidden_down: ``(rows, N, decoder_hidden_size)`` after
            ``decoder_norm``, the features the alignment terms use.
        level_inputs: With ``output_hidden_states``: the encoder input of each level, ``(B, C, *image_size)``,
            ``(B su, ...)`` and ``(B su sd, ...)``.
    """

    loss: torch.Tensor | None = None
    losses: torch.Tensor | None = None
    loss_weights: torch.Tensor | None = None
    logits_up: torch.Tensor | None = None
    logits_mid: torch.Tensor | None = None
    logits_down: torch.Tensor | None = None
    mask_up: torch.Tensor | None = None
    mask_mid: torch.Tensor | None = None
    mask_down: torch.Tensor | None = None
    ids_restore_up: torch.Tensor | None = None
    ids_restore_mid: torch.Tensor | None = None
    ids_restore_down: torch.Tensor | None = None
    labels_mid: torch.Tensor | None = None
    labels_down: torch.Tensor | None = None
    latent_up: torch.Tensor | None = None
    latent_mid: torch.Tensor | None = None
    latent_down: torch.Tensor | None = None
    decoder_hidden_up: torch.Tensor | None = None
    decoder_hidden_mid: torch.Tensor | None = None
    decoder_hidden_down: torch.Tensor | None = None
    level_inputs: tuple[torch.Tensor, ...] | None = None


@dataclass
class _Level:
    """One level's forward: its input, mask, encoder latent, decoder output and reconstruction loss."""

    inputs: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor
    latent: torch.Tensor
    decoder_hidden: torch.Tensor
    logits: torch.Tensor
    loss: torch.Tensor


# --- the model -------------------------------------------------------------------------------------------


class MiMForPreTraining(MiMPreTrainedModel):
    r"""MiM pre-training (upstream ``MaskedAutoencoderConvViT3d``).

    Each crop ``(C, *2 image_size)`` yields three levels, each encoded with masking and reconstructed by one
    shared decoder (spec §2.2-§2.4):

    * **up**: the crop trilinearly down-sampled to ``image_size``; masked in 8 groups of ``N / 8`` consecutive
      raster tokens (quirk Q1: a group is not a spatial sub-cube).
    * **mid**: ``num_mid_volumes`` of the crop's 8 octants (index ``4 h + 2 w + d``), those of masked up groups
      with the highest selection noise; token-masked.
    * **down**: ``num_down_patches`` ``prod(patch_sizes)``-sized patches of masked tokens of each mid volume,
      trilinearly up-sampled to ``image_size``; token-masked.

    The masked encoder runs stages 1-3 with the visible mask inside each conv block, adds the stage shortcuts
    (``stage{1,2,3}_output_decode``) after the transformer, then ``norm``. The targets are the level's own
    patches (normalised per patch with ``norm_pix_loss``); the loss is the MSE over masked tokens.

    Cross-level alignment, ``crit(a, b) = 2 - 2 cos(a, b)`` (:func:`byol_loss`), on mean-pooled decoder features
    ``f`` (spec §2.6). The two ``alignment`` settings side by side:

    ==============  =====================================================  ==================================
    term            ``"released"`` (upstream code, the fixtures)           ``"paper"``
    ==============  =====================================================  ==================================
    up <-> mid      ``mean_{i<B, j<su} crit(f_mid[i], aggregate_mid(f_mid)  ``mean_{i, j} crit(u[i, labels_mid
                    [i, j])`` with ``f_mid`` the flat ``(B su, D)`` rows:   [i, j]], aggregate_mid(f_mid)[i,
                    row ``i`` is *not* sample ``i``'s and no up-level       j])``, ``u = aggregate_pred_up_
                    feature enters (quirk Q2)                               feature(group means of the up
                                                                            level's detached f)``: each mid
                                                                            volume against the up features of
                                                                            the group that selected it
    mid <-> down    ``c = aggregate_pred_mid_feature(f_mid.detach())``,     the same, with each mid volume's
                    ``d = aggregate_down(f_down)`` reshaped to ``(B sd,     own ``sd`` down patches
                    -1, D)``; ``mean_{i<B su, j} crit(c[i], d[i, j])``      (``d`` reshaped to ``(B su, sd,
                    (each mid volume against its own patches when           D)``)
                    ``su == sd``)
    ==============  =====================================================  ==================================

    In ``"released"`` mode ``aggregate_pred_up_feature`` is computed as upstream computes it and enters the total
    loss with weight 0, so every parameter gets a (zero) gradient, as DDP with ``find_unused_parameters=False``
    requires. ``alignment`` is read from the config at each forward.

    The encoder is upstream's pre-training variant (:class:`MiMModel` with ``pretraining=True``: frozen sin-cos
    positions, no layer scale, no relative bias, no fpn); ``decoder_pos_embed`` is a frozen sin-cos table too.
    """

    _keys_to_ignore_on_load_unexpected = None
    fixed_parameters = ("decoder_pos_embed",)

    def __init__(self, config: MiMConfig):
        super().__init__(config)
        config.check_pretraining()
        self.mim = MiMModel(config, add_fpn=False, pretraining=True)
        dims, width, patches = config.embed_dims, config.hidden_size, config.patch_sizes
        for stage in range(3):
            kernel = math.prod(patches[stage + 1 :])  # stage output -> token grid
            setattr(
                self, f"stage{stage + 1}_output_decode", nn.Conv3d(dims[stage], width, kernel, stride=kernel)
            )
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        decoder = config.decoder_hidden_size
        self.decoder_embed = nn.Linear(width, decoder)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, decoder), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                MiMLayer(config, decoder, config.decoder_num_attention_heads, config.decoder_mlp_ratio)
                for _ in range(config.decoder_num_hidden_layers)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder, eps=config.layer_norm_eps)
        self.decoder_pred = nn.Linear(decoder, config.total_stride**3 * config.num_channels)
        for name in (
            "aggregate_mid",
            "aggregate_down",
            "aggregate_pred_up_feature",
            "aggregate_pred_mid_feature",
        ):
            setattr(self, name, MiMMlp(decoder, decoder, config.hidden_act))
        self.post_init()

    def _init_head_weights(self, module: nn.Module) -> None:
        if module is self:
            init.normal_(self.mask_token, std=self.config.initializer_range)
            table = sincos_position_table(self.config.token_grid, self.config.decoder_hidden_size)
            init.copy_(self.decoder_pos_embed, table.unsqueeze(0))

    # --- the contract: crops of exactly 2 * image_size ------------------------------------------------

    def required_input_multiple(self, spacing=None) -> tuple[int, ...]:
        """The crop size ``2 * image_size``: the forward takes crops of exactly that size."""
        return tuple(self.config.crop_size)

    def check_input_shape(self, shape, spacing=None) -> None:
        """Only crops of ``2 * image_size`` (upstream's forward hard-codes its geometry)."""
        if tuple(int(n) for n in shape) != tuple(self.config.crop_size):
            raise VolumeShapeError(
                f"MiMForPreTraining takes crops of 2 * image_size = {tuple(self.config.crop_size)}; got "
                f"{tuple(int(n) for n in shape)} (crop or pad the volume, or set image_size)"
            )

    # --- the pieces --------------------------------------------------------------------------------------

    def encode_masked(self, volume: torch.Tensor, mask: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """The masked encoder (spec §2.3): latents ``(rows, V, C)`` of the visible tokens ``ids_keep``."""
        config, mim = self.config, self.mim
        visible = (1 - mask).to(volume.dtype).view(mask.shape[0], 1, *config.token_grid)
        x, shortcuts = volume, []
        for stage in range(3):
            cells = math.prod(
                config.patch_sizes[stage + 1 :]
            )  # voxels of this stage's output per token, per axis
            stage_visible = visible
            for axis in (2, 3, 4):
                stage_visible = stage_visible.repeat_interleave(cells, dim=axis)
            x = mim.conv_stage(stage, x, stage_visible)
            shortcut = getattr(self, f"stage{stage + 1}_output_decode")(x)
            shortcuts.append(shortcut.flatten(2).transpose(1, 2))
        tokens, _ = mim.embed_tokens(x)
        tokens = mim.transformer(gather_tokens(tokens, ids_keep))
        for shortcut in shortcuts:  # added after the transformer, before the norm (spec §8.2)
            tokens = tokens + gather_tokens(shortcut, ids_keep)
        return self.norm(tokens)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Mask tokens in, unshuffle, decoder blocks, ``decoder_norm``: ``(rows, N, decoder_hidden_size)``."""
        hidden = scatter_tokens(self.decoder_embed(latent), ids_restore, self.mask_token)
        hidden = hidden + self.decoder_pos_embed.to(hidden.dtype)
        for block in self.decoder_blocks:
            hidden = block(hidden)
        return self.decoder_norm(hidden)

    def _level(self, volume: torch.Tensor, noise: torch.Tensor, mask_ratio: float) -> _Level:
        mask, ids_restore, ids_keep = mask_from_noise(noise, mask_ratio)
        latent = self.encode_masked(volume, mask, ids_keep)
        hidden = self.decode(latent, ids_restore)
        logits = self.decoder_pred(hidden)
        target = patchify(volume, self.config.total_stride, channels_last=True)
        loss = masked_reconstruction_loss(
            logits.float(), target.float(), mask, norm_pix=self.config.norm_pix_loss
        )
        return _Level(volume, mask, ids_restore, latent, hidden, logits, loss)

    # --- forward ---------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: MiMNoise | Mapping[str, torch.Tensor] | None = None,
        training_progress: float | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MiMForPreTrainingOutput | tuple:
        r"""
        Args:
            pixel_values: ``(B, num_channels, *2 image_size)`` crops, values in ``[0, 1]``.
            noise: The five random draws (:class:`MiMNoise` or a mapping of its fields); missing ones are drawn
                with ``torch.rand`` in upstream's order.
            training_progress: ``epoch / epochs`` in ``[0, 1]``, for ``loss_weight_mode`` other than
                ``"concurrent"``.
            output_hidden_states: Also return each level's encoder input (``level_inputs``).
            return_dict: Return a tuple when ``False``.
        """
        config = self.config
        self._check_pixel_values(pixel_values)
        batch, channels = pixel_values.shape[:2]
        su, sd, image, group = (
            config.num_mid_volumes,
            config.num_down_patches,
            config.image_size,
            config.num_tokens // 8,
        )
        crops = pixel_values.to(self.mim.patch_embed1.proj.weight.dtype)
        noise = MiMNoise.resolve(noise, batch, config, device=crops.device)

        up = self._level(
            F.interpolate(crops, size=image, mode="trilinear", align_corners=False),
            repeat_group_noise(noise.up_groups, group),
            config.mask_ratio_up,
        )
        # Mid: octants of masked groups, the highest selection noise last (upstream's argsort(...)[:, -su:]).
        masked_groups = up.mask.view(batch, NUM_GROUPS, group).amax(dim=2)
        labels_mid = torch.argsort(noise.select_mid * masked_groups, dim=1, stable=True)[:, -su:]
        octants = patchify(crops, image, channels_last=False)  # (B, 8, C * prod(image)), index 4h + 2w + d
        mid_inputs = gather_tokens(octants, labels_mid).reshape(batch * su, channels, *image)
        mid = self._level(mid_inputs, noise.mid, config.mask_ratio_mid)
        # Down: patches of masked mid tokens, up-sampled to the level size.
        stride = config.total_stride
        labels_down = torch.argsort(noise.select_down * mid.mask, dim=1, stable=True)[:, -sd:]
        patches = gather_tokens(patchify(mid_inputs, stride, channels_last=False), labels_down)
        patches = patches.reshape(batch * su * sd, channels, stride, stride, stride)
        down = self._level(
            F.interpolate(patches, size=image, mode="trilinear", align_corners=False),
            noise.down,
            config.mask_ratio_down,
        )

        loss_upmid, loss_middown, unused = self._alignment(up, mid, down, labels_mid, batch)
        losses = torch.stack([up.loss, mid.loss, down.loss, loss_upmid.float(), loss_middown.float()])
        weights = torch.tensor(
            mim_loss_weights(config.loss_weights, config.loss_weight_mode, training_progress),
            dtype=losses.dtype,
            device=losses.device,
        )
        loss = (weights * losses).sum()
        if unused is not None:  # a zero-weight use, so DDP sees every parameter take part
            loss = loss + 0.0 * unused.float().sum()

        output_hidden_states = (
            config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        output = MiMForPreTrainingOutput(
            loss=loss,
            losses=losses,
            loss_weights=weights,
            logits_up=up.logits,
            logits_mid=mid.logits,
            logits_down=down.logits,
            mask_up=up.mask,
            mask_mid=mid.mask,
            mask_down=down.mask,
            ids_restore_up=up.ids_restore,
            ids_restore_mid=mid.ids_restore,
            ids_restore_down=down.ids_restore,
            labels_mid=labels_mid.reshape(-1),
            labels_down=labels_down.reshape(-1),
            latent_up=up.latent,
            latent_mid=mid.latent,
            latent_down=down.latent,
            decoder_hidden_up=up.decoder_hidden,
            decoder_hidden_mid=mid.decoder_hidden,
            decoder_hidden_down=down.decoder_hidden,
            level_inputs=(up.inputs, mid.inputs, down.inputs) if output_hidden_states else None,
        )
        return_dict = config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def _alignment(
        self, up: _Level, mid: _Level, down: _Level, labels_mid: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(loss_upmid, loss_middown, unused)``; see the class docstring for the two ``alignment`` modes."""
        config = self.config
        su, sd, width = config.num_mid_volumes, config.num_down_patches, config.decoder_hidden_size
        released = config.alignment == "released"
        # Up-level features per token group, from the detached decoder output (upstream computes them in both modes).
        groups = up.decoder_hidden.detach().reshape(batch, NUM_GROUPS, -1, width).mean(dim=2)
        up_features = self.aggregate_pred_up_feature(groups)  # (B, 8, D)
        mid_pooled = mid.decoder_hidden.mean(dim=1)  # (B su, D)
        mid_projected = self.aggregate_mid(mid_pooled).reshape(batch, su, width)
        if released:  # quirk Q2: rows 0..B-1 of the flat (B su) axis against sample i's projections
            loss_upmid = byol_loss(mid_pooled[:batch, None, :], mid_projected).mean()
        else:
            loss_upmid = byol_loss(gather_tokens(up_features, labels_mid), mid_projected).mean()
        down_projected = self.aggregate_down(down.decoder_hidden.mean(dim=1))  # (B su sd, D)
        mid_targets = self.aggregate_pred_mid_feature(mid.decoder_hidden.detach().mean(dim=1))  # (B su, D)
        if released:
            down_projected = down_projected.reshape(batch * sd, -1, width)[: batch * su]
        else:
            down_projected = down_projected.reshape(batch * su, sd, width)
        loss_middown = byol_loss(mid_targets[:, None, :], down_projected).mean()
        return loss_upmid, loss_middown, up_features if released else None
