"""The model contract: what medfm's pipelines and training loop may rely on in any family's model.

Pipelines and the loop never look inside a model (no ``pyramid`` attribute, no "cls token at index 0"):
they ask the model, through :class:`MedfmModelMixin`, which inputs it takes and what it returns. A family
whose classes derive from :class:`MedfmPreTrainedModel` (or, for a model built on a transformers class such
as ``ResNetModel``, mix :class:`MedfmModelMixin` into its subclass) works with every pipeline, the
fine-tuning examples and the pre-training loop without them naming it.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_utils import PreTrainedModel

__all__ = [
    "ADAPTER_BASE_MODEL_KEY",
    "InferredContract",
    "MedfmModelMixin",
    "MedfmPreTrainedModel",
    "adapter_base_model",
    "as_volume",
    "checkpoint_shapes",
    "classification_loss",
    "model_contract",
    "unwrap_model",
]


def classification_loss(
    loss_function: Callable[..., torch.Tensor], config: Any, logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """transformers' image-classification loss (``model.loss_function``), with the problem type decided per
    call and the labels cast to what it needs.

    The problem is ``config.problem_type`` when set; otherwise regression for one label, single-label
    classification for integer labels, multi-label for float ones. transformers' loss would write the type it
    guessed into the model's config (so the first batch fixed it for good) and expects float targets for BCE
    and MSE; here the config is left as it is and integer 0/1 targets work for multi-label.
    """
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    settled = copy.copy(config)  # shallow: only problem_type differs
    settled.problem_type = problem
    if problem != "single_label_classification":
        labels = labels.to(logits.dtype)
    return loss_function(labels, logits, settled)


def classifier_output(model: Any, logits: torch.Tensor, labels: torch.Tensor | None, outputs: Any) -> Any:
    """An ``ImageClassifierOutput``: ``logits``, their loss against ``labels`` (:func:`classification_loss`, none
    without labels) and the backbone ``outputs``' hidden states and attentions."""
    from transformers.modeling_outputs import ImageClassifierOutput

    loss = (
        classification_loss(model.loss_function, model.config, logits, labels) if labels is not None else None
    )
    return ImageClassifierOutput(
        loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
    )


def as_volume(pixel_values: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(B, C, D, H, W)`` for a volume batch or, for a ``(B, C, H, W)`` image batch, its one-slice volume; and
    whether the input was 2D (so outputs can drop the slice axis again).

    Raises:
        ValueError: Neither 4 nor 5 dimensions.
    """
    if pixel_values.ndim == 4:
        return pixel_values.unsqueeze(2), True
    if pixel_values.ndim != 5:
        raise ValueError(
            f"pixel_values must be (B, C, D, H, W) or (B, C, H, W); got {tuple(pixel_values.shape)}"
        )
    return pixel_values, False


class MedfmModelMixin:
    """The contract every medfm model class fulfils.

    Class attributes:
        input_spatial_dims: The spatial dimensionalities the forward accepts: ``(3,)`` for volumes
            ``(B, C, D, H, W)``, ``(2,)`` for images ``(B, C, H, W)``, ``(2, 3)`` for both.
        accepts_spacing: Whether the forward takes ``spacing=(z, y, x)`` mm (``(3,)`` or ``(B, 3)``).
        pooling: How ``pooler_output`` is made: ``"cls"`` (a prefix token) or ``"mean"`` (mean of the patch
            tokens, for families without a cls token).
        channels_config_key: The config field holding the number of input channels.
        input_size_config_key: The config field holding the input window ``(D, H, W)`` the model is built
            for, for families whose position tables are sized to it (MiM's ``image_size``); ``None`` for
            families that take any size. Fine-tuning sets it to the training crop, and inference windows
            default to it.
    """

    input_spatial_dims: ClassVar[tuple[int, ...]] = (3,)
    accepts_spacing: ClassVar[bool] = False
    pooling: ClassVar[str] = "cls"
    channels_config_key: ClassVar[str] = "in_channels"
    input_size_config_key: ClassVar[str | None] = None

    def preferred_input_shape(self) -> tuple[int, ...] | None:
        """The window ``(D, H, W)`` the model is built for (see ``input_size_config_key``), or ``None``."""
        if self.input_size_config_key is None:
            return None
        return tuple(int(n) for n in getattr(self.config, self.input_size_config_key))

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in ``last_hidden_state`` (1 for a cls token)."""
        return 1 if self.pooling == "cls" else 0

    @property
    def num_input_channels(self) -> int:
        """Channels the model expects (from its config)."""
        return int(getattr(self.config, self.channels_config_key))

    def required_input_multiple(
        self, spacing: Sequence[float] | torch.Tensor | None = None
    ) -> tuple[int, ...]:
        """Each spatial size ``(D, H, W)`` of a volume input must be a multiple of this (a single-slice 2D input
        needs only the in-plane multiple).

        Args:
            spacing: The input's spacing, for models whose patch depends on it (SPAD); ``None``: the most
                demanding case.
        """
        raise NotImplementedError(f"{type(self).__name__} does not state its required input multiple")

    def minimum_input_shape(self, spacing: Sequence[float] | torch.Tensor | None = None) -> tuple[int, ...]:
        """The smallest input ``(D, H, W)`` the model runs on (by default one multiple)."""
        return self.required_input_multiple(spacing)

    def input_padding_step(self) -> dict[str, Any]:
        """The processor step that pads any input to what this model needs (see
        :meth:`medfm.processing.MedicalImageProcessor.padded_for`): the required multiple, background value."""
        return {"name": "pad_to_multiple", "multiple": list(self.required_input_multiple()), "value": "min"}

    def check_input_shape(
        self, shape: Sequence[int], spacing: Sequence[float] | torch.Tensor | None = None
    ) -> None:
        """Raise a ValueError saying what is wrong when the model cannot run on an input of spatial ``shape``
        ``(D, H, W)``: a size that is not a multiple of :meth:`required_input_multiple`, or below
        :meth:`minimum_input_shape`. Models with further rules (a pyramid that needs two voxels at its
        coarsest level) extend it."""
        shape = tuple(int(n) for n in shape)
        multiple = tuple(self.required_input_multiple(spacing))
        minimum = tuple(self.minimum_input_shape(spacing))
        if len(shape) != len(multiple) or any(n % m for n, m in zip(shape, multiple)):
            raise ValueError(f"input size {shape} must be a multiple of {multiple} for {type(self).__name__}")
        if any(n < low for n, low in zip(shape, minimum)):
            raise ValueError(f"input size {shape} is below the minimum {minimum} of {type(self).__name__}")

    def model_inputs(self, pixel_values: torch.Tensor, spacing: torch.Tensor | None = None) -> dict[str, Any]:
        """Forward keyword arguments for ``pixel_values`` (and ``spacing`` where the forward takes it)."""
        inputs: dict[str, Any] = {"pixel_values": pixel_values}
        if self.accepts_spacing and spacing is not None:
            inputs["spacing"] = spacing
        return inputs

    def as_model_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """A processor's ``(B, C, D, H, W)`` batch in the layout the forward takes.

        A 2D-only model gets ``(B, C, H, W)`` (the depth must be 1); other models take the volume as it is.

        Raises:
            ValueError: A 2D-only model given a batch with several slices.
        """
        if self.input_spatial_dims == (2,) and pixel_values.ndim == 5:
            if pixel_values.shape[2] != 1:
                raise ValueError(
                    f"{type(self).__name__} takes 2D images; got a volume of {pixel_values.shape[2]} slices "
                    "(run it slice by slice, as the segmentation pipeline does)"
                )
            return pixel_values[:, :, 0]
        return pixel_values


class MedfmPreTrainedModel(MedfmModelMixin, PreTrainedModel):
    """Base of medfm's own model classes: transformers' :class:`PreTrainedModel` plus the medfm contract."""

    #: Regex whose first group is a block index in the checkpoint's keys (``None``: the family has no blocks).
    layer_key_pattern: ClassVar[str | None] = None
    #: The config field counting those blocks.
    layer_count_field: ClassVar[str] = "num_hidden_layers"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``; a self-contained adapter folder (see :func:`adapter_base_model`)
        also loads as it is: its architecture from its ``config.json``, the base model's weights, its adapter.

        A local checkpoint holding more blocks than the config asks for (``num_hidden_layers=2`` on a 12-block
        model) is refused, since the extra blocks would be silently dropped; pass ``allow_fewer_layers=True``
        to truncate on purpose.
        """
        allow_fewer = bool(kwargs.pop("allow_fewer_layers", False))
        base = adapter_base_model(pretrained_model_name_or_path)
        if base is None:
            try:
                model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            except RuntimeError as error:
                if "ignore_mismatched_sizes" not in str(error):
                    raise
                raise _mismatch_error(cls, pretrained_model_name_or_path, args, kwargs) from error
            if not allow_fewer:
                _check_layer_count(model, pretrained_model_name_or_path)
            return model
        return _load_self_contained_adapter(cls, pretrained_model_name_or_path, base, args, kwargs)


def _mismatch_error(cls: type, source: Any, args: tuple, kwargs: dict[str, Any]) -> Exception:
    """The typed error for a checkpoint whose tensors do not fit the config as overridden, naming them."""
    from ..errors import CheckpointShapeMismatchError

    overrides = {
        k: v for k, v in kwargs.items() if k not in ("ignore_mismatched_sizes", "output_loading_info")
    }
    try:
        _, info = super(MedfmPreTrainedModel, cls).from_pretrained(
            source, *args, **overrides, ignore_mismatched_sizes=True, output_loading_info=True
        )
        mismatched = [
            (str(key), tuple(saved), tuple(shape)) for key, saved, shape in info.get("mismatched_keys", [])
        ]
    except Exception:  # the names are a courtesy; the error stands without them
        mismatched = []
    names = [key for key, _, _ in mismatched]
    listed = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    # An Auto class passes the merged config object; only plain overrides are worth naming.
    shown = ", ".join(f"{k}={v!r}" for k, v in overrides.items() if k != "config")
    return CheckpointShapeMismatchError(
        f"its tensors {listed or '(see the load report above)'} do not fit the config as "
        f"{'overridden (' + shown + ')' if shown else 'given'}; drop the overrides that change the architecture, or "
        "pass ignore_mismatched_sizes=True to initialise those tensors afresh",
        os.fspath(source) if isinstance(source, str | os.PathLike) else None,
        mismatched=mismatched,
    )


def checkpoint_shapes(folder: str | os.PathLike, adapter: bool = False) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors in a folder's ``*.safetensors`` files, read from their headers only: the
    model's weights, or (``adapter``) its ``adapter_*`` files."""
    from pathlib import Path

    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        if path.name.startswith("adapter_") != adapter:
            continue
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _check_layer_count(model: Any, source: Any) -> None:
    """Refuse a model built with fewer blocks than its local checkpoint holds."""
    import re
    from pathlib import Path

    pattern = getattr(model, "layer_key_pattern", None)
    folder = Path(str(source))
    if pattern is None or not folder.is_dir():
        return
    held = {int(m.group(1)) for key in checkpoint_shapes(folder) if (m := re.search(pattern, key))}
    wanted = int(getattr(model.config, model.layer_count_field, 0) or 0)
    if held and max(held) + 1 > wanted:
        from ..errors import InvalidConfigError

        raise InvalidConfigError(
            f"the checkpoint holds {max(held) + 1} blocks but {model.layer_count_field}={wanted} would drop "
            f"{max(held) + 1 - wanted} of them; pass allow_fewer_layers=True to truncate on purpose",
            str(source),
        )


class InferredContract(MedfmModelMixin):
    """The contract of a model that does not state one (a plain transformers model), inferred as well as can
    be: volumes, ``spacing`` if the forward's signature takes it, inputs a multiple of ``config.patch_size``
    (1 without one), a cls token when the config says ``use_cls_token`` is not false."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.accepts_spacing = "spacing" in inspect.signature(model.forward).parameters
        self.pooling = "cls" if getattr(self.config, "use_cls_token", True) else "mean"

    def required_input_multiple(self, spacing=None) -> tuple[int, ...]:
        patch = getattr(self.config, "patch_size", 1)
        patch = tuple(int(p) for p in patch) if isinstance(patch, list | tuple) else (int(patch),) * 3
        return (1, *patch[-2:]) if len(patch) == 2 else patch

    @property
    def num_input_channels(self) -> int:
        for key in (self.channels_config_key, "num_channels"):
            if hasattr(self.config, key):
                return int(getattr(self.config, key))
        raise AttributeError(f"{type(self.model).__name__}'s config names no input channel count")


def unwrap_model(model: Any) -> Any:
    """The model inside PEFT (``get_base_model``) and DDP/FSDP (``module``) wrappers, however nested."""
    for _ in range(4):
        unwrap = getattr(model, "get_base_model", None)
        inner = unwrap() if callable(unwrap) else getattr(model, "module", None)
        if inner is None or inner is model:
            break
        model = inner
    return model


def model_contract(model: nn.Module) -> MedfmModelMixin:
    """The medfm contract of ``model`` (a PEFT or DDP wrapper is looked through).

    A medfm model is its own contract; any other model with a transformers config gets an
    :class:`InferredContract`.

    Raises:
        TypeError: ``model`` has no config (it is not a transformers model).
    """
    seen = unwrap_model(model)
    if isinstance(seen, MedfmModelMixin):
        return seen
    if getattr(seen, "config", None) is not None and callable(getattr(seen, "forward", None)):
        return InferredContract(seen)
    raise TypeError(
        f"{type(model).__name__} is not a transformers model (no config): medfm's pipelines and training need "
        "a model with a config, best one whose class derives from medfm.models.modeling_utils.MedfmModelMixin"
    )


#: The field of an adapter folder's ``config.json`` naming the model whose weights the adapter was trained on.
ADAPTER_BASE_MODEL_KEY = "medfm_base_model"

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def adapter_base_model(folder: Any) -> str | None:
    """The base model of a self-contained adapter folder, or ``None`` when ``folder`` is not one.

    A self-contained adapter folder (what :func:`medfm.peft.save_adapter` writes) holds PEFT's adapter files
    and the fine-tuned model's full ``config.json`` (its architecture: patch, channels, labels, decoder
    widths), which names the base model in ``medfm_base_model``; it holds no full weights.
    """
    import json
    import os

    if not isinstance(folder, str | os.PathLike) or not os.path.isdir(folder):
        return None
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return None
    if any(os.path.isfile(os.path.join(folder, name)) for name in _WEIGHT_FILES):
        return None
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as handle:
        return json.load(handle).get(ADAPTER_BASE_MODEL_KEY)


def _load_self_contained_adapter(cls: type, folder: Any, base: str, args: tuple, kwargs: dict) -> Any:
    """The fine-tuned architecture (the folder's config) with the base model's weights (adapted at load time
    as when fine-tuning began: new heads initialised, the patch kernel converted) and the folder's adapter."""
    from transformers import PreTrainedConfig

    config = kwargs.pop("config", None)
    if not isinstance(config, PreTrainedConfig):
        config = cls.config_class.from_pretrained(folder)
    kwargs.pop("adapter_kwargs", None)  # the adapter is loaded below, from the folder
    adapter_name = kwargs.pop("adapter_name", None)
    kwargs.setdefault("ignore_mismatched_sizes", True)
    from transformers.utils import logging

    # The base lacks the task heads by design (the adapter brings them): its load report would only alarm.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model = super(MedfmPreTrainedModel, cls).from_pretrained(base, *args, config=config, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    model.load_adapter(str(folder), adapter_name=adapter_name)
    model.name_or_path = str(folder)
    return model
