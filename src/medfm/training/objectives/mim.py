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

import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForPreTraining

from ...errors import PretrainingOptionError
from .base import DataRecipe, PretrainingObjective

__all__ = ["MiMPretraining"]


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
    def build(cls, model, tokenizer, config, tokenizer_config, **settings: Any) -> MiMPretraining:
        config = dict(config)
        crop = settings.get("crop")
        if crop is not None:
            if any(int(c) % 2 for c in crop):
                raise PretrainingOptionError(f"--crop-size {crop[-1]}: a MiM crop must be even (two levels)")
            level = [int(c) // 2 for c in crop]
            if "image_size" in config and [int(s) for s in config["image_size"]] != level:
                raise PretrainingOptionError(
                    f"--config image_size {config['image_size']} disagrees with --crop-size {crop[-1]}: MiM "
                    f"crops are twice the level input, so image_size must be {level} (or leave it out)"
                )
            config["image_size"] = level
        if model is not None:
            mim = AutoModelForPreTraining.from_pretrained(model, **config)
        else:
            mim = AutoModelForPreTraining.from_config(AutoConfig.for_model("mim", **config))
        if getattr(mim.config, "model_type", None) != "mim":
            raise PretrainingOptionError(
                f"--pretrained {model}: a {mim.config.model_type!r} model; --model mim needs a 'mim' one"
            )
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
