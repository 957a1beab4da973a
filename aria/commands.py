"""What every command line shares (``aria-*``, ``python -m aria.tools.*``, ``python -m
data_tools.*``): an error a user can cause ends it with one line on stderr that names the tool,
never a traceback; Ctrl-C ends it quietly. And the flags of every tool that loads a model, declared
without importing torch (``--help`` stays quick).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from aria.config import IMAGE_SIZES

DTYPE_NAMES = ("fp32", "bf16", "fp16")
"""``--dtype`` values (``aria.convert.store.DTYPES`` maps them to torch dtypes)."""
USER_ERRORS = (ValueError, OSError)
"""What a user can cause: bad values and bad records (``DataError`` is a ``ValueError``), a missing,
unreadable or unwritable file (``OSError``)."""


def run_command(prog: str, run: Callable[[], int | None], error_code: int = 1) -> int:
    """``run()``'s exit code (None = 0); ``error_code`` after printing ``PROG: error: MESSAGE`` to
    stderr when a user's error ends it; 130 on Ctrl-C."""
    try:
        return run() or 0
    except USER_ERRORS as err:
        sys.stdout.flush()
        print(f"{prog}: error: {err}", file=sys.stderr)
        return error_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def run_report(prog: str, compute: Callable[[], Any], render: Callable[[Any], str],
               json_path: Path | None) -> int:
    """``run_command`` for a tool that computes a result, prints ``render(result)`` and, with
    ``json_path``, also writes the result there as JSON."""
    def run() -> int:
        result = compute()
        print(render(result))
        if json_path is not None:
            Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        return 0

    return run_command(prog, run)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL and the inference flags, the same in every tool that loads a model."""
    parser.add_argument("model", help="Hugging Face directory, or our model / checkpoint / run directory")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory or .model file (default: the run's data.tokenizer, "
                             "else the one in MODEL)")
    parser.add_argument("--image-size", type=int, default=None, choices=IMAGE_SIZES,
                        help="crop side of images (default: the run's, else the processor files', else "
                             "the model's largest)")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="frames per video when the record does not say (default: the run's, else 8)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                        help="weights' dtype (default: bf16 on a GPU, fp32 on the CPU)")
