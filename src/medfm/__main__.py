"""``python -m medfm``: the ``medfm`` command (what ``accelerate launch -m medfm segment ...`` runs)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
