"""A pre-training run from the command line: data, objective by name, the shared loop, the final save.

``examples/pretrain_mim.py`` and ``examples/pretrain_tokenizer.py`` are thin wrappers around
:func:`pretraining_parser` and :func:`run_pretraining`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

__all__ = ["pretraining_parser", "run_pretraining"]


def pretraining_parser(description: str, *, objective: str) -> argparse.ArgumentParser:
    """The options of a pre-training run; crop, depth and learning-rate defaults come from the chosen
    objective's :class:`~medfm.training.objectives.DataRecipe`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=objective, help="objective name (see medfm.training.objectives)")
    parser.add_argument("--data", required=True, help="folder of NIfTI/DICOM or a dataset.json")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--pretrained", help="initial weights (a medfm model folder or Hub id)")
    parser.add_argument(
        "--tokenizer", help="SPAD-VT tokenizer folder for MIM targets (random projection if omitted)"
    )
    parser.add_argument("--config", default="{}", help="JSON of model config fields (e.g. a tiny model)")
    parser.add_argument("--tokenizer-config", default="{}", help="JSON of tokenizer config fields")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--accumulation-steps", type=int, default=1)
    parser.add_argument("--crop-size", type=int, help="in-plane crop (default: the objective's)")
    parser.add_argument(
        "--depth-tokens", type=int, help="tokens along depth in a 3D crop (default: the objective's)"
    )
    parser.add_argument("--slice-probability", type=float, default=0.0, help="fraction of 2D-slice batches")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the objective's)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--grad-clip", type=float, default=0.5)
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--stop-after", type=int, help="stop after this step (the schedule still spans --steps)"
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        "--resume-from-checkpoint",
        dest="resume",
        help="'latest' or a checkpoint folder",
    )
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--losses-file", help="also write the losses (JSON) here; with N processes, one per rank"
    )
    parser.add_argument(
        "--weights-digest-dir", help="write each rank's final weight digest here (DDP checks)"
    )
    return parser


def run_pretraining(args: argparse.Namespace) -> list[float]:
    """Run a pre-training job described by :func:`pretraining_parser`'s options; return this rank's losses."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env, set_seed
    from torch.utils.data import DataLoader

    from ..data import (
        AnisotropyBatchSampler,
        PretrainingDataset,
        collate_samples,
        discover_volumes,
        probe_volumes,
    )
    from ..processing import MedicalImageProcessor
    from .loop import TrainingConfig, train
    from .objectives import OBJECTIVES, build_objective

    # The process-wide state is made here, before the Accelerator: pass the CPU flag the launcher set, or a
    # CPU multi-process run would not form its process group.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if args.model not in OBJECTIVES:
        raise ValueError(f"unknown pre-training objective {args.model!r}; known: {sorted(OBJECTIVES)}")
    recipe = OBJECTIVES[args.model].data_recipe()
    # Data first: an empty or unreadable source fails before any model is built.
    infos = probe_volumes(discover_volumes(args.data))
    data_processor = MedicalImageProcessor(steps=[dict(step) for step in recipe.steps])
    dataset = PretrainingDataset(infos, data_processor, patch=recipe.token_stride)
    sampler = AnisotropyBatchSampler(
        infos,
        args.batch_size,
        crop_size=args.crop_size or recipe.crop_size,
        depth_tokens=args.depth_tokens or recipe.depth_tokens,
        patch=recipe.token_stride,
        slice_probability=args.slice_probability,
        seed=args.seed,
        rank=state.process_index,
        world_size=state.num_processes,
    )
    state.print(
        f"{len(infos)} volumes in anisotropy groups "
        + json.dumps({k: len(v) for k, v in sampler.groups.items()})
    )

    set_seed(args.seed)
    objective = build_objective(
        args.model,
        model=args.pretrained,
        tokenizer=args.tokenizer,
        config=json.loads(args.config),
        tokenizer_config=json.loads(args.tokenizer_config),
    )
    if args.activation_checkpointing:
        objective.enable_activation_checkpointing()

    def batches():
        # Its own generator: a loader otherwise draws a seed from the global RNG, which would shift the random
        # masks of a resumed run by one draw.
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=args.num_workers,
            collate_fn=collate_samples,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=args.num_workers > 0,
            generator=torch.Generator().manual_seed(args.seed + state.process_index),
        )
        return iter(loader)

    config = TrainingConfig(
        steps=args.steps,
        learning_rate=args.lr if args.lr is not None else recipe.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        accumulation_steps=args.accumulation_steps,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        output_dir=args.output,
        save_every=args.save_every,
        keep_last=args.keep_last,
        log_every=args.log_every,
        resume_from=args.resume,
        stop_after=args.stop_after,
    )
    history = train(
        objective,
        batches,
        config,
        description=f"pre-training {args.model}",
        data_position=lambda consumed: sampler.load_state_dict({"batches_drawn": consumed}),
        tokens_per_batch=objective.tokens_per_batch,
    )

    if args.losses_file:
        target = Path(args.losses_file)
        if state.num_processes > 1:
            target = target.with_name(f"{target.stem}.rank{state.process_index}{target.suffix}")
        target.write_text(json.dumps({"first_step": history.first_step, "losses": history.losses}))
    if args.weights_digest_dir:
        digest = hashlib.sha256()
        for name, tensor in sorted(objective.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        folder = Path(args.weights_digest_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{state.process_index}.sha256").write_text(digest.hexdigest())
    if state.is_main_process:
        objective.save_pretrained(Path(args.output) / "model")
        state.print(f"saved {Path(args.output) / 'model'}")
    state.wait_for_everyone()
    return history.losses
