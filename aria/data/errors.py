"""The exceptions every data component raises for bad input, and the skip-or-raise policy.

Design decisions:
- A bad record is never a crash deep in a long run and never silently lost: components raise
  ``DataError`` (or ``MediaError`` for unreadable media) carrying *where* (file and line, or shard
  and key) and *why*; the dataset layer hands it to ``BadInputPolicy``, which counts it by reason,
  logs it, and skips the record, or re-raises it when ``data.strict=true``.
- A ``DataError`` pickles with its kind and location (``__reduce__``), so it can cross from a loader
  worker to the training process intact.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable

log = logging.getLogger("aria.data")


class DataError(ValueError):
    """A record that cannot be used. ``kind`` is a short stable reason name used for counting."""

    def __init__(self, reason: str, kind: str = "invalid_record", where: str | None = None) -> None:
        self.reason, self.kind, self.where = reason, kind, where
        super().__init__(f"{where}: {reason}" if where else reason)

    def __reduce__(self):
        return type(self), (self.reason, self.kind, self.where)

    def at(self, where: str) -> "DataError":
        """The same error located at ``where`` (e.g. 'data/train.jsonl:17'), if not located yet."""
        if self.where is None:
            self.where = where
            self.args = (f"{where}: {self.reason}",)
        return self


class MediaError(DataError):
    """An image or video that is missing, unreadable, truncated or empty."""

    def __init__(self, reason: str, kind: str = "bad_media", where: str | None = None) -> None:
        super().__init__(reason, kind, where)


class BadInputPolicy:
    """Skip + count + log (default) or raise (strict) for every ``DataError``."""

    def __init__(self, strict: bool = False, max_logged: int = 100, keep: bool = False) -> None:
        self.strict = strict
        self.max_logged = max_logged
        self.counts: Counter[str] = Counter()
        self.errors: list[DataError] | None = [] if keep else None
        """Every handled error, in order, when ``keep`` (validation reports)."""

    def handle(self, err: DataError) -> None:
        if self.strict:
            raise err
        self.counts[err.kind] += 1
        if self.errors is not None:
            self.errors.append(err)
            return
        if sum(self.counts.values()) <= self.max_logged:
            log.warning("skipped bad sample (%s): %s", err.kind, err)

    def attempt(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any | None:
        """``fn(*args, **kwargs)``, or None after handling the ``DataError`` it raised."""
        try:
            return fn(*args, **kwargs)
        except DataError as err:
            self.handle(err)
            return None

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())
