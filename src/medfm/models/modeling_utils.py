"""The model contract: what medfm's pipelines and training loop may rely on in any family's model.

Pipelines and the loop never look inside a model (no ``pyramid`` attribute, no "cls token at index 0"):
they ask the model, through :class:`MedfmModelMixin`, which inputs it takes and what it returns. A family
whose classes derive from :class:`MedfmPreTrainedModel` (or, for a model built on a transformers class such
as ``ResNetModel``, mix :class:`MedfmModelMixin` into its subclass) works with every pipeline, the
fine-tuning examples and the pre-training loop without them naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_utils import PreTrainedModel

__all__ = ["MedfmModelMixin", "MedfmPreTrainedModel", "as_volume", "model_contract"]


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
    """

    input_spatial_dims: ClassVar[tuple[int, ...]] = (3,)
    accepts_spacing: ClassVar[bool] = False
    pooling: ClassVar[str] = "cls"
    channels_config_key: ClassVar[str] = "in_channels"

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
        """Each spatial size of an input must be a multiple of this (``(D, H, W)``; ``(1, H, W)`` for 2D).

        Args:
            spacing: The input's spacing, for models whose patch depends on it (SPAD); ``None``: the most
                demanding case.
        """
        raise NotImplementedError(f"{type(self).__name__} does not state its required input multiple")

    def minimum_input_shape(self, spacing: Sequence[float] | torch.Tensor | None = None) -> tuple[int, ...]:
        """The smallest input ``(D, H, W)`` the model runs on (by default one multiple)."""
        return self.required_input_multiple(spacing)

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


def model_contract(model: nn.Module) -> MedfmModelMixin:
    """The medfm model inside ``model`` (a PEFT or DDP wrapper is looked through).

    Raises:
        TypeError: ``model`` is not a medfm model.
    """
    seen = model
    for _ in range(4):
        if isinstance(seen, MedfmModelMixin):
            return seen
        unwrap = getattr(seen, "get_base_model", None)
        seen = unwrap() if callable(unwrap) else getattr(seen, "module", None)
        if seen is None:
            break
    raise TypeError(
        f"{type(model).__name__} is not a medfm model: medfm's pipelines and training need a model class "
        "that derives from medfm.models.modeling_utils.MedfmModelMixin"
    )
