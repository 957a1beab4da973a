"""The base a LoRA checkpoint adapts: its reference (``base.json``) and the fingerprint that proves
the base on disk is still the one the adapters were trained on.

A LoRA run's checkpoint holds its adapters, not the frozen base (~50 GB at Aria size, at every
``checkpoint.every_steps``). Its model directory is then::

    model_config.json   the architecture (with the stage's RoPE base), as in any model directory
    adapters.safetensors + lora.json     the adapters (``aria.model.lora``)
    base.json           {"path": the base directory, "hf": true if it is a Hugging Face directory,
                         "fingerprint": "v2:<sha256 hex>"}

and stands for base + adapters wherever a model directory is read: ``TensorStore`` opens the base
in its place (after the check below), so training, resuming, conversion, generation and evaluation
read it like any other model directory.

Design decisions:
- The fingerprint must be cheap at 25B parameters, change when a weight changes and not when only
  the files change. It hashes, for every tensor in name order (our names, through ``TensorStore``,
  so the same weights sharded otherwise, split by expert-parallel rank or saved as an HF directory
  with the same dtype give the same value): its name, dtype, shape and three 4 KiB windows of its
  bytes (first, middle, last of the whole tensor). At Aria size that is ~1000 tensors, ~12 MB read
  in small blocks, whereas hashing every byte would read 50 GB. Weights rewritten with other values
  change the sampled bytes of every tensor; an edit confined to the unsampled interior of one tensor
  would go unnoticed (the price of not reading everything). Not chosen: the sha256 of the index +
  file sizes (a retrained base of the same shapes has the same index and sizes), file headers (they
  change with the sharding), modification times (a copy changes them, the content not).
- The path is stored absolute (resolved when the run loads the base), so export and generation from
  another working directory find it. A moved base is "missing": the error names the path and the
  fingerprint the base must have.
- A base is always a directory that holds weights: a LoRA run that starts from another LoRA
  checkpoint with the same adapters refers to that checkpoint's base, never to the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from aria.model.lora import merge_lora, required_adapters

BASE_JSON = "base.json"
FINGERPRINT_VERSION = "v2"
WINDOW = 4096  # bytes hashed at each of a tensor's three sampled places


@dataclass(frozen=True)
class BaseRef:
    """What a LoRA checkpoint's adapters were trained on."""

    path: str
    """The base model directory (absolute)."""
    hf: bool
    """True: a Hugging Face directory (``config.json``); False: our model directory."""
    fingerprint: str
    """``fingerprint(path)`` when the run loaded it."""


def fingerprint(directory: str | Path, hf: bool = False) -> str:
    """``v2:<sha256>`` over every tensor of the weights in ``directory`` (see the module docstring):
    the same for the same weights however they are sharded or split by expert-parallel rank."""
    from aria.convert.store import TensorStore

    digest = hashlib.sha256()
    store = TensorStore(directory, hf=hf)
    try:
        for key in sorted(store.keys()):
            shape, dtype = store.shape(key), store.dtypes[key]
            numel = math.prod(shape)
            digest.update(json.dumps([key, str(dtype), list(shape)]).encode())
            width = max(1, WINDOW // dtype.itemsize)
            for at in sorted({0, max(0, numel // 2 - width // 2), max(0, numel - width)}):
                window = store.read(key, at, min(numel, at + width)).contiguous()
                digest.update(window.view(torch.uint8).numpy().tobytes())
    finally:
        store.close()
    return f"{FINGERPRINT_VERSION}:{digest.hexdigest()}"


def reference(directory: str | Path, hf: bool) -> BaseRef:
    """The reference a LoRA checkpoint keeps to base ``directory``, fingerprinted now."""
    return BaseRef(str(Path(directory).resolve()), hf, fingerprint(directory, hf))


def write_base(directory: str | Path, ref: BaseRef) -> None:
    (Path(directory) / BASE_JSON).write_text(json.dumps(asdict(ref), indent=2) + "\n")


def read_base(directory: str | Path) -> BaseRef | None:
    """The base reference of an adapters-only model directory, None for one that holds weights."""
    path = Path(directory) / BASE_JSON
    if not path.is_file():
        return None
    try:
        return BaseRef(**json.loads(path.read_text()))
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a LoRA base reference (expected path, hf, fingerprint): "
                         f"{err}") from None


def checked_base(directory: str | Path, ref: BaseRef) -> Path:
    """The base directory of adapters-only ``directory`` after checking that it is there and is
    the base the adapters were trained on (same fingerprint); raises naming both otherwise."""
    base = Path(ref.path)
    what = (f"{directory} holds LoRA adapters only; they were trained on the base {base} "
            f"(fingerprint {ref.fingerprint}, from {Path(directory) / BASE_JSON})")
    marker = "config.json" if ref.hf else "model_config.json"
    if not (base / marker).is_file():
        raise FileNotFoundError(f"{what}, which is missing (no {base / marker}). Put that base back at "
                                f"{base}, or export the adapters (aria-convert to-hf --adapters-only) "
                                "and apply them to a copy of it")
    if read_base(base) is not None:
        raise ValueError(f"{what}, which holds adapters only itself: a base must hold weights")
    found = fingerprint(base, ref.hf)
    if found != ref.fingerprint:
        raise ValueError(f"{what}, but the weights now at {base} differ: their fingerprint is {found}, "
                         f"expected {ref.fingerprint}. The adapters only make sense on the weights they "
                         "were trained on: restore that base")
    return base


def merge_transform(directory: str | Path):
    """The ``transform`` that ``aria.convert`` applies to the (our name, tensor) stream of model
    directory ``directory``: its LoRA adapters merged into the weights (``--merge-lora``). The base
    of an adapters-only directory is checked now, before an export writes anything."""
    adapters, cfg = required_adapters(directory, "--merge-lora")
    ref = read_base(directory)
    if ref is not None:  # adapters only: refuse a missing or changed base before anything is written
        checked_base(directory, ref)

    def merge_lora_adapters(tensors: Iterable[tuple[str, torch.Tensor]]
                            ) -> Iterator[tuple[str, torch.Tensor]]:
        return merge_lora(tensors, adapters, cfg)

    return merge_lora_adapters
