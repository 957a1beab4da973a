"""Where records come from: JSONL files (random access) and webdataset tar shards (streamed), read
by one *slot* (a rank's loader worker) with a position that can be saved and restored exactly.

Design decisions:
- A slot is ``rank * num_workers + worker`` out of ``world * num_workers``. Slots see disjoint
  samples that together cover each epoch.
- JSONL: the line offsets are indexed once; epoch e visits a seeded permutation, slot s takes every
  S-th entry. Position = (epoch, entries taken).
- Shards: epoch e visits the shards in a seeded order; with at least S shards slot s reads every S-th
  shard, otherwise every slot reads every shard and keeps every S-th sample. Samples inside a shard
  keep their order. Position = (epoch, shard number in the slot's list, samples taken in it).
- A source yields raw records plus a ``MediaResolver``; parsing and decoding happen downstream, so
  a bad record costs only its own line.
"""

from __future__ import annotations

import glob
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from aria.data.errors import DataError
from aria.data.records import MediaResolver, parse_json_line


@dataclass
class RawRecord:
    record: dict | None
    """The parsed JSON object, or None when ``error`` is set."""
    resolver: MediaResolver | None
    where: str
    error: DataError | None = None


def _epoch_rng(seed: int, epoch: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, salt])


class JsonlSource:
    """One JSONL file; media paths are relative to its directory."""

    def __init__(self, path: str | Path, allow_outside_media: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL dataset file not found: {self.path}")
        offsets, line_numbers = [], []
        with open(self.path, "rb") as f:
            pos = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(pos)
                    line_numbers.append(number)
                pos += len(line)
        if not offsets:
            raise ValueError(f"dataset {self.path} is empty: no records")
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.line_numbers = np.asarray(line_numbers, dtype=np.int64)
        self.resolver = MediaResolver(self.path.parent, allow_outside=allow_outside_media)
        self.name = str(self.path)

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, index: int, handle) -> RawRecord:
        handle.seek(int(self.offsets[index]))
        where = f"{self.path}:{int(self.line_numbers[index])}"
        try:
            return RawRecord(parse_json_line(handle.readline(), where), self.resolver, where)
        except DataError as err:
            return RawRecord(None, None, where, err)

    def iterate(self, slot: int, num_slots: int, seed: int, position: dict | None = None
                ) -> Iterator[tuple[RawRecord, dict]]:
        """Endless: yields (record, position after it) over epochs."""
        epoch = position["epoch"] if position else 0
        taken = position["taken"] if position else 0
        if len(self) < num_slots:
            raise ValueError(f"dataset {self.path} has {len(self)} records, fewer than the {num_slots} "
                             "loader slots (ranks x data.num_workers) that share it")
        with open(self.path, "rb") as handle:
            while True:
                order = _epoch_rng(seed, epoch, 0).permutation(len(self))[slot::num_slots]
                for i in range(taken, len(order)):
                    yield self.read(int(order[i]), handle), {"epoch": epoch, "taken": i + 1}
                epoch, taken = epoch + 1, 0

    def iterate_once(self) -> Iterator[RawRecord]:
        """Every record once, in file order (evaluation, validation)."""
        with open(self.path, "rb") as handle:
            for i in range(len(self)):
                yield self.read(i, handle)


class ShardSource:
    """Webdataset tar shards: a directory of ``*.tar``, one ``.tar`` file, or a glob pattern."""

    def __init__(self, spec: str | Path) -> None:
        spec = str(spec)
        if Path(spec).is_dir():
            shards = sorted(str(p) for p in Path(spec).glob("*.tar"))
        elif any(c in spec for c in "*?["):
            shards = sorted(glob.glob(spec))
        else:
            shards = [spec] if Path(spec).is_file() else []
        if not shards:
            raise FileNotFoundError(f"no webdataset shards (*.tar) found at {spec}")
        self.shards, self.name = shards, spec

    def samples(self, shard: str) -> Iterator[RawRecord]:
        """The samples of one shard, in order; a broken shard ends with one error record."""
        key, members, count = None, {}, 0
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    base, _, ext = Path(info.name).name.partition(".")
                    prefix = str(Path(info.name).parent / base) if "/" in info.name else base
                    if prefix != key and key is not None:
                        yield self._record(shard, key, members)
                        count += 1
                        members = {}
                    key = prefix
                    members[ext] = tar.extractfile(info).read()
            if key is not None:
                yield self._record(shard, key, members)
        except (tarfile.TarError, OSError, EOFError) as err:
            yield RawRecord(None, None, f"{shard}:sample {count}",
                            DataError(f"unreadable shard ({err}); the rest of it is skipped", "bad_shard"))

    @staticmethod
    def _record(shard: str, key: str, members: dict[str, bytes]) -> RawRecord:
        where = f"{shard}:{key}"
        if "json" not in members:
            return RawRecord(None, None, where, DataError(
                f"sample has no .json member (members: {sorted(members)})", "invalid_record", where))
        try:
            record = parse_json_line(members.pop("json"), where)
        except DataError as err:
            return RawRecord(None, None, where, err)
        return RawRecord(record, MediaResolver(members=members), where)

    def iterate(self, slot: int, num_slots: int, seed: int, position: dict | None = None
                ) -> Iterator[tuple[RawRecord, dict]]:
        epoch = position["epoch"] if position else 0
        shard_pos = position["shard"] if position else 0
        taken = position["taken"] if position else 0
        by_shard = len(self.shards) >= num_slots
        while True:
            order = _epoch_rng(seed, epoch, 1).permutation(len(self.shards))
            mine = order[slot::num_slots] if by_shard else order
            yielded = taken
            for s in range(shard_pos, len(mine)):
                seen = 0  # samples of this shard belonging to this slot
                for n, raw in enumerate(self.samples(self.shards[int(mine[s])])):
                    if not by_shard and n % num_slots != slot and raw.error is None:
                        continue
                    seen += 1
                    if seen <= taken:
                        continue
                    yielded += 1
                    yield raw, {"epoch": epoch, "shard": s, "taken": seen}
                taken = 0
            if yielded == 0:
                raise ValueError(f"webdataset shards {self.name} gave loader slot {slot} of {num_slots} "
                                 "no sample in a whole epoch: too few samples for the ranks x "
                                 "data.num_workers sharing them")
            epoch, shard_pos, taken = epoch + 1, 0, 0

    def iterate_once(self) -> Iterator[RawRecord]:
        for shard in self.shards:
            yield from self.samples(shard)


def open_source(path: str | Path, split: str = "train", allow_outside_media: bool = False):
    """A dataset path -> its source: a ``.jsonl`` file, a directory holding ``{split}.jsonl``, or
    webdataset shards (a ``.tar``, a directory of them, or a glob)."""
    p = Path(path)
    if p.suffix == ".jsonl":
        return JsonlSource(p, allow_outside_media)
    if p.is_dir() and (p / f"{split}.jsonl").is_file():
        return JsonlSource(p / f"{split}.jsonl", allow_outside_media)
    if p.suffix == ".tar" or any(c in str(path) for c in "*?[") or (p.is_dir() and any(p.glob("*.tar"))):
        return ShardSource(path)
    if p.is_dir():
        raise FileNotFoundError(f"dataset directory {p} holds neither {split}.jsonl nor *.tar shards")
    raise FileNotFoundError(f"dataset not found: {path}")
