"""Converting MiM checkpoints to medfm, and adapting pre-trained weights at load time (spec §5).

Two things live here:

* **Checkpoint conversion** (spec §5.1-5.2): an upstream ``checkpoint-final.pth`` (pre-training,
  ``checkpoint["model"]``), a fine-tuned ``ConvViT3dUNETR`` or ``ConvViT3d`` classifier state dict, or a bare
  ``ConvViT3d`` encoder, as ``.pth``/``.pt``/``.bin`` or ``.safetensors``. The kind is told from the keys, the
  config from the tensors' shapes plus what only the user can tell (``--config``, with :class:`MiMConfig`'s
  own field names), and a folder ``from_pretrained`` loads is written atomically.
* **Load-time adaptation** (spec §5.3, upstream ``load_ckpt``): loading a converted pre-training folder into
  a fine-tuning config, e.g. ``MiMForSemanticSegmentation.from_pretrained(path, image_size=[64, 64, 32],
  num_labels=2, num_channels=4)``, resizes ``pos_embed`` trilinearly to the new token grid and tiles the first
  patch embedding over the input channels, through transformers' weight-conversion hooks
  (:func:`register_mim_weight_adaptation`). The new tensors (layer scale, relative bias, fpn, heads) come
  from the model's initialisation. Saving writes the adapted tensors as they are, so a saved fine-tuning
  model reloads without adapting twice.

Upstream names map to medfm's (the contract of ``modeling_mim``): the encoder keeps its names, except that
``blocks4.{i}.attn.relative_position_bias_table`` gains a level (``...attn.relative_position_bias.``) and the
``relative_position_index`` buffers are dropped (the model recomputes them; conversion checks they agree).
Under a head the encoder sits at ``mim.``; the segmentation decoder (``encoder1..4``, ``encoder10``,
``decoder1..5``, ``out``) moves under ``decoder.``, the classifier's ``head`` becomes ``classifier``, and the
pre-training decoder, stage shortcuts and projectors keep their names.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointMismatchError, InvalidConfigError, MedfmError, UnsupportedFormatError
from ...layers.relative_position import relative_position_index
from ..conversion_utils import (
    CONVERSION_MARKER,
    LoadTimeAdaptation,
    atomic_output_folder,
    build_config,
    check_config_fields,
    check_output_folder,
    load_original_state_dict,
    load_state_dict_strict,
    register_load_time_adaptation,
    require_keys,
    single_tensor,
)
from .configuration_mim import MiMConfig
from .modeling_mim import resize_position_embeddings

__all__ = [
    "CARD_TEMPLATE",
    "CHECKPOINT_KINDS",
    "PARITY_STATEMENT",
    "PROCESSOR_PRESETS",
    "ResizePositionEmbedding",
    "TileInputChannels",
    "convert_mim_checkpoint",
    "convert_mim_state_dict",
    "detect_checkpoint_kind",
    "infer_mim_config",
    "infer_token_grid",
    "register_mim_weight_adaptation",
    "tile_input_channels",
]

#: The kinds of upstream checkpoint and the medfm class each converts to.
CHECKPOINT_KINDS = {
    "pretraining": "MiMForPreTraining",
    "segmentation": "MiMForSemanticSegmentation",
    "classification": "MiMForImageClassification",
    "backbone": "MiMModel",
}
#: The processor preset written beside each kind (``medfm.processing.presets``).
PROCESSOR_PRESETS = {
    "pretraining": "mim-pretrain",
    "segmentation": "mim-btcv",
    "classification": "mim-cc-ccii",
    "backbone": "mim-pretrain",
}
#: The model-card template (``medfm/model_cards``).
CARD_TEMPLATE = "mim-base"
#: What the card says about the conversion's verification.
PARITY_STATEMENT = (
    "The conversion of this checkpoint was **not verified** against outputs of the original code; medfm's "
    "tests check the conversion code on small models built and run with the original code (pre-training "
    "losses, latents and predictions, segmentation and classification logits, and the pre-training to "
    "fine-tuning weight loading)."
)

# Upstream encoder (ConvViT3d) keys, as the pre-training model and the classifier name them.
_ENCODER = re.compile(r"^(pos_embed$|patch_embed[1-5]\.|blocks[1-4]\.|fpn\.)")
_REL_TABLE = re.compile(r"^(blocks4\.\d+\.attn\.)relative_position_bias_table$")
_REL_INDEX = re.compile(r"^blocks4\.\d+\.attn\.relative_position_index$")
# Upstream ConvViT3dUNETR's decoder modules (MONAI blocks), which medfm keeps under ``decoder.``.
_SEG_DECODER = re.compile(r"^(encoder(1|2|3|4|10)|decoder[1-5]|out)\.")
# Keys of MiM's four stages (upstream names, at the top level or under ``backbone.``).
_MIM_STAGE = re.compile(r"^(backbone\.)?(patch_embed[1-4]|blocks[1-4])\.")
# Keys of a single-stage ViT (another family's checkpoint given to the MiM converter).
_SINGLE_STAGE_VIT = re.compile(r"^(\w+\.)?(blocks\.\d+|patch_embed\.)")
# Tensors whose presence tells the kind of checkpoint.
_PRETRAINING_MARKERS = ("decoder_pred.weight", "mask_token")
_SEGMENTATION_MARKERS = ("backbone.patch_embed1.proj.weight", "encoder1.layer.conv1.conv.weight")
_CLASSIFICATION_MARKERS = ("patch_embed1.proj.weight", "head.weight")
#: Tensors :func:`infer_mim_config` reads (upstream encoder names).
ENCODER_REQUIRED_KEYS = (*(f"patch_embed{i}.proj.weight" for i in range(1, 5)), "blocks4.0.mlp.fc1.weight")
PRETRAINING_REQUIRED_KEYS = (
    "pos_embed",
    "decoder_embed.weight",
    "decoder_blocks.0.mlp.fc1.weight",
    "decoder_pred.weight",
)


# --- load-time adaptation ------------------------------------------------------------------------------


def tile_input_channels(weight: torch.Tensor, num_channels: int) -> torch.Tensor:
    """A first patch-embedding kernel ``(E, c, k, k, k)`` repeated along its input channels to ``num_channels``.

    Upstream ``load_ckpt`` repeats the pre-trained single-channel kernel (spec §5.3, step 2), without
    rescaling; a ``c``-channel kernel is tiled ``num_channels / c`` times.

    Raises:
        InvalidConfigError: ``num_channels`` is not a multiple of ``c``.
    """
    channels = int(weight.shape[1])
    if channels == num_channels:
        return weight
    if num_channels % channels:
        raise InvalidConfigError(
            f"cannot tile a {channels}-channel patch_embed1 kernel to num_channels={num_channels} (not a multiple)"
        )
    return weight.repeat(1, num_channels // channels, *([1] * (weight.ndim - 2)))


def _saved_token_grid(config: MiMConfig) -> list[int] | None:
    """The token grid of the config saved beside the weights being loaded (``config.name_or_path``), whose
    ``image_size`` the ``from_pretrained`` arguments may have replaced in ``config``; ``None`` if unreadable."""
    name = getattr(config, "name_or_path", "") or ""
    if not name:
        return None
    try:
        return list(type(config).from_pretrained(name).token_grid)
    except Exception:  # not a folder or cached repo with a MiM config.json: fall back to the token count
        return None


class ResizePositionEmbedding(LoadTimeAdaptation):
    """Weight-loading op: ``pos_embed`` resized to the model config's token grid (trilinear,
    ``align_corners=False``: :func:`~medfm.models.mim.modeling_mim.resize_position_embeddings`), and the
    pre-training ``decoder_pos_embed`` likewise (:meth:`adapt_decoder_table`).

    A table that already has the config's token count is kept as it is. Otherwise its grid is the one of the
    config saved with the weights (``image_size`` of the folder being loaded) when that has as many tokens, else
    the cube root of the token count (upstream pre-training checkpoints are cubic).
    """

    def adapt(self, table: torch.Tensor, config: MiMConfig) -> torch.Tensor:
        """The table on ``config.token_grid``."""
        target = list(config.token_grid)
        tokens = int(table.shape[1]) if table.ndim == 3 else -1
        if table.ndim != 3 or tokens == math.prod(target):
            return table
        source = _saved_token_grid(config)
        if source is None or math.prod(source) != tokens:
            side = _cube_root(tokens)
            if side is None:
                raise InvalidConfigError(
                    f"cannot resize a pos_embed of {tokens} tokens to the grid {target} of image_size "
                    f"{config.image_size}: its own grid is unknown (no saved MiM config.json of as many tokens, and "
                    f"{tokens} is no cube); load it with its own image_size"
                )
            source = [side] * 3
        return resize_position_embeddings(table, source, target)

    def adapt_decoder_table(self, table: torch.Tensor, config: MiMConfig) -> torch.Tensor:
        """The pre-training ``decoder_pos_embed`` on ``config.token_grid`` (a pre-training folder loaded with another
        ``image_size``: a run continued on other crops). It is a fixed sin-cos table (spec §1.2): when it is that of
        its saved grid it is rebuilt exactly for the new grid (a freshly built model's table); any other table is
        resized as :meth:`adapt` resizes ``pos_embed``."""
        target = list(config.token_grid)
        tokens = int(table.shape[1]) if table.ndim == 3 else -1
        if table.ndim != 3 or tokens == math.prod(target):
            return table
        source = _saved_token_grid(config)
        if source is not None and math.prod(source) == tokens and _is_sincos_table(table[0], source):
            return _sincos(target, int(table.shape[-1])).unsqueeze(0).to(table.dtype)
        return self.adapt(table, config)

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, config=None, **kwargs):
        """Apply :meth:`adapt` to ``pos_embed``, :meth:`adapt_decoder_table` to ``decoder_pos_embed``."""
        tensor = single_tensor(input_dict)
        if config is not None:
            decoder = str(kwargs.get("full_layer_name") or "").endswith("decoder_pos_embed")
            tensor = (self.adapt_decoder_table if decoder else self.adapt)(tensor, config)
        return {target_patterns[0]: tensor}


class TileInputChannels(LoadTimeAdaptation):
    """Weight-loading op: ``patch_embed1.proj.weight`` tiled to ``config.num_channels`` (:func:`tile_input_channels`)."""

    def adapt(self, weight: torch.Tensor, config: MiMConfig) -> torch.Tensor:
        """The kernel for ``config.num_channels`` input channels."""
        return tile_input_channels(weight, config.num_channels) if weight.ndim == 5 else weight


def register_mim_weight_adaptation() -> None:
    """Hook the pre-training -> fine-tuning adaptation into ``from_pretrained`` for every ``mim`` model.

    Idempotent; a family load hook. The encoder's ``pos_embed`` and the pre-training ``decoder_pos_embed`` (one
    pattern, as every pattern must match a tensor of every MiM class; ``(?<![a-z])`` anchors its start) are fitted
    to the config's token grid, and the first patch embedding to its channels.
    """
    register_load_time_adaptation(
        MiMConfig.model_type,
        [
            (r"(?<![a-z])pos_embed", ResizePositionEmbedding()),
            (r"(?<!\w)patch_embed1\.proj\.weight", TileInputChannels()),
        ],
    )


# --- kinds, key mapping and config inference -----------------------------------------------------------


def detect_checkpoint_kind(state: dict[str, torch.Tensor], source: str | os.PathLike | None = None) -> str:
    """The kind of upstream checkpoint ``state`` is, told from its keys (a ``module.`` prefix already removed).

    ``"pretraining"`` (``MaskedAutoencoderConvViT3d``: ``decoder_pred``/``mask_token``), ``"segmentation"``
    (``ConvViT3dUNETR``: ``backbone.*`` and ``encoder1``), ``"classification"`` (``ConvViT3d`` with ``head``)
    or ``"backbone"`` (a bare ``ConvViT3d`` encoder: encoder keys only).

    Raises:
        UnsupportedFormatError: None of these (naming what was looked for).
    """
    if any(key in state for key in _PRETRAINING_MARKERS) and any(_MIM_STAGE.match(key) for key in state):
        return "pretraining"
    if all(key in state for key in _SEGMENTATION_MARKERS):
        return "segmentation"
    if all(key in state for key in _CLASSIFICATION_MARKERS):
        return "classification"
    if "patch_embed1.proj.weight" in state and all(_ENCODER.match(key) for key in state):
        return "backbone"
    sample = sorted(state)[:6]
    hint = ""
    if any(_SINGLE_STAGE_VIT.match(key) for key in state):
        hint = (
            "; its keys (blocks.N..., patch_embed.*) are those of a single-stage ViT, not of MiM's four-stage "
            "ConvViT3d: convert it with its own family's converter (`medfm convert --help` lists them)"
        )
    raise UnsupportedFormatError(
        "not a MiM checkpoint of a known kind: expected a pre-training model (decoder_pred, mask_token), a "
        "segmentation network (backbone.*, encoder1), a classifier (patch_embed1..., head) or a bare encoder "
        f"(patch_embed1..., blocks4...); found keys such as {sample}{hint}",
        source,
    )


def _encoder_state(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The encoder's tensors under upstream ``ConvViT3d`` names."""
    if kind == "segmentation":
        return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return {k: v for k, v in state.items() if _ENCODER.match(k)}


def convert_mim_state_dict(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Upstream keys of a ``kind`` checkpoint (:func:`detect_checkpoint_kind`) to medfm keys.

    ``relative_position_index`` buffers are dropped (check them with :func:`infer_mim_config` first); the
    relative bias table moves to ``...attn.relative_position_bias.relative_position_bias_table``.
    """
    converted = {}
    for key, value in state.items():
        if kind == "segmentation":
            if key.startswith("backbone."):
                key = "mim." + _encoder_key(key.removeprefix("backbone."))
            elif _SEG_DECODER.match(key):
                key = "decoder." + key
        elif _ENCODER.match(key):
            key = _encoder_key(key)
            if kind != "backbone":
                key = "mim." + key
        elif kind == "classification" and key.startswith("head."):
            key = "classifier." + key.removeprefix("head.")
        if not _REL_INDEX.match(key.removeprefix("mim.")):
            converted[key] = value.contiguous()
    return converted


def _encoder_key(key: str) -> str:
    return _REL_TABLE.sub(r"\1relative_position_bias.relative_position_bias_table", key)


def _sincos(grid: list[int] | tuple[int, ...], width: int) -> torch.Tensor:
    from ...layers.position import sincos_position_table

    return sincos_position_table(list(grid), width)


def _is_sincos_table(table: torch.Tensor, grid: list[int] | tuple[int, ...]) -> bool:
    """Whether ``(N, C)`` ``table`` is the fixed 3D sin-cos table of ``grid`` (spec §1.2)."""
    if table.is_meta:  # shapes only: nothing to compare
        return False
    try:
        expected = _sincos(grid, int(table.shape[-1]))
    except ValueError:  # a width the sin-cos table cannot have
        return False
    return expected.shape == table.shape and torch.allclose(table.float(), expected, atol=1e-4, rtol=0.0)


def _sincos_grid(pos_embed: torch.Tensor | None) -> list[int] | None:
    """The token grid whose fixed sin-cos table a pre-training ``pos_embed`` ``(1, N, C)`` is, or ``None`` (a
    learned or altered table). Distinct grids of ``N`` tokens have distinct tables, so at most one fits."""
    if pos_embed is None or pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[-1] % 6:
        return None
    if pos_embed.is_meta or not _is_sincos_table(pos_embed[0, :1], [1, 1, 1]):
        return (
            None  # token 0 (coordinates 0, 0, 0) has the same row in every grid's table: not a sin-cos table
        )
    tokens = int(pos_embed.shape[1])
    side = _cube_root(tokens)
    candidates = ([(side,) * 3] if side is not None else []) + [g for g in _grids(tokens) if len(set(g)) > 1]
    for grid in candidates:
        if _is_sincos_table(pos_embed[0], grid):
            return list(grid)
    return None


def _cube_root(n: int) -> int | None:
    side = round(n ** (1 / 3)) if n > 0 else 0
    for candidate in (side - 1, side, side + 1):
        if candidate > 0 and candidate**3 == n:
            return candidate
    return None


def _grids(num_tokens: int) -> list[tuple[int, int, int]]:
    """Every ordered ``(a, b, c)`` with ``a * b * c == num_tokens``."""
    divisors = [d for d in range(1, num_tokens + 1) if num_tokens % d == 0]
    return [(a, b, num_tokens // (a * b)) for a in divisors for b in divisors if (num_tokens // a) % b == 0]


def _table_rows(grid: tuple[int, ...] | list[int]) -> int:
    return math.prod(2 * g - 1 for g in grid)


def infer_token_grid(
    num_tokens: int | None,
    *,
    table_rows: int | None = None,
    index: torch.Tensor | None = None,
    requested: list[int] | None = None,
    source: str | os.PathLike | None = None,
) -> list[int]:
    """The stage-4 token grid ``(g1, g2, g3)`` of a fine-tuning checkpoint.

    Every constraint the checkpoint holds is used: the token count ``N = g1 g2 g3`` (of ``pos_embed``), the
    relative bias table's ``prod(2 g - 1)`` rows, and the stored ``relative_position_index`` (which fixes the
    axis order). ``requested`` (from ``--config``'s ``image_size``) must satisfy them all; otherwise the one
    grid that does is taken, or the cube when several remain and one is a cube.

    Raises:
        InvalidConfigError: ``requested`` contradicts the checkpoint, or the grid stays ambiguous (give
            ``image_size`` in ``--config``).
        CheckpointMismatchError: No grid fits the checkpoint's tensors.
    """
    if num_tokens is None and index is not None:
        num_tokens = int(index.shape[0])
    if requested is not None:
        grid = [int(g) for g in requested]
        problems = []
        if num_tokens is not None and math.prod(grid) != num_tokens:
            problems.append(f"pos_embed holds {num_tokens} tokens, not {math.prod(grid)}")
        if table_rows is not None and _table_rows(grid) != table_rows:
            problems.append(
                f"the relative bias tables have {table_rows} rows, not prod(2g - 1) = {_table_rows(grid)}"
            )
        if not problems and index is not None and not torch.equal(index, relative_position_index(grid)):
            problems.append(
                "the stored relative_position_index is not the one of this grid (another axis order)"
            )
        if problems:
            raise InvalidConfigError(
                f"image_size gives the token grid {grid}, but {'; '.join(problems)}: the checkpoint was made for "
                "another image_size",
                source,
            )
        return grid
    if num_tokens is None:
        raise InvalidConfigError(
            "the checkpoint has neither pos_embed nor relative_position_index, so its input size cannot be told: "
            "give image_size in --config (e.g. --config '{\"image_size\": [96, 96, 96]}')",
            source,
        )
    candidates = _grids(num_tokens)
    if table_rows is not None:
        candidates = [g for g in candidates if _table_rows(g) == table_rows]
    if index is not None:
        candidates = [g for g in candidates if torch.equal(index, relative_position_index(g))]
    if not candidates:
        raise CheckpointMismatchError(
            f"no token grid fits {num_tokens} tokens"
            + (f" and {table_rows} relative bias rows" if table_rows is not None else "")
            + (" and the stored relative_position_index" if index is not None else ""),
            source,
        )
    if len(candidates) > 1:
        cubes = [g for g in candidates if g[0] == g[1] == g[2]]
        if not cubes:
            raise InvalidConfigError(
                f"the token grid of {num_tokens} tokens is ambiguous ({[list(g) for g in candidates[:6]]}...): give "
                "image_size in --config (each axis = grid x prod(patch_sizes), e.g. "
                "--config '{\"image_size\": [64, 64, 32]}')",
                source,
            )
        candidates = cubes
    return list(candidates[0])


def _count_blocks(state: dict[str, torch.Tensor], prefix: str, source) -> int:
    found = {int(m.group(1)) for key in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", key))}
    if not found:
        return 0
    depth = 1 + max(found)
    absent = sorted(set(range(depth)) - found)
    if absent:
        raise CheckpointMismatchError(
            f"{prefix} blocks {absent} are missing (the checkpoint has up to {prefix}.{depth - 1})", source
        )
    return depth


def _ratio(hidden: int, width: int) -> int | float:
    return hidden // width if hidden % width == 0 else hidden / width


def _cubic_kernel(weight: torch.Tensor, key: str, source) -> int:
    kernel = tuple(int(k) for k in weight.shape[2:])
    if len(kernel) != 3 or len(set(kernel)) != 1:
        raise CheckpointMismatchError(
            f"{key} has kernel {kernel}; a cubic 3D patch kernel was expected", source
        )
    return kernel[0]


def _check_heads(width: Any, heads: Any, label: str, field: str, given: bool, source) -> None:
    """Refuse heads that do not divide the width, saying how to pass them when they were the default."""
    if not isinstance(width, int) or not isinstance(heads, int) or heads < 1 or width % heads == 0:
        return  # other problems are the config's to report
    if given:
        raise InvalidConfigError(f"{field} {heads} does not divide {label} = {width}", source)
    raise InvalidConfigError(
        f"the upstream default {field}={heads} does not divide {label} = {width}: give the number of heads in "
        f"--config (e.g. --config '{{\"{field}\": 4}}')",
        source,
    )


def infer_mim_config(
    state: dict[str, torch.Tensor],
    overrides: dict[str, Any] | None = None,
    source: str | os.PathLike | None = None,
    kind: str | None = None,
) -> MiMConfig:
    """A :class:`MiMConfig` from upstream tensor shapes; ``overrides`` supply what shapes cannot tell.

    Read from the tensors: ``embed_dims``, ``num_channels``, ``patch_sizes`` (patch-embedding kernels),
    ``depths`` (blocks counted), ``mlp_ratios`` (``fc1`` widths), ``qkv_bias``, ``image_size`` (the token
    grid times ``prod(patch_sizes)``: the cube root of the pre-training token count, unless ``image_size``
    gives another grid of as many tokens; for a fine-tuned checkpoint :func:`infer_token_grid`), the
    decoder's width, depth and MLP ratio, ``fpn_hidden_size`` and ``segmentation_feature_size``
    (segmentation), ``num_labels`` (``out``/``head``), and, for fine-tuned checkpoints,
    ``use_absolute_position_embeddings``, ``use_relative_position_bias`` and whether there is a layer scale.
    A pre-training checkpoint keeps the fine-tuning defaults of the last three (its encoder is always
    upstream's pre-training one), and ``fpn_hidden_size`` is ``2 * embed_dims[3]`` as in upstream's
    factories unless given.

    From ``overrides`` only (else the upstream base defaults): ``num_attention_heads``,
    ``decoder_num_attention_heads``, the masking, sampling and loss settings, ``alignment``,
    ``drop_path_rate``, ``layer_scale_init_value``, ``normalize_features``...

    Args:
        state: The upstream checkpoint's tensors (``module.`` removed).
        overrides: :class:`MiMConfig` fields (``--config``).
        source: The checkpoint, named in errors.
        kind: :func:`detect_checkpoint_kind` of ``state`` (detected when not given).

    Raises:
        UnsupportedFormatError: ``state`` is no MiM checkpoint of a known kind.
        CheckpointMismatchError: A tensor the inference reads is missing or of an unusable shape, or the
            stored relative position index fits no grid.
        InvalidConfigError: ``overrides`` is not a mapping or names unknown fields; heads do not divide the
            widths; ``image_size`` contradicts the checkpoint or is needed and missing; or the resulting config
            is invalid.
    """
    overrides = {} if overrides is None else overrides
    check_config_fields(MiMConfig, overrides)
    overrides = dict(overrides)
    kind = kind or detect_checkpoint_kind(state, source)
    encoder = _encoder_state(state, kind)
    require_keys(encoder, ENCODER_REQUIRED_KEYS, source, f"MiM {kind}")
    if kind == "pretraining":
        require_keys(state, PRETRAINING_REQUIRED_KEYS, source, "MiM pre-training")
    elif kind == "backbone":  # MiMModel builds the fpn map; the classifier's encoder is saved with its head
        require_keys(state, ("fpn.0.weight",), source, "MiM encoder (ConvViT3d with fpn)")
    try:
        return _infer(state, encoder, overrides, source, kind)
    except (IndexError, ValueError, ZeroDivisionError) as error:
        if isinstance(error, MedfmError):
            raise
        raise CheckpointMismatchError(
            f"cannot infer the MiM config from the tensors' shapes ({type(error).__name__}: {error})", source
        ) from None


def _infer(state, encoder, overrides, source, kind) -> MiMConfig:
    embeds = [encoder[f"patch_embed{i}.proj.weight"] for i in range(1, 5)]
    for i, weight in enumerate(embeds, 1):
        if weight.ndim != 5:
            raise CheckpointMismatchError(
                f"patch_embed{i}.proj.weight has shape {tuple(weight.shape)}; a 5D Conv3d kernel was expected",
                source,
            )
    widths = [int(w.shape[0]) for w in embeds]
    values: dict[str, Any] = {
        "embed_dims": widths,
        "num_channels": int(embeds[0].shape[1]),
        "patch_sizes": [
            _cubic_kernel(w, f"patch_embed{i}.proj.weight", source) for i, w in enumerate(embeds, 1)
        ],
        "depths": [_count_blocks(encoder, f"blocks{s}", source) for s in range(1, 5)],
        "qkv_bias": "blocks4.0.attn.qkv.bias" in encoder,
    }
    defaults = MiMConfig()
    values["mlp_ratios"] = [  # a stage without blocks keeps the default
        _ratio(int(encoder[f"blocks{s}.0.mlp.fc1.weight"].shape[0]), widths[s - 1])
        if f"blocks{s}.0.mlp.fc1.weight" in encoder
        else defaults.mlp_ratios[s - 1]
        for s in range(1, 5)
    ]
    stride = math.prod(values["patch_sizes"])
    requested = overrides.get("image_size")
    if isinstance(requested, int) and not isinstance(requested, bool):
        requested = [requested] * 3
    requested_grid = None  # the grid --config asks for; a malformed image_size is the config's to report
    if (
        isinstance(requested, list | tuple)
        and len(requested) == 3
        and all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 and n % stride == 0 for n in requested
        )
    ):
        requested_grid = [n // stride for n in requested]
    pos_embed = encoder.get("pos_embed")
    if pos_embed is not None and (pos_embed.ndim != 3 or pos_embed.shape[-1] != widths[3]):
        raise CheckpointMismatchError(
            f"pos_embed has shape {tuple(pos_embed.shape)}; (1, tokens, {widths[3]}) was expected", source
        )
    tokens = int(pos_embed.shape[1]) if pos_embed is not None else None
    if kind == "pretraining":
        # The pre-training pos_embed is a fixed sin-cos table, which tells its grid; failing that (a learned or
        # altered table), upstream pre-trains on a cubic grid, and a grid given by image_size needs only the right
        # token count.
        table_grid = _sincos_grid(pos_embed)
        side = _cube_root(tokens) if requested_grid is None and table_grid is None else None
        if requested_grid is not None:
            grid = infer_token_grid(tokens, requested=requested_grid, source=source)
            if table_grid is not None and table_grid != grid:
                raise InvalidConfigError(
                    f"image_size gives the token grid {grid}, but the pre-training pos_embed is the sin-cos table of "
                    f"the grid {table_grid} (image_size {[g * stride for g in table_grid]}): the checkpoint was made "
                    "for that image_size; leave image_size out or give that one",
                    source,
                )
        elif table_grid is not None:
            grid = table_grid
        elif side is not None:
            grid = [side] * 3
        else:
            raise InvalidConfigError(
                f"the pre-training pos_embed holds {tokens} tokens, no cube, so its grid is ambiguous: give "
                "image_size in --config",
                source,
            )
        values.update(_infer_pretraining(state, source))
        values["fpn_hidden_size"] = 2 * widths[3]
    else:
        table, index = _relative_position_tensors(encoder, source)
        grid = infer_token_grid(
            tokens,
            table_rows=int(table.shape[0]) if table is not None else None,
            index=index,
            requested=requested_grid,
            source=source,
        )
        values["use_absolute_position_embeddings"] = pos_embed is not None
        values["use_relative_position_bias"] = table is not None
        if "blocks4.0.gamma_1" not in encoder:
            values["layer_scale_init_value"] = None
        fpn = encoder.get("fpn.0.weight")
        values["fpn_hidden_size"] = int(fpn.shape[0]) if fpn is not None else 2 * widths[3]
        if kind == "segmentation":
            require_keys(
                state,
                ("encoder1.layer.conv1.conv.weight", "out.conv.conv.weight"),
                source,
                "MiM segmentation",
            )
            feature_size = int(state["encoder1.layer.conv1.conv.weight"].shape[0])
            if feature_size != widths[3] // 8:  # else the config's default rule gives it
                values["segmentation_feature_size"] = feature_size
            values["num_labels"] = int(state["out.conv.conv.weight"].shape[0])
        elif kind == "classification":
            values["num_labels"] = int(state["head.weight"].shape[0])
    values["image_size"] = [g * stride for g in grid]
    values["num_attention_heads"] = defaults.num_attention_heads
    if kind == "pretraining":
        values["decoder_num_attention_heads"] = defaults.decoder_num_attention_heads
    values.update(overrides)
    embed_dims = values["embed_dims"]
    _check_heads(
        embed_dims[3] if isinstance(embed_dims, list | tuple) and len(embed_dims) == 4 else None,
        values["num_attention_heads"],
        "embed_dims[3]",
        "num_attention_heads",
        "num_attention_heads" in overrides,
        source,
    )
    if kind == "pretraining":
        _check_heads(
            values["decoder_hidden_size"],
            values["decoder_num_attention_heads"],
            "decoder_hidden_size",
            "decoder_num_attention_heads",
            "decoder_num_attention_heads" in overrides,
            source,
        )
    config = build_config(MiMConfig, values, source)
    checks = {
        "pretraining": ("pre-training", config.check_pretraining),
        "segmentation": ("segmentation", config.check_segmentation),
    }
    if kind in checks:
        label, check = checks[kind]
        try:
            check()
        except InvalidConfigError as error:
            raise InvalidConfigError(f"invalid MiMConfig for {label} ({error.reason})", source) from None
    return config


def _infer_pretraining(state: dict[str, torch.Tensor], source) -> dict[str, Any]:
    embed = state["decoder_embed.weight"]
    width = int(embed.shape[0])
    values = {
        "decoder_hidden_size": width,
        "decoder_num_hidden_layers": _count_blocks(state, "decoder_blocks", source),
        "decoder_mlp_ratio": _ratio(int(state["decoder_blocks.0.mlp.fc1.weight"].shape[0]), width),
    }
    return values


def _relative_position_tensors(encoder: dict[str, torch.Tensor], source):
    """The first block's relative bias table and stored index (``None`` where absent); the blocks must agree."""
    tables = {k: v for k, v in encoder.items() if _REL_TABLE.match(k)}
    indices = {k: v for k, v in encoder.items() if _REL_INDEX.match(k)}
    table = tables.get("blocks4.0.attn.relative_position_bias_table")
    index = indices.get("blocks4.0.attn.relative_position_index")
    if table is not None and table.ndim != 2:
        raise CheckpointMismatchError(
            f"blocks4.0.attn.relative_position_bias_table has shape {tuple(table.shape)}; (rows, heads) was expected",
            source,
        )
    for key, other in indices.items():
        if index is None or other.shape != index.shape or not torch.equal(other, index):
            raise CheckpointMismatchError(
                f"{key} differs from blocks4.0's relative_position_index: every block covers the same grid",
                source,
            )
    if index is not None and (index.ndim != 2 or index.shape[0] != index.shape[1]):
        raise CheckpointMismatchError(
            f"relative_position_index has shape {tuple(index.shape)}; (tokens, tokens) was expected", source
        )
    return table, (index.long() if index is not None else None)


# --- the conversion -----------------------------------------------------------------------------------------


def convert_mim_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    config_overrides: dict[str, Any] | None = None,
    trust_checkpoint: bool = False,
) -> Path:
    """Convert an upstream MiM checkpoint to a medfm model folder.

    Writes ``config.json``, ``model.safetensors``, ``preprocessor_config.json`` (the kind's preset,
    :data:`PROCESSOR_PRESETS`), a ``README.md`` model card and ``conversion.json`` to ``output``. A pre-training
    checkpoint becomes :class:`MiMForPreTraining` (``AutoModel`` loads its encoder; ``from_pretrained`` of a
    fine-tuning class adapts it, see :func:`register_mim_weight_adaptation`), a segmentation network
    :class:`MiMForSemanticSegmentation`, a classifier :class:`MiMForImageClassification`, a bare encoder
    :class:`MiMModel`. The converted tensors load strictly: every tensor is used and none is missing.

    Everything is read and checked before anything is written, and the folder is written next to ``output``
    and renamed into place when complete (:func:`~medfm.models.conversion_utils.atomic_output_folder`): a
    failure leaves no partial folder. ``output`` may be new, empty, or a previous conversion (replaced).

    Args:
        checkpoint: ``checkpoint-final.pth`` (its ``model``), or a state dict as ``.pth``/``.pt``/``.bin``/
            ``.safetensors``; a ``module.`` prefix is removed.
        output: Output folder (created).
        config_overrides: :class:`MiMConfig` fields the shapes cannot tell (``num_attention_heads``, mask
            ratios, ``alignment``, ``image_size`` of a non-cubic fine-tuned grid...); see :func:`infer_mim_config`.
        trust_checkpoint: See :func:`~medfm.models.conversion_utils.load_original_state_dict`.

    Returns:
        The output folder.

    Raises:
        VolumeNotFoundError, CorruptFileError: The checkpoint is missing or unreadable (truncated).
        UnsupportedFormatError: A file of an unknown format, or a checkpoint of no known MiM kind.
        NonFiniteWeightsError: The checkpoint holds NaN/Inf weights.
        CheckpointMismatchError: Missing or unexpected tensors, tensors of the wrong shape, or a stored
            relative position index that is not the grid's.
        InvalidConfigError: ``config_overrides`` is not a mapping, names unknown fields, or gives an invalid
            config (heads that do not divide the widths, an ``image_size`` the checkpoint contradicts...).
        OutputPathError, OverwriteInputError: ``output`` is a file, a non-empty folder that is no conversion,
            or holds the input.
        OutputWriteError: Writing failed (disk full...).
    """
    from ...hub import write_model_card
    from ...processing import MedicalImageProcessor
    from . import modeling_mim, modeling_mim_pretraining

    output = Path(output)
    check_output_folder(output, (checkpoint,))  # fail early, before the slow part
    original = load_original_state_dict(checkpoint, trust_checkpoint=trust_checkpoint)
    kind = detect_checkpoint_kind(original, checkpoint)
    config = infer_mim_config(original, config_overrides, checkpoint, kind=kind)
    state = convert_mim_state_dict(original, kind)
    name = CHECKPOINT_KINDS[kind]
    model_class = getattr(modeling_mim_pretraining if kind == "pretraining" else modeling_mim, name)
    model = load_state_dict_strict(model_class(config), state, checkpoint)
    dropped = sorted(k for k in original if _REL_INDEX.match(k.removeprefix("backbone.")))
    with atomic_output_folder(output, (checkpoint,)) as folder:
        model.save_pretrained(folder)
        MedicalImageProcessor.from_preset(PROCESSOR_PRESETS[kind]).save_pretrained(folder)
        write_model_card(
            CARD_TEMPLATE,
            folder,
            base_model=None,
            repo_id=output.name,
            extra={"source_checkpoint": Path(checkpoint).name, "parity_statement": PARITY_STATEMENT},
        )
        (folder / CONVERSION_MARKER).write_text(
            json.dumps(
                {
                    "source": Path(checkpoint).name,
                    "kind": kind,
                    "model_class": name,
                    "num_tensors": len(state),
                    "dropped": dropped,
                    "verified_max_abs_error": None,
                },
                indent=2,
            )
        )
    return output
