#!/usr/bin/env python
"""Pre-train the SPAD-VT soft tokenizer: L1 reconstruction plus the codebook regularisers (spec §a).

    accelerate launch examples/pretrain_tokenizer.py --data /data/ct --output runs/spad-vt \
        --steps 500000 --batch-size 8 --mixed-precision bf16

The loss is ``L1(reconstruction, input) + 0.03 * quant_loss + 1.0 * entropy`` (the upstream README's
weights; ``--config '{"quant_weight": ..., "entropy_weight": ...}'`` changes them). Crops are 128 px
in-plane and 4 tokens deep. Everything else (data, checkpoints, exact resume, trackers, processes) is as in
``pretrain_mim.py``; the tokenizer goes to ``OUTPUT/model``, ready for ``pretrain_mim.py --tokenizer``.
"""

from __future__ import annotations

from medfm.training.pretraining import pretraining_parser, run_pretraining


def main(argv: list[str] | None = None) -> list[float]:
    parser = pretraining_parser(__doc__.split("\n\n")[0], objective="spad-vt")
    return run_pretraining(parser.parse_args(argv))


if __name__ == "__main__":
    main()
