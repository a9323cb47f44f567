"""Run as: python -m pixelray.cli COMMAND ... (what `pixelray submit` runs on the cluster)."""

import sys

from pixelray.cli import main

sys.exit(main())
