"""aria-generate: chat with a model from the command line.

Not available yet: it needs the tokenizer and image/video processor, which are being built. The
generation loop itself exists (``aria.model.generate``); ``scripts/quickstart.sh`` shows it on a
tiny model. Until then this command exits with status 2 and says so.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("aria-generate: not implemented yet in this version of aria (it needs the tokenizer and "
          "processor); see aria.model.generate for the generation loop.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
