#!/usr/bin/env python
"""Fine-tune a medfm segmentation model with Accelerate, in full or with LoRA/DoRA adapters.

    accelerate launch examples/finetune_segmentation.py --model org/spad-vit-base \
        --data Task09_Spleen/dataset.json --output runs/spleen --num-labels 2 \
        --preset spad-btcv --steps 5000 [--lora [--merge]] [--resume-from-checkpoint latest]

``--model`` is any medfm model (a folder or Hub id); its segmentation head is built through
``AutoModelForSemanticSegmentation`` with the family's fine-tuning defaults (SPAD: a fixed (4, 16, 16) patch)
and as many input channels as the processed images have. Data: a Medical Segmentation Decathlon
``dataset.json`` or a folder with ``imagesTr/`` and ``labelsTr/``. A fraction of the cases is held out for
validation Dice (the pipeline's sliding windows, ``medfm.metrics``). The ``dataset.json`` label names become
the model's ``id2label`` (and ``--num-labels`` defaults to their count); every label map is checked against
``--num-labels`` before training. Checkpoints (``accelerate`` state, written atomically; an adapter run's hold
its trainable parameters only) go to ``OUTPUT/checkpoints`` at every validation, the last two kept. The final
model, or a self-contained adapter folder (loadable as it is by ``medfm segment --model OUTPUT``,
``pipeline()`` and ``AutoPeftModel``), or with ``--merge`` the merged model, goes to ``OUTPUT`` with its
processor, ``metrics.json`` (per-label Dice by name) and a model card.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medfm.training.arguments import (
    adapter_kind,
    add_training_arguments,
    load_for_task,
    parameter_counts,
    run_script,
    save_fine_tuned,
    save_trainable_parameters_only,
    spellings,
    training_config,
    wrap_with_adapters,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="pre-trained medfm model folder or Hub id")
    parser.add_argument("--data", required=True, help="dataset.json or a folder with imagesTr/ and labelsTr/")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        *spellings("num-labels"),
        type=int,
        help="classes, background included (default: the number of labels dataset.json names)",
    )
    parser.add_argument(
        *spellings("patch-size"),
        type=int,
        nargs=3,
        help="patch (D, H, W) of the fine-tuned model (default: the family's)",
    )
    parser.add_argument(
        *spellings("in-channels"), type=int, help="input channels (default: those of the processed images)"
    )
    parser.add_argument(
        *spellings("decoder-lateral-channels"),
        type=int,
        nargs=4,
        metavar="C",
        help="widths of the segmentation decoder's four lateral levels, fine to coarse (default: the "
        "model's, SPAD 128 256 512 512); smaller widths make a smaller head and adapter",
    )
    parser.add_argument(
        *spellings("decoder-full-res-channels"),
        type=int,
        nargs=2,
        metavar="C",
        help="widths of the decoder's two full-resolution levels (default: the model's, SPAD 32 64)",
    )
    parser.add_argument(
        "--config", default="{}", help="JSON object of further config fields of the fine-tuned model"
    )
    parser.add_argument("--preset", help="processor preset (default: the model's own processor)")
    parser.add_argument(
        "--crop",
        type=int,
        nargs=3,
        default=(32, 128, 128),
        metavar=("D", "H", "W"),
        help="training crop (default 32 128 128)",
    )
    add_training_arguments(parser, lr=1e-4, batch_size=2)
    args = parser.parse_args(argv)
    if args.merge and not (args.lora or args.dora):
        parser.error("--merge needs --lora or --dora (a full fine-tune is saved whole anyway)")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForSemanticSegmentation

    from medfm.cli import parse_config_overrides
    from medfm.data.segmentation import check_label_values, load_modality, load_segmentation_labels
    from medfm.errors import DatasetError
    from medfm.hub import CardInfo, check_model_source, write_model_card
    from medfm.processing import MedicalImageProcessor
    from medfm.training import (
        VolumeCropSampler,
        evaluate_segmentation,
        load_segmentation_pairs,
        prepare_segmentation_sample,
        train,
    )

    if not args.preset:  # the processor comes from the model folder (otherwise the data is checked first)
        check_model_source(args.model)
    set_seed(args.seed)
    output = Path(args.output)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, project_dir=str(output))
    processor = (
        MedicalImageProcessor.from_preset(args.preset)
        if args.preset
        else MedicalImageProcessor.from_pretrained(args.model)
    )
    pairs = load_segmentation_pairs(args.data)
    names = load_segmentation_labels(args.data)
    num_labels = args.num_labels if args.num_labels is not None else len(names or {})
    if num_labels < 2:
        raise DatasetError(
            "names no labels: pass --num-labels (classes, background included)"
            if args.num_labels is None
            else f"--num-labels must be at least 2 (background and one class); got {num_labels}",
            args.data,
        )
    if names is not None and len(names) != num_labels:
        raise DatasetError(
            f"names {len(names)} labels {names} but --num-labels is {num_labels}: make them agree", args.data
        )
    held_out = max(1, round(len(pairs) * args.val_fraction)) if len(pairs) > 1 else 0
    samples = []
    for image, label in pairs:
        sample = prepare_segmentation_sample(processor, image, label, num_labels)
        check_label_values(sample.labels, num_labels, label)  # before any model is built or step is run
        samples.append(sample)
    train_samples, val_samples = samples[held_out:] or samples, samples[:held_out] or samples
    accelerator.print(
        f"data: {len(pairs)} cases, {len(samples) - held_out} for training and {held_out} for validation"
        + ("" if held_out else " (too few to hold any out: validating on the training case)")
    )

    overrides = {"num_labels": num_labels, **parse_config_overrides(args.config)}
    if names is not None:
        overrides.update(id2label=names, label2id={name: value for value, name in names.items()})
    if args.patch_size:
        overrides["patch_size"] = list(args.patch_size)
    if args.decoder_lateral_channels:
        overrides["decoder_lateral_channels"] = list(args.decoder_lateral_channels)
    if args.decoder_full_res_channels:
        overrides["decoder_full_res_channels"] = list(args.decoder_full_res_channels)
    model = load_for_task(
        AutoModelForSemanticSegmentation,
        args.model,
        num_channels=args.in_channels or int(samples[0].pixel_values.shape[0]),
        input_size=args.crop,
        **overrides,
    )
    model = wrap_with_adapters(model, args)
    total, trainable = parameter_counts(model)
    accelerator.print(
        f"model: {total:,} parameters, {trainable:,} trainable ({100 * trainable / max(total, 1):.2f}%, "
        f"adapters: {adapter_kind(args)})"
    )
    save_trainable_parameters_only(accelerator)
    label_names = {int(k): v for k, v in model.config.id2label.items()} if names is not None else None

    roi = tuple(args.crop)
    labels = list(range(1, num_labels))

    def validate(trained, step: int) -> dict[str, float | None]:
        scores = evaluate_segmentation(trained, val_samples, roi, labels=labels, label_names=label_names)
        shown = {k: None if v is None else round(v, 4) for k, v in scores.items()}
        accelerator.print(f"step {step}: validation {json.dumps(shown)}")
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
        kind = save_fine_tuned(
            trained, output, args, auto_class=AutoModelForSemanticSegmentation, processor=processor
        )
        write_model_card(
            "fine-tuned",
            output,
            info=CardInfo(
                base_model=str(args.model),
                datasets=[str(args.data)],
                dataset_name=Path(args.data).stem,
                metrics={k: v for k, v in final.items() if k.startswith(("dice", "mean")) and v is not None},
                training={
                    "steps": args.steps,
                    "learning_rate": args.lr,
                    "batch_size": args.batch_size,
                    "crop": tuple(args.crop),
                    "adapters": adapter_kind(args),
                    "labels": ", ".join(f"{k}: {v}" for k, v in trained.config.id2label.items()),
                },
                validation_size=len(val_samples),
                modality=load_modality(args.data),
            ),
        )
        (output / "metrics.json").write_text(json.dumps(final, indent=2))
        accelerator.print(f"saved {kind} to {output}")
    return final


if __name__ == "__main__":
    run_script(main)
