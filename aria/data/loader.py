"""The training data stream: mixed sources -> parsed records -> encoded samples -> packed batches,
built in loader worker processes, with an exact, saveable position.

Design decisions:
- Each worker of each rank is a *slot* with its own sources' positions and its own mixing RNG, so
  workers never coordinate and slots never overlap (``sources.py``).
- Mixing draws the next dataset at random by weight for every sample (a seeded numpy generator
  whose state is part of the position), not "the first N rows of each" as the official code did.
- A worker yields whole micro-batches, each carrying its slot's position *after* the rows it holds
  (the start of the first row not yet emitted). The DataLoader hands batches over in worker order,
  so the main process records, per slot, the position of the last batch it actually consumed; a
  restored loader resumes every slot from there and produces exactly the batches that would have
  followed.
- Bad samples go through ``BadInputPolicy``: skipped and counted by reason (the counts travel with
  each batch), or raised in strict mode. A source that yields no usable sample in a whole pass is
  an error, never an endless loop.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aria.config import DataConfig, parse_mixture
from aria.data.errors import BadInputPolicy, DataError
from aria.data.packing import PackedBatch, Packer, collate
from aria.data.processor import Processor
from aria.data.records import parse_record
from aria.data.sources import RawRecord, open_source


class Mixture:
    """Weighted random interleaving of sources for one slot."""

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
        self.iters = [s.iterate(slot, num_slots, seed, p) for s, p in zip(sources, self.positions)]

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
    """Everything a worker needs to rebuild the stream (picklable)."""

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


class PackedStream(IterableDataset):
    """Endless packed micro-batches for one rank; one slot per loader worker."""

    def __init__(self, spec: StreamSpec, workers: int, state: dict | None = None,
                 first_worker: int = 0) -> None:
        super().__init__()
        self.spec, self.workers, self.state = spec, max(1, workers), state or {}
        # DataLoader worker w serves worker slot (w + first_worker) % workers, so that a resumed
        # loader's first batch comes from the slot whose turn it was.
        self.first_worker = first_worker

    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        spec = self.spec
        num_slots = spec.world_size * self.workers
        slot = spec.rank * self.workers + (worker + self.first_worker) % self.workers
        sources = [open_source(path, "train", spec.allow_outside_media) for path, _ in spec.datasets]
        saved = self.state.get(str(slot)) or self.state.get(slot)
        mixture = Mixture(sources, [w for _, w in spec.datasets], slot, num_slots, spec.seed,
                          saved["mixture"] if saved else None)
        skip_chunks = saved["chunk"] if saved else 0
        policy = BadInputPolicy(spec.strict)
        if saved:
            policy.counts.update(saved.get("skipped", {}))
        packer = Packer(spec.seq_len, spec.split_long_text)
        rows = []
        tokens_per_crop = spec.processor.tokens_per_crop
        pad_id = spec.processor.tokenizer.pad_id
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
                epochs[k], usable[k] = position["epoch"], 0
                whole[k] = position["taken"] == 1 and position.get("shard", 0) == 0
            try:
                if raw.error is not None:
                    raise raw.error
                sample = parse_record(raw.record, raw.where, raw.resolver)
                pieces = packer.pieces(spec.processor.encode(sample), before)
            except DataError as err:
                policy.handle(err)
                continue
            usable[k] += 1
            if skip_chunks:  # resuming inside a split document: its first chunks were emitted
                pieces, skip_chunks = pieces[skip_chunks:], 0
            for piece in pieces:
                closed = packer.add(piece)
                if closed is not None:
                    rows.append(closed)
            while len(rows) >= spec.batch_size:
                batch_rows, rows = rows[: spec.batch_size], rows[spec.batch_size:]
                batch = collate(batch_rows, spec.seq_len, pad_id, tokens_per_crop)
                if rows:
                    start, chunk = rows[0].pieces[0].start, rows[0].pieces[0].chunk
                else:
                    start, chunk = packer.open_start() or (mixture.state(), 0)
                batch.state = {"slot": slot, "position": {"mixture": start, "chunk": chunk,
                                                          "skipped": dict(policy.counts)}}
                yield batch


class TrainLoader:
    """Iterates packed batches for this rank and tracks the resume position of every slot."""

    def __init__(self, spec: StreamSpec, num_workers: int, prefetch_factor: int = 4) -> None:
        self.spec, self.num_workers, self.prefetch_factor = spec, num_workers, prefetch_factor
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
        """Bad samples skipped so far, by reason, summed over this rank's workers."""
        total: Counter = Counter()
        for position in self.positions.values():
            total.update(position.get("skipped", {}))
        return total

    def __iter__(self) -> Iterator[PackedBatch]:
        stream = PackedStream(self.spec, self.num_workers, dict(self.positions), self.next_worker)
        kwargs = {}
        if self.num_workers > 0:
            kwargs = dict(num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                          persistent_workers=False, multiprocessing_context="fork")
        for batch in DataLoader(stream, batch_size=None, **kwargs):
            self.positions[batch.state["slot"]] = batch.state["position"]
            self.next_worker = (self.next_worker + 1) % max(1, self.num_workers)
            yield batch


def build_train_loader(data: DataConfig, processor: Processor, seq_len: int, batch_size: int,
                       rank: int = 0, world_size: int = 1, seed: int = 0) -> TrainLoader:
    datasets = parse_mixture(data.train, "data.train")
    if not datasets:
        raise ValueError("config field 'data.train' is empty: give a dataset path")
    for path, _ in datasets:  # fail now, not in a worker, on a missing or empty dataset
        open_source(path, "train", data.allow_outside_media)
    spec = StreamSpec(datasets, processor, seq_len, batch_size, rank, world_size, seed, data.strict,
                      data.allow_outside_media, data.split_long_text)
    return TrainLoader(spec, data.num_workers)


def iterate_samples(path: str, processor: Processor, split: str = "test", strict: bool = False,
                    allow_outside_media: bool = False, policy: BadInputPolicy | None = None
                    ) -> Iterator[tuple[Any, Any]]:
    """Every sample of a dataset once, in order, as (parsed Sample, EncodedSample); bad ones are
    handled by ``policy`` (evaluation, validation, expert reports)."""
    policy = policy or BadInputPolicy(strict)
    for raw in open_source(path, split, allow_outside_media).iterate_once():
        try:
            if raw.error is not None:
                raise raw.error
            sample = parse_record(raw.record, raw.where, raw.resolver)
            yield sample, processor.encode(sample)
        except DataError as err:
            policy.handle(err)


def eval_batches(path: str, processor: Processor, seq_len: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, strict: bool = False,
                 allow_outside_media: bool = False) -> Iterator[PackedBatch]:
    """One deterministic pass over a held-out set, packed like training; ranks take every
    world_size-th batch."""
    packer, rows, n = Packer(seq_len, split_long_text=True), [], 0
    policy = BadInputPolicy(strict)
    for _, encoded in iterate_samples(path, processor, "test", strict, allow_outside_media, policy):
        try:
            pieces = packer.pieces(encoded, None)
        except DataError as err:
            policy.handle(err)
            continue
        for piece in pieces:
            closed = packer.add(piece)
            if closed is not None:
                rows.append(closed)
        while len(rows) >= batch_size:
            if n % world_size == rank:
                yield collate(rows[:batch_size], seq_len, processor.tokenizer.pad_id, processor.tokens_per_crop)
            rows, n = rows[batch_size:], n + 1
    if packer.row.pieces:
        rows.append(packer.row)
    if rows and n % world_size == rank:
        yield collate(rows, seq_len, processor.tokenizer.pad_id, processor.tokens_per_crop)
