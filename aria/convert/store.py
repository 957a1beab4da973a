"""Sharded safetensors directories: reading exact slices of tensors (whatever the expert-parallel
layout they were saved with) and writing shards.

Files: ``model.safetensors``, or above the shard size ``model-0000k-of-0000n.safetensors`` shards
plus ``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map": {key: file}}``).
A checkpoint made with expert parallelism (P ranks of experts) keeps every rank's experts in its own
file: the files above hold the non-expert tensors, ``experts-ep{r:03d}-of-{P:03d}.safetensors`` hold
rank r's slice (E / P experts) of every expert tensor, and ``layout.json`` says ``{"ep_size": P}``.

Design decisions:
- ``TensorStore`` reads any flat range of any global tensor straight from the files (an expert
  tensor from the EP files that hold it), so a rank reads only the bytes it keeps and conversion
  sees one ordinary model whatever the layout.
- Shards are first written under temporary names and renamed once their count is known; the index
  is written last, so a directory with an index is complete. A failure while writing (a bad key
  found mid-stream) deletes the temporary shards and leaves the output as it was.
- An expert-parallel layout is checked as a whole before it is read: ``layout.json`` present and
  readable, every rank's file there, no files of another EP size left beside them.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aria.commands import DTYPE_NAMES
from aria.convert.keymap import rename_hf

LAYOUT = "layout.json"
EXPERT_PARAM = re.compile(r"\.moe\.experts\.w_fc[12]$")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '10KB' / bytes -> bytes."""
    if isinstance(text, int):
        return text
    units = {"KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "B": 1}
    s = text.strip().upper()
    for unit, factor in units.items():
        if s.endswith(unit) and s[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(s[: -len(unit)]) * factor)
    if s.isdigit():
        return int(s)
    raise ValueError(f"size {text!r} is not understood: expected e.g. '5GB', '500MB' or a byte count")


# ---------------------------------------------------------------------------------------------
# safetensors reading / writing
# ---------------------------------------------------------------------------------------------


def weight_files(directory: Path) -> dict[str, list[str]]:
    """safetensors file -> the keys it holds, from the index or the single file."""
    directory = Path(directory)
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index} is not a safetensors index (needs a 'weight_map'): {err}") from None
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(name, []).append(key)
        absent = sorted(name for name in files if not (directory / name).is_file())
        if absent:
            raise FileNotFoundError(f"{index} lists shard(s) missing from {directory}: {absent}")
        return files
    single = directory / SINGLE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {SINGLE: list(f.keys())}
    raise FileNotFoundError(f"{directory} holds no weights: expected {SINGLE} or {INDEX}")


EXPERT_FILE = re.compile(r"^experts-ep(\d+)-of-(\d+)\.safetensors$")


def expert_parallel_size(directory: Path) -> int:
    """P of an expert-parallel directory (``layout.json``), 1 without one."""
    path = Path(directory) / LAYOUT
    if not path.is_file():
        return 1
    try:
        size = json.loads(path.read_text())["ep_size"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not an expert-parallel layout (expected {{\"ep_size\": P}}): "
                         f"{err}") from None
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{path}: ep_size must be a positive integer, got {size!r}")
    return size


def expert_file(directory: Path, rank: int, ep_size: int) -> Path:
    return Path(directory) / f"experts-ep{rank:03d}-of-{ep_size:03d}.safetensors"


def expert_files(directory: Path) -> list[Path]:
    """The expert slice files of ``directory`` in rank order ([] when its experts are in the
    ordinary weight files), after checking that they form exactly one complete layout."""
    directory = Path(directory)
    found = {f.name: int(m.group(2)) for f in directory.glob("experts-ep*-of-*.safetensors")
             if (m := EXPERT_FILE.match(f.name))}
    if found and not (directory / LAYOUT).is_file():
        raise ValueError(f"{directory} holds expert-parallel files {sorted(found)} but no {LAYOUT} "
                         "saying their ep_size")
    P = expert_parallel_size(directory)
    stray = sorted(name for name, size in found.items() if size != P)
    if stray:
        raise ValueError(f"{directory} mixes expert-parallel layouts: {LAYOUT} says ep_size={P}, but "
                         f"{stray} belong to ep_size {sorted({found[n] for n in stray})}. A checkpoint "
                         "holds one layout; remove the files left by the other one")
    if P == 1:
        return []
    files = [expert_file(directory, r, P) for r in range(P)]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"{directory} is an expert-parallel checkpoint ({LAYOUT}: ep_size={P}) "
                                f"but lacks {absent}")
    return files


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
                      "F16": torch.float16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class _Piece(NamedTuple):
    """Rows [row0, row0 + shape[0]) of a tensor, stored as ``key`` in ``file`` with ``shape``."""

    file: str
    key: str
    row0: int
    shape: tuple[int, ...]


class TensorStore:
    """Random access to the tensors of a model directory: ours (any expert-parallel layout: a
    tensor's experts may lie in P files) or, with ``hf=True``, a Hugging Face directory read under
    our names. Shapes and dtypes come from the safetensors headers; ``read`` returns any flat range
    of a whole tensor reading exactly its bytes (a rank loads only what it keeps), and
    ``bytes_read`` counts them. The layout is checked when the store opens: an index naming absent
    files or keys, expert files of mixed or incomplete layouts, a tensor stored twice. A LoRA
    checkpoint that holds adapters only (``base.json``) reads as its base, once that is checked to
    be the base the adapters were trained on (``aria.convert.lora_base``)."""

    def __init__(self, directory: str | Path, hf: bool = False) -> None:
        from aria.convert.lora_base import checked_base, read_base

        ref = None if hf else read_base(directory)
        if ref is not None:  # adapters only: the weights are the base's
            directory, hf = checked_base(directory, ref), ref.hf
        directory = self.directory = Path(directory)
        self._handles: dict[str, object] = {}
        self.pieces: dict[str, list[_Piece]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.bytes_read = 0
        expert = expert_files(directory)  # the layout is checked before anything else is read
        headers = []
        for name, keys in weight_files(directory).items():
            handle = self._handle(name)
            present = set(handle.keys())
            for key in keys:
                if key not in present:
                    raise ValueError(f"{directory / INDEX} maps '{key}' to {name}, which lacks it")
                headers.append((key, (name, key)))
        source = f"Hugging Face weights in {directory}" if hf else f"weights in {directory}"
        named = rename_hf(headers, source, size=lambda entry: math.prod(self._header(*entry)[0])) if hf else headers
        for ours, (name, key) in named:
            if ours in self.pieces:
                raise ValueError(f"{directory} holds '{ours}' twice")
            shape, dtype = self._header(name, key)
            self.pieces[ours], self.dtypes[ours] = [_Piece(name, key, 0, shape)], dtype
        if expert:
            self._add_expert_files(expert)

    def _add_expert_files(self, files: list[Path]) -> None:
        keys = list(self._handle(files[0].name).keys())
        for f in files:
            if set(self._handle(f.name).keys()) != set(keys):
                raise ValueError(f"{f} holds different expert tensors than {files[0].name}")
        for key in keys:
            if key in self.pieces:
                raise ValueError(f"'{key}' is in both {files[0].name} and the ordinary weight files of "
                                 f"{self.directory}")
            headers = [self._header(f.name, key) for f in files]
            if len(set(headers)) != 1:
                raise ValueError(f"{self.directory}: the expert slices of '{key}' differ in shape or dtype "
                                 f"across ranks: {dict(zip((f.name for f in files), headers))}")
            shape = headers[0][0]
            self.pieces[key] = [_Piece(f.name, key, r * shape[0], shape) for r, f in enumerate(files)]
            self.dtypes[key] = headers[0][1]

    def _handle(self, name: str):
        if name not in self._handles:
            self._handles[name] = safe_open(self.directory / name, framework="pt")
        return self._handles[name]

    def _header(self, name: str, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        sl = self._handle(name).get_slice(key)
        dtype = sl.get_dtype()
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.directory / name}: tensor '{key}' is stored as {dtype}, which is not "
                             f"read here (one of {sorted(SAFETENSORS_DTYPES)}); convert the checkpoint "
                             "to bf16 or fp32 first")
        return tuple(sl.get_shape()), SAFETENSORS_DTYPES[dtype]

    def keys(self) -> list[str]:
        return list(self.pieces)

    def shape(self, key: str) -> tuple[int, ...]:
        pieces = self.pieces[key]
        return (sum(p.shape[0] for p in pieces), *pieces[0].shape[1:]) if pieces[0].shape else ()

    def nbytes(self, key: str) -> int:
        return math.prod(self.shape(key)) * self.dtypes[key].itemsize

    def read(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of tensor ``key`` flattened in row-major order (1-D)."""
        shape = self.shape(key)
        numel = math.prod(shape)
        end = numel if end is None else end
        if not 0 <= start <= end <= numel:
            raise ValueError(f"{self.directory}: range [{start}, {end}) is outside '{key}' ({numel} elements)")
        row = math.prod(shape[1:])
        parts = []
        for piece in self.pieces[key]:
            first = piece.row0 * row
            a, b = max(start, first), min(end, first + math.prod(piece.shape))
            if a < b:
                sl = self._handle(piece.file).get_slice(piece.key)
                parts.append(_read_flat(sl, piece.shape, a - first, b - first, ()))
        if not parts:  # an empty range, or a zero-size tensor
            out = torch.empty(0, dtype=self.dtypes[key])
        else:
            out = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.bytes_read += out.numel() * out.element_size()
        return out

    def tensor(self, key: str) -> torch.Tensor:
        return self.read(key).view(self.shape(key))

    def close(self) -> None:
        self._handles.clear()


def _read_flat(sl, shape: tuple[int, ...], a: int, b: int, prefix: tuple) -> torch.Tensor:
    """Elements [a, b) of the row-major flattening of ``sl[prefix]`` (of ``shape``), read as at
    most 2 * len(shape) + 1 blocks that are contiguous on disk."""
    if not shape or (a == 0 and b == math.prod(shape)):
        return sl[prefix + (slice(None),) * len(shape)].reshape(-1) if shape or prefix else sl[()].reshape(-1)
    inner = math.prod(shape[1:])
    parts = []
    row = a // inner
    if a % inner:  # a partial first row
        stop = min(b, (row + 1) * inner)
        parts.append(_read_flat(sl, shape[1:], a - row * inner, stop - row * inner, prefix + (slice(row, row + 1),)))
        a, row = stop, row + 1
    full = b // inner
    if a < b and row < full:  # whole rows
        parts.append(sl[prefix + (slice(row, full),)].reshape(-1))
        a, row = full * inner, full
    if a < b:  # a partial last row
        parts.append(_read_flat(sl, shape[1:], 0, b - a, prefix + (slice(row, row + 1),)))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def iter_tensors(directory: Path, shapes_only: bool = False) -> Iterator[tuple[str, torch.Tensor | tuple]]:
    """Yields (key, tensor) one at a time over every weight file of ``directory``, expert slices of
    an expert-parallel checkpoint concatenated into whole tensors. ``shapes_only``: (key, shape)
    from the safetensors headers, reading no data."""
    store = TensorStore(directory)  # the layout is checked before any tensor is yielded
    try:
        for key in store.keys():
            yield key, store.shape(key) if shapes_only else store.tensor(key)
    finally:
        store.close()


def write_sharded(tensors: Iterable[tuple[str, torch.Tensor]], directory: Path,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Writes ``model.safetensors`` or shards + index; returns the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    temp_names, weight_map, shard, shard_bytes, total = [], {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f".shard-{len(temp_names):05d}.tmp"
        save_file(shard, directory / name, metadata={"format": "pt"})
        temp_names.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    seen = set()
    try:
        for key, tensor in tensors:
            if key in seen:
                raise ValueError(f"tensor '{key}' written twice")
            seen.add(key)
            size = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + size > max_shard_bytes:
                flush()
            shard[key] = tensor.contiguous()
            shard_bytes += size
            total += size
        if shard or not temp_names:
            flush()
    except BaseException:
        for name, _ in temp_names:
            (directory / name).unlink(missing_ok=True)
        raise

    # complete: now replace whatever weights the directory held before
    for stale in [directory / SINGLE, directory / INDEX, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(temp_names) == 1:
        os.replace(directory / temp_names[0][0], directory / SINGLE)
        return [SINGLE]
    files = []
    for i, (temp, keys) in enumerate(temp_names):
        final = f"model-{i + 1:05d}-of-{len(temp_names):05d}.safetensors"
        os.replace(directory / temp, directory / final)
        files.append(final)
        weight_map.update({key: final for key in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files + [INDEX]


def cast_tensors(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None
          ) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in tensors:
        yield key, (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
