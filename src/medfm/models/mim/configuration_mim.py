"""Configuration of MiM (Mask in Mask; Zhuang et al., IEEE TMI 2025, arXiv 2404.15580).

Defaults are the released base size (`shared/specs/mim.md` §1.1, §2): a 4-stage hybrid conv + ViT encoder
("ConvViT3d") on 96^3 inputs, an 8-block decoder of width 576, and the masking, sampling and loss weights of
the released ``pretrain.sh``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from ...errors import InvalidConfigError

__all__ = ["MIM_ALIGNMENTS", "MIM_LOSS_WEIGHT_MODES", "MiMConfig"]

#: ``alignment``: reproduce the released code's cross-level terms, or the paper's up<->mid term (spec §2.6).
MIM_ALIGNMENTS = ("released", "paper")
#: ``loss_weight_mode`` (spec §2.7): fixed weights, or w_up / w_down rescaled over training.
MIM_LOSS_WEIGHT_MODES = ("concurrent", "coarse_to_fine", "fine_to_coarse")
#: Names of the five loss terms, in the order of ``loss_weights`` and of the pre-training output's ``losses``.
MIM_LOSS_NAMES = ("up", "mid", "down", "up_mid", "mid_down")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _int_list(value: Any, name: str, length: int, minimum: int = 1) -> list[int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != length
        or not all(_is_int(v) and v >= minimum for v in value)
    ):
        raise InvalidConfigError(
            f"{name} must be a list of {length} integers >= {minimum}; got {_describe(value)}"
        )
    return [int(v) for v in value]


def _positive_int(value: Any, name: str) -> None:
    if not _is_int(value) or value < 1:
        raise InvalidConfigError(f"{name} must be an integer >= 1; got {_describe(value)}")


def _number(value: Any, name: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
    ok = _is_real(value) and (value > low if low_open else value >= low) and value < high
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {high:g})"
        raise InvalidConfigError(f"{name} must be a finite number in {span}; got {_describe(value)}")


def _boolean(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise InvalidConfigError(f"{name} must be true or false; got {_describe(value)}")


def _check_labels(config: Any, given: Any = None, before_init: bool = False) -> None:
    """``num_labels`` (when given) must be an integer >= 1 that agrees with ``id2label``, whose keys are the class
    ids ``0 .. n-1`` (transformers would otherwise replace the names with ``LABEL_i``, or keep ids that no
    logit has)."""
    if given is not None and (not _is_int(given) or given < 1):
        raise InvalidConfigError(f"num_labels must be an integer >= 1; got {_describe(given)}")
    id2label = getattr(config, "id2label", None)
    if not isinstance(id2label, dict):
        return
    if given is not None and before_init and given != len(id2label):
        raise InvalidConfigError(
            f"num_labels={given!r} disagrees with id2label, which names {len(id2label)} classes; give one of them, "
            "or make them agree"
        )
    if before_init:
        return
    if not id2label:
        raise InvalidConfigError("id2label names no class; a model needs num_labels >= 1")
    if sorted(id2label) != list(range(len(id2label))):
        raise InvalidConfigError(
            f"id2label keys must be the class ids 0 .. {len(id2label) - 1}; got {sorted(id2label)!r:.120}"
        )


@strict
class MiMConfig(PreTrainedConfig):
    r"""Configuration of the MiM models (:class:`~medfm.models.mim.MiMModel` and its heads).

    The encoder has four stages, each opened by a stride-``patch_sizes[i]`` patch embedding (Conv3d, channel
    LayerNorm, GELU): three stages of convolution blocks, then transformer blocks on the stage-4 token grid
    ``image_size / prod(patch_sizes)``. MiM pre-training (spec §2) encodes three levels of a crop of
    ``2 * image_size``: the whole crop down-sampled to ``image_size`` (up), ``num_mid_volumes`` of its eight
    octants (mid) and ``num_down_patches`` ``prod(patch_sizes)``-sized patches of each mid volume, up-sampled to
    ``image_size`` (down).

    ``use_relative_position_bias``, ``layer_scale_init_value`` and ``use_absolute_position_embeddings`` describe
    the fine-tuning encoder (segmentation, classification, :class:`MiMModel`); the pre-training model always
    builds upstream's pre-training encoder (fixed sin-cos positions, no layer scale, no relative bias).

    Args:
        image_size: ``(D1, D2, D3)``, each a multiple of ``prod(patch_sizes)``: the input of each pre-training
            level and the fine-tuning ROI the position table (and relative bias) is sized for.
        num_channels: Input channels.
        embed_dims: Widths of the four stages.
        depths: Blocks per stage (conv blocks in stages 1-3, transformer blocks in stage 4).
        num_attention_heads: Heads of the stage-4 transformer blocks.
        mlp_ratios: MLP expansion of each stage.
        patch_sizes: Stride (= kernel) of each stage's patch embedding.
        qkv_bias: Bias of the fused qkv projections.
        hidden_act: Activation of the patch embeddings and MLPs (GELU, erf form, upstream).
        layer_norm_eps: Epsilon of the transformer LayerNorms and the final norms.
        conv_layer_norm_eps: Epsilon of the channel LayerNorms of the patch embeddings and conv blocks.
        fpn_hidden_size: Width of the fine-tuning encoder's fifth map (Conv3d k2 s2, BatchNorm, GELU).
        use_absolute_position_embeddings: Add a position table to the stage-4 tokens (fine-tuning encoder).
        use_relative_position_bias: A learned 3D relative position bias per transformer block (fine-tuning).
        layer_scale_init_value: Initial per-channel layer scale ``gamma`` of the transformer blocks
            (fine-tuning); ``None``: no layer scale.
        drop_path_rate: Stochastic depth, rising linearly over all blocks of the four stages.
        attention_dropout: Dropout on the attention weights while training.
        decoder_hidden_size: Width of the pre-training decoder.
        decoder_num_hidden_layers: Blocks of the pre-training decoder.
        decoder_num_attention_heads: Heads of the pre-training decoder.
        decoder_mlp_ratio: MLP expansion of the decoder (upstream uses ``mlp_ratios[0]``).
        norm_pix_loss: Normalise each target patch (mean 0, unbiased variance 1) before the MSE.
        mask_ratio_up: Masked fraction at the up level, masked in 8 groups of consecutive tokens.
        mask_ratio_mid: Masked fraction of the mid-level tokens.
        mask_ratio_down: Masked fraction of the down-level tokens.
        num_mid_volumes: Octants encoded per crop at the mid level (upstream ``sample_usual``), chosen among the
            masked up groups; more than there are masked groups fill up with unmasked octants (upstream's zero
            scores, whose ties medfm breaks by index).
        num_down_patches: Patches encoded per mid volume at the down level (upstream ``sample_down``), chosen
            among the masked mid tokens in the same way.
        loss_weights: Weights of the losses up, mid, down, up-mid and mid-down.
        loss_weight_mode: ``"concurrent"`` (fixed weights), ``"coarse_to_fine"`` or ``"fine_to_coarse"``.
        alignment: ``"released"`` reproduces the released code's cross-level terms; ``"paper"`` aligns each mid
            volume with the up-level features of its group (see :class:`MiMForPreTraining`).
        segmentation_feature_size: Width ``F`` of the segmentation decoder; ``None``: ``embed_dims[3] // 8`` (the
            stage-4 map enters the decoder unprojected, so it needs ``8 F`` channels).
        normalize_features: Pass the fine-tuning encoder's maps through a parameter-free channel LayerNorm
            (eps 1e-5) before handing them out, as the segmentation network does.
        initializer_range: Std of the normal initialisation of new weights (mask token, heads).
    """

    model_type = "mim"

    image_size: int | list[int] | tuple[int, ...] = (96, 96, 96)
    num_channels: int = 1
    embed_dims: list[int] | tuple[int, ...] = (48, 96, 192, 384)
    depths: list[int] | tuple[int, ...] = (2, 2, 2, 11)
    num_attention_heads: int = 12
    mlp_ratios: list[float] | list[int] | tuple[float, ...] = (4, 4, 4, 4)
    patch_sizes: list[int] | tuple[int, ...] = (2, 2, 2, 2)
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    conv_layer_norm_eps: float = 1e-5
    fpn_hidden_size: int = 768
    use_absolute_position_embeddings: bool = True
    use_relative_position_bias: bool = True
    layer_scale_init_value: float | None = 1.0
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    decoder_hidden_size: int = 576
    decoder_num_hidden_layers: int = 8
    decoder_num_attention_heads: int = 16
    decoder_mlp_ratio: float = 4
    norm_pix_loss: bool = True
    mask_ratio_up: float = 0.5
    mask_ratio_mid: float = 0.6
    mask_ratio_down: float = 0.5
    num_mid_volumes: int = 4
    num_down_patches: int = 4
    loss_weights: list[float] | tuple[float, ...] = (1.0, 1.0, 1.0, 0.1, 0.1)
    loss_weight_mode: str = "concurrent"
    alignment: str = "released"
    segmentation_feature_size: int | None = None
    normalize_features: bool = True
    initializer_range: float = 0.02

    # Stored as lists however they are given (at construction, as from_pretrained overrides, by assignment).
    _LIST_FIELDS = ("image_size", "embed_dims", "depths", "patch_sizes", "mlp_ratios", "loss_weights")

    def __setattr__(self, name, value):
        if name == "image_size" and _is_int(value):
            value = [int(value)] * 3
        elif name in MiMConfig._LIST_FIELDS and isinstance(value, tuple):
            value = list(value)
        super().__setattr__(name, value)

    def __post_init__(self, **kwargs):
        self._check_fields()
        self.image_size = [int(v) for v in self.image_size]
        self.embed_dims = [int(v) for v in self.embed_dims]
        self.depths = [int(v) for v in self.depths]
        self.patch_sizes = [int(v) for v in self.patch_sizes]
        self.mlp_ratios = [int(v) if _is_int(v) else float(v) for v in self.mlp_ratios]
        self.loss_weights = [float(v) for v in self.loss_weights]
        _check_labels(self, kwargs.get("num_labels"), before_init=True)
        super().__post_init__(**kwargs)
        _check_labels(self)
        self.validate_architecture()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """transformers' ``from_dict``, then the checks of construction again: ``from_pretrained`` sets its keyword
        overrides after construction, and they are checked here rather than when a model is built.

        A ``num_labels`` other than the saved ``id2label``'s count is a new head, whose classes get new names (as
        transformers does); with an ``id2label`` given beside it, the two must agree.

        Raises:
            InvalidConfigError: A saved field or an override the config refuses (naming it).
        """
        given = kwargs.get("num_labels")
        if given is not None:
            _check_labels(cls, given, before_init=True)  # an integer >= 1 (a class has no id2label)
            names = kwargs.get("id2label")
            if isinstance(names, dict) and len(names) != given:
                raise InvalidConfigError(
                    f"num_labels={given!r} disagrees with id2label, which names {len(names)} classes; give one of "
                    "them, or make them agree"
                )
            saved = config_dict.get("id2label")
            if isinstance(saved, dict) and len(saved) != given:  # a new head: its classes get new names
                config_dict = {k: v for k, v in config_dict.items() if k not in ("id2label", "label2id")}
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        if isinstance(config, MiMConfig):
            _check_labels(config, given)
            config.validate_architecture()
        return result

    # --- checks ----------------------------------------------------------------------------------------

    def _check_fields(self) -> None:
        _int_list(self.image_size, "image_size", 3)
        _int_list(self.embed_dims, "embed_dims", 4)
        _int_list(self.depths, "depths", 4, minimum=0)
        _int_list(self.patch_sizes, "patch_sizes", 4)
        if self.depths[3] < 1:
            raise InvalidConfigError(f"depths[3] (transformer blocks) must be >= 1; got {self.depths}")
        ratios = self.mlp_ratios
        if (
            not isinstance(ratios, list | tuple)
            or len(ratios) != 4
            or not all(_is_real(r) and r > 0 for r in ratios)
        ):
            raise InvalidConfigError(f"mlp_ratios must be a list of 4 numbers > 0; got {_describe(ratios)}")
        for name in (
            "num_channels",
            "num_attention_heads",
            "fpn_hidden_size",
            "decoder_hidden_size",
            "decoder_num_hidden_layers",
            "decoder_num_attention_heads",
            "num_mid_volumes",
            "num_down_patches",
        ):
            _positive_int(getattr(self, name), name)
        for name in (
            "qkv_bias",
            "use_absolute_position_embeddings",
            "use_relative_position_bias",
            "norm_pix_loss",
            "normalize_features",
        ):
            _boolean(getattr(self, name), name)
        _number(self.layer_norm_eps, "layer_norm_eps", 0.0, low_open=True)
        _number(self.conv_layer_norm_eps, "conv_layer_norm_eps", 0.0, low_open=True)
        _number(self.drop_path_rate, "drop_path_rate", 0.0, 1.0)
        _number(self.attention_dropout, "attention_dropout", 0.0, 1.0)
        _number(self.decoder_mlp_ratio, "decoder_mlp_ratio", 0.0, low_open=True)
        _number(self.initializer_range, "initializer_range", 0.0)
        for name in ("mask_ratio_up", "mask_ratio_mid", "mask_ratio_down"):
            _number(getattr(self, name), name, 0.0, 1.0)
        if self.layer_scale_init_value is not None:
            _number(self.layer_scale_init_value, "layer_scale_init_value", -math.inf)
        if self.segmentation_feature_size is not None:
            _positive_int(self.segmentation_feature_size, "segmentation_feature_size")
        weights = self.loss_weights
        if (
            not isinstance(weights, list | tuple)
            or len(weights) != 5
            or not all(_is_real(w) and w >= 0 for w in weights)
        ):
            raise InvalidConfigError(
                f"loss_weights must be 5 finite numbers >= 0 (up, mid, down, up-mid, mid-down); got {_describe(weights)}"
            )
        if self.loss_weight_mode not in MIM_LOSS_WEIGHT_MODES:
            raise InvalidConfigError(
                f"loss_weight_mode must be one of {MIM_LOSS_WEIGHT_MODES}; got {_describe(self.loss_weight_mode)}"
            )
        if self.alignment not in MIM_ALIGNMENTS:
            raise InvalidConfigError(
                f"alignment must be one of {MIM_ALIGNMENTS}; got {_describe(self.alignment)}"
            )
        if not isinstance(self.hidden_act, str):
            raise InvalidConfigError(
                f"hidden_act must be an activation name; got {_describe(self.hidden_act)}"
            )

    def validate_architecture(self) -> None:
        """Check each field's type and range, and the combinations every MiM model relies on.

        Runs on construction and when a model is built. The pre-training model checks more
        (:meth:`check_pretraining`).

        Raises:
            InvalidConfigError: Naming the field, its value and what is allowed.
        """
        self._check_fields()
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            raise InvalidConfigError(
                f"hidden_act {self.hidden_act!r} is not an activation transformers knows"
            )
        stride = self.total_stride
        if any(n % stride for n in self.image_size):
            raise InvalidConfigError(
                f"image_size {self.image_size} must be a multiple of the total patch stride prod(patch_sizes) = {stride} "
                "on every axis"
            )
        width = self.hidden_size
        if width % self.num_attention_heads:
            raise InvalidConfigError(
                f"num_attention_heads {self.num_attention_heads} does not divide embed_dims[3] = {width}"
            )
        for stage, (dim, ratio, depth) in enumerate(zip(self.embed_dims, self.mlp_ratios, self.depths)):
            if depth and int(dim * ratio) < 1:
                raise InvalidConfigError(
                    f"mlp_ratios[{stage}] = {ratio} gives stage {stage + 1} (width {dim}) an MLP of int({dim} x {ratio}) "
                    "= 0 hidden units; use a ratio of at least 1 / width"
                )
        if self.use_absolute_position_embeddings and width % 6:
            raise InvalidConfigError(
                f"embed_dims[3] = {width} must be divisible by 6 for the 3D sin-cos position table (a sin and a cos "
                "half for each of three axes); or set use_absolute_position_embeddings=False"
            )

    def check_segmentation(self) -> None:
        """The extra rule of the segmentation network, checked when it is built.

        Raises:
            InvalidConfigError: ``8 * feature_size != embed_dims[3]``, a stage that does not halve the grid, or an
                ``image_size`` (the window the pipelines run the network on) that is not a multiple of twice the
                patch stride or leaves the fpn map a single voxel.
        """
        self.validate_architecture()
        if list(self.patch_sizes) != [2, 2, 2, 2]:
            raise InvalidConfigError(
                f"patch_sizes {list(self.patch_sizes)}: the segmentation decoder takes the stage maps at strides 2, "
                "4, 8 and 16 (and the fpn at 32), so every stage must halve the grid: patch_sizes [2, 2, 2, 2]"
            )
        window = 2 * self.total_stride
        if any(n % window for n in self.image_size):
            raise InvalidConfigError(
                f"image_size {list(self.image_size)}: the segmentation network runs on windows of image_size, whose "
                f"fpn map (stride {window}) needs every axis to be a multiple of {window}"
            )
        if math.prod(n // window for n in self.image_size) < 2:
            raise InvalidConfigError(
                f"image_size {list(self.image_size)} leaves the segmentation network's fpn map a single voxel, which "
                f"instance norm cannot normalise; use at least {2 * window} on one axis (e.g. image_size "
                f"{[2 * window, *self.image_size[1:]]})"
            )
        width = self.hidden_size
        if self.feature_size * 8 != width:
            raise InvalidConfigError(
                f"segmentation_feature_size {self.feature_size} must be embed_dims[3] / 8 = {width / 8:g}: the stage-4 "
                "map enters the segmentation decoder without a projection, which expects 8 * feature_size channels"
            )

    def check_pretraining(self) -> None:
        """The extra rules of MiM pre-training (spec §2.2), checked when :class:`MiMForPreTraining` is built.

        Raises:
            InvalidConfigError: The token grid cannot be cut into 8 groups, a mask ratio leaves part of a group,
                more volumes or patches are sampled than exist, the decoder width does not suit its heads or
                the sin-cos table, or the released alignment's reshape would fail.
        """
        self.validate_architecture()
        tokens = self.num_tokens
        if tokens % 8:
            raise InvalidConfigError(
                f"pre-training masks the up level in 8 groups of consecutive tokens, so the token grid "
                f"{self.token_grid} ({tokens} tokens) must hold a multiple of 8 tokens"
            )
        group = tokens // 8
        keep = int(tokens * (1 - self.mask_ratio_up))
        if keep % group:
            raise InvalidConfigError(
                f"mask_ratio_up {self.mask_ratio_up} keeps {keep} of {tokens} tokens, not a whole number of groups of "
                f"{group}; choose a ratio that is a multiple of 1/8"
            )
        for name in ("mask_ratio_up", "mask_ratio_mid", "mask_ratio_down"):
            if int(tokens * (1 - getattr(self, name))) < 1:
                raise InvalidConfigError(f"{name} {getattr(self, name)} leaves no visible token of {tokens}")
        if self.num_mid_volumes > 8:
            raise InvalidConfigError(
                f"num_mid_volumes must be at most 8 (the octants of a crop); got {self.num_mid_volumes}"
            )
        if self.num_down_patches > tokens:
            raise InvalidConfigError(
                f"num_down_patches must be at most the {tokens} patches of a mid volume; got {self.num_down_patches}"
            )
        if self.alignment == "released" and self.num_mid_volumes > self.num_down_patches:
            raise InvalidConfigError(
                "alignment='released' reshapes the down features by num_down_patches rows per sample (upstream "
                f"assumes num_down_patches == num_mid_volumes) and needs num_mid_volumes ({self.num_mid_volumes}) <= "
                f"num_down_patches ({self.num_down_patches}); use alignment='paper' otherwise"
            )
        if int(self.decoder_hidden_size * self.decoder_mlp_ratio) < 1:
            raise InvalidConfigError(
                f"decoder_mlp_ratio {self.decoder_mlp_ratio} gives the decoder (width {self.decoder_hidden_size}) an MLP "
                "of 0 hidden units; use a ratio of at least 1 / decoder_hidden_size"
            )
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise InvalidConfigError(
                f"decoder_num_attention_heads {self.decoder_num_attention_heads} does not divide decoder_hidden_size "
                f"{self.decoder_hidden_size}"
            )
        for name in ("hidden_size", "decoder_hidden_size"):
            if getattr(self, name) % 6:
                raise InvalidConfigError(
                    f"{'embed_dims[3]' if name == 'hidden_size' else name} = {getattr(self, name)} must be divisible "
                    "by 6 for the pre-training 3D sin-cos position table"
                )

    # --- derived sizes -------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        """Width of the stage-4 tokens (``embed_dims[3]``)."""
        return self.embed_dims[3]

    @property
    def num_hidden_layers(self) -> int:
        """Transformer blocks of stage 4 (``depths[3]``)."""
        return self.depths[3]

    @property
    def total_stride(self) -> int:
        """Voxels per token along each axis: ``prod(patch_sizes)`` (16 upstream)."""
        return math.prod(self.patch_sizes)

    @property
    def token_grid(self) -> list[int]:
        """The stage-4 token grid of an ``image_size`` input."""
        return [n // self.total_stride for n in self.image_size]

    @property
    def num_tokens(self) -> int:
        """Tokens of an ``image_size`` input."""
        return math.prod(self.token_grid)

    @property
    def crop_size(self) -> list[int]:
        """Pre-training crop: ``2 * image_size`` (192^3 upstream)."""
        return [2 * n for n in self.image_size]

    @property
    def feature_size(self) -> int:
        """Width ``F`` of the segmentation decoder."""
        if self.segmentation_feature_size is not None:
            return int(self.segmentation_feature_size)
        return self.embed_dims[3] // 8
