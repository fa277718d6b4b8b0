"""What a pre-training objective is, and the table of objectives the model families declare.

An objective is an ``nn.Module`` whose forward takes a batch of the pre-training data stream
(``pixel_values``, ``spacing``, ``aniso_d``) and returns an output with a ``loss``. Beyond that it tells the
shared loop (:mod:`medfm.training.loop`) how it wants to be optimised: its parameter groups and AdamW
settings, how gradients are clipped, what runs after each optimizer step (an EMA teacher update, freezing a
head for the first epoch), and which data recipe it trains on. Families name their objectives in their
``FAMILY`` record (``objectives={"name": "module:Class"}``); :data:`OBJECTIVES` reads those records.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["OBJECTIVES", "DataRecipe", "PretrainingObjective", "build_objective", "default_parameter_groups"]

#: Parameter names (last component) that never get weight decay, besides every 1-D parameter.
NO_DECAY_NAMES = ("bias", "cls_token", "mask_token", "pos_embed")


def default_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices and kernels; none on biases, norms, tokens and 1-D parameters."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        plain = parameter.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
        (no_decay if plain else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class DataRecipe:
    """How an objective's pre-training data is prepared and cropped.

    Attributes:
        steps: Processor steps applied to every volume before cropping (a list of step dicts).
        crop_size: Default in-plane crop edge.
        depth_tokens: Default number of tokens along depth in a 3D crop.
        token_stride: The model's total stride ``P`` (crops are multiples of it; with the anisotropy level
            it gives the depth stride ``max(P >> aniso_d, 1)``).
        learning_rate: The objective's default peak learning rate.
        grad_clip: The objective's default max gradient norm (0: no clipping).
        cubic_crop: Crops are ``crop_size`` along every axis, whatever the volume's anisotropy (``depth_tokens``
            is then unused); otherwise the depth follows the SPAD anisotropy rule.
        random_flips: Flip each crop along each axis with probability 1/2.
        three_d_only: The objective trains on 3D crops only (``--slice-probability`` must be 0).
    """

    steps: tuple[Mapping[str, Any], ...] = ()
    crop_size: int = 96
    depth_tokens: int = 6
    token_stride: int = 16
    learning_rate: float = 1e-4
    grad_clip: float = 0.5
    cubic_crop: bool = False
    random_flips: bool = True
    three_d_only: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


class PretrainingObjective(nn.Module):
    """Base class of pre-training objectives (see the module docstring).

    Subclasses implement ``forward`` (returning an output with ``loss``), :meth:`build`,
    :meth:`tokens_per_batch`, :meth:`save_pretrained` and :meth:`data_recipe`, and override the hooks they
    need; the defaults are AdamW with betas (0.9, 0.999), decay as :func:`default_parameter_groups`, clipping
    of the global gradient norm, and nothing after a step.
    """

    #: AdamW betas.
    betas: tuple[float, float] = (0.9, 0.999)
    #: Whether this objective trains a tokenizer (``examples/pretrain_tokenizer.py``) rather than a model.
    trains_tokenizer: bool = False

    #: ``model_type`` of the frozen tokenizer whose outputs are the targets (``--tokenizer``), if the objective
    #: has one; ``None`` for objectives without a tokenizer (the run then offers no ``--tokenizer`` option).
    tokenizer_model_type: ClassVar[str | None] = None

    #: Help text of ``--config``: what its JSON object may set.
    config_help: ClassVar[str] = "JSON object of model config fields (e.g. a tiny model)"

    @classmethod
    def build(
        cls,
        model: str | None,
        tokenizer: str | None,
        config: dict[str, Any],
        tokenizer_config: dict[str, Any],
        **settings: Any,
    ) -> PretrainingObjective:
        """The objective from command-line settings: initial weights (a folder or Hub id, or ``None``), a
        tokenizer where the objective has one, and config fields. ``settings`` carries the run's other
        choices an objective may need (``crop``: the crop shape, ``steps``: the optimizer steps of the
        schedule); objectives ignore those they do not use."""
        raise NotImplementedError

    @classmethod
    def data_recipe(cls) -> DataRecipe:
        """The data this objective trains on."""
        return DataRecipe()

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return default_parameter_groups(self, weight_decay)

    def optimizer_settings(self) -> dict[str, Any]:
        """Keyword arguments of AdamW besides the learning rate and the groups."""
        return {"betas": self.betas}

    def clip_gradients(self, accelerator: Any, max_norm: float) -> None:
        """Clip before the optimizer step (default: the global norm of every gradient)."""
        accelerator.clip_grad_norm_(self.parameters(), max_norm)

    def after_optimizer_step(self, step: int) -> None:
        """Called after every optimizer step with the number of steps done."""

    def tokens_per_batch(self, batch: dict[str, Any]) -> int:
        return 0

    def enable_activation_checkpointing(self) -> None:
        raise ValueError(f"{type(self).__name__} has no blocks to checkpoint")

    def save_pretrained(self, path: str | os.PathLike) -> None:
        raise NotImplementedError


class _ObjectiveTable(Mapping[str, type]):
    """Objective name -> class, read from the family records each time (run-time families included)."""

    def _entries(self) -> dict[str, str]:
        from ...models.registry import families

        return {name: ref for family in families() for name, ref in family.objectives.items()}

    def __getitem__(self, name: str) -> type:
        from ...models.family import resolve_reference

        return resolve_reference(self._entries()[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())

    def __repr__(self) -> str:
        return f"OBJECTIVES({sorted(self._entries())})"


#: Objective name -> :class:`PretrainingObjective` subclass, from every family's record.
OBJECTIVES: Mapping[str, type] = _ObjectiveTable()


def build_objective(name: str, **kwargs: Any) -> PretrainingObjective:
    """Build the objective registered under ``name`` (keyword arguments as :meth:`PretrainingObjective.build`).

    Raises:
        ValueError: Unknown name (the message lists the known ones).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown pre-training objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name].build(**kwargs)


def unwrap_objective(model: nn.Module) -> nn.Module:
    """The objective inside a DDP/FSDP wrapper."""
    return getattr(model, "module", model)


def clip_gradients(model: nn.Module, accelerator: Any, max_norm: float) -> None:
    """The objective's own clipping, or the global norm for a plain model."""
    inner = unwrap_objective(model)
    if isinstance(inner, PretrainingObjective):
        inner.clip_gradients(accelerator, max_norm)
    else:
        accelerator.clip_grad_norm_(model.parameters(), max_norm)


def per_tensor_clip(parameters: Iterator[torch.nn.Parameter], max_norm: float) -> None:
    """Clip each gradient tensor to norm ``max_norm`` on its own (DINO's ``clip_gradients``, used by UniMiSS)."""
    for parameter in parameters:
        if parameter.grad is not None:
            norm = parameter.grad.detach().norm(2)
            scale = max_norm / (norm + 1e-6)
            if scale < 1:
                parameter.grad.mul_(scale)
