"""MiM pre-training (Zhuang et al., "MiM: Mask in Mask Self-Supervised Pre-Training for 3D Medical Image
Analysis", IEEE TMI 2025; specs/mim.md §2-§3): hierarchical masked reconstruction at three levels with
cross-level alignment, on random cubic crops of CT volumes in [0, 1].

The model is built through ``AutoModelForPreTraining`` from a ``mim`` config, so this module names no model
class. What the objective adds to the model is the run's settings of spec §2.7: AdamW betas (0.9, 0.95),
weight decay on every parameter of more than one dimension only (timm's ``add_weight_decay``: biases, norms
and layer scales excluded, the 3-D ``mask_token`` included), no gradient clipping, and the fraction of the
schedule done, which the ``coarse_to_fine`` and ``fine_to_coarse`` loss-weight modes read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForPreTraining

from ...errors import PretrainingOptionError
from .base import DataRecipe, PretrainingObjective

__all__ = ["MiMPretraining"]


def _check_crop_grid(config: dict[str, Any], crop: list[int]) -> None:
    """Refuse a crop whose levels have a token grid pre-training cannot mask in 8 groups (naming --crop-size)."""
    patches = config.get("patch_sizes", (2, 2, 2, 2))
    if not (isinstance(patches, list | tuple) and all(isinstance(p, int) and p > 0 for p in patches)):
        return  # the config check names the field
    stride = math.prod(patches)
    level = [c // 2 for c in crop]
    if any(n % stride for n in level) or math.prod(n // stride for n in level) % 8:
        grid = "x".join(str(n // stride) if n % stride == 0 else f"{n / stride:g}" for n in level)
        step = 4 * stride  # cubic levels of an even number of tokens per axis: a multiple of 8 tokens
        nearest = sorted({max(step, crop[-1] // step * step), max(step, -(-crop[-1] // step) * step)})
        raise PretrainingOptionError(
            f"--crop-size {crop[-1]} gives MiM levels of {level[-1]}^3 voxels, a {grid} token grid (stride "
            f"{stride}), which pre-training cannot mask in 8 groups of tokens; use a multiple of {step} "
            f"(e.g. {' or '.join(str(n) for n in nearest)})"
        )


def _require_mim(model: str, model_type: Any) -> None:
    """Refuse a ``--pretrained`` model of another type than ``mim``, naming the option."""
    if model_type != "mim":
        raise PretrainingOptionError(
            f"--pretrained {model}: a {model_type!r} model; --model mim needs a 'mim' one (a MiM pre-training or "
            "converted MiM folder)"
        )


def _local_config(model: str) -> dict[str, Any] | None:
    """The saved config of a local ``--pretrained`` folder (``None`` for a Hub id or an unreadable file, which
    transformers reports on when loading).

    Raises:
        PretrainingOptionError: The folder holds a model of another type than ``mim``.
    """
    import json
    from pathlib import Path

    try:
        saved = json.loads((Path(model).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    _require_mim(model, saved.get("model_type") if isinstance(saved, dict) else None)
    return saved


def _load_pretrained(model: str, config: dict[str, Any]) -> torch.nn.Module:
    """``AutoModelForPreTraining.from_pretrained(model, **config)``, a folder of another family, an unreadable one,
    or weights of other shapes than ``--config`` asks for refused naming ``--pretrained``."""
    from ...errors import CheckpointShapeMismatchError, MedfmError

    try:
        saved = AutoConfig.from_pretrained(model)
    except MedfmError as error:
        raise PretrainingOptionError(f"--pretrained {model}: {error.reason}") from None
    except (OSError, ValueError, KeyError) as error:
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise PretrainingOptionError(
            f"--pretrained {model}: not a model folder or Hub id transformers can read ({first})"
        ) from None
    _require_mim(model, getattr(saved, "model_type", None))
    try:
        return AutoModelForPreTraining.from_pretrained(model, **config)
    except CheckpointShapeMismatchError as error:
        wrong = sorted(f"{key} {saved_shape} (model {shape})" for key, saved_shape, shape in error.mismatched)
        more = f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""
        raise PretrainingOptionError(
            f"--pretrained {model}: its weights do not fit the model --config asks for (tensors of other shapes: "
            f"{', '.join(wrong[:4])}{more}); leave out the --config fields that change the architecture (the "
            "folder's config.json has them)"
        ) from None
    except MedfmError as error:
        raise PretrainingOptionError(f"--pretrained {model}: {error.reason}") from None


class MiMPretraining(PretrainingObjective):
    """MiM pre-training of a ``mim`` model (spec §2).

    Each crop (``2 * image_size`` voxels along every axis) gives the up, mid and down levels inside the model;
    the loss is the model's weighted total. ``training_progress`` (optimizer steps done over the steps of the
    schedule; upstream counts epochs) is checkpointed with the objective, so a resumed run weighs its losses
    exactly as an uninterrupted one.

    Args:
        model: A ``mim`` pre-training model (``AutoModelForPreTraining``).
        total_steps: Optimizer steps of the whole schedule (for the loss-weight modes); ``None``: progress 0.
    """

    betas = (0.9, 0.95)
    config_help = (
        'JSON object of MiM config fields, e.g. \'{"embed_dims": [24, 48, 96, 192], "depths": [1, 1, 1, 4], '
        '"num_attention_heads": 6}\' for a smaller model; image_size defaults to half the crop'
    )

    def __init__(self, model: torch.nn.Module, total_steps: int | None = None):
        super().__init__()
        self.mim = model
        self.total_steps = total_steps
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.long))

    @classmethod
    def check_options(
        cls,
        config: dict[str, Any],
        crop_size: int | Sequence[int] | None = None,
        pretrained: str | None = None,
    ) -> dict[str, Any]:
        """Check ``--config`` (and ``--crop-size``) before any data is read or model built; return the config fields
        the model is built with (``image_size`` set to half the crop).

        Raises:
            PretrainingOptionError: ``--config`` names a field the mim config does not have, gives an ``image_size``
                that is not half the crop, or (without ``--pretrained``, whose folder holds the config) gives a
                config MiM pre-training refuses; ``--crop-size`` gives levels whose token grid pre-training
                cannot mask in 8 groups; a local ``--pretrained`` folder holds another model type. The message
                names the option and what is allowed.
        """
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        from ...errors import InvalidConfigError
        from ...models.conversion_utils import check_config_fields

        config = dict(config)
        try:  # the mim config class, found through its registration
            check_config_fields(CONFIG_MAPPING["mim"], config)
        except InvalidConfigError as error:
            raise PretrainingOptionError(error.reason) from None
        if crop_size is not None:
            crop = [int(crop_size)] * 3 if isinstance(crop_size, int) else [int(c) for c in crop_size]
            if any(c % 2 for c in crop):
                raise PretrainingOptionError(f"--crop-size {crop[-1]}: a MiM crop must be even (two levels)")
            level = [c // 2 for c in crop]
            if "image_size" in config:
                given = config["image_size"]
                if isinstance(given, int) and not isinstance(given, bool):
                    given = [given] * 3
                if not (
                    isinstance(given, list | tuple)
                    and len(given) == 3
                    and all(isinstance(n, int) and not isinstance(n, bool) for n in given)
                ):
                    raise PretrainingOptionError(
                        f"--config image_size {config['image_size']!r} must be three integers (or one); MiM crops are "
                        f"twice the level input, so with --crop-size {crop[-1]} it is {level} (or leave it out)"
                    )
                if list(given) != level:
                    raise PretrainingOptionError(
                        f"--config image_size {config['image_size']} disagrees with --crop-size {crop[-1]}: MiM "
                        f"crops are twice the level input, so image_size must be {level} (or leave it out)"
                    )
            config["image_size"] = level
        saved = _local_config(pretrained) if pretrained is not None else {}
        if crop_size is not None and saved is not None:  # the grid rule, with the folder's patch sizes if any
            _check_crop_grid({**saved, **config}, crop)
        if pretrained is None:  # else the folder holds the rest of the config: checked when it is loaded
            try:
                AutoConfig.for_model("mim", **config).check_pretraining()
            except InvalidConfigError as error:
                raise PretrainingOptionError(f"--config: {error.reason}") from None
        return config

    @classmethod
    def build(cls, model, tokenizer, config, tokenizer_config, **settings: Any) -> MiMPretraining:
        crop = settings.get("crop")
        config = cls.check_options(config, crop, pretrained=model)
        if model is not None:
            mim = _load_pretrained(model, config)
        else:
            mim = AutoModelForPreTraining.from_config(AutoConfig.for_model("mim", **config))
        return cls(mim, total_steps=settings.get("steps"))

    @classmethod
    def data_recipe(cls) -> DataRecipe:
        from ...processing.presets import get_preset

        # Spec §3.1: [-1000, 1000] HU to [0, 1] at native spacing, random 192^3 crops (padded with 0 where the
        # volume is smaller), no flips. lr: blr 1e-4 x effective batch 512 / 256 (spec §2.7).
        return DataRecipe(
            steps=get_preset("mim-pretrain").steps,
            crop_size=192,
            token_stride=32,
            learning_rate=2e-4,
            grad_clip=0.0,
            cubic_crop=True,
            random_flips=False,
            three_d_only=True,
        )

    def training_progress(self) -> float:
        """Fraction of the schedule done, in [0, 1]."""
        if not self.total_steps:
            return 0.0
        return min(float(self.optimizer_steps) / self.total_steps, 1.0)

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any):
        expected = tuple(2 * int(s) for s in self.mim.config.image_size)
        if tuple(pixel_values.shape[2:]) != expected:
            raise PretrainingOptionError(
                f"MiM crops must be twice the model's image_size {list(self.mim.config.image_size)}, i.e. "
                f"{list(expected)}; got {list(pixel_values.shape[2:])} (set --crop-size {expected[-1]})"
            )
        return self.mim(pixel_values, training_progress=self.training_progress())

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        decay, plain = [], []
        for parameter in self.parameters():
            if parameter.requires_grad:
                (plain if parameter.ndim <= 1 else decay).append(parameter)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]

    def after_optimizer_step(self, step: int) -> None:
        self.optimizer_steps.fill_(step)

    def tokens_per_batch(self, batch: dict[str, Any]) -> int:
        config = self.mim.config
        volumes = 1 + config.num_mid_volumes * (1 + config.num_down_patches)
        return int(batch["pixel_values"].shape[0]) * volumes * int(config.num_tokens)

    def enable_activation_checkpointing(self) -> None:
        self.mim.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The pre-training model (``AutoModel`` loads its encoder; the fine-tuning classes adapt it) and the
        ``mim-pretrain`` processor."""
        from ...processing import MedicalImageProcessor

        self.mim.save_pretrained(path)
        MedicalImageProcessor.from_preset("mim-pretrain").save_pretrained(path)
