"""Converting PUMIT checkpoints to medfm, and adapting pre-trained weights at load time.

Two things live here:

* **Load-time adaptation** (spec §b, "Non-adaptive use"): a pre-trained SPAD-ViT has a ``(E, 3, 16, 16, 16)``
  adaptive patch kernel and a ``(5, 10, 10)`` position table. Loading it into a config with a fixed
  ``patch_size``, other ``in_channels`` or another ``pos_embed_shape`` sums depth taps, folds input channels
  and resamples the table exactly as upstream does, through transformers' weight-conversion hooks, so
  ``SpadViTForSemanticSegmentation.from_pretrained(path, patch_size=(4, 16, 16), in_channels=1, ...)`` works.
* **Checkpoint conversion**: reading an upstream Lightning/Fabric checkpoint (or a plain state dict),
  inferring the config from tensor shapes, and writing a folder ``AutoModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointMismatchError, InvalidConfigError, UnsupportedFormatError
from ...layers import resample_position_grid
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
)
from ..conversion_utils import _safe_globals as _shared_safe_globals
from .configuration_spad import SpadViTConfig, SpadVTConfig
from .spad_conv import merge_depth_taps

__all__ = [
    "adapt_patch_embedding",
    "convert_spad_checkpoint",
    "convert_tokenizer_state_dict",
    "convert_vit_state_dict",
    "infer_tokenizer_config",
    "infer_vit_config",
    "load_original_state_dict",
    "register_spad_weight_adaptation",
]

#: Upstream keys that only the MIM pre-training model has.
MIM_ONLY_PREFIXES = ("mask_token", "mim_head.")
# Buffers upstream may carry that are recomputed here.
_DROPPED = re.compile(r"^(tokenizer\.|rope\.|input_norm_)")


# --- load-time adaptation --------------------------------------------------------------------------


def adapt_patch_embedding(weight: torch.Tensor, patch_size: list[int], in_channels: int) -> torch.Tensor:
    """Upstream's conversion of an adaptive ``(E, C, P, P, P)`` patch kernel to a fixed patch and channel count.

    Depth taps are summed into ``patch_size[0]`` groups; for another channel count the kernel is summed over
    its channels, divided by the new count and repeated (``c = 1``: the plain sum of the RGB kernels).
    """
    if tuple(weight.shape[3:]) != tuple(patch_size[1:]):
        raise ValueError(
            f"cannot adapt a patch kernel of in-plane size {tuple(weight.shape[3:])} to {tuple(patch_size[1:])}"
        )
    weight = merge_depth_taps(weight, patch_size[0])
    if weight.shape[1] != in_channels:
        weight = (weight.sum(dim=1, keepdim=True) / in_channels).repeat(1, in_channels, 1, 1, 1)
    return weight


class AdaptPatchEmbedding(LoadTimeAdaptation):
    """Weight-loading op: :func:`adapt_patch_embedding` to the target config (a no-op when shapes agree)."""

    def adapt(self, weight: torch.Tensor, config: SpadViTConfig) -> torch.Tensor:
        """The kernel for ``config``'s patch and channel count."""
        if tuple(weight.shape) != (config.hidden_size, config.in_channels, *config.patch_size):
            weight = adapt_patch_embedding(weight, config.patch_size, config.in_channels)
        return weight


class ResamplePositionTable(LoadTimeAdaptation):
    """Weight-loading op: resample ``pos_embed`` to ``config.pos_embed_shape`` (area down, then trilinear up)."""

    def adapt(self, table: torch.Tensor, config: SpadViTConfig) -> torch.Tensor:
        """The table on ``config.pos_embed_shape``."""
        if list(table.shape[2:]) != list(config.pos_embed_shape):
            table = resample_position_grid(table, config.pos_embed_shape)
        return table


def register_spad_weight_adaptation() -> None:
    """Hook the adaptation into ``from_pretrained`` for every ``spad_vit`` model (idempotent)."""
    register_load_time_adaptation(
        "spad_vit",
        [("patch_embed.proj.weight", AdaptPatchEmbedding()), ("pos_embed", ResamplePositionTable())],
    )


# --- reading original checkpoints -------------------------------------------------------------------
# Shared by every family's converter (``conversion_utils``); imported here for compatibility.

_safe_globals = _shared_safe_globals


# --- key mapping and config inference ----------------------------------------------------------------


def convert_vit_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream ``ViTForMIM``/``ViT`` keys to :class:`SpadViTForMaskedImageModeling` keys.

    The backbone and ``mask_token`` move under ``spad_vit.``; ``mim_head.*`` stays; tokenizer weights and
    recomputed buffers are dropped.
    """
    converted = {}
    for key, value in state.items():
        if _DROPPED.match(key):
            continue
        converted[key if key.startswith("mim_head.") else f"spad_vit.{key}"] = value.contiguous()
    return converted


def convert_tokenizer_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream ``SimpleVQTokenizer`` keys to :class:`SpadVTModel` keys (the encoder LayerNorms lose a level)."""
    return {re.sub(r"^encoder\.(\d+)\.1\.", r"encoder.\1.", k): v.contiguous() for k, v in state.items()}


def _heads_for(width: int) -> int | None:
    return {768: 12, 1024: 16, 384: 6, 192: 3}.get(width)


#: Tensors :func:`infer_vit_config` and :func:`infer_tokenizer_config` read.
VIT_REQUIRED_KEYS = ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.mlp.w1.weight")
TOKENIZER_REQUIRED_KEYS = ("encoder.0.weight", "quantize.embedding.weight")


def infer_vit_config(
    state: dict[str, torch.Tensor],
    overrides: dict[str, Any] | None = None,
    source: str | os.PathLike | None = None,
) -> SpadViTConfig:
    """A :class:`SpadViTConfig` from upstream tensor shapes; ``overrides`` supply what shapes cannot tell.

    Args:
        state: Upstream ViT weights.
        overrides: Config fields (``--config``).
        source: The checkpoint, named in errors.

    Raises:
        CheckpointMismatchError: A tensor the inference reads is missing or has an unusable shape.
        InvalidConfigError: The number of heads cannot be inferred and is not in ``overrides``, or the
            resulting config is invalid (heads that do not divide the width...).
    """
    overrides = {} if overrides is None else overrides
    check_config_fields(SpadViTConfig, overrides)
    overrides = dict(overrides)
    require_keys(state, VIT_REQUIRED_KEYS, source, "SPAD-ViT")
    patch = state["patch_embed.proj.weight"]
    blocks = [int(k.split(".")[1]) for k in state if re.match(r"blocks\.\d+\.", k)]
    if patch.ndim != 5 or state["cls_token"].ndim != 3 or state["pos_embed"].ndim != 5:
        raise CheckpointMismatchError(
            f"unusable shapes: patch_embed.proj.weight {tuple(patch.shape)} (expected 5 dims), cls_token "
            f"{tuple(state['cls_token'].shape)} (3 dims), pos_embed {tuple(state['pos_embed'].shape)} (5 dims)",
            source,
        )
    width = int(state["cls_token"].shape[-1])
    depth = 1 + max(blocks)
    absent = sorted(set(range(depth)) - set(blocks))
    if absent:
        raise CheckpointMismatchError(
            f"blocks {absent} are missing (the checkpoint has up to block {depth - 1})", source
        )
    inferred: dict[str, Any] = {
        "hidden_size": width,
        "in_channels": int(patch.shape[1]),
        "num_hidden_layers": depth,
        "intermediate_size": int(state["blocks.0.mlp.w1.weight"].shape[0]),
        "pos_embed_shape": list(state["pos_embed"].shape[2:]),
        "qkv_bias": "blocks.0.attn.q_bias" in state,
    }
    kernel = list(patch.shape[2:])
    inferred["patch_size"] = kernel
    inferred["adaptive_patch_embed"] = kernel[0] == kernel[1] == kernel[2]
    if "mim_head.2.weight" in state:
        inferred["codebook_size"] = int(state["mim_head.2.weight"].shape[0])
    heads = overrides.get("num_attention_heads", _heads_for(width))
    if heads is None:
        raise InvalidConfigError(
            f"cannot infer the number of attention heads for width {width}; pass it in the config overrides "
            "(e.g. --config '{\"num_attention_heads\": 4}')",
            source,
        )
    inferred["num_attention_heads"] = heads
    if depth == 24 and "mask_layer_ids" not in overrides:
        inferred["mask_layer_ids"] = list(range(18, 24))
    inferred.update(overrides)
    return build_config(SpadViTConfig, inferred, source)


def infer_tokenizer_config(
    state: dict[str, torch.Tensor],
    overrides: dict[str, Any] | None = None,
    source: str | os.PathLike | None = None,
) -> SpadVTConfig:
    """A :class:`SpadVTConfig` from (converted) tokenizer tensor shapes.

    Raises:
        CheckpointMismatchError: The tensors are not a SPAD-VT tokenizer's.
        InvalidConfigError: The resulting config is invalid.
    """
    check_config_fields(SpadVTConfig, overrides or {}, "tokenizer config")
    require_keys(state, TOKENIZER_REQUIRED_KEYS, source, "SPAD-VT tokenizer")
    try:
        first = state["encoder.0.weight"]
        # Encoder downsampling convs sit at 0, 3, 6, ... (conv, norm, activation) until the first 3x3x3 conv.
        down = []
        for index in range(0, 3 * 16, 3):
            weight = state.get(f"encoder.{index}.weight")
            if weight is None or weight.shape[-1] == 3:
                break
            down.append(int(weight.shape[0]))
        # Decoder up-blocks go from the coarsest width down; the last transposed conv starts at the finest.
        blocks = sorted(
            (int(m.group(1)), v)
            for k, v in state.items()
            if (m := re.match(r"decoder\.(\d+)\.transposed_conv\.weight$", k))
        )
        last = max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.(\d+)\.weight$", k)))
        up = [int(state[f"decoder.{last}.weight"].shape[0])] + [int(w.shape[0]) for _, w in reversed(blocks)]
        config: dict[str, Any] = {
            "in_channels": int(first.shape[1]),
            "start_stride": int(first.shape[-1]),
            "downsample_channels": down,
            "upsample_channels": up,
            "codebook_size": int(state["quantize.embedding.weight"].shape[0]),
            "embedding_dim": int(state["quantize.embedding.weight"].shape[1]),
        }
    except (KeyError, IndexError, ValueError) as error:  # max() of no decoder conv, a tensor of too few dims
        raise CheckpointMismatchError(
            f"not a SPAD-VT tokenizer checkpoint: cannot infer its config ({type(error).__name__}: {error})",
            source,
        ) from None
    config.update(overrides or {})
    return build_config(SpadVTConfig, config, source)


# --- the conversion -------------------------------------------------------------------------------------


def convert_spad_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    config_overrides: dict[str, Any] | None = None,
    trust_checkpoint: bool = False,
    reference: str | os.PathLike | None = None,
) -> Path:
    """Convert an upstream SPAD-ViT checkpoint (and optionally the SPAD-VT tokenizer) to a medfm folder.

    Writes ``config.json``, ``model.safetensors``, ``preprocessor_config.json``, a ``README.md`` model card and
    ``conversion.json`` to ``output``; the tokenizer goes to ``output/tokenizer`` (load it with
    ``SpadVTModel.from_pretrained(output, subfolder="tokenizer")``). A checkpoint with the MIM head is
    written as :class:`SpadViTForMaskedImageModeling` (``AutoModel`` loads its backbone).

    Everything is read and checked before anything is written, and the folder is written next to ``output``
    and renamed into place when complete (see :func:`~medfm.models.conversion_utils.atomic_output_folder`):
    a failure leaves no partial folder. ``output`` may be new, empty, or a previous conversion (replaced).

    Args:
        checkpoint: Upstream ViT checkpoint (``pumit-b.ckpt``), ``.pth`` or ``.safetensors`` state dict.
        output: Output folder (created).
        tokenizer: Upstream tokenizer checkpoint (``simple-soft.ckpt``).
        config_overrides: Config fields shapes cannot tell (``num_attention_heads`` for unusual widths...).
        trust_checkpoint: See :func:`load_original_state_dict`.
        reference: Outputs of the original code on this checkpoint, to verify the conversion: a
            ``.safetensors`` file with ``pixel_values`` (the backbone's input), ``spacing`` (optional) and
            ``last_hidden_state`` (the original backbone's final-normed output). The card states parity
            only when it was checked this way.

    Returns:
        The output folder.

    Raises:
        VolumeNotFoundError, CorruptFileError, UnsupportedFormatError: A checkpoint is missing, unreadable
            (truncated) or of an unknown kind.
        NonFiniteWeightsError: A checkpoint holds NaN/Inf weights.
        CheckpointMismatchError: Missing or unexpected tensors, or tensors of the wrong shape.
        InvalidConfigError: ``config_overrides`` is not a mapping, names unknown fields, or gives an invalid
            config (heads that do not divide the width...).
        OutputPathError, OverwriteInputError: ``output`` is a file, a non-empty folder that is no conversion,
            or holds an input.
        OutputWriteError: Writing failed (disk full...).
        ValueError: The converted model does not reproduce ``reference`` (within 1e-4), or the reference file
            lacks a key.
    """
    from ...hub import write_model_card
    from ...processing import MedicalImageProcessor
    from .modeling_spad import SpadViTForMaskedImageModeling, SpadViTModel
    from .modeling_spad_vt import SpadVTModel

    output = Path(output)
    inputs = (checkpoint, tokenizer, reference)
    check_output_folder(output, inputs)  # fail early, before the slow part
    original = load_original_state_dict(checkpoint, trust_checkpoint=trust_checkpoint)
    if "patch_embed.proj.weight" not in original:
        raise UnsupportedFormatError("not a SPAD-ViT checkpoint (no patch_embed.proj.weight)", checkpoint)
    config = infer_vit_config(original, config_overrides, checkpoint)
    has_mim_head = any(k.startswith(MIM_ONLY_PREFIXES) for k in original)
    model_class = SpadViTForMaskedImageModeling if has_mim_head else SpadViTModel
    state = convert_vit_state_dict(original)
    if not has_mim_head:
        state = {k.removeprefix("spad_vit."): v for k, v in state.items()}
    model = _load_strict(model_class(config), state, checkpoint)
    parity = _verify_against_reference(model, reference) if reference is not None else None
    tokenizer_model = None
    if tokenizer is not None:
        tokenizer_state = convert_tokenizer_state_dict(load_original_state_dict(tokenizer, trust_checkpoint))
        tokenizer_model = _load_strict(
            SpadVTModel(infer_tokenizer_config(tokenizer_state, source=tokenizer)), tokenizer_state, tokenizer
        )
    with atomic_output_folder(output, inputs) as folder:
        model.save_pretrained(folder)
        MedicalImageProcessor.from_preset("spad-pretrain").save_pretrained(folder)
        extra = {"source_checkpoint": Path(checkpoint).name}
        if parity is not None:
            extra["parity_statement"] = (
                f"The conversion was verified against the original code's outputs given to the converter "
                f"(`{Path(reference).name}`): max abs error {parity:.2e} on the final hidden states "
                "(tolerance 1e-4)."
            )
        write_model_card("spad-vit-base", folder, base_model=None, repo_id=output.name, extra=extra)
        if tokenizer_model is not None:
            tokenizer_model.save_pretrained(folder / "tokenizer")
            MedicalImageProcessor.from_preset("spad-vt").save_pretrained(folder / "tokenizer")
            write_model_card(
                "spad-vt",
                folder / "tokenizer",
                base_model=None,
                repo_id=output.name,
                extra={
                    "model_name": f"{output.name} tokenizer (SPAD-VT)",
                    "source_checkpoint": Path(tokenizer).name,
                    "subfolder_argument": ', subfolder="tokenizer"',
                },
            )
        (folder / CONVERSION_MARKER).write_text(
            json.dumps(
                {
                    "source": Path(checkpoint).name,
                    "tokenizer": Path(tokenizer).name if tokenizer else None,
                    "model_class": model_class.__name__,
                    "num_tensors": len(state),
                    "verified_max_abs_error": parity,
                },
                indent=2,
            )
        )
    return output


def _verify_against_reference(model: torch.nn.Module, reference: str | os.PathLike) -> float:
    """The max abs error of the converted backbone against the original code's outputs in ``reference``."""
    from safetensors.torch import load_file

    tensors = load_file(str(reference))
    missing = sorted({"pixel_values", "last_hidden_state"} - set(tensors))
    if missing:
        raise UnsupportedFormatError(f"reference outputs lack {missing}", reference)
    backbone = getattr(model, "spad_vit", model)
    with torch.no_grad():
        out = backbone(tensors["pixel_values"], spacing=tensors.get("spacing")).last_hidden_state
    expected = tensors["last_hidden_state"]
    if out.shape != expected.shape:
        raise ValueError(
            f"{reference}: reference last_hidden_state {tuple(expected.shape)} vs {tuple(out.shape)}"
        )
    error = float((out - expected).abs().max())
    if not error <= 1e-4:
        raise ValueError(
            f"{reference}: the converted model does not reproduce the original outputs (max abs error {error:.3g} "
            "> 1e-4); check the config overrides (--config)"
        )
    return error


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike):
    """:func:`~medfm.models.conversion_utils.load_state_dict_strict`, the tokenizer buffers allowed missing."""
    return load_state_dict_strict(model, state, source, ignore_missing_prefixes=("tokenizer.",))
