"""Where records come from: JSONL files, JSON lists (LLaVA-style ``.json``), local Hugging Face
datasets (random access) and webdataset tar shards (streamed), read by one *stream*
(``loader.py``) with a position that can be saved and restored exactly.

Design decisions:
- Stream s of S sees its own share of every source, by its index alone: streams see disjoint samples
  that together cover each epoch, whichever process or loader worker reads them.
- Sources are opened once, in the training process; loader workers are forked and inherit them.
  A JSONL file is indexed once (byte offsets, numpy int64: 8 bytes a record; line numbers only when
  blank lines make them differ from record numbers).
- A ``.json`` file holding one list (LLaVA's format) is indexed once too, by one pass of the C JSON
  decoder over the file in 16 MB chunks: the byte range and starting line of every element (24
  bytes a record), after which a record is read by seeking to its bytes, as in JSONL. The pass
  parses every element once (seconds per GB); converting the file to JSONL would cost the same pass
  plus a copy on disk. A syntax error stops the indexing with its line: past it no element boundary
  can be trusted, so the file is refused whole (bad *records* are still skipped one by one).
- A local Hugging Face dataset (parquet or arrow files, a directory of them, ``save_to_disk``
  output) is opened with ``datasets``: memory-mapped arrow, read row by row in the arrow format, so
  images embedded by ``datasets``' ``Image`` feature arrive as their undecoded bytes (``{"bytes",
  "path"}``); they become in-memory media members of the record, checked and decoded like files.
  Parquet goes through ``datasets``' cache (``HF_DATASETS_CACHE``) once, as ``load_dataset`` does.
- Every random-access source (JSONL, JSON list, Hugging Face): epoch e visits a seeded
  permutation, stream s takes every S-th entry. Position = (epoch, entries taken). Each source of a
  mixture has its own salt (its index in the mixture), so two datasets of the same length are not
  visited in the same order. A shuffle buffer would add nothing to a uniform permutation.
- Shards: epoch e visits the shards in a seeded order; with at least S shards stream s reads every
  S-th shard, otherwise every stream reads every shard and keeps the samples whose running index in
  the epoch is s modulo S (a running index, not one per shard: with per-shard indices short shards
  would favour the first streams). A sample that is not the stream's is skipped without being
  copied out of the tar, parsed or decoded (a tar is read as a stream, so its bytes still pass by:
  with fewer shards than streams every stream reads every shard; write at least as many shards as
  streams). Reading position = (epoch, shard number in the stream's list,
  samples passed in it, running index, samples taken).
- Samples inside a shard come in the order they were written (often by source or length), so a
  stream's shard samples pass through a seeded shuffle buffer (``data.shuffle_buffer``): the next
  sample is drawn at random from the last ``size`` read. Its position is small and rebuilds it
  exactly: the reading position before the oldest held sample, how many samples were read since,
  which of them are still held (by offset, in slot order) and the generator's state. Resuming
  re-reads those samples (about size x ln(size) of them: a held sample is drawn with probability
  1/size per draw) without decoding any, keeping the held ones.
- A source yields ``Read``s: the raw record, the position after it, and the epoch bookkeeping the
  loader needs to tell a dataset with no usable record (each record's epoch, whether it is the
  first of its epoch, and which epochs the stream has now been given whole; with a shuffle buffer
  records of two epochs interleave, so "the epoch changed" is not enough).
- A source yields raw records plus a ``MediaResolver``; parsing and decoding happen downstream, so
  a bad record costs only its own line. A dataset's column mapping (``columns``) renames fields
  as records are read, whatever the container.
"""

from __future__ import annotations

import codecs
import glob
import json
import re
import tarfile
from array import array
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np

from aria.config import DataConfig, parse_mixture
from aria.data.errors import DataError
from aria.data.records import MediaResolver, apply_columns, parse_json_line

_INDEXED_SALT, _SHARD_SALT, _BUFFER_SALT = 0, 1, 2
HF_SUFFIXES = (".parquet", ".arrow")
SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
"""Words that make a file of a Hugging Face dataset directory belong to a split."""
MEDIA_FIELDS = ("images", "image", "video", "videos")


@dataclass
class RawRecord:
    record: dict | None
    """The parsed JSON object, or None when ``error`` is set."""
    resolver: MediaResolver | None
    where: str
    error: DataError | None = None


class Read(NamedTuple):
    """One record as a stream reads it."""

    raw: RawRecord
    position: dict
    """Where the stream resumes after this record (plain JSON-like data)."""
    epoch: int
    first: bool
    """The first record of the stream's share of its epoch."""
    closed: tuple[int, ...] = ()
    """Epochs whose every record the stream has now been given (this one included)."""


def _epoch_rng(seed: int, epoch: int, kind: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, kind, salt])


class IndexedSource:
    """A dataset whose records are read by index: ``__len__``, ``opened()`` (a handle for
    ``read``) and ``read(index, handle)`` come from the subclass."""

    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def opened(self):
        raise NotImplementedError

    def read(self, index: int, handle) -> RawRecord:
        raise NotImplementedError

    def iterate(self, stream: int, num_streams: int, seed: int, position: dict | None = None,
                salt: int = 0) -> Iterator[Read]:
        """Endless: every record with the position after it, over epochs."""
        epoch = position["epoch"] if position else 0
        taken = position["taken"] if position else 0
        if len(self) < num_streams:
            raise ValueError(f"dataset {self.name} has {len(self)} records, fewer than the {num_streams} "
                             "data streams (data.streams) that share it")
        with self.opened() as handle:
            while True:
                # a copy: a strided view would keep the whole permutation (8 bytes a record) alive
                order = _epoch_rng(seed, epoch, _INDEXED_SALT, salt).permutation(len(self))[stream::num_streams].copy()
                for i in range(taken, len(order)):
                    yield Read(self.read(int(order[i]), handle), {"epoch": epoch, "taken": i + 1}, epoch,
                               i == 0, (epoch - 1,) if i == 0 and epoch > 0 else ())
                epoch, taken = epoch + 1, 0

    def iterate_once(self, part: int = 0, parts: int = 1) -> Iterator[RawRecord]:
        """Every record once, in order; with ``parts``, only records ``part``, ``part + parts``, ...
        (one rank's share of an evaluation)."""
        with self.opened() as handle:
            for i in range(part, len(self), parts):
                yield self.read(i, handle)


class FileSource(IndexedSource):
    """Records indexed in one local file; media paths are relative to its directory."""

    def __init__(self, path: str | Path, kind: str, allow_outside_media: bool,
                 columns: Mapping[str, str] | None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{kind} dataset file not found: {self.path}")
        self.resolver = MediaResolver(self.path.parent, allow_outside=allow_outside_media)
        self.columns = columns
        self.name = str(self.path)

    def check_not_empty(self) -> None:
        if not len(self):
            raise ValueError(f"dataset {self.path} is empty: no records")

    def opened(self):
        return open(self.path, "rb")


class JsonlSource(FileSource):
    """One JSONL file."""

    def __init__(self, path: str | Path, allow_outside_media: bool = False,
                 columns: Mapping[str, str] | None = None) -> None:
        super().__init__(path, "JSONL", allow_outside_media, columns)
        offsets, line_numbers = array("q"), array("q")
        with open(self.path, "rb") as f:
            pos = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(pos)
                    line_numbers.append(number)
                pos += len(line)
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.check_not_empty()
        self.line_numbers = None  # record i is on line i + 1 unless the file has blank lines
        if line_numbers[-1] != len(line_numbers):
            self.line_numbers = np.frombuffer(line_numbers, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def line_number(self, index: int) -> int:
        return index + 1 if self.line_numbers is None else int(self.line_numbers[index])

    def read(self, index: int, handle) -> RawRecord:
        handle.seek(int(self.offsets[index]))
        where = f"{self.path}:{self.line_number(index)}"
        try:
            record = apply_columns(parse_json_line(handle.readline(), where), self.columns)
            return RawRecord(record, self.resolver, where)
        except DataError as err:
            return RawRecord(None, None, where, err)


_CHUNK = 1 << 24
_NOT_SPACE = re.compile(r"[^ \t\n\r]")


class _TextScanner:
    """A UTF-8 file as text read in chunks, addressed by absolute character positions, with the
    byte offset and line of any position at or after the last one located."""

    def __init__(self, f, name: str) -> None:
        self.f, self.name = f, name
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.dropped, self.eof = "", 0, False
        self.mark = (0, 0, 1)  # (position, byte offset, line) last located

    def load(self, keep_from: int) -> bool:
        """Reads the next chunk, forgetting text before ``keep_from`` and the mark; False at EOF."""
        if self.eof:
            return False
        cut = min(keep_from, self.mark[0]) - self.dropped
        self.text, self.dropped = self.text[cut:], self.dropped + cut
        data = self.f.read(_CHUNK)
        self.eof = not data
        try:
            self.text += self.decoder.decode(data, final=self.eof)
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.name}: not UTF-8 text ({err.reason})") from None
        return True

    def skip_space(self, pos: int) -> int | None:
        """The first non-whitespace position from ``pos`` (None at the end of the file)."""
        while True:
            m = _NOT_SPACE.search(self.text, pos - self.dropped)
            if m:
                return m.start() + self.dropped
            if not self.load(pos):
                return None

    def char(self, pos: int) -> str:
        return self.text[pos - self.dropped]

    def locate(self, pos: int) -> tuple[int, int]:
        """(byte offset, line) of ``pos``, which must not precede the last position located."""
        at, byte, line = self.mark
        seg = self.text[at - self.dropped: pos - self.dropped]
        self.mark = (pos, byte + len(seg.encode("utf-8")), line + seg.count("\n"))
        return self.mark[1], self.mark[2]

    def value_end(self, pos: int, decoder: json.JSONDecoder) -> int:
        """Where the JSON value starting at ``pos`` ends (loading more text while it may be cut)."""
        while True:
            try:
                _, end = decoder.raw_decode(self.text, pos - self.dropped)
                if end < len(self.text) or self.eof:  # a number at the end may continue
                    return end + self.dropped
            except (json.JSONDecodeError, RecursionError) as err:
                if self.eof:
                    at = getattr(err, "pos", 0) + self.dropped
                    _, line = self.locate(max(at, self.mark[0]))
                    reason = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
                    raise ValueError(f"{self.name}:{line}: malformed JSON ({reason}); a .json dataset is "
                                     "one JSON list, so no record past this point can be found: fix the "
                                     "file, or write it as JSONL (one record per line)") from None
            self.load(pos)


def index_json_list(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start byte, end byte, start line) of every element of the JSON list in ``path``."""
    starts, ends, lines = array("q"), array("q"), array("q")
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        scan = _TextScanner(f, str(path))
        pos = scan.skip_space(0)
        if pos is None or scan.char(pos) != "[":
            raise ValueError(f"{path}: a .json dataset must hold one JSON list of records")
        pos = scan.skip_space(pos + 1)
        if pos is not None and scan.char(pos) == "]":
            pos = scan.skip_space(pos + 1)
        else:
            while True:
                if pos is None:
                    raise ValueError(f"{path}: the file ends inside its JSON list (truncated?)")
                end = scan.value_end(pos, decoder)
                start_byte, line = scan.locate(pos)
                starts.append(start_byte)
                lines.append(line)
                ends.append(scan.locate(end)[0])
                pos = scan.skip_space(end)
                if pos is not None and scan.char(pos) == "]":
                    pos = scan.skip_space(pos + 1)
                    break
                if pos is not None and scan.char(pos) != ",":
                    _, line = scan.locate(pos)
                    raise ValueError(f"{path}:{line}: malformed JSON (expected ',' or ']' after a list "
                                     f"element, got {scan.char(pos)!r})")
                pos = None if pos is None else scan.skip_space(pos + 1)
        if pos is not None:
            _, line = scan.locate(pos)
            raise ValueError(f"{path}:{line}: data after the end of the JSON list")
    return tuple(np.frombuffer(a, dtype=np.int64) if a else np.zeros(0, np.int64)
                 for a in (starts, ends, lines))


class JsonListSource(FileSource):
    """One ``.json`` file holding a list of records (LLaVA's format). Records are located as
    ``file:line (element i)``."""

    def __init__(self, path: str | Path, allow_outside_media: bool = False,
                 columns: Mapping[str, str] | None = None) -> None:
        super().__init__(path, "JSON", allow_outside_media, columns)
        self.starts, self.ends, self.lines = index_json_list(self.path)
        self.check_not_empty()

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, index: int, handle) -> RawRecord:
        start = int(self.starts[index])
        handle.seek(start)
        where = f"{self.path}:{int(self.lines[index])} (element {index})"
        try:
            record = apply_columns(parse_json_line(handle.read(int(self.ends[index]) - start), where),
                                   self.columns)
            return RawRecord(record, self.resolver, where)
        except DataError as err:
            return RawRecord(None, None, where, err)


def _words(path: Path) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", str(path.with_suffix("")).lower()))


def _split_files(directory: Path, split: str) -> list[Path]:
    """The parquet (else arrow) files of ``split`` in a dataset directory: those with the split's
    name in their path (``train-00000-of-00002.parquet``, ``data/test-0.parquet``,
    ``train/0.arrow``), or all of them when none is named after a split."""
    found = sorted(p for p in directory.rglob("*") if p.suffix in HF_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    suffix = ".parquet" if any(p.suffix == ".parquet" for p in found) else ".arrow"
    files = [p for p in found if p.suffix == suffix]
    named = [p for p in files if _words(p.relative_to(directory)) & set(SPLIT_NAMES)]
    if not named:
        return files
    mine = [p for p in files if split in _words(p.relative_to(directory))]
    if not mine:
        raise FileNotFoundError(f"dataset directory {directory} has no '{split}' {suffix} files (its files "
                                f"are named after splits: {[str(p.relative_to(directory)) for p in named[:5]]})")
    return mine


def _load_hf(path: Path, split: str):
    """(datasets.Dataset, name) of a local Hugging Face dataset."""
    import datasets

    if (path / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(path))
        if split not in splits:
            raise FileNotFoundError(f"Hugging Face dataset {path} has no '{split}' split (splits: "
                                    f"{sorted(splits)})")
        return splits[split], f"{path}[{split}]"
    if (path / "state.json").is_file():
        return datasets.load_from_disk(str(path)), str(path)
    files = [path] if path.is_file() else _split_files(path, split)
    builder = "parquet" if files[0].suffix == ".parquet" else "arrow"
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train"), str(path)


def _without_nulls(row: dict) -> dict:
    """A row with its null fields left out, in nested objects too: arrow gives every row every field
    of a struct, null where the record has none (a text item of a list that also holds images)."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(row)


def _embed_media(record: dict, members: dict[str, bytes]) -> None:
    """Media values held in the row itself (``datasets``' ``Image`` / ``Video`` features store
    ``{"bytes", "path"}``; a binary column holds bytes) become member names of ``members``; such a
    value without bytes is its path. Other values go to the parser as they are."""
    def name_of(value: Any, field_name: str) -> Any:
        if isinstance(value, Mapping) and value and set(value) <= {"bytes", "path"}:
            if value.get("bytes") is None:
                return value.get("path")
            value, original = value["bytes"], value.get("path")
            field_name += f":{Path(original).name}" if original else ""  # its suffix names the format
        if isinstance(value, (bytes, bytearray)):
            members[field_name] = bytes(value)
            return field_name
        return value

    for key in MEDIA_FIELDS:
        value = record.get(key)
        if isinstance(value, list):
            record[key] = [name_of(v, f"{key}[{i}]") for i, v in enumerate(value)]
        elif value is not None:
            record[key] = name_of(value, key)


class HFSource(IndexedSource):
    """A local Hugging Face dataset: a ``.parquet`` / ``.arrow`` file, a directory of them, or a
    ``save_to_disk`` directory (a ``DatasetDict``'s: its ``split``). Rows are records (null columns
    are absent fields) after the column mapping; media paths are relative to the dataset directory
    (a file's directory)."""

    def __init__(self, path: str | Path, split: str = "train", allow_outside_media: bool = False,
                 columns: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"Hugging Face dataset not found: {self.path}")
        dataset, self.name = _load_hf(self.path, split)
        missing = sorted(c for c in (columns or {}).values() if c not in dataset.column_names)
        if missing:
            raise ValueError(f"dataset {self.name}: the column mapping names column(s) {missing}, which "
                             f"it does not have (columns: {dataset.column_names})")
        if len(dataset) == 0:
            raise ValueError(f"dataset {self.name} is empty: no records")
        self.rows = dataset.with_format("arrow")  # undecoded: images stay bytes until the processor
        self.base_dir = self.path if self.path.is_dir() else self.path.parent
        self.allow_outside_media = allow_outside_media
        self.resolver = MediaResolver(self.base_dir, allow_outside=allow_outside_media)
        self.columns = columns

    def __len__(self) -> int:
        return self.rows.num_rows

    def opened(self):
        return nullcontext()

    def read(self, index: int, handle) -> RawRecord:
        where = f"{self.name}:row {index}"
        record = apply_columns(_without_nulls(self.rows[index].to_pylist()[0]), self.columns)
        members: dict[str, bytes] = {}
        _embed_media(record, members)
        resolver = self.resolver if not members else MediaResolver(
            self.base_dir, members=members, allow_outside=self.allow_outside_media)
        return RawRecord(record, resolver, where)


class _Held(NamedTuple):
    n: int
    """Records read before it (since the buffer's start or the resumed position)."""
    read: Read
    before: dict | None
    """The reading position before it."""


def shuffle_buffer(read_from: Callable[[dict | None], Iterator[Read]], size: int, rng: np.random.Generator,
                   state: dict | None = None) -> Iterator[Read]:
    """The records of ``read_from(position)`` drawn at random from a buffer of the last ``size``
    read (``size`` <= 1: in order), each with the buffer's state after it as its position:
    ``{"tail": reading position before the oldest held record, "read": records read from there,
    "held": offset from the oldest of the record in each slot, "rng": generator state}``. From that
    state the same records follow. A plain reading position (saved without a buffer) is a start."""
    if state is not None and "tail" not in state:
        state = {"tail": state, "read": 0, "held": [], "rng": None}
    before = state["tail"] if state else None
    reads = read_from(before)
    n, latest = 0, -1  # records read; latest epoch read
    slots: list[_Held] = []
    pending: Counter[int] = Counter()  # held records per epoch
    closed: list[int] = []

    def take() -> _Held:
        nonlocal n, before, latest
        read = next(reads)
        held = _Held(n, read, before)
        n, before = n + 1, read.position
        if read.epoch > latest:
            if latest >= 0 and not pending[latest]:
                closed.append(latest)
            latest = read.epoch
        return held

    def hold(held: _Held) -> None:
        slots.append(held)
        pending[held.read.epoch] += 1

    if state is not None:
        if state["rng"] is not None:
            rng.bit_generator.state = state["rng"]
        slot_of = {offset: slot for slot, offset in enumerate(state["held"])}
        restored: list[_Held | None] = [None] * len(slot_of)
        for _ in range(state["read"]):  # the records drawn before the resume point are passed over
            held = take()
            if held.n in slot_of:
                restored[slot_of[held.n]] = held
                pending[held.read.epoch] += 1
        slots = restored  # type: ignore[assignment]
        closed.clear()  # epochs that ended before the resume point are not this run's to judge
    while True:
        while len(slots) < size:
            hold(take())
        if slots:
            i = int(rng.integers(len(slots)))
            drawn = slots[i]
            slots[i] = slots[-1]
            slots.pop()
            epoch = drawn.read.epoch
            pending[epoch] -= 1
            if not pending[epoch]:
                del pending[epoch]
                if epoch < latest:
                    closed.append(epoch)
        else:
            drawn = take()
        if slots:
            oldest = min(slots, key=lambda h: h.n)
            position = {"tail": oldest.before, "read": n - oldest.n, "held": [h.n - oldest.n for h in slots],
                        "rng": rng.bit_generator.state}
        else:
            position = {"tail": before, "read": 0, "held": [], "rng": rng.bit_generator.state}
        yield drawn.read._replace(position=position, closed=tuple(closed))
        closed.clear()


class ShardSource:
    """Webdataset tar shards: a directory of ``*.tar``, one ``.tar`` file, or a glob pattern."""

    def __init__(self, spec: str | Path, columns: Mapping[str, str] | None = None,
                 shuffle_buffer: int = 0) -> None:
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
        self.columns, self.shuffle_buffer = columns, shuffle_buffer

    def walk(self, shard: str, keep: Callable[[int], bool] = lambda n: True
             ) -> Iterator[tuple[int, RawRecord | None]]:
        """(index in the shard, record) for every sample of ``shard``, in order; the record is None
        for a sample ``keep(index)`` refuses, whose members are then neither copied out nor parsed
        (their bytes still stream past).
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

    def _record(self, shard: str, key: str, members: dict[str, bytes]) -> RawRecord:
        where = f"{shard}:{key}"
        if "json" not in members:
            return RawRecord(None, None, where, DataError(
                f"sample has no .json member (members: {sorted(members)})", "invalid_record", where))
        try:
            record = apply_columns(parse_json_line(members.pop("json"), where), self.columns)
        except DataError as err:
            return RawRecord(None, None, where, err)
        return RawRecord(record, MediaResolver(members=members), where)

    def iterate(self, stream: int, num_streams: int, seed: int, position: dict | None = None,
                salt: int = 0) -> Iterator[Read]:
        """Endless: every sample of the stream's share with the position after it, over epochs,
        through the shuffle buffer."""
        rng = np.random.default_rng([seed, stream, _BUFFER_SALT, salt])
        return shuffle_buffer(lambda at: self._in_order(stream, num_streams, seed, at, salt),
                              self.shuffle_buffer, rng, position)

    def _in_order(self, stream: int, num_streams: int, seed: int, position: dict | None,
                  salt: int) -> Iterator[Read]:
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
                        yield Read(raw, {"epoch": epoch, "shard": s, "offset": n + 1, "index": base + n + 1,
                                         "taken": taken}, epoch, taken == 1)
                index, offset = base + last + 1, 0
            if taken == 0:
                raise ValueError(f"webdataset shards {self.name} gave data stream {stream} of {num_streams} "
                                 "no sample in a whole epoch: too few samples for the data.streams "
                                 "sharing them")
            epoch, shard_pos, offset, index, taken = epoch + 1, 0, 0, 0, 0

    def iterate_once(self, part: int = 0, parts: int = 1) -> Iterator[RawRecord]:
        """Every sample once, in order; with ``parts``, only those whose running index is ``part``
        modulo ``parts`` (the others are not copied out or parsed)."""
        base = 0
        for shard in self.shards:
            last = -1
            for n, raw in self.walk(shard, lambda n, base=base: (base + n) % parts == part):
                last = n
                if raw is not None:
                    yield raw
            base += last + 1


def _json_kind(path: Path) -> type[IndexedSource]:
    """A ``.json`` file holding a list, or JSON lines under a ``.json`` name."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return JsonListSource if head[:1] == b"[" else JsonlSource


def is_glob(path: str) -> bool:
    """A pattern of webdataset shards (``glob`` syntax), not one path."""
    return any(c in path for c in "*?[")


def check_datasets(data: DataConfig) -> None:
    """Every dataset path of ``data.train`` and ``data.eval`` exists (a file, a directory, or a glob
    of shards that matches); raises ``FileNotFoundError`` naming the config field and the path."""
    for name in ("train", "eval"):
        entries = parse_mixture(getattr(data, name), f"data.{name}")
        for i, entry in enumerate(entries):
            pattern = is_glob(entry.path)
            if not (glob.glob(entry.path) if pattern else Path(entry.path).exists()):
                field = f"data.{name}" + (f"[{i}]" if len(entries) > 1 else "")
                raise FileNotFoundError(f"config field '{field}': dataset not found: {entry.path}"
                                        + (" (the pattern matches no file)" if pattern else ""))


def open_source(path: str | Path, split: str = "train", allow_outside_media: bool = False,
                columns: Mapping[str, str] | None = None, shuffle_buffer: int = 0):
    """A dataset path -> its source: a ``.jsonl`` file, a ``.json`` file (a list of records, or JSON
    lines), a local Hugging Face dataset (a ``.parquet`` / ``.arrow`` file, a ``save_to_disk``
    directory, a directory of parquet or arrow files), a directory holding ``{split}.jsonl`` or
    ``{split}.json``, or webdataset shards (a ``.tar``, a directory of them, or a glob).
    ``columns``: {record field: the dataset's name for it}. ``shuffle_buffer``: for shards."""
    p = Path(path)
    if p.suffix == ".jsonl":
        return JsonlSource(p, allow_outside_media, columns)
    if p.suffix == ".json" and p.is_file():
        return _json_kind(p)(p, allow_outside_media, columns)
    if p.suffix in HF_SUFFIXES:
        return HFSource(p, split, allow_outside_media, columns)
    if p.is_dir():
        if (p / f"{split}.jsonl").is_file():
            return JsonlSource(p / f"{split}.jsonl", allow_outside_media, columns)
        if (p / f"{split}.json").is_file():
            return _json_kind(p / f"{split}.json")(p / f"{split}.json", allow_outside_media, columns)
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return HFSource(p, split, allow_outside_media, columns)
    if p.suffix == ".tar" or is_glob(str(path)) or (p.is_dir() and any(p.glob("*.tar"))):
        return ShardSource(path, columns, shuffle_buffer)
    if p.is_dir():
        if any(q.suffix in HF_SUFFIXES for q in p.rglob("*")):
            return HFSource(p, split, allow_outside_media, columns)
        raise FileNotFoundError(f"dataset directory {p} holds neither {split}.jsonl, {split}.json, *.tar "
                                "shards nor a Hugging Face dataset (parquet / arrow files, save_to_disk)")
    raise FileNotFoundError(f"dataset not found: {path}")
