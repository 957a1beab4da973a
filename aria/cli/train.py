"""aria-train: the training entry point (``torchrun ... -m aria.train``).

Not available yet: the trainer (DeepSpeed ZeRO + expert parallelism, stages, recipes) is being
built. Until then this command exits with status 2 and says so.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("aria-train: training is not implemented yet in this version of aria "
          "(the model, configs and conversion are); it will run "
          "`torchrun -m aria.train recipe=...`.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
