"""``python -m aria.train recipe=NAME key=value ...`` (also ``aria-train``; torchrun launches it)."""

import sys

from aria.cli.train import main

sys.exit(main())
