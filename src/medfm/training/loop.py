"""The training loop shared by medfm's objectives, on Accelerate.

``train(model, batches, config)`` runs AdamW with linear warm-up and cosine decay, gradient accumulation,
gradient clipping and mixed precision through an :class:`accelerate.Accelerator`, shows a progress bar with
the loss, throughput (samples/s, tokens/s) and ETA, and calls ``on_eval`` every ``eval_every`` steps. The
model's forward must return an output with a ``loss``. A
:class:`~medfm.training.objectives.PretrainingObjective` also chooses its parameter groups, AdamW settings and
gradient clipping, and gets a call after every optimizer step.

With ``config.output_dir`` it also logs through Accelerate's trackers (tensorboard and a JSONL file), writes
``save_state`` checkpoints every ``save_every`` steps (atomically: written to a temporary folder, then
renamed) keeping the last ``keep_last``, and resumes exactly from one with ``resume_from="latest"``: model,
optimizer, scheduler, scaler and RNG states come back, and the data stream is positioned at the first
batch not yet consumed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import GeneralTracker
from torch import nn
from tqdm.auto import tqdm

from ..distributed import check_processes_joined
from ..errors import DistributedLaunchError
from .objectives.base import PretrainingObjective, clip_gradients, default_parameter_groups, unwrap_objective

__all__ = [
    "JsonlTracker",
    "TrainingConfig",
    "TrainingHistory",
    "checkpoint_problem",
    "cosine_with_warmup",
    "latest_checkpoint",
    "train",
]


@dataclass
class TrainingConfig:
    """Optimisation, logging and checkpoint settings.

    Attributes:
        steps: Optimizer steps.
        learning_rate: Peak learning rate.
        weight_decay: AdamW weight decay (not applied to biases, norms, tokens and 1-D parameters).
        warmup_steps: Linear warm-up steps.
        min_lr_ratio: Final learning rate as a fraction of the peak (cosine decay).
        grad_clip: Max gradient norm; ``None`` for no clipping.
        accumulation_steps: Micro-batches per optimizer step.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (Accelerate's setting).
        eval_every: Call ``on_eval`` every this many steps (0: only at the end).
        seed: Seed for Accelerate's RNGs.
        output_dir: Where trackers and checkpoints go; ``None`` for neither.
        save_every: Checkpoint every this many steps (0: never).
        keep_last: Checkpoints kept.
        log_every: Log to the trackers every this many steps.
        resume_from: ``"latest"`` or a checkpoint folder to resume from; ``None`` to start afresh.
        stop_after: Stop after this step (the schedule still spans ``steps``): an interruption, for tests
            and for jobs cut into time slices.
        micro_batch_size: Samples per process in one micro-batch. DeepSpeed needs it to build its engine
            (``train_micro_batch_size_per_gpu``) because the loop passes it no DataLoader; other engines
            ignore it.
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
    output_dir: str | None = None
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 10
    resume_from: str | None = None
    stop_after: int | None = None
    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be at least 1; got {self.keep_last}")


@dataclass
class TrainingHistory:
    """What a run recorded: the loss per step (from the start or the resumed step) and evaluations."""

    losses: list[float] = field(default_factory=list)
    evaluations: list[tuple[int, Any]] = field(default_factory=list)
    seconds: float = 0.0
    first_step: int = 1


class _Progress:
    """The loop's own checkpointed state: optimizer steps done and micro-batches consumed."""

    def __init__(self) -> None:
        self.step = 0
        self.micro_batches = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.micro_batches = int(state["step"]), int(state["micro_batches"])


class JsonlTracker(GeneralTracker):
    """An Accelerate tracker that appends one JSON object per ``log`` call to ``metrics.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / "metrics.jsonl"

    @property
    def tracker(self):
        return self

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"config": values}, default=str) + "\n")

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **values}, default=float) + "\n")

    def finish(self) -> None:
        """Nothing to close: every line is flushed when written."""

    def drop_steps_after(self, step: int) -> None:
        """Rewrite the file (atomically) without the lines of steps after ``step`` and without unparsable lines
        (a line cut short by a crash), so a resumed run does not log a step twice."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            logged = entry.get("step") if isinstance(entry, dict) else None
            if isinstance(logged, int) and logged > step:
                continue
            kept.append(line)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, self.path)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.0):
    """Linear warm-up to the peak, then cosine decay to ``min_ratio`` of it at ``total`` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """What makes a ``save_state`` checkpoint folder unusable, or ``None`` when it looks complete.

    Checked without loading it: the folder holds model weights, an optimizer state and the loop's own state,
    none of them empty, every safetensors file's header agrees with its size and every torch-saved file
    (a zip archive) has its central directory (a truncated one has not).
    """
    folder = Path(checkpoint)
    if not folder.is_dir():
        return "not a folder"
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError as error:
        return f"cannot be listed ({error})"
    names = [p.name for p in files]
    if not any(
        n.startswith(("model", "pytorch_model")) and n.endswith((".safetensors", ".bin")) for n in names
    ):
        return "holds no model weights (model*.safetensors or pytorch_model*.bin)"
    if not any(n.startswith("optimizer") and n.endswith(".bin") for n in names):
        return "holds no optimizer state (optimizer*.bin)"
    if not any(n.startswith("custom_checkpoint_") for n in names):
        return "holds no training-loop state (custom_checkpoint_*.pkl)"
    for path in files:
        try:
            size = path.stat().st_size
            if size == 0:
                return f"{path.name} is empty"
            if path.suffix == ".safetensors":
                with path.open("rb") as handle:
                    head = handle.read(8)
                    if len(head) < 8:
                        return f"{path.name} is truncated (no header)"
                    (header_size,) = struct.unpack("<Q", head)
                    if 8 + header_size > size:
                        return f"{path.name} is truncated (header of {header_size} bytes, file of {size})"
                    header = json.loads(handle.read(header_size))
                ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
                if 8 + header_size + max(ends, default=0) != size:
                    return (
                        f"{path.name} is truncated or damaged (its header describes "
                        f"{8 + header_size + max(ends, default=0)} bytes, the file has {size})"
                    )
            elif path.suffix in (".bin", ".pkl", ".pt") and zipfile.is_zipfile(path) is False:
                with path.open("rb") as handle:
                    magic = handle.read(2)
                if magic == b"PK":  # a torch zip archive whose end (the central directory) is missing
                    return f"{path.name} is truncated (its zip directory is missing)"
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            return f"{path.name} is unreadable ({error})"
    return None


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (temporary folders are ignored).

    A ``step-*`` folder that is incomplete or unreadable (see :func:`checkpoint_problem`) is skipped with a
    warning naming it, and the next older one is taken.
    """
    candidates = _checkpoint_candidates(output_dir)
    return candidates[0] if candidates else None


def _checkpoint_candidates(output_dir: str | os.PathLike) -> list[Path]:
    """The usable ``step-*`` folders, newest first; unusable ones are skipped with a warning."""
    root = Path(output_dir) / "checkpoints"
    found = sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []
    usable = []
    for folder in found:
        problem = checkpoint_problem(folder)
        if problem is None:
            usable.append(folder)
        else:
            warnings.warn(f"skipping damaged checkpoint {folder}: {problem}", UserWarning, stacklevel=3)
    return usable


def _drop_logged_steps_after(accelerator, step: int) -> None:
    """After a resume at ``step``, remove ``metrics.jsonl`` lines of later steps (they will be logged again)."""
    if not accelerator.is_main_process:
        return
    for tracker in getattr(accelerator, "trackers", []):
        if isinstance(tracker, JsonlTracker):
            tracker.drop_steps_after(step)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The objective's own groups, or :func:`default_parameter_groups` for a plain model."""
    if isinstance(model, PretrainingObjective):
        return model.parameter_groups(weight_decay)
    return default_parameter_groups(model, weight_decay)


def _optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    settings = model.optimizer_settings() if isinstance(model, PretrainingObjective) else {}
    return torch.optim.AdamW(
        _parameter_groups(model, config.weight_decay), lr=config.learning_rate, **settings
    )


def _make_accelerator(config: TrainingConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    kwargs: dict[str, Any] = {}
    if config.output_dir is not None:
        kwargs["project_config"] = ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / "logs")
        )
        kwargs["log_with"] = ["tensorboard", JsonlTracker("medfm", Path(config.output_dir) / "logs")]
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.accumulation_steps,
        **kwargs,
    )


def _check_process_group(accelerator) -> None:
    """Refuse a launch whose processes do not see each other.

    Accelerate (1.15) builds a process group only on an accelerator, or on CPU when asked (``use_cpu: true``
    or ``ACCELERATE_USE_CPU=1``). Otherwise ``accelerate launch --num_processes N`` on a CPU machine starts N
    processes that each train alone, all acting as the main process (same logs, racing checkpoints).
    """
    check_processes_joined(
        accelerator.num_processes,
        accelerator.distributed_type,
        ": on a machine without GPUs set use_cpu: true in the accelerate config (or ACCELERATE_USE_CPU=1), which "
        "runs the processes as CPU data parallel; FSDP and DeepSpeed shard only on GPUs",
    )


def _configure_deepspeed(accelerator, config: TrainingConfig) -> None:
    """Give DeepSpeed the micro-batch size it would otherwise read off a prepared DataLoader."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    settings = plugin.deepspeed_config
    if settings.get("train_micro_batch_size_per_gpu", "auto") != "auto":
        return
    if config.micro_batch_size is None:
        raise DistributedLaunchError(
            "DeepSpeed needs the micro-batch size per process: set TrainingConfig.micro_batch_size (the "
            "pre-training and fine-tuning scripts set it from --batch-size) or train_micro_batch_size_per_gpu "
            "in the DeepSpeed config"
        )
    settings["train_micro_batch_size_per_gpu"] = int(config.micro_batch_size)
    if settings.get("train_batch_size", "auto") == "auto":
        settings["train_batch_size"] = (
            int(config.micro_batch_size) * config.accumulation_steps * accelerator.num_processes
        )


def _save_checkpoint(accelerator, output_dir: str, step: int, keep_last: int) -> None:
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    temporary = root / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)  # readers never see a half-written checkpoint
        for old in sorted(root.glob("step-*"))[:-keep_last]:
            shutil.rmtree(old)
        for stale in root.glob(".step-*.tmp"):  # left by a save that crashed
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


def train(
    model: nn.Module,
    batches: Iterator[dict[str, Any]] | Callable[[], Iterator[dict[str, Any]]],
    config: TrainingConfig,
    *,
    on_eval: Callable[[nn.Module, int], Any] | None = None,
    accelerator: Any = None,
    description: str = "training",
    data_position: Callable[[int], None] | None = None,
    tokens_per_batch: Callable[[dict[str, Any]], int] | None = None,
) -> TrainingHistory:
    """Train ``model`` on ``batches``.

    Args:
        model: Returns an output with ``loss`` when called with a batch.
        batches: An endless iterator of forward keyword arguments, or a callable making one (called after
            resuming, so the stream starts at the right position).
        config: Settings.
        on_eval: ``f(model, step)`` called every ``config.eval_every`` steps and at the end (in eval mode).
        accelerator: An :class:`accelerate.Accelerator`; one is made from ``config`` if not given.
        description: Progress-bar label.
        data_position: Called with the number of micro-batches already consumed when resuming (before
            ``batches`` is called), to position a resumable data stream.
        tokens_per_batch: Tokens in a batch, for the tokens/s figure.
    """
    accelerator = accelerator or _make_accelerator(config)
    optimizer = _optimizer(model, config)
    scheduler = cosine_with_warmup(optimizer, config.warmup_steps, config.steps, config.min_lr_ratio)
    # The scheduler is not prepared: Accelerate's wrapper steps it once per process, which with N processes
    # would run the schedule N times too fast. It steps once per optimizer step here, and is checkpointed.
    _check_process_group(accelerator)
    _configure_deepspeed(accelerator, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = _Progress()
    accelerator.register_for_checkpointing(progress, scheduler)
    if config.output_dir is not None and accelerator.log_with:
        accelerator.init_trackers("medfm", config={k: v for k, v in asdict(config).items() if v is not None})

    if config.resume_from is not None:
        if config.resume_from == "latest":
            candidates = _checkpoint_candidates(config.output_dir) if config.output_dir is not None else []
        else:
            candidates = [Path(config.resume_from)] if Path(config.resume_from).is_dir() else []
        if not candidates:
            raise FileNotFoundError(
                f"no checkpoint to resume from ({config.resume_from!r} in {config.output_dir})"
            )
        for position, checkpoint in enumerate(candidates):
            try:
                accelerator.load_state(str(checkpoint))
                break
            except Exception as error:  # an unreadable checkpoint: fall back to an older one
                if config.resume_from != "latest" or position == len(candidates) - 1:
                    raise
                warnings.warn(
                    f"skipping damaged checkpoint {checkpoint}: it cannot be loaded ({error})",
                    UserWarning,
                    stacklevel=2,
                )
        accelerator.print(f"resumed from {checkpoint} at step {progress.step}")
        _drop_logged_steps_after(accelerator, progress.step)
    if progress.step >= config.steps:
        accelerator.print(f"nothing to train: the checkpoint is at step {progress.step} of {config.steps}")
    if data_position is not None:
        data_position(progress.micro_batches)
    stream = batches() if callable(batches) else batches

    history = TrainingHistory(first_step=progress.step + 1)
    start, samples, tokens = time.perf_counter(), 0, 0
    last_step = min(config.steps, config.stop_after or config.steps)
    bar = tqdm(
        total=last_step,
        initial=min(progress.step, last_step),
        desc=description,
        unit="step",
        disable=not accelerator.is_main_process,
        mininterval=1.0,
    )
    model.train()
    while progress.step < last_step:
        step_loss = 0.0
        for _ in range(config.accumulation_steps):
            batch = {
                k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v
                for k, v in next(stream).items()
            }
            progress.micro_batches += 1
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.grad_clip is not None:
                    clip_gradients(model, accelerator, config.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            step_loss += float(loss.detach()) / config.accumulation_steps
            samples += int(batch["pixel_values"].shape[0]) if "pixel_values" in batch else 1
            tokens += tokens_per_batch(batch) if tokens_per_batch is not None else 0
        progress.step += 1
        objective = unwrap_objective(model)
        if isinstance(objective, PretrainingObjective):
            objective.after_optimizer_step(progress.step)
        # The step's loss: the mean over its micro-batches and over the processes.
        mean_loss = accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), reduction="mean")
        history.losses.append(float(mean_loss))
        elapsed = max(time.perf_counter() - start, 1e-9)
        figures = {
            "loss": history.losses[-1],
            "lr": scheduler.get_last_lr()[0],
            "samples_per_s": samples / elapsed,
        }
        if tokens_per_batch is not None:
            figures["tokens_per_s"] = tokens / elapsed
        bar.set_postfix({k: f"{v:.4g}" for k, v in figures.items()})
        bar.update()
        if config.output_dir is not None and progress.step % max(config.log_every, 1) == 0:
            accelerator.log(figures, step=progress.step)
        if on_eval is not None and (
            (config.eval_every and progress.step % config.eval_every == 0) or progress.step == config.steps
        ):
            model.eval()
            with torch.no_grad():
                history.evaluations.append(
                    (progress.step, on_eval(accelerator.unwrap_model(model), progress.step))
                )
            model.train()
        if config.output_dir is not None and config.save_every and progress.step % config.save_every == 0:
            _save_checkpoint(accelerator, config.output_dir, progress.step, config.keep_last)
    bar.close()
    history.seconds = time.perf_counter() - start
    if config.output_dir is not None and accelerator.log_with:
        # Finish the trackers only: Accelerator.end_training would also tear down the process group,
        # which the caller may still need (barriers, saving on rank 0).
        accelerator.wait_for_everyone()
        for tracker in accelerator.trackers:
            tracker.finish()
    model.eval()
    return history
