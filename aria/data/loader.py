"""The training data: mixed sources -> parsed records -> encoded samples -> packed micro-batches,
built in loader worker processes, in one global order that does not depend on the number of
processes, with an exact, saveable position.

Design decisions:
- The data of a run is S independent *streams* (``data.streams``; by default processes x workers
  when the run starts, then kept for its whole life). Stream s mixes its sources with its own RNG,
  reads its own share of every source (``sources.py``) and packs its own rows, all keyed by s alone,
  so its micro-batches depend on S, the seed and the data, never on who reads them. The sources are
  opened (a JSONL file indexed) once, in the training process; forked workers inherit them.
- One global sequence: global micro-batch j is the (j div S)-th micro-batch of stream j mod S. A step
  of W processes x G micro-batches takes [j0, j0 + W*G): rank r's g-th is j0 + g*W + r. So rank r
  reads j0 + r, j0 + r + W, ... whatever G, and, S being a multiple of W, only the S/W streams that
  are congruent to j0 + r modulo W (streams r, r + W, ... in a fresh run). The rows of a step depend
  on S alone: not on W, on how the global batch splits into G, nor on the loader workers.
- A rank's streams are dealt round-robin, in the order the rank reads them, to its loader workers;
  each worker interleaves its own streams in that order, and the DataLoader takes one batch from each
  worker in turn, which restores the order. A worker count that does not divide the rank's stream
  count is lowered to its largest divisor that does (and logged).
- Mixing draws the next dataset at random by weight for every *sample* (a seeded numpy generator
  whose state is part of the position), not "the first N rows of each" as the official code did.
  Weights are per sample, not per token: a dataset of long samples gets more tokens than its weight.
- ``read_record`` is the one raw record -> ``Sample`` -> ``EncodedSample`` -> pieces step, used by
  training, evaluation, validation and ``jsonl_to_wds``. Every failure leaves it as a located
  ``DataError``; an exception nobody foresaw becomes one too (kind ``unexpected_error``, naming the
  exception type), so one strange record is skipped and counted instead of killing a worker.
- Position: each micro-batch carries its stream's position *after* it (the start of the first row
  not yet emitted) and the stream's skip counts up to there. The DataLoader runs ahead, so the
  training process records, per stream, the position of the last batch it actually consumed, and
  the global index where the next step starts. A rank's state holds its own streams; ``merge_states``
  joins the states of all ranks, from which any number of processes that divides S resumes: every
  stream continues exactly where it stopped, and the global index says which rank reads it next.
- Workers start before CUDA: ``TrainLoader.start()`` forks them (it creates the DataLoader iterator)
  so that the trainer can call it before CUDA and NCCL are initialised (a process forked after them
  inherits driver state and communicator threads it must never touch). The position must therefore
  be loaded before ``start()``.
- Pinned memory: with CUDA, batches reach the trainer in page-locked host memory, so that
  ``.to(device, non_blocking=True)`` is asynchronous. A thread of ours pins them, up to
  ``prefetch_factor`` batches ahead, from the first iteration on; not the DataLoader's
  ``pin_memory``, whose thread binds to the CUDA device current when its iterator is created (before
  the trainer chose its GPU when ``start()`` comes first) and would allocate on GPU 0 of every rank.
- Bad samples go through ``BadInputPolicy``: skipped and counted by reason, or raised in strict
  mode. Stage 0 (``train.objective`` contrastive or caption_words) adds a rule: a sample that is
  not an image or a video followed by its text is bad (``not_image_caption``,
  ``check_image_caption``). A strict-mode error in a worker travels to the training process as a
  value (the DataLoader would re-raise it by message only) and is raised there as the same
  ``DataError``, kind and location intact. A source that gives a stream no usable sample in a whole epoch is an error,
  never an endless loop (judged per epoch once the source says the stream has had all of it: a
  shuffle buffer interleaves epochs); a worker that produces nothing for ``timeout`` seconds (a
  decoder hang) too.
- Evaluation is sharded: rank r reads, encodes and packs only records r, r + W, ... of the held-out
  set. The ranks' batch counts differ, so before each batch they agree (one small all-reduce, given
  by the trainer) whether any rank still has one; a rank that has none runs an all-padding batch,
  so per-batch collectives (ZeRO-3 gathers, expert all-to-alls) stay matched. Packing never lets
  documents see each other, so the summed loss and token counts do not depend on how the records
  were split over ranks. A rank that fails (a strict-mode bad record) says so in the same
  all-reduce, and every rank stops instead of waiting for it.
- Memory: a micro-batch of B rows holds its crops as raw uint8 pixels (``Processor.from_config``;
  the model normalises them), 3 x S x S bytes each (2.9 MB at 980 px, 0.7 MB at 490 px). With W
  workers the DataLoader keeps up to W x ``prefetch_factor`` batches in shared memory, e.g. 2
  workers x prefetch 2 x 30 crops of 980 px = 0.35 GB per rank (8 ranks a node: 2.8 GB of
  /dev/shm), and with CUDA up to ``prefetch_factor`` more in pinned memory. Lower
  ``prefetch_factor`` (or rows per micro-batch) if /dev/shm is small. Each stream also holds its
  open row's samples.
"""

from __future__ import annotations

import copy
import itertools
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aria.config import IGNORE_INDEX, DataConfig, DatasetEntry, parse_mixture
from aria.data.errors import BadInputPolicy, DataError, log
from aria.data.packing import PackedBatch, Packer, Piece, RowBatcher, collate, padding_batch
from aria.data.processor import EncodedSample, Processor
from aria.data.records import Sample, parse_record
from aria.data.sources import RawRecord, Read, open_source


class Loaded(NamedTuple):
    sample: Sample
    encoded: EncodedSample | None
    """None when no processor was given."""
    pieces: list[Piece] | None
    """None when no packer was given."""


def check_image_caption(encoded: EncodedSample, image_id: int) -> None:
    """A ``DataError`` (kind ``not_image_caption``) unless ``encoded`` is an image (or a video's
    frames) followed by its supervised text: what stage 0's image-caption loss takes."""
    images = (encoded.input_ids == image_id).nonzero()
    supervised = (encoded.targets != IGNORE_INDEX).nonzero()
    if not len(images) or not len(supervised) or int(images[-1]) > int(supervised[0]):
        what = ("no image" if not len(images) else "no supervised text" if not len(supervised)
                else "text supervised before an image")
        raise DataError(f"stage 0 (train.objective=contrastive or caption_words) takes an image or a video "
                        f"followed by its text (caption and video records); this sample has {what}",
                        "not_image_caption")


def read_record(raw: RawRecord, processor: Processor | None = None, packer: Packer | None = None,
                start: Any = None, image_caption: bool = False) -> Loaded:
    """Parse ``raw``, then encode it (with a processor) and cut it into row pieces (with a packer,
    ``start`` being the loader position before it); ``image_caption``: only image-caption samples
    (``check_image_caption``). Raises only ``DataError``, located at the record."""
    try:
        if raw.error is not None:
            raise raw.error
        sample = parse_record(raw.record, raw.where, raw.resolver)
        encoded = pieces = None
        if processor is not None:
            encoded = processor.encode(sample, max_tokens=packer.seq_len if packer is not None else None)
            if image_caption:
                check_image_caption(encoded, processor.tokenizer.image_id)
            if packer is not None:
                pieces = packer.pieces(encoded, start)
        return Loaded(sample, encoded, pieces)
    except DataError as err:
        raise err.at(raw.where) from None
    except Exception as exc:  # a bug or a library failure on strange input: this record only
        raise DataError(f"unexpected {type(exc).__name__} while reading the record: {exc}",
                        "unexpected_error", raw.where) from exc


class Mixture:
    """Weighted random interleaving of sources for one stream (one draw per sample)."""

    def __init__(self, sources: list, weights: list[float], stream: int, num_streams: int, seed: int,
                 state: dict | None = None) -> None:
        self.sources = sources
        total = float(sum(weights))
        self.probs = np.asarray(weights, dtype=np.float64) / total
        self.rng = np.random.default_rng([seed, stream, 7])
        self.positions: list[dict | None] = [None] * len(sources)
        if state is not None:
            if len(state["positions"]) != len(sources):
                raise ValueError(f"saved data position has {len(state['positions'])} datasets but the "
                                 f"config lists {len(sources)}")
            self.rng.bit_generator.state = state["rng"]
            self.positions = list(state["positions"])
        self.iters = [s.iterate(stream, num_streams, seed, p, salt=k)
                      for k, (s, p) in enumerate(zip(sources, self.positions))]

    def state(self) -> dict:
        # a source never changes a position it has yielded: the list is copied, not the positions
        return {"rng": self.rng.bit_generator.state, "positions": list(self.positions)}

    def next(self) -> tuple[Read, dict, int]:
        """The next record, the position *before* it was drawn, and its source's index."""
        before = self.state()
        k = int(self.rng.choice(len(self.sources), p=self.probs)) if len(self.sources) > 1 else 0
        read = next(self.iters[k])
        self.positions[k] = read.position
        return read, before, k


@dataclass
class StreamSpec:
    """What the streams are made of, and where this rank sits among the processes."""

    datasets: list
    """``DatasetEntry``s, or (path, weight) pairs."""
    processor: Processor
    seq_len: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    strict: bool = False
    allow_outside_media: bool = False
    split_long_text: bool = True
    shuffle_buffer: int = 0
    """Records held per stream and shard dataset, drawn at random (``data.shuffle_buffer``)."""
    image_caption: bool = False
    """Only image-caption samples, the others skipped as ``not_image_caption`` (stage 0)."""
    sources: list | None = None
    """The opened sources of ``datasets`` (opened by ``TrainLoader`` if None)."""

    @property
    def entries(self) -> list[DatasetEntry]:
        return [DatasetEntry(*d) for d in self.datasets]

    def open_sources(self) -> list:
        return [open_source(e.path, "train", self.allow_outside_media, e.columns, self.shuffle_buffer)
                for e in self.entries]


@dataclass
class WorkerFailure:
    """A strict-mode ``DataError`` raised in a worker, shipped as a value to be raised again in the
    training process (the DataLoader's own re-raise keeps only the message)."""

    error: DataError


def stream_batches(spec: StreamSpec, stream: int, num_streams: int, saved: dict | None
                   ) -> Iterator[PackedBatch]:
    """Endless micro-batches of stream ``stream`` of ``num_streams``, from ``saved`` (its position
    after its last consumed batch; None = its start) on. Each carries, in ``state``, its stream and
    the stream's position after it."""
    sources = spec.sources or spec.open_sources()
    mixture = Mixture(sources, [e.weight for e in spec.entries], stream, num_streams, spec.seed,
                      saved["mixture"] if saved else None)
    skip_chunks = saved["chunk"] if saved else 0
    policy = BadInputPolicy(spec.strict)
    if saved:
        policy.counts.update(saved.get("skipped", {}))
    batcher = RowBatcher(spec.seq_len, spec.batch_size, spec.split_long_text)
    # per source, {epoch: [usable samples, its first record seen]} until the source says the stream
    # has had the whole epoch: one without a usable sample is an error (a resumed run only judges
    # epochs it saw from their first record)
    epochs: list[dict[int, list]] = [{} for _ in sources]
    while True:
        read, before, k = mixture.next()
        # the resume point before this sample: where the mixture was and what had been skipped
        start = {"mixture": before, "skipped": dict(policy.counts)}
        loaded = policy.attempt(read_record, read.raw, spec.processor, batcher.packer, start,
                                spec.image_caption)
        tally = epochs[k].setdefault(read.epoch, [0, False])
        tally[0] += loaded is not None
        tally[1] |= read.first
        for epoch in read.closed:
            usable, whole = epochs[k].pop(epoch, (1, False))
            if whole and usable == 0:
                raise RuntimeError(f"dataset {sources[k].name} gave data stream {stream} no usable "
                                   f"sample in a whole epoch; skipped so far: {dict(policy.counts)}")
        if loaded is None:
            continue
        pieces = loaded.pieces
        if skip_chunks:  # resuming inside a split document: its first chunks were emitted
            pieces, skip_chunks = pieces[skip_chunks:], 0
        batcher.add(pieces)
        for rows in batcher.full_batches():
            batch = collate(rows, spec.seq_len, spec.processor.tokenizer.pad_id,
                            spec.processor.tokens_per_crop)
            start, chunk = batcher.next_start() or (
                {"mixture": mixture.state(), "skipped": dict(policy.counts)}, 0)
            batch.state = {"stream": stream, "position": {"mixture": start["mixture"], "chunk": chunk,
                                                          "skipped": start["skipped"]}}
            yield batch


class PackedStream(IterableDataset):
    """Endless micro-batches of several streams: loader worker w (or the training process, without
    workers: w = 0) yields one batch of each stream of ``turns[w]`` in turn."""

    def __init__(self, spec: StreamSpec, num_streams: int, turns: list[list[int]],
                 positions: dict[int, dict]) -> None:
        super().__init__()
        self.spec, self.num_streams, self.turns, self.positions = spec, num_streams, turns, positions

    def __iter__(self) -> Iterator[PackedBatch | WorkerFailure]:
        try:
            yield from self._batches()
        except DataError as err:
            yield WorkerFailure(err)

    def _batches(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        mine = self.turns[info.id if info is not None else 0]
        streams = [stream_batches(self.spec, s, self.num_streams, self.positions.get(s)) for s in mine]
        for batches in itertools.cycle(streams):
            yield next(batches)


def pinned(items: Iterator, depth: int) -> Iterator:
    """``items``, with each ``PackedBatch`` copied into pinned host memory by a background thread
    that runs up to ``depth`` items ahead, so that pinning overlaps training. The thread works on
    the CUDA device that is current here (CUDA's current device is per thread)."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(kind: str, item: Any) -> bool:
        while not stop.is_set():  # never blocked for good: the consumer may have gone
            try:
                ready.put((kind, item), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        if device is not None:
            torch.cuda.set_device(device)
        try:
            for item in items:
                if not hand_over("item", item.pin_memory() if isinstance(item, PackedBatch) else item):
                    return
            hand_over("end", None)
        except BaseException as exc:  # raised again in the consuming thread
            hand_over("error", exc)

    thread = threading.Thread(target=work, name="aria-pin-memory", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = ready.get()
            if kind == "error":
                raise item
            if kind == "end":
                return
            yield item
    finally:
        stop.set()
        thread.join()
        del items  # the workers end now, even while a traceback holds these frames


def check_streams(num_streams: int, world_size: int, saved: bool) -> None:
    """Every rank reads its own streams only: their number must be a multiple of the processes'."""
    if num_streams % world_size:
        where = ("the checkpoint's data position has" if saved else "the config gives")
        raise ValueError(f"config field 'data.streams': {where} {num_streams} data streams, which "
                         f"{world_size} processes cannot share evenly; run on a number of processes "
                         f"that divides {num_streams}" + ("" if saved else f" or set data.streams to a "
                                                           f"multiple of {world_size}"))


def saved_streams(state: dict) -> int:
    """The number of streams of a saved data position; a clear error for one saved before streams."""
    if "streams" not in state:
        raise ValueError(f"the saved data position (keys {sorted(state)}) was written by the loader "
                         "before data streams existed; resume it with the version that wrote it, or "
                         "start a new run from its weights (init.from_checkpoint)")
    return state["streams"]


def merge_states(states: list[dict]) -> dict:
    """One data position from the ``TrainLoader.state_dict()`` of every rank of a run, saved at the
    same step: what ``load_state_dict`` takes on any number of processes that divides its streams."""
    if not states:
        raise ValueError("no data positions to merge")
    for key, values in (("streams", {saved_streams(s) for s in states}), ("next", {s["next"] for s in states})):
        if len(values) > 1:
            raise ValueError(f"the ranks' data positions disagree on '{key}' ({sorted(values)}): "
                             "they were not saved at the same step of one run")
    positions: dict[int, dict] = {}
    for state in states:
        for stream, position in state["positions"].items():
            if int(stream) in positions:
                raise ValueError(f"data stream {stream} is in two ranks' data positions: they were not "
                                 "saved by the ranks of one run")
            positions[int(stream)] = position
    return {"streams": states[0]["streams"], "next": states[0]["next"], "positions": positions}


class TrainLoader:
    """This rank's micro-batches of the run's global sequence, and the position of its streams.

    ``streams``: S (None = ``world_size`` x max(1, ``num_workers``)). ``prefetch_factor``: batches
    each worker prepares ahead (see the module docstring for the shared-memory arithmetic), and
    batches pinned ahead. ``timeout``: seconds to wait for a worker's next batch before failing (a
    decoder hang must not hang training); ignored without workers. ``pin_memory``: hand batches
    over in pinned host memory (None = when CUDA is available).
    """

    def __init__(self, spec: StreamSpec, num_workers: int, prefetch_factor: int = 2,
                 timeout: float = 600.0, streams: int | None = None, pin_memory: bool | None = None) -> None:
        if spec.sources is None:
            spec.sources = spec.open_sources()
        self.spec, self.num_workers = spec, num_workers
        self.prefetch_factor, self.timeout = prefetch_factor, timeout
        self.configured_streams = streams
        self.num_streams = streams if streams is not None else spec.world_size * max(1, num_workers)
        check_streams(self.num_streams, spec.world_size, saved=False)
        self.pin_memory = pin_memory
        self.first = 0  # global index where this loader started (0, or the resumed position's)
        self.consumed = 0  # micro-batches this rank consumed since
        self.positions: dict[int, dict] = {}  # this rank's streams: position after the last consumed batch
        self.started: Iterator | None = None  # the DataLoader iterator forked by start()

    @property
    def next_index(self) -> int:
        """Global index of the next step's first micro-batch (the trainer takes the same number of
        micro-batches on every rank)."""
        return self.first + self.consumed * self.spec.world_size

    def streams_in_turn(self) -> list[int]:
        """This rank's streams, in the order it reads them from its next micro-batch on."""
        W, S = self.spec.world_size, self.num_streams
        j = self.next_index + self.spec.rank
        return [(j + k * W) % S for k in range(S // W)]

    def state_dict(self) -> dict:
        """{"streams": S, "next": ``next_index``, "positions": {stream: position after its last
        consumed batch}} for this rank's streams. The same layout resumes from it; another one from
        ``merge_states`` of every rank's."""
        return {"streams": self.num_streams, "next": self.next_index,
                "positions": copy.deepcopy(self.positions)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (before ``start()``): the saved number of streams replaces the
        default one."""
        if self.started is not None:
            raise RuntimeError("TrainLoader.load_state_dict() after start(): the workers were forked "
                               "with the old position")
        num_streams = saved_streams(state)
        if self.configured_streams not in (None, num_streams):
            raise ValueError(f"config field 'data.streams' is {self.configured_streams} but the "
                             f"checkpoint's data position has {num_streams} streams: a run keeps its "
                             f"streams (set data.streams={num_streams} or null)")
        check_streams(num_streams, self.spec.world_size, saved=True)
        self.num_streams, self.first, self.consumed = num_streams, state["next"], 0
        positions = {int(s): p for s, p in state["positions"].items()}
        mine = self.streams_in_turn()
        missing = sorted(s for s in mine if s < self.first and s not in positions)
        if missing:
            raise ValueError(f"the data position has no entry for data stream(s) {missing}, which this "
                             f"rank (rank {self.spec.rank} of {self.spec.world_size}) reads next: with "
                             "another number of processes, load merge_states() of every old rank's "
                             "position")
        self.positions = {s: positions[s] for s in mine if s in positions}

    def skipped(self) -> Counter:
        """Bad samples skipped before the current position, by reason, summed over this rank's
        streams."""
        total: Counter = Counter()
        for position in self.positions.values():
            total.update(position.get("skipped", {}))
        return total

    def start(self) -> None:
        """Start the loader workers now (the first iteration does it otherwise): call it before
        CUDA and NCCL are initialised, after ``load_state_dict``. Iterating uses them."""
        if self.started is None:
            for source in self.spec.sources or []:  # here, not in a worker, where it would surface late
                if hasattr(source, "__len__") and len(source) < self.num_streams:
                    raise ValueError(f"dataset {source.name} has {len(source)} records, fewer than the "
                                     f"{self.num_streams} data streams (data.streams) that share it")
            self.started = iter(self._data_loader())

    def _data_loader(self) -> DataLoader:
        turns = self.streams_in_turn()
        workers = 0
        if self.num_workers > 0:
            workers = max(d for d in range(1, min(self.num_workers, len(turns)) + 1) if len(turns) % d == 0)
            if workers < self.num_workers:
                log.warning("data.num_workers=%d: this rank reads %d data streams (data.streams=%d over "
                            "%d processes), which that many workers cannot share evenly; using %d",
                            self.num_workers, len(turns), self.num_streams, self.spec.world_size, workers)
        dealt = [turns[w::max(1, workers)] for w in range(max(1, workers))]
        dataset = PackedStream(self.spec, self.num_streams, dealt, copy.deepcopy(self.positions))
        kwargs = {}
        if workers > 0:
            kwargs = dict(num_workers=workers, prefetch_factor=self.prefetch_factor,
                          persistent_workers=False, multiprocessing_context="fork", timeout=self.timeout)
        return DataLoader(dataset, batch_size=None, **kwargs)

    def _take_started(self) -> Iterator:
        """The started batches (a later iteration starts again from the position then), pinned if asked."""
        self.start()
        batches, self.started = self.started, None
        # asked only now, after the fork: torch.cuda.is_available() already initialises the driver
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        return pinned(batches, self.prefetch_factor) if pin else batches

    def __iter__(self) -> Iterator[PackedBatch]:
        # no local name for the DataLoader iterator: a traceback that holds this frame must not keep
        # its workers alive
        for batch in self._take_started():
            if isinstance(batch, WorkerFailure):
                raise batch.error
            self.positions[batch.state["stream"]] = batch.state["position"]
            self.consumed += 1
            yield batch


def build_train_loader(data: DataConfig, processor: Processor, seq_len: int, batch_size: int,
                       rank: int = 0, world_size: int = 1, seed: int = 0, prefetch_factor: int = 2,
                       timeout: float = 600.0, image_caption: bool = False) -> TrainLoader:
    datasets = parse_mixture(data.train, "data.train")
    if not datasets:
        raise ValueError("config field 'data.train' is empty: give a dataset path")
    spec = StreamSpec(datasets, processor, seq_len, batch_size, rank, world_size, seed, data.strict,
                      data.allow_outside_media, data.split_long_text, data.shuffle_buffer, image_caption)
    # opened (and indexed) once, here: a missing or empty dataset fails now, not in a worker
    spec.sources = spec.open_sources()
    return TrainLoader(spec, data.num_workers, prefetch_factor, timeout, data.streams)


def iterate_samples(path: str, processor: Processor, split: str = "test", strict: bool = False,
                    allow_outside_media: bool = False, policy: BadInputPolicy | None = None,
                    seq_len: int | None = None, columns: dict[str, str] | None = None,
                    image_caption: bool = False) -> Iterator[tuple[Sample, EncodedSample]]:
    """Every sample of a dataset once, in order, as (parsed Sample, EncodedSample); bad ones are
    handled by ``policy`` (evaluation, validation, expert reports). With ``seq_len``, samples that
    cannot fit a packed row of that length are bad too (the packer's rule); with
    ``image_caption``, samples stage 0 does not take (``check_image_caption``)."""
    policy = policy or BadInputPolicy(strict)
    packer = Packer(seq_len) if seq_len is not None else None
    for raw in open_source(path, split, allow_outside_media, columns).iterate_once():
        loaded = policy.attempt(read_record, raw, processor, packer, None, image_caption)
        if loaded is not None:
            yield loaded.sample, loaded.encoded


DONE, READY, FAILED = 0, 1, 2
"""What a rank says before each evaluation batch (the ranks take the maximum)."""


def eval_batches(path: str, processor: Processor, seq_len: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, strict: bool = False,
                 allow_outside_media: bool = False, columns: dict[str, str] | None = None,
                 most: Callable[[int], int] | None = None, image_caption: bool = False
                 ) -> Iterator[PackedBatch]:
    """One deterministic pass over this rank's share of a held-out set (records ``rank``,
    ``rank + world_size``, ...), packed like training.

    ``most(value)``: the maximum of ``value`` over the ranks (an all-reduce). With it, before every
    batch each rank says whether it has one (``READY``), has none left (``DONE``) or failed
    (``FAILED``): while any rank has one, every rank yields one, an all-padding batch
    (``padding=True``, no tokens, no targets) when it has none, so that collective operations per
    batch stay matched; a failure stops every rank. Without it: only this rank's batches.
    ``image_caption``: only image-caption samples (stage 0, ``check_image_caption``)."""
    policy = BadInputPolicy(strict)
    batcher = RowBatcher(seq_len, batch_size, split_long_text=True)
    pad_id, table = processor.tokenizer.pad_id, processor.tokens_per_crop

    def own() -> Iterator[PackedBatch]:
        for raw in open_source(path, "test", allow_outside_media, columns).iterate_once(rank, world_size):
            loaded = policy.attempt(read_record, raw, processor, batcher.packer, None, image_caption)
            if loaded is None:
                continue
            batcher.add(loaded.pieces)
            for rows in batcher.full_batches():
                yield collate(rows, seq_len, pad_id, table)
        rows = batcher.rest()
        if rows:
            yield collate(rows, seq_len, pad_id, table)

    if most is None:
        yield from own()
        return
    batches = own()
    while True:
        try:
            batch, failure = next(batches, None), None
        except Exception as exc:  # raised below, once the other ranks know to stop
            batch, failure = None, exc
        status = most(FAILED if failure else READY if batch is not None else DONE)
        if failure is not None:
            raise failure
        if status == FAILED:
            raise RuntimeError(f"evaluation of {path} stopped: another rank failed reading its share "
                               "(its log says why)")
        if status == DONE:
            return
        yield batch if batch is not None else padding_batch(batch_size, seq_len, pad_id)
