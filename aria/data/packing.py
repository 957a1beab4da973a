"""Packing encoded samples into fixed-length rows, and collating rows into a model batch.

Letters: B rows, L row length (``seq_len``).

Design decisions:
- Greedy and order-preserving: samples go into the current row while they fit; the next one that
  does not fit closes the row (padded) and opens the next. Rows therefore depend only on the
  sample stream, which makes resuming from a saved position exact.
- A sample is never cut through an image block, and a conversation is never cut at all (an answer
  must not land in a row without its question): a sample longer than the row is skipped and counted
  (``DataError`` kind ``too_long``; an error in strict mode). Only text-only *documents* may be
  split into row-sized chunks (``split_long_text``), since any cut of plain text is a valid document.
- Every sample keeps its own positions (0, 1, ...) and segment id (1, 2, ... within the row; 0 is
  padding), so attention never crosses samples and RoPE restarts per sample.
- Each row remembers where its first piece came from (the loader position before that sample and
  the chunk index inside it): a saved position points at the first sample not yet emitted.
- ``RowBatcher`` is the one place rows are filled and grouped into micro-batches, for training
  (``loader.PackedStream``) and evaluation (``loader.eval_batches``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch

from aria.config import IGNORE_INDEX
from aria.data.processor import EncodedSample, group_crops, too_long


@dataclass
class Piece:
    sample: EncodedSample
    start: Any
    """Loader position before the sample this piece comes from."""
    chunk: int = 0
    """Index of this piece among the chunks of a split document."""


@dataclass
class Row:
    pieces: list[Piece] = field(default_factory=list)
    length: int = 0


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    """(B, L) int64, padded with the tokenizer's pad id."""
    targets: torch.Tensor
    """(B, L) int64, IGNORE_INDEX on padding and unsupervised positions."""
    position_ids: torch.Tensor
    """(B, L) int64, restarting at 0 for every sample."""
    segment_ids: torch.Tensor
    """(B, L) int64, 1, 2, ... per sample in its row, 0 for padding."""
    pixel_values: Any = None
    pixel_mask: Any = None
    image_feature_order: torch.Tensor | None = None
    image_blocks: list[tuple[str | None, int, bool]] | None = None
    """With an image-token cache: every media block in slot order as (key, slots, cached); the
    pixels hold the uncached ones only (``Processor.cached_media``, ``Aria.embed``)."""
    num_samples: int = 0
    num_targets: int = 0
    num_tokens: int = 0
    """Non-padding tokens."""
    num_images: int = 0
    num_frames: int = 0
    where: list[str] = field(default_factory=list)
    """Where each piece came from ('file:line' or 'shard:key'), in row order (debugging, tests)."""
    padding: bool = False
    """An all-padding batch (no tokens, no targets) that evens out batch counts across ranks."""
    state: dict = field(default_factory=dict)
    """Loader bookkeeping (resume position, skip counters); not for the model."""

    def model_inputs(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "targets": self.targets, "position_ids": self.position_ids,
                "segment_ids": self.segment_ids, "pixel_values": self.pixel_values,
                "pixel_mask": self.pixel_mask, "image_feature_order": self.image_feature_order,
                "image_blocks": self.image_blocks}

    def pin_memory(self) -> "PackedBatch":
        """A copy whose model inputs live in pinned (page-locked) host memory, so that copying them to
        a GPU with ``non_blocking=True`` is asynchronous (needs CUDA). The DataLoader's pinning calls
        this too."""
        def pin(x):
            if isinstance(x, list):  # pixels of several crop sizes
                return [pin(v) for v in x]
            return x.pin_memory() if isinstance(x, torch.Tensor) else x

        return replace(self, **{name: pin(value) for name, value in self.model_inputs().items()})


def split_document(sample: EncodedSample, seq_len: int) -> list[EncodedSample]:
    """Row-sized chunks of a text-only document."""
    n = len(sample)
    return [EncodedSample(sample.input_ids[i: i + seq_len], sample.targets[i: i + seq_len],
                          where=f"{sample.where} [tokens {i}:{min(i + seq_len, n)}]", document=True)
            for i in range(0, n, seq_len)]


class Packer:
    """Feeds samples in, gets completed rows out."""

    def __init__(self, seq_len: int, split_long_text: bool = True) -> None:
        self.seq_len, self.split_long_text = seq_len, split_long_text
        self.row = Row()

    def pieces(self, sample: EncodedSample, start: Any) -> list[Piece]:
        """The pieces of one sample; ``DataError`` if it cannot fit a row."""
        if len(sample) <= self.seq_len:
            return [Piece(sample, start)]
        if self.split_long_text and sample.document and not sample.crops:
            return [Piece(chunk, start, i) for i, chunk in enumerate(split_document(sample, self.seq_len))]
        raise too_long(len(sample), sample.num_crops, self.seq_len).at(sample.where)

    def add(self, piece: Piece) -> Row | None:
        """Adds one piece; returns the row it closed, if any."""
        closed = None
        if self.row.length + len(piece.sample) > self.seq_len:
            closed, self.row = self.row, Row()
        self.row.pieces.append(piece)
        self.row.length += len(piece.sample)
        return closed

    def open_start(self) -> tuple[Any, int] | None:
        """Where the open row's first piece came from (None if the row is empty)."""
        return (self.row.pieces[0].start, self.row.pieces[0].chunk) if self.row.pieces else None


class RowBatcher:
    """Pieces in, micro-batches of ``batch_size`` full rows out (plus the rest at the end)."""

    def __init__(self, seq_len: int, batch_size: int, split_long_text: bool = True) -> None:
        self.packer = Packer(seq_len, split_long_text)
        self.batch_size = batch_size
        self.rows: list[Row] = []

    def add(self, pieces: list[Piece]) -> None:
        for piece in pieces:
            closed = self.packer.add(piece)
            if closed is not None:
                self.rows.append(closed)

    def full_batches(self) -> Iterator[list[Row]]:
        """The complete micro-batches now available (each leaves this batcher as it is yielded)."""
        while len(self.rows) >= self.batch_size:
            batch, self.rows = self.rows[: self.batch_size], self.rows[self.batch_size:]
            yield batch

    def next_start(self) -> tuple[Any, int] | None:
        """Where the first row not yet handed out starts (None if nothing is pending)."""
        if self.rows:
            return self.rows[0].pieces[0].start, self.rows[0].pieces[0].chunk
        return self.packer.open_start()

    def rest(self) -> list[Row]:
        """Every row not yet handed out, the open one included (end of a finite pass)."""
        rows = self.rows + ([self.packer.row] if self.packer.row.pieces else [])
        self.rows, self.packer.row = [], Row()
        return rows


def to_device(value: Any, device: torch.device | str, float_dtype: torch.dtype | None = None) -> Any:
    """``value`` (a tensor, or a dict / list of them, or None) on ``device``; floating tensors also
    in ``float_dtype`` when given (integer ids, uint8 pixels and bool masks keep theirs)."""
    if isinstance(value, torch.Tensor):
        dtype = float_dtype if float_dtype is not None and value.is_floating_point() else None
        return value.to(device, dtype, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device, float_dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device, float_dtype) for v in value)
    return value


def collate(rows: list[Row], seq_len: int, pad_id: int, tokens_per_crop: dict[int, int]) -> PackedBatch:
    B, L = len(rows), seq_len
    input_ids_BL = torch.full((B, L), pad_id, dtype=torch.long)
    targets_BL = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    position_ids_BL = torch.zeros((B, L), dtype=torch.long)
    segment_ids_BL = torch.zeros((B, L), dtype=torch.long)
    crops, batch = [], PackedBatch(input_ids_BL, targets_BL, position_ids_BL, segment_ids_BL)
    for b, row in enumerate(rows):
        at = 0
        for seg, piece in enumerate(row.pieces, start=1):
            s = piece.sample
            n = len(s)
            input_ids_BL[b, at: at + n] = s.input_ids
            targets_BL[b, at: at + n] = s.targets
            position_ids_BL[b, at: at + n] = torch.arange(n)
            segment_ids_BL[b, at: at + n] = seg
            crops.extend(s.crops)
            if s.image_blocks is not None:
                batch.image_blocks = (batch.image_blocks or []) + s.image_blocks
            batch.num_images += s.num_images
            batch.num_frames += s.num_frames
            batch.num_samples += piece.chunk == 0
            batch.where.append(s.where)
            at += n
        batch.num_tokens += at
    grouped = group_crops(crops, tokens_per_crop)
    batch.pixel_values, batch.pixel_mask = grouped["pixel_values"], grouped["pixel_mask"]
    batch.image_feature_order = grouped["image_feature_order"]
    batch.num_targets = int((targets_BL != IGNORE_INDEX).sum())
    return batch


def padding_batch(batch_size: int, seq_len: int, pad_id: int) -> PackedBatch:
    """A batch of ``batch_size`` all-padding rows: no tokens, no targets, ``padding=True``."""
    batch = collate([Row() for _ in range(batch_size)], seq_len, pad_id, {})
    batch.padding = True
    return batch
