"""Where records come from: JSONL files (random access) and webdataset tar shards (streamed), read
by one *stream* (``loader.py``) with a position that can be saved and restored exactly.

Design decisions:
- Stream s of S sees its own share of every source, by its index alone: streams see disjoint samples
  that together cover each epoch, whichever process or loader worker reads them.
- Sources are opened once, in the training process; loader workers are forked and inherit them.
  A JSONL file is indexed once (byte offsets, numpy int64: 8 bytes a record; line numbers only when
  blank lines make them differ from record numbers).
- JSONL: epoch e visits a seeded permutation, stream s takes every S-th entry. Position = (epoch,
  entries taken). Each source of a mixture has its own salt (its index in the mixture), so two
  datasets of the same length are not visited in the same order.
- Shards: epoch e visits the shards in a seeded order; with at least S shards stream s reads every
  S-th shard, otherwise every stream reads every shard and keeps the samples whose running index in
  the epoch is s modulo S (a running index, not one per shard: with per-shard indices short shards
  would favour the first streams). A sample that is not the stream's is skipped before its member
  bytes are read or its JSON parsed. Samples inside a shard keep their order (there is no in-shard
  shuffle: shuffle when writing shards; the shard order and the mixture are random). Position =
  (epoch, shard number in the stream's list, samples passed in it, running index, samples taken).
- A source yields raw records plus a ``MediaResolver``; parsing and decoding happen downstream, so
  a bad record costs only its own line.
"""

from __future__ import annotations

import glob
import tarfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from aria.data.errors import DataError
from aria.data.records import MediaResolver, parse_json_line

_JSONL_SALT, _SHARD_SALT = 0, 1


@dataclass
class RawRecord:
    record: dict | None
    """The parsed JSON object, or None when ``error`` is set."""
    resolver: MediaResolver | None
    where: str
    error: DataError | None = None


def _epoch_rng(seed: int, epoch: int, kind: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, kind, salt])


class JsonlSource:
    """One JSONL file; media paths are relative to its directory."""

    def __init__(self, path: str | Path, allow_outside_media: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL dataset file not found: {self.path}")
        offsets, line_numbers = array("q"), array("q")
        with open(self.path, "rb") as f:
            pos = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(pos)
                    line_numbers.append(number)
                pos += len(line)
        if not offsets:
            raise ValueError(f"dataset {self.path} is empty: no records")
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.line_numbers = None  # record i is on line i + 1 unless the file has blank lines
        if line_numbers[-1] != len(line_numbers):
            self.line_numbers = np.frombuffer(line_numbers, dtype=np.int64)
        self.resolver = MediaResolver(self.path.parent, allow_outside=allow_outside_media)
        self.name = str(self.path)

    def __len__(self) -> int:
        return len(self.offsets)

    def line_number(self, index: int) -> int:
        return index + 1 if self.line_numbers is None else int(self.line_numbers[index])

    def read(self, index: int, handle) -> RawRecord:
        handle.seek(int(self.offsets[index]))
        where = f"{self.path}:{self.line_number(index)}"
        try:
            return RawRecord(parse_json_line(handle.readline(), where), self.resolver, where)
        except DataError as err:
            return RawRecord(None, None, where, err)

    def iterate(self, stream: int, num_streams: int, seed: int, position: dict | None = None,
                salt: int = 0) -> Iterator[tuple[RawRecord, dict]]:
        """Endless: yields (record, position after it) over epochs."""
        epoch = position["epoch"] if position else 0
        taken = position["taken"] if position else 0
        if len(self) < num_streams:
            raise ValueError(f"dataset {self.path} has {len(self)} records, fewer than the {num_streams} "
                             "data streams (data.streams) that share it")
        with open(self.path, "rb") as handle:
            while True:
                order = _epoch_rng(seed, epoch, _JSONL_SALT, salt).permutation(len(self))[stream::num_streams]
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

    def walk(self, shard: str, keep: Callable[[int], bool] = lambda n: True
             ) -> Iterator[tuple[int, RawRecord | None]]:
        """(index in the shard, record) for every sample of ``shard``, in order; the record is None
        for a sample ``keep(index)`` refuses, whose member bytes are then neither read nor parsed.
        A broken shard ends with an error record (at the index of the sample it broke in)."""
        n, key, members = -1, None, {}
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    base, _, ext = Path(info.name).name.partition(".")
                    prefix = str(Path(info.name).parent / base) if "/" in info.name else base
                    if prefix != key:
                        if key is not None:
                            yield n, self._record(shard, key, members) if keep(n) else None
                        n, key, members = n + 1, prefix, {}
                    if keep(n):
                        members[ext] = tar.extractfile(info).read()
            if key is not None:
                yield n, self._record(shard, key, members) if keep(n) else None
        except (tarfile.TarError, OSError, EOFError) as err:
            n = max(n, 0)
            error = DataError(f"unreadable shard ({err}); the rest of it is skipped", "bad_shard")
            yield n, RawRecord(None, None, f"{shard}:sample {n}", error) if keep(n) else None

    def samples(self, shard: str) -> Iterator[RawRecord]:
        """The samples of one shard, in order; a broken shard ends with one error record."""
        for _, raw in self.walk(shard):
            yield raw

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

    def iterate(self, stream: int, num_streams: int, seed: int, position: dict | None = None,
                salt: int = 0) -> Iterator[tuple[RawRecord, dict]]:
        """Endless: yields (record, position after it) over epochs."""
        position = position or {}
        epoch = position.get("epoch", 0)
        shard_pos, offset = position.get("shard", 0), position.get("offset", 0)
        index, taken = position.get("index", 0), position.get("taken", 0)
        by_shard = len(self.shards) >= num_streams
        while True:
            order = _epoch_rng(seed, epoch, _SHARD_SALT, salt).permutation(len(self.shards))
            mine = order[stream::num_streams] if by_shard else order
            for s in range(shard_pos, len(mine)):
                base = index - offset  # running index of the shard's first sample

                def keep(n: int, base=base, offset=offset) -> bool:
                    return n >= offset and (by_shard or (base + n) % num_streams == stream)

                last = offset - 1
                for n, raw in self.walk(self.shards[int(mine[s])], keep):
                    last = n
                    if raw is not None:
                        taken += 1
                        yield raw, {"epoch": epoch, "shard": s, "offset": n + 1, "index": base + n + 1,
                                    "taken": taken}
                index, offset = base + last + 1, 0
            if taken == 0:
                raise ValueError(f"webdataset shards {self.name} gave data stream {stream} of {num_streams} "
                                 "no sample in a whole epoch: too few samples for the data.streams "
                                 "sharing them")
            epoch, shard_pos, offset, index, taken = epoch + 1, 0, 0, 0, 0

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
