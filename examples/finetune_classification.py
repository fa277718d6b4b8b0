#!/usr/bin/env python
"""Fine-tune a medfm classifier with Accelerate, in full or with LoRA/DoRA adapters.

    accelerate launch examples/finetune_classification.py --model org/spad-vit-base \
        --data organmnist3d/ --output runs/organ --preset spad-medmnist-3d --steps 3000 [--lora]

``--model`` is any medfm model (a folder or Hub id); its classification head is built through
``AutoModelForImageClassification``. Data: a folder with one sub-folder per class (NIfTI or DICOM inside) or a JSON file with a ``training``
list of ``{"image", "label"}``. A fraction is held out for validation accuracy and AUC. The final model (or
adapter), its processor and a card with the validation scores go to ``OUTPUT``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medfm.training.arguments import (
    add_training_arguments,
    load_for_task,
    training_config,
    wrap_with_adapters,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="pre-trained medfm model folder or Hub id")
    parser.add_argument("--data", required=True, help="folder of class folders, or a JSON list")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--preset", help="processor preset; it must give every image one size (a resize step)"
    )
    add_training_arguments(parser, lr=1e-5, batch_size=4)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForImageClassification

    from medfm.hub import CardInfo, write_model_card
    from medfm.models.modeling_utils import model_contract
    from medfm.processing import MedicalImageProcessor
    from medfm.training import (
        ClassificationSample,
        GroupedBatchSampler,
        evaluate_classification,
        load_classification_items,
        train,
    )

    set_seed(args.seed)
    output = Path(args.output)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    processor = (
        MedicalImageProcessor.from_preset(args.preset)
        if args.preset
        else MedicalImageProcessor.from_pretrained(args.model)
    )
    items, classes = load_classification_items(args.data)
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for path, name in items:
        inputs = processor(str(path))
        samples.append(ClassificationSample(inputs["pixel_values"][0], inputs["spacing"][0], index[name]))
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    held_out = max(1, round(len(samples) * args.val_fraction)) if len(samples) > 1 else 0
    val_samples = [samples[i] for i in order[:held_out]] or samples
    train_samples = [samples[i] for i in order[held_out:]] or samples

    model = load_for_task(
        AutoModelForImageClassification,
        args.model,
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id=index,
    )
    model = wrap_with_adapters(model, args)

    def validate(trained, step: int) -> dict[str, float]:
        scores = evaluate_classification(trained, val_samples)
        accelerator.print(
            f"step {step}: validation {json.dumps({k: round(v, 4) for k, v in scores.items()})}"
        )
        return scores

    config = training_config(args)
    history = train(
        model,
        GroupedBatchSampler(
            train_samples,
            args.batch_size,
            seed=args.seed + accelerator.process_index,
            include_spacing=model_contract(model).accepts_spacing,
        ),
        config,
        on_eval=validate,
        accelerator=accelerator,
        description="fine-tuning",
    )
    final = history.evaluations[-1][1]
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(output)
        processor.save_pretrained(output)
        write_model_card(
            "fine-tuned",
            output,
            info=CardInfo(
                base_model=str(args.model),
                datasets=[str(args.data)],
                task_type="image-classification",
                dataset_name=Path(args.data).name,
                metrics=final,
                training={
                    "steps": args.steps,
                    "learning_rate": args.lr,
                    "batch_size": args.batch_size,
                    "classes": ", ".join(classes),
                },
            ),
        )
        (output / "metrics.json").write_text(json.dumps(final, indent=2))
    return final


if __name__ == "__main__":
    main()
