"""SPAD / PUMIT pre-training objectives (Luo et al., arXiv 2312.07630): SPAD-ViT masked image modeling
against a frozen SPAD-VT tokenizer (spec §c), and the tokenizer's own training (spec §a).

The models are built through transformers' Auto classes from the ``spad_vit`` and ``spad_vt`` configs, so
this module names no model class.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedImageModeling
from transformers.utils import ModelOutput

from .base import DataRecipe, PretrainingObjective

__all__ = [
    "SpadMaskedImageModeling",
    "SpadTokenizerTraining",
    "TokenizerTrainingOutput",
    "global_code_use_loss",
    "random_projection_tokenizer",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Pre-training intensities (spec §d): 0.5-99.5 percentiles of the foreground to [0, 1], grey to RGB.
_SPAD_STEPS = (
    {"name": "percentile_clip", "lower": 0.5, "upper": 99.5, "above_min": True, "rescale": True},
    {"name": "repeat_channels", "num_channels": 3},
)


def _tokens(shape: torch.Size, aniso_d: int, stride: int) -> int:
    depth = max(stride >> int(aniso_d), 1)
    return int(shape[0] * (shape[2] // depth) * (shape[3] // stride) * (shape[4] // stride))


def random_projection_tokenizer(config, logit_scale: float = 3.0, seed: int = 0) -> nn.Module:
    """A SPAD-VT with random weights and a code projection scaled so its soft tokens are peaked.

    A freshly initialised tokenizer gives near-uniform code distributions, which leave nothing to learn. Scaled
    up, its random projection makes each token's target a fixed, input-dependent distribution: a stand-in
    for a trained tokenizer in smoke tests and demos (real pre-training loads a trained SPAD-VT).
    """
    generator = torch.Generator().manual_seed(seed)
    tokenizer = AutoModel.from_config(config)
    with torch.no_grad():
        weight = tokenizer.quantize.proj.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * logit_scale / weight.shape[1] ** 0.5)
    return tokenizer


class SpadMaskedImageModeling(PretrainingObjective):
    """SPAD-ViT masked image modeling against a frozen SPAD-VT (spec §c).

    The ViT sees the ImageNet-normalised image and the tokenizer ``2x - 1``, both at the batch's
    ``aniso_d``; the loss is the soft-target cross-entropy at the masked tokens.
    """

    tokenizer_model_type = "spad_vt"
    config_help = "JSON object of SPAD-ViT config fields, e.g. '{\"hidden_size\": 384}' for a smaller model"

    def __init__(self, mim: nn.Module):
        super().__init__()
        self.mim = mim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1), persistent=False)

    @classmethod
    def build(cls, model, tokenizer, config, tokenizer_config, **settings) -> SpadMaskedImageModeling:
        if tokenizer is not None:
            tokenizer_model = AutoModel.from_pretrained(tokenizer)
        else:
            tokenizer_model = random_projection_tokenizer(AutoConfig.for_model("spad_vt", **tokenizer_config))
        config = {"codebook_size": tokenizer_model.config.codebook_size, **config}
        mim = (
            AutoModelForMaskedImageModeling.from_pretrained(model, **config)
            if model is not None
            else AutoModelForMaskedImageModeling.from_config(AutoConfig.for_model("spad_vit", **config))
        )
        mim.set_tokenizer(tokenizer_model)
        return cls(mim)

    @classmethod
    def data_recipe(cls) -> DataRecipe:
        return DataRecipe(
            steps=_SPAD_STEPS, crop_size=160, depth_tokens=5, token_stride=16, learning_rate=2e-5
        )

    def forward(
        self, pixel_values: torch.Tensor, aniso_d: int, spacing: torch.Tensor | None = None, **kwargs
    ):
        return self.mim(
            (pixel_values - self.mean) / self.std,
            aniso_d=aniso_d,
            tokenizer_pixel_values=pixel_values * 2 - 1,
        )

    def tokens_per_batch(self, batch: dict[str, Any]) -> int:
        return _tokens(batch["pixel_values"].shape, batch["aniso_d"], self.mim.config.patch_size[0])

    def enable_activation_checkpointing(self) -> None:
        self.mim.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The MIM model (``AutoModel`` loads its backbone) with its processor and, beside it, the tokenizer."""
        from ...processing import MedicalImageProcessor

        self.mim.save_pretrained(path)
        MedicalImageProcessor.from_preset("spad-pretrain").save_pretrained(path)
        if self.mim.tokenizer is not None:
            self.mim.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))


@dataclass
class TokenizerTrainingOutput(ModelOutput):
    """Loss of a SPAD-VT training step and its parts."""

    loss: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    quant_loss: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def global_code_use_loss(probabilities: torch.Tensor) -> torch.Tensor:
    """``sum_k pbar_k log pbar_k``, ``pbar`` the mean code distribution over every token of the *global* batch.

    The per-rank means are all-gathered (differentiably), as upstream does, so the regulariser does not change
    with the number of processes.
    """
    mean = probabilities.flatten(0, -2).float().mean(dim=0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.nn.functional import all_gather

        mean = torch.stack(all_gather(mean)).mean(dim=0)
    return (mean * mean.clamp_min(1e-12).log()).sum()


class SpadTokenizerTraining(PretrainingObjective):
    """SPAD-VT training (spec §a): ``L1(reconstruction, x) + quant_weight * quant_loss + entropy_weight * entropy``
    on ``x = 2 * pixel_values - 1``.

    The perceptual (LPIPS) and adversarial terms of upstream are not included: LPIPS needs ImageNet-trained
    network weights, which medfm does not download.
    """

    config_help = (
        "JSON object of SPAD-VT config fields (e.g. codebook_size) and the loss weights quant_weight and "
        "entropy_weight"
    )

    trains_tokenizer = True

    def __init__(self, tokenizer: nn.Module, quant_weight: float = 0.03, entropy_weight: float = 1.0):
        super().__init__()
        self.tokenizer = tokenizer
        self.quant_weight, self.entropy_weight = quant_weight, entropy_weight

    @classmethod
    def build(cls, model, tokenizer, config, tokenizer_config, **settings) -> SpadTokenizerTraining:
        settings = {**tokenizer_config, **config}
        weights = {k: settings.pop(k) for k in ("quant_weight", "entropy_weight") if k in settings}
        source = model or tokenizer
        vt = (
            AutoModel.from_pretrained(source, **settings)
            if source is not None
            else AutoModel.from_config(AutoConfig.for_model("spad_vt", **settings))
        )
        return cls(vt, **weights)

    @classmethod
    def data_recipe(cls) -> DataRecipe:
        return DataRecipe(
            steps=_SPAD_STEPS, crop_size=128, depth_tokens=4, token_stride=16, learning_rate=1e-4
        )

    def forward(
        self, pixel_values: torch.Tensor, aniso_d: int, spacing: torch.Tensor | None = None, **kwargs
    ):
        x = pixel_values * 2 - 1
        out = self.tokenizer(x, aniso_d=aniso_d)
        reconstruction = (out.reconstruction - x).abs().mean()
        quant_loss = global_code_use_loss(out.probabilities)
        loss = reconstruction + self.quant_weight * quant_loss + self.entropy_weight * out.entropy
        return TokenizerTrainingOutput(
            loss=loss,
            reconstruction_loss=reconstruction.detach(),
            quant_loss=quant_loss.detach(),
            entropy=out.entropy.detach(),
        )

    def tokens_per_batch(self, batch: dict[str, Any]) -> int:
        return _tokens(batch["pixel_values"].shape, batch["aniso_d"], self.tokenizer.config.total_stride)

    def enable_activation_checkpointing(self) -> None:
        raise ValueError("SPAD-VT has no transformer blocks to checkpoint")

    def save_pretrained(self, path: str | os.PathLike) -> None:
        from ...processing import MedicalImageProcessor

        self.tokenizer.save_pretrained(path)
        MedicalImageProcessor.from_preset("spad-vt").save_pretrained(path)
