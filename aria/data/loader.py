"""The training data stream: mixed sources -> parsed records -> encoded samples -> packed batches,
built in loader worker processes, with an exact, saveable position.

Design decisions:
- Each worker of each rank is a *slot* with its own sources' positions and its own mixing RNG, so
  workers never coordinate and slots never overlap (``sources.py``). The sources are opened (a
  JSONL file indexed) once, in the training process; forked workers inherit them.
- Mixing draws the next dataset at random by weight for every *sample* (a seeded numpy generator
  whose state is part of the position), not "the first N rows of each" as the official code did.
  Weights are per sample, not per token: a dataset of long samples gets more tokens than its weight.
- ``read_record`` is the one raw record -> ``Sample`` -> ``EncodedSample`` -> pieces step, used by
  training, evaluation, validation and ``jsonl_to_wds``. Every failure leaves it as a located
  ``DataError``; an exception nobody foresaw becomes one too (kind ``unexpected_error``, naming the
  exception type), so one strange record is skipped and counted instead of killing a worker.
- A worker yields whole micro-batches, each carrying its slot's position *after* the rows it holds
  (the start of the first row not yet emitted) and the skip counts up to that position. The
  DataLoader hands batches over in worker order, so the main process records, per slot, the position
  of the last batch it actually consumed; a restored loader resumes every slot from there and
  produces exactly the batches that would have followed.
- Bad samples go through ``BadInputPolicy``: skipped and counted by reason, or raised in strict
  mode. A strict-mode error in a worker travels to the training process as a value (the DataLoader
  would re-raise it by message only) and is raised there as the same ``DataError``, kind and
  location intact. A source that yields no usable sample in a whole pass is an error, never an
  endless loop; a worker that produces nothing for ``timeout`` seconds (a decoder hang) too.
- Memory: a micro-batch of B rows holds its crops as float32, 3 x S x S x 4 bytes each (11.5 MB at
  980 px, 2.9 MB at 490 px). With W workers the DataLoader keeps up to W x ``prefetch_factor``
  batches in shared memory, e.g. 2 workers x prefetch 2 x 30 crops of 980 px = 1.4 GB per rank
  (8 ranks a node: 11 GB of /dev/shm). Lower ``prefetch_factor`` (or rows per micro-batch) if
  /dev/shm is small; the model consumes normalised float pixels, so they are shipped as such.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aria.config import DataConfig, parse_mixture
from aria.data.errors import BadInputPolicy, DataError
from aria.data.packing import PackedBatch, Packer, Piece, RowBatcher, collate, padding_batch
from aria.data.processor import EncodedSample, Processor
from aria.data.records import Sample, parse_record
from aria.data.sources import RawRecord, open_source


class Loaded(NamedTuple):
    sample: Sample
    encoded: EncodedSample | None
    """None when no processor was given."""
    pieces: list[Piece] | None
    """None when no packer was given."""


def read_record(raw: RawRecord, processor: Processor | None = None, packer: Packer | None = None,
                start: Any = None) -> Loaded:
    """Parse ``raw``, then encode it (with a processor) and cut it into row pieces (with a packer,
    ``start`` being the loader position before it). Raises only ``DataError``, located at the record."""
    try:
        if raw.error is not None:
            raise raw.error
        sample = parse_record(raw.record, raw.where, raw.resolver)
        encoded = pieces = None
        if processor is not None:
            encoded = processor.encode(sample, max_tokens=packer.seq_len if packer is not None else None)
            if packer is not None:
                pieces = packer.pieces(encoded, start)
        return Loaded(sample, encoded, pieces)
    except DataError as err:
        raise err.at(raw.where) from None
    except Exception as exc:  # a bug or a library failure on strange input: this record only
        raise DataError(f"unexpected {type(exc).__name__} while reading the record: {exc}",
                        "unexpected_error", raw.where) from exc


class Mixture:
    """Weighted random interleaving of sources for one slot (one draw per sample)."""

    def __init__(self, sources: list, weights: list[float], slot: int, num_slots: int, seed: int,
                 state: dict | None = None) -> None:
        self.sources, self.slot, self.num_slots, self.seed = sources, slot, num_slots, seed
        total = float(sum(weights))
        self.probs = np.asarray(weights, dtype=np.float64) / total
        self.rng = np.random.default_rng([seed, slot, 7])
        self.positions: list[dict | None] = [None] * len(sources)
        if state is not None:
            if len(state["positions"]) != len(sources):
                raise ValueError(f"saved data position has {len(state['positions'])} datasets but the "
                                 f"config lists {len(sources)}")
            self.rng.bit_generator.state = state["rng"]
            self.positions = list(state["positions"])
        self.iters = [s.iterate(slot, num_slots, seed, p, salt=k)
                      for k, (s, p) in enumerate(zip(sources, self.positions))]

    def state(self) -> dict:
        return {"rng": copy.deepcopy(self.rng.bit_generator.state), "positions": copy.deepcopy(self.positions)}

    def next(self) -> tuple[RawRecord, dict, int]:
        """The next record, the position *before* it was drawn, and its source's index."""
        before = self.state()
        k = int(self.rng.choice(len(self.sources), p=self.probs)) if len(self.sources) > 1 else 0
        raw, self.positions[k] = next(self.iters[k])
        return raw, before, k


@dataclass
class StreamSpec:
    """Everything a worker needs to rebuild the stream."""

    datasets: list[tuple[str, float]]
    processor: Processor
    seq_len: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    strict: bool = False
    allow_outside_media: bool = False
    split_long_text: bool = True
    sources: list | None = None
    """The opened sources of ``datasets`` (opened by ``TrainLoader`` if None)."""


@dataclass
class WorkerFailure:
    """A strict-mode ``DataError`` raised in a worker, shipped as a value to be raised again in the
    training process (the DataLoader's own re-raise keeps only the message)."""

    error: DataError


class PackedStream(IterableDataset):
    """Endless packed micro-batches for one rank; one slot per loader worker."""

    def __init__(self, spec: StreamSpec, workers: int, state: dict | None = None,
                 first_worker: int = 0) -> None:
        super().__init__()
        self.spec, self.workers, self.state = spec, max(1, workers), state or {}
        # DataLoader worker w serves worker slot (w + first_worker) % workers, so that a resumed
        # loader's first batch comes from the slot whose turn it was.
        self.first_worker = first_worker

    def __iter__(self) -> Iterator[PackedBatch | WorkerFailure]:
        try:
            yield from self._batches()
        except DataError as err:
            yield WorkerFailure(err)

    def _batches(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        spec = self.spec
        num_slots = spec.world_size * self.workers
        slot = spec.rank * self.workers + (worker + self.first_worker) % self.workers
        sources = spec.sources or [open_source(p, "train", spec.allow_outside_media) for p, _ in spec.datasets]
        saved = self.state.get(str(slot)) or self.state.get(slot)
        mixture = Mixture(sources, [w for _, w in spec.datasets], slot, num_slots, spec.seed,
                          saved["mixture"] if saved else None)
        skip_chunks = saved["chunk"] if saved else 0
        policy = BadInputPolicy(spec.strict)
        if saved:
            policy.counts.update(saved.get("skipped", {}))
        batcher = RowBatcher(spec.seq_len, spec.batch_size, spec.split_long_text)
        # usable samples per source in its current epoch: a whole epoch without one is an error
        # (a resumed run only judges epochs it saw from their first sample)
        epochs, usable, whole = [None] * len(sources), [0] * len(sources), [False] * len(sources)
        while True:
            raw, before, k = mixture.next()
            position = mixture.positions[k]
            if position["epoch"] != epochs[k]:
                if whole[k] and usable[k] == 0:
                    raise RuntimeError(f"dataset {sources[k].name} gave loader slot {slot} no usable "
                                       f"sample in a whole epoch; skipped so far: {dict(policy.counts)}")
                epochs[k], usable[k], whole[k] = position["epoch"], 0, position["taken"] == 1
            # the resume point before this sample: where the mixture was and what had been skipped
            start = {"mixture": before, "skipped": dict(policy.counts)}
            loaded = policy.attempt(read_record, raw, spec.processor, batcher.packer, start)
            if loaded is None:
                continue
            usable[k] += 1
            pieces = loaded.pieces
            if skip_chunks:  # resuming inside a split document: its first chunks were emitted
                pieces, skip_chunks = pieces[skip_chunks:], 0
            batcher.add(pieces)
            for rows in batcher.full_batches():
                batch = collate(rows, spec.seq_len, spec.processor.tokenizer.pad_id,
                                spec.processor.tokens_per_crop)
                start, chunk = batcher.next_start() or (
                    {"mixture": mixture.state(), "skipped": dict(policy.counts)}, 0)
                batch.state = {"slot": slot, "position": {"mixture": start["mixture"], "chunk": chunk,
                                                          "skipped": start["skipped"]}}
                yield batch


class TrainLoader:
    """Iterates packed batches for this rank and tracks the resume position of every slot.

    ``prefetch_factor``: batches each worker prepares ahead (see the module docstring for the
    shared-memory arithmetic). ``timeout``: seconds to wait for a worker's next batch before
    failing (a decoder hang must not hang training); ignored without workers.
    """

    def __init__(self, spec: StreamSpec, num_workers: int, prefetch_factor: int = 2,
                 timeout: float = 600.0) -> None:
        if spec.sources is None:
            spec.sources = [open_source(p, "train", spec.allow_outside_media) for p, _ in spec.datasets]
        self.spec, self.num_workers = spec, num_workers
        self.prefetch_factor, self.timeout = prefetch_factor, timeout
        self.positions: dict[int, dict] = {}
        self.next_worker = 0  # the worker slot whose batch comes next (they take turns)

    def state_dict(self) -> dict:
        return {"num_slots": self.spec.world_size * max(1, self.num_workers),
                "next_worker": self.next_worker, "positions": copy.deepcopy(self.positions)}

    def load_state_dict(self, state: dict) -> None:
        slots = self.spec.world_size * max(1, self.num_workers)
        if state["num_slots"] != slots:
            raise ValueError(f"the saved data position was made with {state['num_slots']} loader "
                             f"slots (ranks x workers) but this run has {slots}; resume with the same "
                             "world size and data.num_workers")
        self.positions = {int(k): v for k, v in state["positions"].items()}
        self.next_worker = state["next_worker"]

    def skipped(self) -> Counter:
        """Bad samples skipped before the current position, by reason, summed over this rank's
        workers."""
        total: Counter = Counter()
        for position in self.positions.values():
            total.update(position.get("skipped", {}))
        return total

    def __iter__(self) -> Iterator[PackedBatch]:
        stream = PackedStream(self.spec, self.num_workers, dict(self.positions), self.next_worker)
        kwargs = {}
        if self.num_workers > 0:
            kwargs = dict(num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                          persistent_workers=False, multiprocessing_context="fork",
                          timeout=self.timeout)
        for batch in DataLoader(stream, batch_size=None, **kwargs):
            if isinstance(batch, WorkerFailure):
                raise batch.error
            self.positions[batch.state["slot"]] = batch.state["position"]
            self.next_worker = (self.next_worker + 1) % max(1, self.num_workers)
            yield batch


def build_train_loader(data: DataConfig, processor: Processor, seq_len: int, batch_size: int,
                       rank: int = 0, world_size: int = 1, seed: int = 0, prefetch_factor: int = 2,
                       timeout: float = 600.0) -> TrainLoader:
    datasets = parse_mixture(data.train, "data.train")
    if not datasets:
        raise ValueError("config field 'data.train' is empty: give a dataset path")
    # opened (and indexed) once, here: a missing or empty dataset fails now, not in a worker
    sources = [open_source(path, "train", data.allow_outside_media) for path, _ in datasets]
    spec = StreamSpec(datasets, processor, seq_len, batch_size, rank, world_size, seed, data.strict,
                      data.allow_outside_media, data.split_long_text, sources)
    return TrainLoader(spec, data.num_workers, prefetch_factor, timeout)


def iterate_samples(path: str, processor: Processor, split: str = "test", strict: bool = False,
                    allow_outside_media: bool = False, policy: BadInputPolicy | None = None,
                    seq_len: int | None = None) -> Iterator[tuple[Sample, EncodedSample]]:
    """Every sample of a dataset once, in order, as (parsed Sample, EncodedSample); bad ones are
    handled by ``policy`` (evaluation, validation, expert reports). With ``seq_len``, samples that
    cannot fit a packed row of that length are bad too (the packer's rule)."""
    policy = policy or BadInputPolicy(strict)
    packer = Packer(seq_len) if seq_len is not None else None
    for raw in open_source(path, split, allow_outside_media).iterate_once():
        loaded = policy.attempt(read_record, raw, processor, packer)
        if loaded is not None:
            yield loaded.sample, loaded.encoded


def eval_batches(path: str, processor: Processor, seq_len: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, strict: bool = False,
                 allow_outside_media: bool = False) -> Iterator[PackedBatch]:
    """One deterministic pass over a held-out set, packed like training; ranks take every
    world_size-th batch. Every rank yields the same number of batches: a rank short of one at the
    end yields an all-padding batch (``padding=True``, no tokens, no targets), so collective
    operations per batch stay matched across ranks."""
    policy = BadInputPolicy(strict)
    batcher = RowBatcher(seq_len, batch_size, split_long_text=True)
    pad_id, table = processor.tokenizer.pad_id, processor.tokens_per_crop
    n = 0  # batches formed so far, over all ranks
    for raw in open_source(path, "test", allow_outside_media).iterate_once():
        loaded = policy.attempt(read_record, raw, processor, batcher.packer)
        if loaded is None:
            continue
        batcher.add(loaded.pieces)
        for rows in batcher.full_batches():
            if n % world_size == rank:
                yield collate(rows, seq_len, pad_id, table)
            n += 1
    rows = batcher.rest()
    if rows:
        if n % world_size == rank:
            yield collate(rows, seq_len, pad_id, table)
        n += 1
    if n % world_size and rank >= n % world_size:
        yield padding_batch(batch_size, seq_len, pad_id)
