#!/usr/bin/env python
"""Convert an original MiM checkpoint (pre-training, segmentation or classification) to a medfm model folder.

    python conversion/convert_mim_original_to_hf.py --checkpoint checkpoint-final.pth --output mim-base \
        [--config '{"num_attention_heads": 12, "decoder_num_attention_heads": 16}']

The same as ``medfm convert mim ...``; the logic lives in :mod:`medfm.models.mim.convert_mim`.
"""

from __future__ import annotations

import sys

from medfm.cli import convert_main

if __name__ == "__main__":
    sys.exit(convert_main("mim"))
