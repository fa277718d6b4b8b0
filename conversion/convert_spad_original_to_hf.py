#!/usr/bin/env python
"""Convert an original PUMIT (SPAD-ViT / SPAD-VT) checkpoint to a medfm model folder.

    python conversion/convert_spad_original_to_hf.py --checkpoint pumit-b.ckpt \
        --tokenizer simple-soft.ckpt --output spad-vit-base [--config '{"num_attention_heads": 12}']

The logic lives in :mod:`medfm.models.spad.convert_spad`; this is its command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="upstream ViT checkpoint (.ckpt, .pth or .safetensors)"
    )
    parser.add_argument("--tokenizer", help="upstream SPAD-VT checkpoint, written to OUTPUT/tokenizer")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--config", default="{}", help="JSON object of config fields shapes cannot tell, or a .json file"
    )
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="allow full unpickling of a file you trust"
    )
    args = parser.parse_args(argv)

    import medfm  # noqa: F401  (registers the models)
    from medfm.errors import MedfmError
    from medfm.models.spad.convert_spad import convert_spad_checkpoint

    text = Path(args.config).read_text() if args.config.endswith(".json") else args.config
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        parser.error(f"--config is not a JSON object: {error}")
    try:
        out = convert_spad_checkpoint(
            args.checkpoint,
            args.output,
            tokenizer=args.tokenizer,
            config_overrides=overrides,
            trust_checkpoint=args.trust_checkpoint,
        )
    except (MedfmError, ValueError) as error:
        print(f"convert_spad_original_to_hf: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
