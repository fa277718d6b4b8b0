#!/usr/bin/env python
r"""Masked image modeling pre-training on many volumes and many processes, with Accelerate.

    accelerate launch examples/pretrain_tokenizer.py --data /data/ct --output runs/spad-vt \
        --steps 500000 --batch-size 8 --mixed-precision bf16
    accelerate launch examples/pretrain_mim.py --model spad-vit --data /data/ct --output runs/spad \
        --tokenizer runs/spad-vt --steps 300000 --batch-size 14 --mixed-precision bf16

--model names the objective (spad-vit now; MiM and VIS-MAE plug in by name). --tokenizer takes the --output
folder of a pretrain_tokenizer.py run (or its model/ folder, or a converted model folder with a tokenizer/
subfolder); without it the targets come from a random projection, which is for smoke tests only. Data: a
folder of NIfTI files and DICOM series, or a Decathlon dataset.json; unreadable files are skipped with a
warning naming them. Batches share one anisotropy level and crop shape. Checkpoints (accelerate state,
written atomically, the last --keep-last kept) go to OUTPUT/checkpoints; --resume_from_checkpoint latest
continues exactly where a run stopped. Metrics go to tensorboard and OUTPUT/logs/metrics.jsonl; the final
model goes to OUTPUT/model (AutoModel.from_pretrained loads the backbone) with the tokenizer in
OUTPUT/model/tokenizer.
"""

from __future__ import annotations

from medfm.training.pretraining import pretraining_parser, run_pretraining


def main(argv: list[str] | None = None) -> list[float]:
    parser = pretraining_parser(__doc__, objective="spad-vit")
    return run_pretraining(parser.parse_args(argv))


if __name__ == "__main__":
    main()
