"""``python -m medfm.app``: serve the web viewer (see :func:`medfm.app.main`)."""

import sys

from .launcher import main

sys.exit(main())
