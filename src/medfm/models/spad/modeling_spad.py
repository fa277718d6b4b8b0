"""SPAD-ViT (PUMIT): a spacing-adaptive 3D ViT and its heads.

Luo et al., *Building Universal Foundation Models for Medical Image Analysis with Spatially Adaptive
Networks*, arXiv 2312.07630. Module and parameter names follow the upstream code (``cls_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.{i}``, ``norm``), so released checkpoints convert 1:1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from ...layers.anisotropy import grid_anisotropy
from ...layers.attention import AttentionCore
from ...layers.blocks import PreNormBlock
from ...layers.decoders.feature_pyramid import SimpleFeaturePyramid
from ...layers.decoders.unet import PyramidUNetDecoder
from ...layers.losses import deep_supervision_loss, soft_target_cross_entropy
from ...layers.masking import (
    gather_tokens,
    mask_from_visible_indices,
    random_visible_indices,
    replace_tokens,
    visible_indices_from_mask,
)
from ...layers.mlp import SwiGLU
from ...layers.patch_embed import check_divisible
from ...layers.position import resample_position_grid
from ...layers.rope import Rope3D, TokenRotation
from ...layers.varlen_attention import PackedSequenceOutput, pack_sequences, packed_inputs
from ..modeling_utils import MedfmPreTrainedModel, as_volume, classifier_output
from .configuration_spad import SpadViTConfig
from .spad_conv import SpadConv3d, aniso_d_from_spacing

logger = logging.get_logger(__name__)

__all__ = [
    "SpadViTForImageClassification",
    "SpadViTForMaskedImageModeling",
    "SpadViTForSemanticSegmentation",
    "SpadViTMaskedImageModelingOutput",
    "SpadViTModel",
    "SpadViTPackedOutput",
    "SpadViTPreTrainedModel",
    "SpadViTSegmentationOutput",
]


# --- outputs -------------------------------------------------------------------------------------------


@dataclass
class SpadViTMaskedImageModelingOutput(ModelOutput):
    """Output of :class:`SpadViTForMaskedImageModeling`.

    Attributes:
        loss: Soft-target cross-entropy over masked tokens, when targets were available.
        logits: ``(N_masked, codebook_size)`` predictions for the masked tokens, batch-major, token order.
        mask: ``(B, L)`` float mask that was used, 1 where a patch was masked (ViTMAE's convention; a float, so
            outputs can be compared and reduced like every other tensor). ``bool_masked_pos`` gives it as bool.
        target_logits: ``(B, L, codebook_size)`` tokenizer logits the targets came from, if computed.
        hidden_states: As in :class:`SpadViTModel`, when asked.
        attentions: Per block, the attention weights ``(B, heads, L', L')`` (``L'`` the tokens that block saw),
            when asked (eager attention).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    target_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    @property
    def bool_masked_pos(self) -> torch.Tensor | None:
        """The mask as ``(B, L)`` bool, True = masked."""
        return self.mask.bool() if self.mask is not None else None


@dataclass
class SpadViTSegmentationOutput(ModelOutput):
    """Output of :class:`SpadViTForSemanticSegmentation`.

    Attributes:
        loss: Deep-supervised Dice + cross-entropy, when ``labels`` were given.
        logits: ``(B, num_labels, D, H, W)`` at input resolution (``(B, K, H, W)`` for 4D inputs).
        auxiliary_logits: Coarser decoder outputs (finest first), in training with deep supervision.
        hidden_states: Backbone hidden states, when asked.
        attentions: Backbone attention weights per block, when asked (eager attention).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    auxiliary_logits: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# --- backbone ------------------------------------------------------------------------------------------


class SpadViTPatchEmbed(nn.Module):
    """Patch embedding: a SPAD-conv (adaptive, pre-trained) or an ordinary Conv3d (fixed ``patch_size``)."""

    def __init__(self, config: SpadViTConfig):
        super().__init__()
        self.adaptive = config.adaptive_patch_embed
        size = config.patch_size
        if self.adaptive:
            self.proj = SpadConv3d(config.in_channels, config.hidden_size, size[0], stride=size[0])
        else:
            self.proj = nn.Conv3d(config.in_channels, config.hidden_size, tuple(size), stride=tuple(size))

    def patch_shape(self, aniso_d: int) -> tuple[int, int, int]:
        """The effective ``(depth, height, width)`` patch for this anisotropy level."""
        size = self.proj.kernel_size
        if self.adaptive:
            return (max(size[0] >> aniso_d, 1), size[1], size[2])
        return tuple(size)  # type: ignore[return-value]

    def forward(self, pixel_values: torch.Tensor, aniso_d: int) -> torch.Tensor:
        check_divisible(pixel_values.shape[2:], self.patch_shape(aniso_d), f"the patch at aniso_d {aniso_d}")
        if self.adaptive:
            return self.proj.spad_forward(pixel_values, aniso_d, 0)[0]
        return self.proj(pixel_values)


class SpadViTAttention(AttentionCore):
    """Multi-head self-attention with q/v biases (no k bias) and 3D RoPE on the patch tokens."""

    def __init__(self, config: SpadViTConfig):
        super().__init__(config, config.num_attention_heads, config.head_dim)
        width = config.hidden_size
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        # Separate parameters, as upstream (EVA-02) stores them; added after the projections so that
        # adapters wrapping q_proj/v_proj still see plain Linear layers.
        self.q_bias = nn.Parameter(torch.zeros(width)) if config.qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(width)) if config.qkv_bias else None
        self.proj = nn.Linear(width, width)

    def forward(
        self, hidden_states: torch.Tensor, rotation: TokenRotation, **attention_kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``rotation`` covers every token (cls tokens stay unrotated); ``attention_kwargs`` carry a packed
        batch's ``attention_mask`` or ``cu_seqlens``. Returns the output and the attention weights."""
        batch, length, _ = hidden_states.shape
        query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self.q_bias is not None:
            query = query + self.q_bias
            value = value + self.v_bias
        heads = (batch, length, self.num_heads, self.head_dim)
        # Token-major (B, L, heads, head_dim), as the fused RoPE kernel reads it; then (B, heads, L, head_dim).
        query, key = rotation.rotate_pair(query.view(heads), key.view(heads))
        query, key, value = (t.transpose(1, 2) for t in (query, key, value.view(heads)))
        output, weights = self.attend(
            query, key, value, attention_kwargs.pop("attention_mask", None), **attention_kwargs
        )
        return self.proj(output.reshape(batch, length, -1)), weights


class SpadViTLayer(PreNormBlock):
    """Pre-norm block: ``x + attn(LN(x))``, then ``x + SwiGLU(LN(x))`` with the sub-LN (no drop path)."""

    def __init__(self, config: SpadViTConfig):
        width, eps = config.hidden_size, config.layer_norm_eps
        super().__init__(
            nn.LayerNorm(width, eps=eps),
            SpadViTAttention(config),
            nn.LayerNorm(width, eps=eps),
            SwiGLU(width, config.intermediate_size, sub_norm_eps=eps),
        )


class SpadViTPreTrainedModel(MedfmPreTrainedModel):
    """Weight initialisation, checkpointing, attention support and the medfm model contract shared by the
    SPAD-ViT classes: volumes and 2D images, spacing-aware, cls pooling."""

    config_class = SpadViTConfig
    config: SpadViTConfig
    base_model_prefix = "spad_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SpadViTLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_record_outputs = {"attentions": SpadViTAttention}
    _input_embed_layer = "patch_embed"
    # A pre-trained (MIM) checkpoint carries these; every other head skips them, as upstream does.
    _keys_to_ignore_on_load_unexpected = [r"mask_token$", r"mim_head\."]

    input_spatial_dims = (2, 3)
    accepts_spacing = True
    pooling = "cls"
    layer_key_pattern = r"(?:^|\.)blocks\.(\d+)\."

    def required_input_multiple(self, spacing=None) -> tuple[int, ...]:
        """The effective patch at the input's anisotropy level (without spacing: the full ``P`` in depth)."""
        patch_embed = self.base_model.patch_embed
        level = 0
        if spacing is not None and patch_embed.adaptive:
            level = aniso_d_from_spacing(spacing, max_stride=self.config.patch_size[0])
        return patch_embed.patch_shape(level)

    def input_padding_step(self) -> dict:
        """A spacing-adaptive model pads depth to its patch at the grid's anisotropy (``P >> aniso_d``)."""
        if not self.config.adaptive_patch_embed:
            return super().input_padding_step()
        size = self.config.patch_size[0]
        return {"name": "pad_to_multiple", "multiple": size, "anisotropy_stride": size, "value": "min"}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Conv3d | nn.ConvTranspose3d):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.InstanceNorm3d):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
        elif isinstance(module, SpadViTAttention) and module.q_bias is not None:
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, SpadViTModel):
            init.trunc_normal_(module.cls_token, std=std)
            init.trunc_normal_(module.pos_embed, std=std)
            if module.mask_token is not None:
                init.trunc_normal_(module.mask_token, std=std)


class SpadViTModel(SpadViTPreTrainedModel):
    r"""The SPAD-ViT backbone.

    ``forward(pixel_values, spacing)`` takes ``(B, C, D, H, W)`` (or ``(B, C, H, W)`` for 2D images) and the
    voxel spacing ``(z, y, x)`` mm, from which the anisotropy level ``aniso_d`` of the adaptive patch
    embedding follows (``aniso_d`` may be given instead). It returns ``last_hidden_state`` (final norm
    applied, cls token first), ``pooler_output`` (that cls token), and with ``output_hidden_states``:
    ``hidden_states[0]``, the embeddings (patch + resampled position table, cls in front), and
    ``hidden_states[i]``, the un-normalised output of block ``i - 1``.

    Args:
        config: The model configuration.
        use_mask_token: Add the MIM ``mask_token`` (masked pre-training).
        use_final_norm: Apply the final LayerNorm. Heads that tap the blocks' un-normalised outputs (the
            segmentation adapter) build the backbone without it, so it holds no parameter its forward never
            uses (which DDP would reject).
    """

    def __init__(self, config: SpadViTConfig, use_mask_token: bool = False, use_final_norm: bool = True):
        super().__init__(config)
        config.validate_architecture()
        width = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, width, *config.pos_embed_shape))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width)) if use_mask_token else None
        self.patch_embed = SpadViTPatchEmbed(config)
        self.rope = Rope3D(config.head_dim, config.rope_base, config.rope_rescale_shape)
        self.blocks = nn.ModuleList([SpadViTLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps) if use_final_norm else nn.Identity()
        self.post_init()

    def resolve_aniso_d(
        self, pixel_values: torch.Tensor, spacing: torch.Tensor | None, aniso_d: int | None
    ) -> int:
        """``aniso_d`` if given, else 5 for a single-slice input, else from ``spacing`` (fixed patches need none)."""
        if aniso_d is not None:
            return int(aniso_d)
        if spacing is not None or pixel_values.shape[2] == 1:
            return grid_anisotropy(pixel_values.shape[2], spacing, max_stride=self.config.patch_size[0])
        if not self.config.adaptive_patch_embed:
            return 0
        raise ValueError(
            "an adaptive SPAD-ViT needs the voxel spacing of a 3D input: pass spacing=(z, y, x) mm "
            "(the processor returns it) or aniso_d"
        )

    def embed(self, pixel_values: torch.Tensor, aniso_d: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Patch tokens plus the position table resampled to the token grid: ``(B, N, E)`` and the grid."""
        tokens = self.patch_embed(pixel_values, aniso_d)
        grid = tuple(tokens.shape[2:])
        tokens = tokens + resample_position_grid(self.pos_embed, grid).to(tokens.dtype)
        return tokens.flatten(2).transpose(1, 2), grid  # type: ignore[return-value]

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        spacing: torch.Tensor | None = None,
        aniso_d: int | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        visible_indices: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values: ``(B, C, D, H, W)`` or ``(B, C, H, W)``.
            spacing: ``(3,)`` or ``(B, 3)`` voxel spacing ``(z, y, x)`` mm; one anisotropy level per batch.
            aniso_d: Explicit anisotropy level, overriding ``spacing``.
            bool_masked_pos: ``(B, L)`` True where a patch is replaced by ``mask_token`` (MIM).
            visible_indices: ``(B, V)`` visible patch indices; the complement of ``bool_masked_pos``.
            output_hidden_states: Return the embeddings and every block's output. (Recorded here rather than
                by hooks: with ``mask_layer_ids`` a block may see only the visible tokens, and its hidden state
                is the full sequence with the visible rows updated.)
            output_attentions: Return every block's attention weights (eager attention), as ``attentions``.
            return_dict: Return a tuple when ``False``.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        wants_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        if wants_attentions and self.config._attn_implementation != "eager":
            logger.warning_once(
                f"output_attentions: the {self.config._attn_implementation!r} attention returns no weights; load "
                "the model with attn_implementation='eager' to get them"
            )
        pixel_values, _ = as_volume(pixel_values)
        pixel_values = pixel_values.to(self.patch_embed.proj.weight.dtype)
        level = self.resolve_aniso_d(pixel_values, spacing, aniso_d)
        tokens, grid = self.embed(pixel_values, level)
        batch, length, _ = tokens.shape

        masked = mask_from_visible_indices(bool_masked_pos, visible_indices, batch, length, tokens.device)
        if masked is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask_token; build it with use_mask_token=True for MIM")
            tokens = torch.where(masked[..., None], self.mask_token.to(tokens.dtype), tokens)
        hidden = torch.cat([self.cls_token.to(tokens.dtype).expand(batch, -1, -1), tokens], dim=1)
        rotation = self.rope.rotation([grid], device=hidden.device)

        # With mask_layer_ids, the other blocks see only the cls and visible tokens (MAE-style).
        partial = masked is not None and self.config.mask_layer_ids is not None
        visible = visible_indices_from_mask(masked) if partial else None
        if partial:  # the cls row, then the visible rows: each token keeps its own angles, for every block
            rows = torch.cat([torch.zeros_like(visible[:, :1]), visible + 1], dim=1)
            visible_rotation = rotation.select(rows)
        all_hidden = [hidden] if output_hidden_states else None
        for index, block in enumerate(self.blocks):
            if partial and index not in self.config.mask_layer_ids:
                hidden = self._visible_only(block, hidden, visible, visible_rotation)
            else:
                hidden = block(hidden, rotation)
            if all_hidden is not None:
                all_hidden.append(hidden)

        sequence = self.norm(hidden)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence,
            pooler_output=sequence[:, 0],
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )

    @staticmethod
    def _visible_only(
        block: SpadViTLayer, hidden: torch.Tensor, visible: torch.Tensor, visible_rotation: TokenRotation
    ) -> torch.Tensor:
        """Run ``block`` on the cls and visible tokens only; the masked rows pass through unchanged."""
        subset = torch.cat([hidden[:, :1], gather_tokens(hidden, visible + 1)], dim=1)  # +1: skip cls
        out = block(subset, visible_rotation)
        return torch.cat([out[:, :1], replace_tokens(hidden[:, 1:], visible, out[:, 1:])], dim=1)

    def forward_packed(
        self,
        volumes: torch.Tensor | list,
        spacings: torch.Tensor | list | tuple | None = None,
        aniso_ds: list[int] | None = None,
        output_hidden_states: bool = False,
    ) -> SpadViTPackedOutput:
        r"""Run volumes of different shapes and spacings as one packed token stream.

        Each volume (``(C, D, H, W)``, or ``(C, H, W)`` for a 2D image) is embedded at its own anisotropy level,
        with the position table resampled to its own grid and its own RoPE angles; attention stays within each
        volume's tokens. No padding is computed. The result equals running each volume alone (within float
        tolerance); :meth:`SpadViTPackedOutput.unpack` splits it.

        Attention: ``attn_implementation="medfm_varlen"`` runs per-sequence kernels (flash-attn's varlen kernel
        on a GPU when installed); ``eager`` and ``sdpa`` get a block-diagonal mask (a reference path whose memory
        grows with the square of the total length).

        Args:
            volumes: The volumes, as any of: a list of tensors ``(C, D, H, W)`` / ``(C, H, W)``; a batched
                tensor ``(B, C, D, H, W)`` (or ``(B, C, H, W)``), each sample one sequence; a
                :class:`~medfm.io.MedicalVolume` or a list of them (or of tensors and volumes mixed). A
                ``MedicalVolume`` brings its own spacing.
            spacings: One ``(z, y, x)`` spacing per volume (``None`` entries for 2D images, or to take a
                ``MedicalVolume``'s own), a ``(B, 3)`` tensor, or one spacing ``(z, y, x)`` for every volume.
                Explicit values override a ``MedicalVolume``'s spacing.
            aniso_ds: Explicit anisotropy levels, overriding ``spacings``.
            output_hidden_states: Also return the embeddings and every block's output.
        """
        weight = self.patch_embed.proj.weight
        sequences, grids = [], []
        for index, (volume, spacing) in enumerate(packed_inputs(volumes, spacings)):
            volume = volume[None].to(device=weight.device, dtype=weight.dtype)
            level = self.resolve_aniso_d(volume, spacing, aniso_ds[index] if aniso_ds is not None else None)
            tokens, grid = self.embed(volume, level)
            sequences.append(torch.cat([self.cls_token[0].to(tokens.dtype), tokens[0]]))
            grids.append(grid)
        hidden, cu_seqlens, attention_kwargs = pack_sequences(sequences, self.config._attn_implementation)
        rotation = self.rope.rotation(grids, device=hidden.device)  # each volume its own positions
        all_hidden = [hidden[0]] if output_hidden_states else None
        for block in self.blocks:
            hidden = block(hidden, rotation, **attention_kwargs)
            if all_hidden is not None:
                all_hidden.append(hidden[0])
        sequence = self.norm(hidden)[0]
        return SpadViTPackedOutput(
            last_hidden_state=sequence,
            pooler_output=sequence[cu_seqlens[:-1]],
            cu_seqlens=cu_seqlens,
            grids=tuple(grids),
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )

    def token_grid(self, input_shape: tuple[int, ...], aniso_d: int) -> tuple[int, int, int]:
        """Token grid ``(D', H', W')`` for an input of spatial shape ``input_shape[-3:]``."""
        patch = self.patch_embed.patch_shape(aniso_d)
        return tuple(n // p for n, p in zip(input_shape[-3:], patch))  # type: ignore[return-value]


class SpadViTPackedOutput(PackedSequenceOutput):
    """Output of :meth:`SpadViTModel.forward_packed`: every sequence's cls token then its patch tokens (final
    norm applied); ``pooler_output`` holds the cls tokens, ``grids`` the token grids ``(D', H', W')``."""


# --- masked image modeling -----------------------------------------------------------------------------


class SpadViTForMaskedImageModeling(SpadViTPreTrainedModel):
    r"""SPAD-ViT with the MIM head: predict the SPAD-VT tokenizer's soft token distributions at masked patches.

    Targets are ``softmax(tokenizer_logits)`` at the masked positions (spec §c). They come either from a
    frozen :class:`~medfm.models.spad.SpadVTModel` attached with :meth:`set_tokenizer` (run on
    ``tokenizer_pixel_values``, the ``2x - 1`` image, with the same ``aniso_d``), or precomputed as
    ``target_logits`` ``(B, L, codebook_size)``. The tokenizer is not saved with this model.

    Args:
        config: The model configuration.
        tokenizer: Optional frozen tokenizer for the targets.
    """

    def __init__(self, config: SpadViTConfig, tokenizer: nn.Module | None = None):
        super().__init__(config)
        self.spad_vit = SpadViTModel(config, use_mask_token=True)
        self.mim_head = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.codebook_size),
        )
        self.post_init()
        self._tokenizer: nn.Module | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    @property
    def tokenizer(self) -> nn.Module | None:
        """The frozen target tokenizer, if attached.

        It is deliberately not a sub-module: it is not trained, not saved with this model, not touched by
        ``from_pretrained``'s weight loading, and not wrapped by DDP/FSDP. It follows the input's device.
        """
        return self._tokenizer

    def set_tokenizer(self, tokenizer: nn.Module | None) -> None:
        """Attach (or, with ``None``, detach) a tokenizer for the targets; it is frozen and kept in eval mode."""
        if tokenizer is not None:
            codebook = tokenizer.config.codebook_size
            if codebook != self.config.codebook_size:
                raise ValueError(
                    f"tokenizer has {codebook} codes; the MIM head predicts {self.config.codebook_size}"
                )
            tokenizer.requires_grad_(False)
            tokenizer.eval()
        # Bypass nn.Module registration on purpose (see the property).
        object.__setattr__(self, "_tokenizer", tokenizer)

    def _targets(self, tokenizer_pixel_values: torch.Tensor, aniso_d: int) -> torch.Tensor:
        tokenizer = self._tokenizer
        if tokenizer is None:
            raise ValueError("tokenizer_pixel_values given but no tokenizer attached (set_tokenizer)")
        weight = next(tokenizer.parameters())
        if weight.device != tokenizer_pixel_values.device:
            tokenizer.to(tokenizer_pixel_values.device)
        with torch.no_grad():
            return tokenizer.encode(tokenizer_pixel_values.to(weight.dtype), aniso_d=aniso_d).logits.flatten(
                1, 3
            )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        spacing: torch.Tensor | None = None,
        aniso_d: int | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        visible_indices: torch.Tensor | None = None,
        tokenizer_pixel_values: torch.Tensor | None = None,
        target_logits: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SpadViTMaskedImageModelingOutput:
        r"""
        Args:
            pixel_values: ViT input (ImageNet-normalised in pre-training), ``(B, 3, D, H, W)``.
            spacing, aniso_d: As in :class:`SpadViTModel`.
            bool_masked_pos, visible_indices: The mask; when neither is given, a random one with
                ``config.mask_ratio`` (uniform per sample, as upstream).
            tokenizer_pixel_values: Tokenizer input (``2x - 1``) for the attached tokenizer.
            target_logits: Precomputed tokenizer logits ``(B, L, K)``; used instead of the tokenizer.
            output_hidden_states, output_attentions: As in :class:`SpadViTModel`.
        """
        volume, _ = as_volume(pixel_values)
        level = self.spad_vit.resolve_aniso_d(volume, spacing, aniso_d)
        grid = self.spad_vit.token_grid(volume.shape, level)
        length = grid[0] * grid[1] * grid[2]
        if bool_masked_pos is None and visible_indices is None:
            visible_indices = random_visible_indices(
                volume.shape[0], length, self.config.mask_ratio, device=volume.device
            )
        outputs = self.spad_vit(
            volume,
            aniso_d=level,
            bool_masked_pos=bool_masked_pos,
            visible_indices=visible_indices,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        masked = mask_from_visible_indices(
            bool_masked_pos, visible_indices, volume.shape[0], length, volume.device
        )
        logits = self.mim_head(outputs.last_hidden_state[:, 1:][masked])

        if target_logits is None and tokenizer_pixel_values is not None:
            target_logits = self._targets(tokenizer_pixel_values, level)
        loss = None
        if target_logits is not None:
            if tuple(target_logits.shape[:2]) != (volume.shape[0], length):
                raise ValueError(
                    f"target_logits {tuple(target_logits.shape)} do not match {length} tokens per sample"
                )
            loss = soft_target_cross_entropy(logits, target_logits[masked])
        return SpadViTMaskedImageModelingOutput(
            loss=loss,
            logits=logits,
            mask=masked.float(),
            target_logits=target_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# --- classification ------------------------------------------------------------------------------------


class SpadViTForImageClassification(SpadViTPreTrainedModel):
    """SPAD-ViT with a linear head on the final-normalised cls token (upstream's MedMNIST recipe)."""

    def __init__(self, config: SpadViTConfig):
        super().__init__(config)
        self.spad_vit = SpadViTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        spacing: torch.Tensor | None = None,
        aniso_d: int | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""
        Args:
            labels: ``(B,)`` class indices (cross-entropy), ``(B, num_labels)`` 0/1 or soft targets for
                ``problem_type="multi_label_classification"`` (BCE), or values for regression (MSE); see
                :func:`~medfm.models.modeling_utils.classification_loss`.
        """
        outputs = self.spad_vit(
            pixel_values,
            spacing=spacing,
            aniso_d=aniso_d,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        logits = self.classifier(outputs.pooler_output)
        return classifier_output(self, logits, labels, outputs)


# --- segmentation --------------------------------------------------------------------------------------


def _depth_factor(patch_depth: int, level: int) -> int:
    """Upstream's depth factor ``f(l) = 1 if a >= l else 2`` with ``a = log2(16 // patch_depth)``.

    A single-slice patch (a 2D model) never scales depth; upstream only ran that case for classification.
    """
    if patch_depth == 1:
        return 1
    a = max(0, (16 // patch_depth).bit_length() - 1)
    return 1 if a >= level else 2


def spad_feature_pyramid(config: SpadViTConfig) -> SimpleFeaturePyramid:
    """Upstream's ``SimpleViTAdapter`` taps: level 0 upsampled x4 in-plane, level 1 x2, level 2 kept, level 3
    max-pooled, with depth factors that follow the patch depth (spec §e)."""
    f3, f4, f5 = (_depth_factor(config.patch_size[0], level) for level in (3, 4, 5))
    return SimpleFeaturePyramid(
        config.hidden_size,
        config.patch_size,
        fine_factors=((f4, 2, 2), (f3, 2, 2)),
        up_factor=(f4, 2, 2),
        down_factor=(f5, 2, 2),
    )


class SpadViTForSemanticSegmentation(SpadViTPreTrainedModel):
    r"""SPAD-ViT segmentation: the adapter taps (InstanceNorm + feature pyramid) and a UNet-style decoder.

    Upstream fine-tunes with a fixed patch (``patch_size=(4, 16, 16)``, ``adaptive_patch_embed=False``);
    loading a pre-trained checkpoint into such a config converts the weights as upstream does (see
    :mod:`medfm.models.spad.convert_spad`). ``num_labels`` counts the background.
    """

    def __init__(self, config: SpadViTConfig):
        if config.adaptive_patch_embed:
            raise ValueError(
                "SpadViTForSemanticSegmentation needs a fixed patch, as upstream fine-tunes: load with "
                "from_pretrained(path, patch_size=(4, 16, 16), adaptive_patch_embed=False, ...) and the "
                "pre-trained weights are adapted"
            )
        super().__init__(config)
        # The adapter taps the blocks' un-normalised outputs: the final norm would be a parameter without use.
        self.spad_vit = SpadViTModel(config, use_final_norm=False)
        self.pyramid = spad_feature_pyramid(config)
        self.decoder = PyramidUNetDecoder(
            config.in_channels,
            config.hidden_size,
            config.decoder_lateral_channels,
            config.decoder_full_res_channels,
            config.num_labels,
            self.pyramid.level_strides,
        )
        self.post_init()

    input_spatial_dims = (3,)
    # A checkpoint of the backbone alone also holds its final norm, which the adapter does not use.
    _keys_to_ignore_on_load_unexpected = [r"mask_token$", r"mim_head\.", r"(^|\.)norm\.(weight|bias)$"]

    def required_input_multiple(self, spacing=None) -> tuple[int, ...]:
        """The stride of the coarsest pyramid level."""
        return tuple(self.pyramid.level_strides[3])

    def check_input_shape(self, shape, spacing=None) -> None:
        """A multiple of the coarsest stride, with at least two voxels at that level (instance norm needs them)."""
        super().check_input_shape(shape, spacing)
        coarse = [int(n) // s for n, s in zip(shape, self.pyramid.level_strides[3])]
        if coarse[0] * coarse[1] * coarse[2] < 2:
            raise ValueError(
                f"input size {tuple(int(n) for n in shape)} leaves the coarsest pyramid level a single voxel, which "
                f"instance norm cannot normalise; use at least 2 x {tuple(self.pyramid.level_strides[3])} on one axis"
            )

    def extract_features(
        self,
        pixel_values: torch.Tensor,
        spacing: torch.Tensor | None = None,
        aniso_d: int | None = None,
        **kwargs,
    ) -> tuple[list[torch.Tensor], BaseModelOutputWithPooling]:
        """The four pyramid features and the backbone's output (all hidden states, and attentions if asked)."""
        volume, _ = as_volume(pixel_values)
        level = self.spad_vit.resolve_aniso_d(volume, spacing, aniso_d)
        outputs = self.spad_vit(volume, aniso_d=level, output_hidden_states=True, **kwargs)
        taps = [outputs.hidden_states[i + 1] for i in self.config.out_indices]
        grid = self.spad_vit.token_grid(volume.shape, level)
        return self.pyramid(taps, grid), outputs

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        spacing: torch.Tensor | None = None,
        aniso_d: int | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SpadViTSegmentationOutput:
        r"""
        Args:
            labels: ``(B, D, H, W)`` (or ``(B, H, W)``) class indices for the deep-supervised Dice + CE loss.
            output_hidden_states, output_attentions: Also return the backbone's (``config`` defaults apply).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        volume, is_2d = as_volume(pixel_values)
        check_divisible(volume.shape[2:], self.pyramid.level_strides[3], "the coarsest pyramid stride")
        features, backbone = self.extract_features(volume, spacing, aniso_d, **kwargs)
        deep = self.config.deep_supervision and (self.training or labels is not None)
        outputs = self.decoder(volume.to(features[0].dtype), features, num_heads=4 if deep else 1)
        logits = outputs[0]
        loss = None
        if labels is not None:
            loss = deep_supervision_loss(outputs, labels.unsqueeze(1) if is_2d else labels)
        auxiliary = tuple(outputs[1:]) if self.training and self.config.deep_supervision else None
        return SpadViTSegmentationOutput(
            loss=loss,
            logits=logits[:, :, 0] if is_2d else logits,
            auxiliary_logits=auxiliary,
            hidden_states=backbone.hidden_states if output_hidden_states else None,
            attentions=backbone.attentions,
        )
