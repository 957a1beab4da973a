"""What every command line shares (``aria-*``, ``python -m aria.tools.*``, ``python -m
data_tools.*``): an error a user can cause ends it with one line on stderr that names the tool,
never a traceback; Ctrl-C ends it quietly.
"""

from __future__ import annotations

import sys
from typing import Callable

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
