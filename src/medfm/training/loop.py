"""The training loop shared by medfm's objectives, on Accelerate.

``train(model, batches, config)`` runs AdamW with linear warm-up and cosine decay, gradient accumulation,
gradient clipping and mixed precision through an :class:`accelerate.Accelerator`, shows a progress bar
with the loss and throughput, and calls ``on_eval`` every ``eval_every`` steps. The model's forward must
return an output with a ``loss``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["TrainingConfig", "TrainingHistory", "cosine_with_warmup", "train"]


@dataclass
class TrainingConfig:
    """Optimisation settings.

    Attributes:
        steps: Optimizer steps.
        learning_rate: Peak learning rate.
        weight_decay: AdamW weight decay (not applied to biases, norms and 1-D parameters).
        warmup_steps: Linear warm-up steps.
        min_lr_ratio: Final learning rate as a fraction of the peak (cosine decay).
        grad_clip: Max gradient norm; ``None`` for no clipping.
        accumulation_steps: Micro-batches per optimizer step.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (Accelerate's setting).
        eval_every: Call ``on_eval`` every this many steps (0: only at the end).
        seed: Seed for Accelerate's RNGs.
    """

    steps: int = 1000
    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    grad_clip: float | None = 1.0
    accumulation_steps: int = 1
    mixed_precision: str = "no"
    eval_every: int = 0
    seed: int = 0


@dataclass
class TrainingHistory:
    """What a run recorded: the loss per step and every evaluation's result."""

    losses: list[float] = field(default_factory=list)
    evaluations: list[tuple[int, Any]] = field(default_factory=list)
    seconds: float = 0.0


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.0):
    """Linear warm-up to the peak, then cosine decay to ``min_ratio`` of it at ``total`` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (
            no_decay
            if parameter.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
            else decay
        ).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    config: TrainingConfig,
    *,
    on_eval: Callable[[nn.Module, int], Any] | None = None,
    accelerator: Any = None,
    description: str = "training",
) -> TrainingHistory:
    """Train ``model`` on ``batches`` (an endless iterator of forward keyword arguments).

    Args:
        model: Returns an output with ``loss`` when called with a batch.
        batches: Yields dicts of tensors; moved to the accelerator's device here.
        config: Optimisation settings.
        on_eval: ``f(model, step)`` called every ``config.eval_every`` steps and at the end (in eval mode);
            its results go to the history.
        accelerator: An :class:`accelerate.Accelerator`; one is made from ``config`` if not given.
        description: Progress-bar label.
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.accumulation_steps
    )
    optimizer = torch.optim.AdamW(_parameter_groups(model, config.weight_decay), lr=config.learning_rate)
    scheduler = cosine_with_warmup(optimizer, config.warmup_steps, config.steps, config.min_lr_ratio)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    history = TrainingHistory()
    start = time.perf_counter()
    samples = 0
    bar = tqdm(
        total=config.steps,
        desc=description,
        unit="step",
        disable=not accelerator.is_main_process,
        mininterval=1.0,
    )
    model.train()
    step = 0
    while step < config.steps:
        for _ in range(config.accumulation_steps):
            batch = {
                k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v
                for k, v in next(batches).items()
            }
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.grad_clip is not None:
                    accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            samples += int(next(iter(batch.values())).shape[0])
        step += 1
        history.losses.append(float(loss.detach()))
        elapsed = time.perf_counter() - start
        bar.set_postfix(
            loss=f"{history.losses[-1]:.4f}",
            lr=f"{scheduler.get_last_lr()[0]:.2e}",
            samples_per_s=f"{samples / max(elapsed, 1e-9):.1f}",
        )
        bar.update()
        if on_eval is not None and (
            (config.eval_every and step % config.eval_every == 0) or step == config.steps
        ):
            model.eval()
            with torch.no_grad():
                history.evaluations.append((step, on_eval(accelerator.unwrap_model(model), step)))
            model.train()
    bar.close()
    history.seconds = time.perf_counter() - start
    model.eval()
    return history
