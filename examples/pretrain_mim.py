#!/usr/bin/env python
r"""Masked image modeling pre-training on many volumes and many processes, with Accelerate.

    accelerate launch examples/pretrain_tokenizer.py --data /data/ct --output runs/spad-vt \
        --steps 500000 --batch-size 8 --mixed-precision bf16
    accelerate launch examples/pretrain_mim.py --model spad-vit --data /data/ct --output runs/spad \
        --tokenizer runs/spad-vt --steps 300000 --batch-size 14 --mixed-precision bf16
    accelerate launch examples/pretrain_mim.py --model mim --data /data/ct --output runs/mim \
        --steps 100000 --batch-size 1 --accumulation-steps 64 --mixed-precision bf16

--model names the objective, from the model families' records:
  spad-vit  SPAD-ViT against the soft tokens of a frozen SPAD-VT tokenizer. --tokenizer takes the --output
            folder of a pretrain_tokenizer.py run (or its model/ folder, or a converted model folder with a
            tokenizer/ subfolder); without it the targets come from a random projection, which is for smoke
            tests only. Crops: --crop-size in-plane, --depth-tokens deep at the volume's anisotropy level,
            random flips; batches share one anisotropy level and crop shape.
  mim       MiM (Mask in Mask): random cubic crops of --crop-size (192 by default, twice the model's
            image_size) of CT windowed [-1000, 1000] HU to [0, 1] at native spacing, no flips; three levels
            (the crop at half resolution, its octants, small patches of masked octant tokens) reconstructed
            by one decoder, with cross-level alignment; AdamW (0.9, 0.95), no gradient clipping. --config
            sets the mim config's fields (sizes, mask ratios, loss_weights, loss_weight_mode, alignment).
Data: a folder of NIfTI files and DICOM series, or a Decathlon dataset.json; unreadable files are skipped
with a warning naming them. Checkpoints (accelerate state, written atomically, the last --keep-last kept)
go to OUTPUT/checkpoints; --resume_from_checkpoint latest continues exactly where a run stopped. Metrics go
to tensorboard and OUTPUT/logs/metrics.jsonl; the final model goes to OUTPUT/model (AutoModel.from_pretrained
loads the backbone; SPAD's tokenizer is saved in OUTPUT/model/tokenizer).
"""

from __future__ import annotations

from medfm.training.arguments import run_script
from medfm.training.pretraining import pretraining_parser, run_pretraining


def main(argv: list[str] | None = None) -> list[float]:
    parser = pretraining_parser(__doc__, objective="spad-vit")
    return run_pretraining(parser.parse_args(argv))


if __name__ == "__main__":
    run_script(main)
