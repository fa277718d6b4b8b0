"""The loop takes from an objective its parameter groups, AdamW settings, gradient clipping and the hook run
after each optimizer step; the per-tensor clipping UniMiSS needs; the objectives table and data recipes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.utils import ModelOutput

from medfm.training import TrainingConfig, train
from medfm.training.objectives import (
    OBJECTIVES,
    DataRecipe,
    PretrainingObjective,
    build_objective,
    per_tensor_clip,
)


class EmaObjective(PretrainingObjective):
    """A student and an EMA teacher (as DINO/UniMiSS keep one), AdamW betas (0.9, 0.95), decay on every
    parameter, each gradient tensor clipped on its own; records what the loop asked of it."""

    betas = (0.9, 0.95)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Linear(4, 2)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.steps_seen: list[int] = []
        self.clips: list[float] = []

    def forward(self, x: torch.Tensor, **kwargs):
        return ModelOutput(loss=(self.student(x) - self.teacher(x)).square().mean() + self.student(x).mean())

    def parameter_groups(self, weight_decay: float):
        return [{"params": list(self.student.parameters()), "weight_decay": weight_decay}]

    def clip_gradients(self, accelerator, max_norm: float) -> None:
        self.clips.append(max_norm)
        per_tensor_clip(self.student.parameters(), max_norm)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        self.steps_seen.append(step)
        for teacher, student in zip(self.teacher.parameters(), self.student.parameters()):
            teacher.mul_(0.9).add_(0.1 * student)


def test_loop_uses_the_objectives_hooks() -> None:
    objective = EmaObjective()
    teacher_before = objective.teacher.weight.clone()
    stream = ({"x": torch.randn(3, 4, generator=torch.Generator().manual_seed(i))} for i in range(100))
    config = TrainingConfig(steps=4, warmup_steps=1, grad_clip=0.3, accumulation_steps=2, weight_decay=0.05)
    from unittest import mock

    with mock.patch("torch.optim.AdamW", wraps=torch.optim.AdamW) as adamw:
        train(objective, stream, config)
    groups, kwargs = adamw.call_args.args[0], adamw.call_args.kwargs
    assert kwargs["betas"] == (0.9, 0.95)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05 and len(groups[0]["params"]) == 2
    assert objective.steps_seen == [1, 2, 3, 4]  # once per optimizer step, not per micro-batch
    assert objective.clips == [0.3] * 4
    assert not torch.equal(objective.teacher.weight, teacher_before)  # the EMA teacher moved
    assert all(p.grad is None for p in objective.teacher.parameters())


def test_per_tensor_clip_bounds_each_gradient() -> None:
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.1, 0.0])
    per_tensor_clip([a, b], 0.5)
    assert a.grad.norm() == pytest.approx(0.5, rel=1e-5)  # 5 -> 0.5
    assert torch.equal(b.grad, torch.tensor([0.1, 0.0]))  # already under the bound: untouched


def test_objectives_table_and_recipes() -> None:
    import importlib

    from medfm.models.registry import FAMILY_MODULES

    shipped = [name for m in FAMILY_MODULES for name in importlib.import_module(m).FAMILY.objectives]
    assert {"spad-vit", "spad-vt"} <= set(shipped) <= set(OBJECTIVES)
    for name in shipped:
        recipe = OBJECTIVES[name].data_recipe()
        assert isinstance(recipe, DataRecipe) and recipe.steps and recipe.token_stride > 0
    # The SPAD recipes are the values the example scripts used to pass explicitly.
    mim, tokenizer = OBJECTIVES["spad-vit"].data_recipe(), OBJECTIVES["spad-vt"].data_recipe()
    assert (mim.crop_size, mim.depth_tokens, mim.learning_rate) == (160, 5, 2e-5)
    assert (tokenizer.crop_size, tokenizer.depth_tokens, tokenizer.learning_rate) == (128, 4, 1e-4)
    with pytest.raises(ValueError, match="unknown pre-training objective"):
        build_objective("no-such-objective")


def test_load_for_task_errors_name_the_model(tmp_path) -> None:
    from transformers import AutoModelForSemanticSegmentation, ViTConfig

    from medfm.models.spad import SpadVTConfig, SpadVTModel
    from medfm.training.arguments import load_for_task

    SpadVTModel(SpadVTConfig(downsample_channels=[8, 8, 16], upsample_channels=[8, 8, 16], embedding_dim=16,
        codebook_size=8)).save_pretrained(tmp_path / "vt")  # fmt: skip
    with pytest.raises(ValueError, match="has no AutoModelForSemanticSegmentation class"):
        load_for_task(AutoModelForSemanticSegmentation, str(tmp_path / "vt"))
    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="belongs to no medfm model family"):
        load_for_task(AutoModelForSemanticSegmentation, str(tmp_path / "vit"))
