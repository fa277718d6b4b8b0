#!/usr/bin/env python
r"""Pre-train the SPAD-VT soft tokenizer whose soft tokens are the targets of SPAD-ViT's masked image modeling.

    accelerate launch examples/pretrain_tokenizer.py --data /data/ct --output runs/spad-vt \
        --steps 500000 --batch-size 8 --mixed-precision bf16
    accelerate launch examples/pretrain_mim.py --model spad-vit --data /data/ct --output runs/spad \
        --tokenizer runs/spad-vt ...

The loss is L1(reconstruction, input) + 0.03 * quant_loss + 1.0 * entropy (the upstream README's weights;
--config '{"quant_weight": ..., "entropy_weight": ...}' changes them, and the same JSON object sets SPAD-VT
config fields such as codebook_size). The perceptual and adversarial terms of upstream are left out. Crops
are 128 px in-plane and 4 tokens deep by default. Everything else (data, checkpoints, exact resume,
trackers, processes) is as in pretrain_mim.py; the tokenizer goes to OUTPUT/model, and
pretrain_mim.py --tokenizer OUTPUT uses it.
"""

from __future__ import annotations

from medfm.training.pretraining import pretraining_parser, run_pretraining


def main(argv: list[str] | None = None) -> list[float]:
    parser = pretraining_parser(__doc__, objective="spad-vt")
    return run_pretraining(parser.parse_args(argv))


if __name__ == "__main__":
    main()
