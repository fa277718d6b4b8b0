"""Configurations of SPAD-ViT and SPAD-VT (PUMIT; Luo et al., arXiv 2312.07630).

Defaults are the released base sizes (`shared/specs/spad.md`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from ...errors import InvalidConfigError

__all__ = ["SpadVTConfig", "SpadViTConfig"]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _three(value: int | list[int] | tuple[int, ...], name: str) -> list[int]:
    values = [value] * 3 if _is_int(value) else value
    if (
        not isinstance(values, (list, tuple))
        or len(values) != 3
        or not all(_is_int(v) and v >= 1 for v in values)
    ):
        raise InvalidConfigError(
            f"{name} must be a positive int or a list of three positive ints; got {_describe(value)}"
        )
    return [int(v) for v in values]


def _positive_int(config: Any, name: str, minimum: int = 1) -> None:
    value = getattr(config, name)
    if not _is_int(value) or value < minimum:
        raise InvalidConfigError(f"{name} must be an integer >= {minimum}; got {_describe(value)}")


def _int_list(config: Any, name: str, minimum: int = 1, length: int | None = None) -> None:
    value = getattr(config, name)
    if (
        not isinstance(value, (list, tuple))
        or (length is not None and len(value) != length)
        or not value
        or not all(_is_int(v) and v >= minimum for v in value)
    ):
        size = f"{length} " if length is not None else ""
        raise InvalidConfigError(
            f"{name} must be a list of {size}integers >= {minimum}; got {_describe(value)}"
        )


def _number(config: Any, name: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
    value = getattr(config, name)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value < high
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {high:g})"
        raise InvalidConfigError(f"{name} must be a finite number in {span}; got {_describe(value)}")


def _boolean(config: Any, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, bool):
        raise InvalidConfigError(f"{name} must be true or false; got {_describe(value)}")


def _check_labels(config: Any, kwargs: dict[str, Any]) -> None:
    """``num_labels`` must agree with ``id2label``, whose keys are the class ids ``0 .. n-1``."""
    id2label = config.id2label
    if id2label is None:
        return
    given = kwargs.get("num_labels")
    if given is not None and (not _is_int(given) or given < 1):
        raise InvalidConfigError(f"num_labels must be an integer >= 1; got {_describe(given)}")
    if given is not None and given != len(id2label):
        raise InvalidConfigError(
            f"num_labels={given!r} disagrees with id2label, which names {len(id2label)} classes; "
            "give one of them, or make them agree"
        )
    if kwargs.get("_before_init"):
        return
    if sorted(id2label) != list(range(len(id2label))):
        raise InvalidConfigError(
            f"id2label keys must be the class ids 0 .. {len(id2label) - 1}; got {sorted(id2label)!r:.120}"
        )


def default_out_indices(depth: int) -> list[int]:
    """The blocks upstream's segmentation adapter taps for a ViT of ``depth`` blocks."""
    known = {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}
    return known.get(depth, [max(round((i + 1) * depth / 4) - 1, 0) for i in range(4)])


@strict
class SpadViTConfig(PreTrainedConfig):
    r"""Configuration of a SPAD-ViT (:class:`~medfm.models.spad.SpadViTModel` and its heads).

    SPAD-ViT is an EVA-02-style ViT made 3D: a spacing-adaptive patch embedding, a learned 3D position
    table resampled to the token grid, and 3D rotary position embeddings in every block.

    Args:
        in_channels: Input channels (3 for the pre-trained model; grey images are repeated).
        patch_size: Patch size, an int or ``(depth, height, width)``.
        adaptive_patch_embed: The pre-trained SPAD patch embedding: a ``P^3`` kernel whose depth taps are
            merged according to the input's anisotropy (``aniso_d``), so one model serves every spacing.
            ``False`` gives an ordinary Conv3d with ``patch_size`` (how upstream fine-tunes).
        hidden_size: Token width ``E``.
        num_hidden_layers: Number of transformer blocks.
        num_attention_heads: Heads per block; ``hidden_size / heads`` must be a multiple of 4 (3D RoPE).
        intermediate_size: SwiGLU hidden width; ``int(E * 8 / 3)`` upstream (2048 for the base model).
        pos_embed_shape: Shape ``(D, H, W)`` of the learned position table.
        rope_base: RoPE bases for the depth, height and width axes.
        rope_rescale_shape: Per axis, ``-1`` for integer token positions (upstream default).
        qkv_bias: Biases on q and v (there is never one on k).
        layer_norm_eps: Epsilon of every LayerNorm (1e-5 upstream, not EVA's 1e-6).
        mask_ratio: Fraction of patch tokens masked in MIM pre-training.
        mask_layer_ids: Blocks that see mask tokens in MIM; ``None`` means all (the base model). The others
            see only the cls and visible tokens.
        codebook_size: Size of the SPAD-VT codebook the MIM head predicts over.
        initializer_range: Std of the truncated normal used to initialise new weights.
        attention_dropout: Dropout on attention weights while training.
        out_indices: Blocks whose outputs the segmentation adapter taps; by default upstream's
            ``[3, 5, 7, 11]`` (B) or ``[7, 11, 15, 23]`` (L), else four evenly spread blocks.
        decoder_lateral_channels: Widths of the UNet decoder's four lateral levels (fine to coarse).
        decoder_full_res_channels: Widths of the decoder's two full-resolution levels.
        deep_supervision: Whether the loss (and, in training, the output) includes the coarser decoder heads.
    """

    model_type = "spad_vit"

    in_channels: int = 3
    patch_size: int | list[int] | tuple[int, ...] = 16
    adaptive_patch_embed: bool = True
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 2048
    pos_embed_shape: list[int] | tuple[int, ...] = (5, 10, 10)
    rope_base: list[float] | tuple[float, ...] = (2333.0, 10000.0, 10000.0)
    rope_rescale_shape: list[int] | tuple[int, ...] = (-1, -1, -1)
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    mask_ratio: float = 0.55
    mask_layer_ids: list[int] | None = None
    codebook_size: int = 1024
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    out_indices: list[int] | tuple[int, ...] | None = None
    decoder_lateral_channels: list[int] | tuple[int, ...] = (128, 256, 512, 512)
    decoder_full_res_channels: list[int] | tuple[int, ...] = (32, 64)
    deep_supervision: bool = True

    # Fields stored as lists of three ints however they are given: at construction, as from_pretrained
    # overrides (set after __post_init__), or by assignment.
    _THREE_INT_FIELDS = ("patch_size", "pos_embed_shape")

    def __setattr__(self, name, value):
        if name in SpadViTConfig._THREE_INT_FIELDS and value is not None:
            value = _three(value, name)
        super().__setattr__(name, value)

    def __post_init__(self, **kwargs):
        # Field checks run first (and raise InvalidConfigError naming the field), so the conversions below and
        # the architecture checks never see a string or a fraction.
        self._check_fields()
        if not isinstance(self.rope_base, (list, tuple)) or len(self.rope_base) != 3:
            raise InvalidConfigError(
                f"rope_base must be a list of three positive numbers; got {_describe(self.rope_base)}"
            )
        self.rope_base = [float(b) if _is_int(b) else b for b in self.rope_base]
        if self.out_indices is None:
            self.out_indices = default_out_indices(self.num_hidden_layers)
        for name in ("out_indices", "mask_layer_ids"):
            value = getattr(self, name)
            if value is not None:
                _int_list(self, name, minimum=0)
                setattr(self, name, [int(i) for i in value])
        self.rope_rescale_shape = [int(r) for r in self.rope_rescale_shape]
        self.decoder_lateral_channels = [int(c) for c in self.decoder_lateral_channels]
        self.decoder_full_res_channels = [int(c) for c in self.decoder_full_res_channels]
        _check_labels(self, {**kwargs, "_before_init": True})
        super().__post_init__(**kwargs)
        _check_labels(self, {})
        self.validate_architecture()  # raised here, the error stays an InvalidConfigError naming the field

    def _check_fields(self) -> None:
        for name in (
            "in_channels",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "codebook_size",
        ):
            _positive_int(self, name)
        for name in ("adaptive_patch_embed", "qkv_bias", "deep_supervision"):
            _boolean(self, name)
        _number(self, "layer_norm_eps", 0.0, low_open=True)
        _number(self, "mask_ratio", 0.0, 1.0)
        _number(self, "initializer_range", 0.0)
        _number(self, "attention_dropout", 0.0, 1.0)
        rope = self.rope_base
        if (
            not isinstance(rope, (list, tuple))
            or len(rope) != 3
            or not all(
                isinstance(b, numbers.Real) and not isinstance(b, bool) and math.isfinite(b) and b > 0
                for b in rope
            )
        ):
            raise InvalidConfigError(
                f"rope_base must be three finite numbers > 0 (depth, height, width); got {_describe(rope)}"
            )
        rescale = self.rope_rescale_shape
        if (
            not isinstance(rescale, (list, tuple))
            or len(rescale) != 3
            or not all(_is_int(r) and (r == -1 or r >= 1) for r in rescale)
        ):
            raise InvalidConfigError(
                f"rope_rescale_shape must be three ints, each -1 (integer positions) or >= 1; got {_describe(rescale)}"
            )
        _int_list(self, "decoder_lateral_channels")
        _int_list(self, "decoder_full_res_channels", length=2)

    def validate_architecture(self) -> None:
        """Check each field's type and range, and the combinations the model relies on.

        Runs on construction, when the model is built, and on ``config.validate()``.

        Raises:
            InvalidConfigError: Naming the field, its value and what is allowed.
        """
        self._check_fields()
        for name in ("patch_size", "pos_embed_shape"):
            _three(getattr(self, name), name)
        if self.hidden_size % self.num_attention_heads:
            raise InvalidConfigError(
                f"num_attention_heads {self.num_attention_heads} does not divide hidden_size {self.hidden_size}; "
                "choose heads so that hidden_size / num_attention_heads is a whole multiple of 4"
            )
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise InvalidConfigError(
                f"head size hidden_size / num_attention_heads = {self.hidden_size // self.num_attention_heads} must "
                "be a multiple of 4 for 3D RoPE"
            )
        if self.adaptive_patch_embed:
            size = self.patch_size[0]
            if self.patch_size != [size] * 3 or size & (size - 1):
                raise InvalidConfigError(
                    f"adaptive_patch_embed=True needs an isotropic power-of-2 patch_size (e.g. 16); got "
                    f"{self.patch_size} (set adaptive_patch_embed=false for a fixed patch)"
                )
        if any(not 0 <= i < self.num_hidden_layers for i in self.out_indices):
            raise InvalidConfigError(
                f"out_indices {self.out_indices} must name blocks in [0, {self.num_hidden_layers})"
            )
        if len(self.out_indices) != 4 or len(self.decoder_lateral_channels) != 4:
            raise InvalidConfigError(
                f"out_indices and decoder_lateral_channels must each have 4 entries (the segmentation adapter taps "
                f"4 blocks); got {len(self.out_indices)} and {len(self.decoder_lateral_channels)}"
            )
        if self.mask_layer_ids is not None and any(
            not 0 <= i < self.num_hidden_layers for i in self.mask_layer_ids
        ):
            raise InvalidConfigError(
                f"mask_layer_ids {self.mask_layer_ids} must name blocks in [0, {self.num_hidden_layers})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@strict
class SpadVTConfig(PreTrainedConfig):
    r"""Configuration of the SPAD-VT soft visual tokenizer (:class:`~medfm.models.spad.SpadVTModel`).

    Args:
        in_channels: Input channels (RGB in ``[-1, 1]``).
        start_stride: Stride (= kernel) of the first downsampling conv.
        downsample_channels: Widths after each downsampling conv (the first uses ``start_stride``, the
            others stride 2); total stride ``start_stride * 2^(n-1)``.
        upsample_channels: Widths of the decoder levels, fine to coarse.
        codebook_size: Number of codes.
        embedding_dim: Code width (= the encoder output width).
        layer_norm_eps: Epsilon of the encoder's LayerNorms.
        group_norm_groups: Groups of the GroupNorms.
        group_norm_eps: Epsilon of the GroupNorms.
        initializer_range: Std for new Linear weights.
    """

    model_type = "spad_vt"

    in_channels: int = 3
    start_stride: int = 4
    downsample_channels: list[int] | tuple[int, ...] = (128, 256, 512)
    upsample_channels: list[int] | tuple[int, ...] = (128, 256, 512)
    codebook_size: int = 1024
    embedding_dim: int = 512
    layer_norm_eps: float = 1e-5
    group_norm_groups: int = 8
    group_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self._check_fields()
        self.downsample_channels = [int(c) for c in self.downsample_channels]
        self.upsample_channels = [int(c) for c in self.upsample_channels]
        _check_labels(self, {**kwargs, "_before_init": True})
        super().__post_init__(**kwargs)
        _check_labels(self, {})
        self.validate_architecture()  # raised here, the error stays an InvalidConfigError naming the field

    def _check_fields(self) -> None:
        for name in ("in_channels", "start_stride", "codebook_size", "embedding_dim", "group_norm_groups"):
            _positive_int(self, name)
        _int_list(self, "downsample_channels")
        _int_list(self, "upsample_channels")
        _number(self, "layer_norm_eps", 0.0, low_open=True)
        _number(self, "group_norm_eps", 0.0, low_open=True)
        _number(self, "initializer_range", 0.0)

    def validate_architecture(self) -> None:
        """Check each field's type and range, and the combinations the model relies on.

        Raises:
            InvalidConfigError: Naming the field, its value and what is allowed.
        """
        self._check_fields()
        if self.start_stride & (self.start_stride - 1):
            raise InvalidConfigError(f"start_stride must be a power of 2; got {self.start_stride}")
        if self.upsample_channels[-1] != self.embedding_dim:
            raise InvalidConfigError(
                f"upsample_channels[-1] ({self.upsample_channels[-1]}) must equal embedding_dim "
                f"({self.embedding_dim}): the decoder starts from the codes"
            )
        if len(self.downsample_channels) != len(self.upsample_channels):
            raise InvalidConfigError(
                f"downsample_channels and upsample_channels need the same number of levels; got "
                f"{len(self.downsample_channels)} and {len(self.upsample_channels)}"
            )
        for name in ("downsample_channels", "upsample_channels"):
            bad = [c for c in getattr(self, name) if c % self.group_norm_groups]
            if bad:
                raise InvalidConfigError(
                    f"{name} {bad} are not multiples of group_norm_groups {self.group_norm_groups}"
                )

    @property
    def total_stride(self) -> int:
        return self.start_stride * 2 ** (len(self.downsample_channels) - 1)
