"""MiM's hybrid conv + ViT encoder ("ConvViT3d") and its fine-tuning heads.

J. Zhuang et al., *MiM: Mask in Mask Self-Supervised Pre-Training for 3D Medical Image Analysis*, IEEE TMI
44(9), 2025 (arXiv 2404.15580); spec `shared/specs/mim.md` §1 and §4. Parameter names are upstream's
(``patch_embed{1..5}``, ``blocks{1..4}``, ``pos_embed``, ``fpn``), so a converted checkpoint keeps its keys.

Annotations here are evaluated (no ``from __future__ import annotations``): transformers reads the forwards'
``**kwargs: Unpack[TransformersKwargs]`` at runtime to learn which output flags (``output_attentions``) they take.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput, SemanticSegmenterOutput
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from ...errors import LabelMapError, VolumeShapeError
from ...layers.attention import AttentionCore
from ...layers.blocks import PreNormBlock
from ...layers.drop import DropPath, drop_path_rates
from ...layers.norm import ChannelsFirstLayerNorm
from ...layers.position import sincos_position_table
from ...layers.relative_position import RelativePositionBias, relative_position_index
from ..modeling_utils import MedfmPreTrainedModel, classifier_output
from .configuration_mim import MiMConfig

__all__ = [
    "MiMAttention",
    "MiMConvBlock",
    "MiMForImageClassification",
    "MiMForSemanticSegmentation",
    "MiMLayer",
    "MiMMlp",
    "MiMModel",
    "MiMModelOutput",
    "MiMPreTrainedModel",
    "channel_layer_norm",
    "resize_position_embeddings",
]


# --- outputs -------------------------------------------------------------------------------------------


@dataclass
class MiMModelOutput(ModelOutput):
    """Output of :class:`MiMModel`.

    Attributes:
        last_hidden_state: ``(B, N, C)`` stage-4 tokens (raster order over the token grid; no final norm, as
            upstream's fine-tuning encoder has none).
        pooler_output: ``(B, C)`` mean of the tokens.
        feature_maps: The encoder's maps, finest first: stages 1-3 ``(B, C_i, *input / 2^i)``, the stage-4
            tokens as a map ``(B, C, *grid)``, and (with the fpn) the fpn map ``(B, fpn_hidden_size, *grid / 2)``;
            channel-normalised when ``normalize``. Always returned (the segmentation head's input).
        hidden_states: ``feature_maps`` again, when ``output_hidden_states``.
        attentions: Per transformer block, ``(B, heads, N, N)`` attention weights, when ``output_attentions``
            (eager attention).
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    feature_maps: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# --- helpers -------------------------------------------------------------------------------------------


def channel_layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Parameter-free LayerNorm over the channels of ``(B, C, *spatial)`` (upstream ``proj_out(normalize=True)``)."""
    return F.layer_norm(x.movedim(1, -1), (x.shape[1],), eps=eps).movedim(-1, 1)


def resize_position_embeddings(
    pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]
) -> torch.Tensor:
    """A ``(1, N, C)`` position table on token grid ``old_grid`` resampled to ``new_grid``: ``(1, N', C)``.

    Trilinear with ``align_corners=False`` on every axis, growing or shrinking, as upstream's ``load_ckpt``
    resizes the pre-trained table for a fine-tuning ROI (spec §5.3); converters should use it too.
    """
    old, new = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if old == new:
        return pos_embed
    width = pos_embed.shape[-1]
    table = pos_embed.reshape(1, *old, width).permute(0, 4, 1, 2, 3)
    table = F.interpolate(table, size=new, mode="trilinear", align_corners=False)
    return table.permute(0, 2, 3, 4, 1).reshape(1, -1, width)


# --- blocks --------------------------------------------------------------------------------------------


class MiMPatchEmbed(nn.Module):
    """Non-overlapping ``Conv3d(k = s = patch)``, a channel LayerNorm, then the activation (GELU upstream)."""

    def __init__(self, in_channels: int, out_channels: int, patch: int, eps: float, act: str):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, out_channels, patch, stride=patch)
        self.norm = ChannelsFirstLayerNorm(out_channels, eps=eps)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))


class MiMConvMlp(nn.Module):
    """1x1x1 Conv3d ``C -> hidden``, activation, 1x1x1 Conv3d ``hidden -> C``."""

    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Conv3d(width, hidden, 1)
        self.act = ACT2FN[act]
        self.fc2 = nn.Conv3d(hidden, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MiMConvBlock(GradientCheckpointingLayer):
    """Upstream ``CBlock3d``: ``x + conv2(dwconv5(m * conv1(LN(x))))``, then ``x + mlp(LN(x))``.

    ``attn`` is the depthwise 5x5x5 convolution (upstream's name). ``m`` (pre-training only) is the visible mask
    at this stage's resolution: it zeroes masked voxels inside the depthwise branch; the residual path and the
    MLP still carry them (spec §1.2).
    """

    def __init__(self, width: int, mlp_ratio: float, eps: float, act: str, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = ChannelsFirstLayerNorm(width, eps=eps)
        self.conv1 = nn.Conv3d(width, width, 1)
        self.attn = nn.Conv3d(width, width, 5, padding=2, groups=width)
        self.conv2 = nn.Conv3d(width, width, 1)
        self.norm2 = ChannelsFirstLayerNorm(width, eps=eps)
        self.mlp = MiMConvMlp(width, int(width * mlp_ratio), act)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        branch = self.conv1(self.norm1(x))
        if visible is not None:
            branch = branch * visible
        x = x + self.drop_path(self.conv2(self.attn(branch)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MiMMlp(nn.Module):
    """``fc2(act(fc1(x)))`` (timm ``Mlp`` without dropout); also the pre-training projectors."""

    def __init__(self, width: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MiMRelativePositionBias(RelativePositionBias):
    """3D relative position bias over the whole configured token grid (upstream's fine-tuning ``Attention``).

    The table covers the offsets of the configured grid. For another input grid, an axis that shrinks takes the
    central rows of the table (exact: the same offsets); an axis that grows has its table rows trilinearly
    stretched (``align_corners=True``, so offset 0 and the extreme offsets keep their values) to the new offset
    range, an extrapolation upstream never needed (its inputs were always the configured size).
    """

    def forward(self, grid: Sequence[int] | None = None) -> torch.Tensor:
        """``(heads, N, N)`` for ``grid`` (the configured grid when ``None``)."""
        window = self.window_size
        grid = window if grid is None else tuple(int(g) for g in grid)
        if grid == window:
            return super().forward()
        heads = self.relative_position_bias_table.shape[1]
        table = self.relative_position_bias_table.view(*[2 * w - 1 for w in window], heads)
        table = table.permute(3, 0, 1, 2).unsqueeze(0)  # (1, heads, 2w1-1, 2w2-1, 2w3-1)
        for axis, (w, g) in enumerate(zip(window, grid)):
            if g < w:
                table = table.narrow(2 + axis, w - g, 2 * g - 1)
        size = tuple(2 * g - 1 for g in grid)
        if tuple(table.shape[2:]) != size:
            table = F.interpolate(table, size=size, mode="trilinear", align_corners=True)
        table = table[0].permute(1, 2, 3, 0).reshape(-1, heads)
        index = relative_position_index(grid).to(table.device)
        n = index.shape[0]
        return table[index.view(-1)].view(n, n, heads).permute(2, 0, 1).contiguous()


class MiMAttention(AttentionCore):
    """Multi-head self-attention with a fused ``qkv`` projection ([q | k | v] x heads x head_dim) and, in the
    fine-tuning encoder, a relative position bias added to the logits."""

    def __init__(
        self,
        config: MiMConfig,
        width: int,
        num_heads: int,
        qkv_bias: bool,
        relative_grid: Sequence[int] | None = None,
    ):
        super().__init__(config, num_heads, width // num_heads)
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        self.relative_position_bias = (
            MiMRelativePositionBias(relative_grid, num_heads) if relative_grid is not None else None
        )

    def forward(
        self, hidden_states: torch.Tensor, grid: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, N, C)`` tokens of token grid ``grid`` (needed only with the relative bias)."""
        batch, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if self.relative_position_bias is not None:
            bias = self.relative_position_bias(grid).unsqueeze(0).to(query.dtype)
        output, weights = self.attend(query, key, value, bias)
        return self.proj(output.reshape(batch, length, width)), weights


class MiMLayer(PreNormBlock):
    """Pre-norm transformer block ``x + g1 * attn(LN(x))``, ``x + g2 * mlp(LN(x))`` with optional layer scale
    ``gamma_1``/``gamma_2`` (fine-tuning encoder) and drop path. Also the pre-training decoder's block."""

    def __init__(
        self,
        config: MiMConfig,
        width: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        relative_grid: Sequence[int] | None = None,
    ):
        eps = config.layer_norm_eps
        super().__init__(
            nn.LayerNorm(width, eps=eps),
            MiMAttention(config, width, num_heads, config.qkv_bias, relative_grid),
            nn.LayerNorm(width, eps=eps),
            MiMMlp(width, int(width * mlp_ratio), config.hidden_act),
            drop_path,
        )
        if layer_scale is not None:
            self.gamma_1 = nn.Parameter(torch.full((width,), float(layer_scale)))
            self.gamma_2 = nn.Parameter(torch.full((width,), float(layer_scale)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, hidden_states: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        attended, _ = self.attn(self.norm1(hidden_states), grid)
        if self.gamma_1 is not None:
            attended = self.gamma_1 * attended
        hidden_states = hidden_states + self.drop_path(attended)
        update = self.mlp(self.norm2(hidden_states))
        if self.gamma_2 is not None:
            update = self.gamma_2 * update
        return hidden_states + self.drop_path(update)


# --- base class ----------------------------------------------------------------------------------------

#: Keys of a pre-training checkpoint that only the pre-training model has (dropped at fine-tuning, spec §5.3).
_PRETRAINING_ONLY_KEYS = (
    r"^(stage\d_output_decode|mask_token|decoder_embed|decoder_pos_embed|decoder_blocks|decoder_norm|decoder_pred|"
    r"aggregate_\w+)(\.|$)"
)


def _reset_conv(module: nn.Module) -> None:
    """PyTorch's default convolution init (kaiming-uniform, a = sqrt 5), through transformers' init functions."""
    init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    if module.bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        init.uniform_(module.bias, -bound, bound)


class MiMPreTrainedModel(MedfmPreTrainedModel):
    """Weight initialisation, checkpointing, attention dispatch and the medfm model contract of the MiM
    classes: 3D volumes, no spacing, mean pooling, inputs a multiple of the total patch stride."""

    config_class = MiMConfig
    config: MiMConfig
    base_model_prefix = "mim"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiMLayer", "MiMConvBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_record_outputs = {"attentions": MiMAttention}
    _input_embed_layer = "patch_embed1"

    input_spatial_dims = (3,)
    accepts_spacing = False
    pooling = "mean"
    channels_config_key = "num_channels"
    input_size_config_key = "image_size"
    layer_key_pattern = r"(?:^|\.)blocks4\.(\d+)\."
    _keys_to_ignore_on_load_unexpected = [_PRETRAINING_ONLY_KEYS, r"^norm\.(weight|bias)$"]

    #: Parameters of this module that never train (fixed sin-cos tables); see :meth:`freeze_fixed_tables`.
    fixed_parameters: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained`` (see :class:`MedfmPreTrainedModel`); the fixed sin-cos tables of the
        pre-training model stay frozen (loading would make every parameter trainable)."""
        model = super().from_pretrained(*args, **kwargs)
        if isinstance(model, MiMPreTrainedModel):
            model.freeze_fixed_tables()
        return model

    def freeze_fixed_tables(self) -> None:
        """Set ``requires_grad=False`` on every ``fixed_parameters`` entry of this model and its sub-models."""
        for module in self.modules():
            for name in getattr(module, "fixed_parameters", ()):
                parameter = getattr(module, name, None)
                if parameter is not None:
                    parameter.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        """The first patch embedding (so ``enable_input_require_grads`` works)."""
        return self.base_model.patch_embed1

    def required_input_multiple(self, spacing=None) -> tuple[int, ...]:
        """The total patch stride; twice that with the fpn (its stride-2 conv needs an even token grid)."""
        stride = self.config.total_stride
        if getattr(self.base_model, "fpn", None) is not None:
            stride *= 2
        return (stride,) * 3

    def check_input_shape(self, shape, spacing=None) -> None:
        """Raise :class:`~medfm.errors.VolumeShapeError` (a ValueError) for a size the model cannot run on."""
        try:
            super().check_input_shape(shape, spacing)
        except ValueError as error:
            raise VolumeShapeError(str(error)) from None

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Typed errors for a batch that is not ``(B, num_channels, D1, D2, D3)`` of a usable size."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 5:
            shape = (
                tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            )
            raise VolumeShapeError(
                f"pixel_values must be a (B, C, D1, D2, D3) tensor for {type(self).__name__}; got {shape}"
            )
        if pixel_values.shape[0] == 0:
            raise VolumeShapeError(f"pixel_values is an empty batch {tuple(pixel_values.shape)}")
        if pixel_values.shape[1] != self.config.num_channels:
            raise VolumeShapeError(
                f"pixel_values has {pixel_values.shape[1]} channels; {type(self).__name__} takes "
                f"num_channels={self.config.num_channels}"
            )
        self.check_input_shape(pixel_values.shape[2:])

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        config = self.config
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)  # upstream (JAX ViT): xavier-uniform, zero bias
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
            _reset_conv(module)
        elif isinstance(module, nn.LayerNorm | nn.BatchNorm3d | nn.InstanceNorm3d | nn.GroupNorm):
            if getattr(module, "weight", None) is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, RelativePositionBias):
            init.zeros_(module.relative_position_bias_table)
            # A non-persistent buffer: rebuilt here after from_pretrained materialises the model.
            init.copy_(module.relative_position_index, relative_position_index(module.window_size))
        if isinstance(module, MiMLayer) and module.gamma_1 is not None:
            value = config.layer_scale_init_value if config.layer_scale_init_value is not None else 1.0
            init.constant_(module.gamma_1, value)
            init.constant_(module.gamma_2, value)
        if isinstance(module, MiMModel) and module.pos_embed is not None:
            table = sincos_position_table(config.token_grid, config.hidden_size)
            init.copy_(module.pos_embed, table.unsqueeze(0))
        self._init_head_weights(module)

    def _init_head_weights(self, module: nn.Module) -> None:
        """Initialisation of a head's own parameters (overridden by the heads)."""


# --- backbone ------------------------------------------------------------------------------------------


class MiMModel(MiMPreTrainedModel):
    r"""The MiM encoder (upstream ``ConvViT3d``): three conv stages and a transformer stage, plus the fpn map.

    ``forward(pixel_values)`` takes ``(B, C, D1, D2, D3)``, each size a multiple of ``prod(patch_sizes)`` (twice
    that with the fpn). A position table sized for ``config.image_size`` is resampled trilinearly to other token
    grids; the relative bias likewise (see :class:`MiMRelativePositionBias`).

    Args:
        config: The model configuration.
        add_fpn: Build the fifth, stride-2 map (``fpn``: Conv3d k2 s2, BatchNorm3d, activation) that the
            segmentation network decodes; the classifier builds the encoder without it.
        pretraining: Build upstream's pre-training encoder instead: a frozen sin-cos ``pos_embed``
            (``requires_grad=False``), no layer scale, no relative bias, no fpn, whatever the config's
            ``use_relative_position_bias``, ``layer_scale_init_value`` and ``use_absolute_position_embeddings``
            say (those fields describe the fine-tuning encoder). :class:`MiMForPreTraining` builds this one.
    """

    def __init__(self, config: MiMConfig, add_fpn: bool = True, pretraining: bool = False):
        super().__init__(config)
        config.validate_architecture()
        self.pretraining = pretraining
        dims, depths, act, eps = (
            config.embed_dims,
            config.depths,
            config.hidden_act,
            config.conv_layer_norm_eps,
        )
        with torch.device("cpu"):  # plain floats, also when the model is built on the meta device
            rates = drop_path_rates(config.drop_path_rate, depths=depths)
        channels = [config.num_channels, *dims]
        for stage in range(4):
            setattr(
                self,
                f"patch_embed{stage + 1}",
                MiMPatchEmbed(channels[stage], dims[stage], config.patch_sizes[stage], eps, act),
            )
        for stage in range(3):
            blocks = [MiMConvBlock(dims[stage], config.mlp_ratios[stage], eps, act, r) for r in rates[stage]]
            setattr(self, f"blocks{stage + 1}", nn.ModuleList(blocks))
        width = config.hidden_size
        self.patch_embed5 = nn.Linear(width, width)
        if pretraining or config.use_absolute_position_embeddings:
            self.pos_embed = nn.Parameter(
                torch.zeros(1, config.num_tokens, width), requires_grad=not pretraining
            )
        else:
            self.pos_embed = None
        self.fixed_parameters = ("pos_embed",) if pretraining else ()
        relative_grid = config.token_grid if config.use_relative_position_bias and not pretraining else None
        layer_scale = None if pretraining else config.layer_scale_init_value
        self.blocks4 = nn.ModuleList(
            [
                MiMLayer(
                    config,
                    width,
                    config.num_attention_heads,
                    config.mlp_ratios[3],
                    r,
                    layer_scale,
                    relative_grid,
                )
                for r in rates[3]
            ]
        )
        if add_fpn and not pretraining:
            self.fpn = nn.Sequential(
                nn.Conv3d(width, config.fpn_hidden_size, kernel_size=2, stride=2),
                nn.BatchNorm3d(config.fpn_hidden_size),
                ACT2FN[act],
            )
        else:
            self.fpn = None
        self.post_init()

    # The pieces, for the pre-training model, which runs them with masks.

    def conv_stage(self, index: int, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding ``index`` (0-2) and its conv blocks; ``visible`` ``(B, 1, *out)`` masks the
        depthwise branch (pre-training)."""
        x = getattr(self, f"patch_embed{index + 1}")(x)
        for block in getattr(self, f"blocks{index + 1}"):
            x = block(x, visible)
        return x

    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Stage-3 map to stage-4 tokens ``(B, N, C)`` (raster order), position table added, and the grid."""
        x = self.patch_embed4(x)
        grid = tuple(x.shape[2:])
        tokens = self.patch_embed5(x.flatten(2).transpose(1, 2))
        if self.pos_embed is not None:
            pos = resize_position_embeddings(self.pos_embed, self.config.token_grid, grid)
            tokens = tokens + pos.to(tokens.dtype)
        return tokens, grid  # type: ignore[return-value]

    def transformer(self, tokens: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """The stage-4 blocks."""
        for block in self.blocks4:
            tokens = block(tokens, grid)
        return tokens

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        normalize: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MiMModelOutput:
        r"""
        Args:
            pixel_values: ``(B, num_channels, D1, D2, D3)``.
            normalize: Channel-normalise the feature maps (parameter-free LayerNorm, eps 1e-5, upstream
                ``normalize=True``); ``None``: ``config.normalize_features``. ``last_hidden_state`` is never
                normalised.
            output_hidden_states: Also return the feature maps as ``hidden_states``.
            output_attentions: Return the transformer blocks' attention weights (eager attention).
            return_dict: Return a tuple when ``False``.
        """
        config = self.config
        normalize = config.normalize_features if normalize is None else normalize
        output_hidden_states = (
            config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        self._check_pixel_values(pixel_values)
        x = pixel_values.to(self.patch_embed1.proj.weight.dtype)
        maps = []
        for stage in range(3):
            x = self.conv_stage(stage, x)
            maps.append(x)
        tokens, grid = self.embed_tokens(x)
        tokens = self.transformer(tokens, grid)
        token_map = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        maps.append(token_map)
        if self.fpn is not None:
            maps.append(self.fpn(token_map))
        if normalize:
            maps = [channel_layer_norm(m) for m in maps]
        feature_maps = tuple(maps)
        return MiMModelOutput(
            last_hidden_state=tokens,
            pooler_output=tokens.mean(dim=1),
            feature_maps=feature_maps,
            hidden_states=feature_maps if output_hidden_states else None,
        )


# --- classification ------------------------------------------------------------------------------------


class MiMForImageClassification(MiMPreTrainedModel):
    """MiM classifier (upstream ``models_convvit3d_cls.ConvViT3d``, spec §4.2): the encoder without fpn, the
    mean of the stage-4 tokens, LayerNorm (``norm``, eps ``layer_norm_eps``), then ``classifier`` (upstream
    ``head``). A pre-trained checkpoint's final ``norm`` loads into ``norm``, as upstream does."""

    # The pre-training checkpoint's final norm is this head's norm; the rest of its head is dropped.
    _keys_to_ignore_on_load_unexpected = [_PRETRAINING_ONLY_KEYS]

    def __init__(self, config: MiMConfig):
        super().__init__(config)
        self.mim = MiMModel(config, add_fpn=False)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_head_weights(self, module: nn.Module) -> None:
        if module is getattr(self, "classifier", None):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values: ``(B, num_channels, D1, D2, D3)``.
            labels: ``(B,)`` class indices (cross-entropy), ``(B, num_labels)`` targets for multi-label (BCE), or
                values for regression (MSE); see :func:`~medfm.models.modeling_utils.classification_loss`.
            output_hidden_states, output_attentions: As in :class:`MiMModel`.
        """
        outputs = self.mim(pixel_values, output_hidden_states=output_hidden_states, **kwargs)
        logits = self.classifier(self.norm(outputs.pooler_output))
        return classifier_output(self, logits, labels, outputs)


# --- segmentation --------------------------------------------------------------------------------------


class MiMForSemanticSegmentation(MiMPreTrainedModel):
    """MiM segmentation (upstream ``ConvViT3dUNETR``, spec §4.1): the encoder's five channel-normalised maps
    and the raw image decoded by MONAI UNETR blocks (``decoder``, :class:`~medfm.layers.decoders.unetr.UnetrDecoder`).

    ``num_labels`` counts the background. With ``labels`` the loss is MONAI's Dice + cross-entropy as upstream
    fine-tunes (``to_onehot_y``, ``softmax``, ``squared_pred``, ``smooth_nr=0``, ``smooth_dr=1e-6``).
    """

    _keys_to_ignore_on_load_unexpected = [_PRETRAINING_ONLY_KEYS, r"^norm\.(weight|bias)$"]

    def __init__(self, config: MiMConfig):
        super().__init__(config)
        config.check_segmentation()
        self.mim = MiMModel(config, add_fpn=True)
        from ...layers.decoders.unetr import UnetrDecoder  # MONAI: loaded only when a decoder is built

        self.decoder = UnetrDecoder(
            3,
            config.num_channels,
            [*config.embed_dims, config.fpn_hidden_size],
            config.feature_size,
            config.num_labels,
            norm_name="instance",
            res_block=True,
        )
        self.post_init()

    def check_input_shape(self, shape, spacing=None) -> None:
        """A multiple of twice the patch stride, with more than one voxel at the fpn level (instance norm)."""
        super().check_input_shape(shape, spacing)
        coarse = [int(n) // (2 * self.config.total_stride) for n in shape]
        if math.prod(coarse) < 2:
            raise VolumeShapeError(
                f"input size {tuple(int(n) for n in shape)} leaves the fpn map a single voxel, which instance norm "
                f"cannot normalise; use at least {4 * self.config.total_stride} voxels on one axis"
            )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SemanticSegmenterOutput:
        r"""
        Args:
            pixel_values: ``(B, num_channels, D1, D2, D3)``.
            labels: ``(B, D1, D2, D3)`` (or ``(B, 1, D1, D2, D3)``) class indices for the Dice + CE loss.
            output_hidden_states: Also return the encoder's (normalised) maps.
            output_attentions: As in :class:`MiMModel`.

        Returns:
            ``logits`` ``(B, num_labels, D1, D2, D3)`` at the input size.
        """
        self._check_pixel_values(pixel_values)
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        outputs = self.mim(pixel_values, normalize=self.config.normalize_features, **kwargs)
        features = outputs.feature_maps
        logits = self.decoder(pixel_values.to(features[0].dtype), features)
        loss = self.segmentation_loss(logits, labels) if labels is not None else None
        return SemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=features if output_hidden_states else None,
            attentions=outputs.attentions,
        )

    @staticmethod
    def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Upstream's fine-tuning loss: MONAI ``DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True,
        smooth_nr=0, smooth_dr=1e-6)``, in float32."""
        from monai.losses import DiceCELoss

        target = labels.long()
        if target.ndim == logits.ndim - 1:
            target = target.unsqueeze(1)
        if target.shape[1] != 1 or target.shape[2:] != logits.shape[2:]:
            raise VolumeShapeError(
                f"labels must be (B, *spatial) or (B, 1, *spatial) matching logits {tuple(logits.shape)}; got "
                f"{tuple(labels.shape)}"
            )
        classes = logits.shape[1]
        if labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise LabelMapError("labels must be whole class indices; got fractional values")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= classes):
            raise LabelMapError(
                f"labels must be class indices in [0, {classes - 1}] (num_labels={classes}); got values from "
                f"{int(target.min())} to {int(target.max())}"
            )
        criterion = DiceCELoss(
            to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6
        )
        return criterion(logits.float(), target)
