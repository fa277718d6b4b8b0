#!/usr/bin/env python
"""Fine-tune a medfm segmentation model with Accelerate, in full or with LoRA/DoRA adapters.

    accelerate launch examples/finetune_segmentation.py --model org/spad-vit-base \
        --data Task09_Spleen/dataset.json --output runs/spleen --num-labels 2 \
        --preset spad-btcv --steps 5000 [--lora]

``--model`` is any medfm model (a folder or Hub id); its segmentation head is built through
``AutoModelForSemanticSegmentation`` with the family's fine-tuning defaults (SPAD: a fixed (4, 16, 16) patch)
and as many input channels as the processed images have. Data: a Medical Segmentation Decathlon
``dataset.json`` or a folder with ``imagesTr/`` and ``labelsTr/``. A fraction of the cases is held out for
validation Dice (the pipeline's sliding windows, ``medfm.metrics``). Checkpoints (``accelerate`` state,
written atomically) go to ``OUTPUT/checkpoints`` at every validation, the last two kept; the final model (or
adapter), its processor and a model card with the validation Dice go to ``OUTPUT``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medfm.training.arguments import (
    adapter_kind,
    add_training_arguments,
    load_for_task,
    training_config,
    wrap_with_adapters,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="pre-trained medfm model folder or Hub id")
    parser.add_argument("--data", required=True, help="dataset.json or a folder with imagesTr/ and labelsTr/")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--num-labels", type=int, required=True, help="classes, background included")
    parser.add_argument(
        "--patch-size",
        type=int,
        nargs=3,
        help="patch (D, H, W) of the fine-tuned model (default: the family's)",
    )
    parser.add_argument(
        "--in-channels", type=int, help="input channels (default: those of the processed images)"
    )
    parser.add_argument(
        "--config", default="{}", help="JSON object of further config fields of the fine-tuned model"
    )
    parser.add_argument("--preset", help="processor preset (default: the model's own processor)")
    parser.add_argument("--crop", type=int, nargs=3, default=(32, 128, 128), metavar=("D", "H", "W"))
    add_training_arguments(parser, lr=1e-4, batch_size=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForSemanticSegmentation

    from medfm.cli import parse_config_overrides
    from medfm.hub import CardInfo, write_model_card
    from medfm.processing import MedicalImageProcessor
    from medfm.training import (
        VolumeCropSampler,
        evaluate_segmentation,
        load_segmentation_pairs,
        prepare_segmentation_sample,
        train,
    )

    set_seed(args.seed)
    output = Path(args.output)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, project_dir=str(output))
    processor = (
        MedicalImageProcessor.from_preset(args.preset)
        if args.preset
        else MedicalImageProcessor.from_pretrained(args.model)
    )
    pairs = load_segmentation_pairs(args.data)
    held_out = max(1, round(len(pairs) * args.val_fraction)) if len(pairs) > 1 else 0
    samples = [prepare_segmentation_sample(processor, image, label) for image, label in pairs]
    train_samples, val_samples = samples[held_out:] or samples, samples[:held_out] or samples

    overrides = {"num_labels": args.num_labels, **parse_config_overrides(args.config)}
    if args.patch_size:
        overrides["patch_size"] = list(args.patch_size)
    model = load_for_task(
        AutoModelForSemanticSegmentation,
        args.model,
        num_channels=args.in_channels or int(samples[0].pixel_values.shape[0]),
        **overrides,
    )
    model = wrap_with_adapters(model, args)

    roi = tuple(args.crop)
    labels = list(range(1, args.num_labels))

    def validate(trained, step: int) -> dict[str, float]:
        scores = evaluate_segmentation(trained, val_samples, roi, labels=labels)
        accelerator.print(
            f"step {step}: validation {json.dumps({k: round(v, 4) for k, v in scores.items()})}"
        )
        return scores

    sampler = VolumeCropSampler(
        train_samples,
        crop=roi,
        batch_size=args.batch_size,
        flip_axes=(1, 2),
        seed=args.seed + accelerator.process_index,  # each process draws its own crops
    )
    # The loop checkpoints atomically at every validation and keeps the last two.
    config = training_config(args, output_dir=str(output), save_every=args.eval_every, keep_last=2)
    history = train(
        model, sampler, config, on_eval=validate, accelerator=accelerator, description="fine-tuning"
    )
    final = history.evaluations[-1][1]
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model)
        trained.save_pretrained(output)
        processor.save_pretrained(output)
        write_model_card(
            "fine-tuned",
            output,
            info=CardInfo(
                base_model=str(args.model),
                datasets=[str(args.data)],
                dataset_name=Path(args.data).stem,
                metrics={k: v for k, v in final.items() if k.startswith(("dice", "mean"))},
                training={
                    "steps": args.steps,
                    "learning_rate": args.lr,
                    "batch_size": args.batch_size,
                    "crop": tuple(args.crop),
                    "adapters": adapter_kind(args),
                },
            ),
        )
        (output / "metrics.json").write_text(json.dumps(final, indent=2))
        accelerator.print(f"saved {'adapter' if args.lora or args.dora else 'model'} to {output}")
    return final


if __name__ == "__main__":
    main()
