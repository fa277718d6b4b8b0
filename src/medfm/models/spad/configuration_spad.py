"""Configurations of SPAD-ViT and SPAD-VT (PUMIT; Luo et al., arXiv 2312.07630).

Defaults are the released base sizes (`shared/specs/spad.md`).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

__all__ = ["SpadVTConfig", "SpadViTConfig"]


def _three(value: int | list[int] | tuple[int, ...], name: str) -> list[int]:
    values = [int(value)] * 3 if isinstance(value, int) else [int(v) for v in value]
    if len(values) != 3 or any(v < 1 for v in values):
        raise ValueError(f"{name} must be a positive int or three positive ints; got {value!r}")
    return values


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
        self.rope_base = [float(b) for b in self.rope_base]
        self.rope_rescale_shape = [int(r) for r in self.rope_rescale_shape]
        if self.out_indices is None:
            self.out_indices = default_out_indices(self.num_hidden_layers)
        self.out_indices = [int(i) for i in self.out_indices]
        self.decoder_lateral_channels = [int(c) for c in self.decoder_lateral_channels]
        self.decoder_full_res_channels = [int(c) for c in self.decoder_full_res_channels]
        if self.mask_layer_ids is not None:
            self.mask_layer_ids = [int(i) for i in self.mask_layer_ids]
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        """Check the combinations the model relies on.

        Raises:
            ValueError: With what is inconsistent.
        """
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads"
            )
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError(
                "head size (hidden_size / num_attention_heads) must be a multiple of 4 for 3D RoPE"
            )
        if self.adaptive_patch_embed:
            size = self.patch_size[0]
            if self.patch_size != [size] * 3 or size & (size - 1):
                raise ValueError(
                    f"an adaptive patch embedding needs an isotropic power-of-2 patch; got {self.patch_size}"
                )
        if any(not 0 <= i < self.num_hidden_layers for i in self.out_indices):
            raise ValueError(
                f"out_indices {self.out_indices} must name blocks in [0, {self.num_hidden_layers})"
            )
        if len(self.out_indices) != 4 or len(self.decoder_lateral_channels) != 4:
            raise ValueError("the segmentation adapter taps exactly 4 blocks with 4 lateral widths")
        if self.mask_layer_ids is not None and any(
            not 0 <= i < self.num_hidden_layers for i in self.mask_layer_ids
        ):
            raise ValueError(
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
        self.downsample_channels = [int(c) for c in self.downsample_channels]
        self.upsample_channels = [int(c) for c in self.upsample_channels]
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        if self.start_stride & (self.start_stride - 1):
            raise ValueError(f"start_stride must be a power of 2; got {self.start_stride}")
        if self.upsample_channels[-1] != self.embedding_dim:
            raise ValueError(
                "upsample_channels[-1] must equal embedding_dim (the decoder starts from the codes)"
            )
        if len(self.downsample_channels) != len(self.upsample_channels):
            raise ValueError("downsample_channels and upsample_channels need the same number of levels")

    @property
    def total_stride(self) -> int:
        return self.start_stride * 2 ** (len(self.downsample_channels) - 1)
