#!/usr/bin/env python
"""Fine-tune a medfm classifier with Accelerate, in full or with LoRA/DoRA adapters.

    accelerate launch examples/finetune_classification.py --model org/spad-vit-base \
        --data organmnist3d/ --output runs/organ --preset spad-medmnist-3d --steps 3000 [--lora]

``--model`` is any medfm model (a folder or Hub id); its classification head is built through
``AutoModelForImageClassification``. Data: a folder with one sub-folder per class (NIfTI or DICOM inside) or a JSON file with a ``training``
list of ``{"image", "label"}``; the class names become the model's ``id2label``. A fraction of each class
(stratified: every class with two or more images has one in validation) is held out for validation accuracy
and AUC (``null`` when it cannot be computed). Checkpoints go to ``OUTPUT/checkpoints`` at every validation
(``--resume-from-checkpoint latest`` continues a run). The final model, a self-contained adapter folder or
(``--merge``) the merged model, its processor, ``metrics.json`` and a card go to ``OUTPUT``.
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
    args = parser.parse_args(argv)
    if args.merge and not (args.lora or args.dora):
        parser.error("--merge needs --lora or --dora (a full fine-tune is saved whole anyway)")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForImageClassification

    from medfm.data.classification import stratified_split
    from medfm.hub import CardInfo, check_model_source, write_model_card
    from medfm.models.modeling_utils import model_contract
    from medfm.processing import MedicalImageProcessor
    from medfm.training import (
        ClassificationSample,
        GroupedBatchSampler,
        evaluate_classification,
        load_classification_items,
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
    items, classes = load_classification_items(args.data)
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for path, name in items:
        inputs = processor(str(path))
        samples.append(ClassificationSample(inputs["pixel_values"][0], inputs["spacing"][0], index[name]))
    train_index, val_index = stratified_split(
        [sample.label for sample in samples], args.val_fraction, seed=args.seed
    )
    val_samples = [samples[i] for i in val_index] or samples
    train_samples = [samples[i] for i in train_index] or samples
    counts = ", ".join(
        f"{name} {sum(samples[i].label == k for i in train_index)}/{sum(samples[i].label == k for i in val_index)}"
        for k, name in enumerate(classes)
    )
    accelerator.print(
        f"data: {len(samples)} images, {len(train_index)} for training and {len(val_index)} for validation "
        f"(per class, train/val: {counts})"
    )

    model = load_for_task(
        AutoModelForImageClassification,
        args.model,
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id=index,
    )
    model = wrap_with_adapters(model, args)
    total, trainable = parameter_counts(model)
    accelerator.print(
        f"model: {total:,} parameters, {trainable:,} trainable ({100 * trainable / max(total, 1):.2f}%, "
        f"adapters: {adapter_kind(args)})"
    )
    save_trainable_parameters_only(accelerator)

    def validate(trained, step: int) -> dict[str, float | None]:
        scores = evaluate_classification(trained, val_samples)
        shown = {k: None if v is None else round(v, 4) for k, v in scores.items()}
        accelerator.print(f"step {step}: validation {json.dumps(shown)}")
        return scores

    config = training_config(args, output_dir=str(output), save_every=args.eval_every, keep_last=2)
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
        kind = save_fine_tuned(
            accelerator.unwrap_model(model),
            output,
            args,
            auto_class=AutoModelForImageClassification,
            processor=processor,
        )
        write_model_card(
            "fine-tuned",
            output,
            info=CardInfo(
                base_model=str(args.model),
                datasets=[str(args.data)],
                task_type="image-classification",
                dataset_name=Path(args.data).name,
                metrics={k: v for k, v in final.items() if v is not None},
                training={
                    "steps": args.steps,
                    "learning_rate": args.lr,
                    "batch_size": args.batch_size,
                    "classes": ", ".join(classes),
                    "adapters": adapter_kind(args),
                },
                validation_size=len(val_samples),
            ),
        )
        (output / "metrics.json").write_text(json.dumps(final, indent=2))
        accelerator.print(f"saved {kind} to {output}")
    return final


if __name__ == "__main__":
    run_script(main)
