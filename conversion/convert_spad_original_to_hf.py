#!/usr/bin/env python
"""Convert an original PUMIT (SPAD-ViT / SPAD-VT) checkpoint to a medfm model folder.

    python conversion/convert_spad_original_to_hf.py --checkpoint pumit-b.ckpt \
        --tokenizer simple-soft.ckpt --output spad-vit-base [--config '{"num_attention_heads": 12}']

The same as ``medfm convert spad ...``; the logic lives in :mod:`medfm.models.spad.convert_spad`.
"""

from __future__ import annotations

import sys

from medfm.cli import convert_main

if __name__ == "__main__":
    sys.exit(convert_main("spad"))
