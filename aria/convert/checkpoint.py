"""Model directories on disk: ours and Hugging Face's, both as (sharded) safetensors.

Our model directory (what ``aria-convert from-hf`` writes and what training can start from) holds
``model_config.json`` (``ModelConfig.to_dict()``) and our parameters in sharded safetensors
(``aria.convert.store``; a training checkpoint made with expert parallelism keeps every rank's
experts in its own file, which the readers consolidate, so conversion and loading see one ordinary
model whatever the layout; ZeRO partitions never reach this format: training gathers them when it
saves ``model/``). A Hugging Face directory has ``config.json`` + ``generation_config.json`` and the
same safetensors layout with HF names (what ``save_pretrained`` writes). This module converts
weights and configs; ``aria.convert.export`` adds the tokenizer and the processor files.

Design decisions:
- Conversion streams: tensors are read one at a time (``safe_open``) and written shard by shard, so
  converting the 25.3B model holds at most one output shard plus the tensor being read (for an
  expert tensor of an EP checkpoint: its P slices and their concatenation) in memory, never a
  second copy of the model.
- ``convert`` takes an optional ``transform`` over the (our name, tensor) stream, applied between
  reading and writing (e.g. merging adapters into the weights). Its output is checked key by key
  and shape by shape against the model config as it streams; without a transform the safetensors
  headers are also checked before any data is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from aria.config import ModelConfig
from aria.convert import keymap
from aria.convert.hf_config import from_hf_config, generation_config, read_json, to_hf_config
from aria.convert.keymap import rename_hf
from aria.convert.store import DEFAULT_SHARD_BYTES, cast_tensors, iter_tensors, write_sharded
from aria.rundir import MODEL_CONFIG

# ---------------------------------------------------------------------------------------------
# Our model directory
# ---------------------------------------------------------------------------------------------


def read_model_config(directory: Path) -> ModelConfig:
    path = Path(directory) / MODEL_CONFIG
    if not path.is_file():
        hint = ("it has config.json: a Hugging Face directory, which aria-convert from-hf imports"
                if (Path(directory) / "config.json").is_file() else
                "an HF directory has config.json; use aria-convert from-hf")
        raise FileNotFoundError(f"{directory} is not an Aria model directory: {MODEL_CONFIG} is "
                                f"missing ({hint})")
    return ModelConfig.from_dict(read_json(path))


def save_model_dir(state: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                   cfg: ModelConfig, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                   dtype: torch.dtype | None = None) -> None:
    directory = Path(directory)
    items = state.items() if isinstance(state, dict) else state
    if cfg.text.tie_word_embeddings:
        items = ((k, v) for k, v in items if k != "lm_head.weight")
    write_sharded(cast_tensors(items, dtype), directory, max_shard_bytes)
    (directory / MODEL_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def load_model_dir(directory: Path, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None):
    """Builds the model of ``directory`` and loads its weights, checking every key and shape. LoRA
    adapters saved beside the weights (a LoRA run's checkpoint) are merged in: this is the model
    the run trained."""
    from aria.model import build_model
    from aria.convert.lora_base import merge_transform
    from aria.model.lora import ADAPTERS_FILE

    cfg = read_model_config(directory)
    model = build_model(cfg, device="meta")
    tensors = iter_tensors(directory)
    if (Path(directory) / ADAPTERS_FILE).is_file():
        tensors = merge_transform(directory)(tensors)
    load_state(model, tensors, f"weights in {directory}", device, dtype)
    return model


def load_state(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], source: str,
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> None:
    """Loads named tensors (our names) into a (meta) model with full key and shape checks."""
    expected = model.state_dict()
    state = dict(tensors)
    tied = model.cfg.text.tie_word_embeddings
    check_state({k: t.shape for k, t in state.items()}, expected, source, tied)
    if tied:
        state["lm_head.weight"] = state["decoder.embed.weight"]
    for key, tensor in state.items():
        keep_fp32 = key.endswith("expert_bias")
        target = expected[key].dtype if dtype is None or keep_fp32 else dtype
        state[key] = tensor.to(device=device, dtype=target if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.decoder.embed.weight


def check_state(shapes: dict[str, tuple], expected: dict[str, torch.Tensor], source: str,
                tied_lm_head: bool) -> None:
    """Every expected key present, no other key, every shape right: one error naming them."""
    keymap.check_keys(shapes, expected, source, tied_lm_head)
    for key, shape in shapes.items():
        keymap.check_shape(source, key, shape, expected[key].shape)


# ---------------------------------------------------------------------------------------------
# Hugging Face directory
# ---------------------------------------------------------------------------------------------


def read_hf_config(directory: Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        hint = (f" (it has {MODEL_CONFIG}: one of our model directories, which aria-convert to-hf "
                "exports)" if (Path(directory) / MODEL_CONFIG).is_file() else "")
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory: config.json "
                                f"is missing{hint}")
    return from_hf_config(read_json(path), source=str(path))


def ours_to_hf_tensors(tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """Renames our tensors to the HF on-disk layout, adds the dead post-LayerNorm as zeros and, for
    a model without shared experts, the zero-size shared-expert tensors HF still declares."""
    dtype = torch.float32
    for key, tensor in tensors:
        if cfg.text.tie_word_embeddings and key == "lm_head.weight":
            continue
        dtype = tensor.dtype if tensor.is_floating_point() else dtype
        yield keymap.ours_to_hf(key), tensor
    for key in keymap.HF_DEAD_KEYS:
        yield key, torch.zeros(cfg.vision.hidden_size, dtype=dtype)
    if cfg.moe.num_shared_experts == 0:
        D = cfg.text.hidden_size
        for layer in range(cfg.text.num_layers):
            for name, shape in (("gate_proj", (0, D)), ("up_proj", (0, D)), ("down_proj", (D, 0))):
                yield (keymap.ours_to_hf(f"decoder.layers.{layer}.moe.shared.{name}.weight"),
                       torch.zeros(shape, dtype=dtype))


def load_hf_dir(directory: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """Our model, loaded straight from a Hugging Face Aria directory."""
    from aria.model import build_model

    cfg = read_hf_config(directory)
    model = build_model(cfg, device="meta")
    source = f"Hugging Face weights in {directory}"
    load_state(model, rename_hf(iter_tensors(directory), source), source, device, dtype)
    return model


def write_hf_dir(tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, directory: Path,
                 dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 stop_token_ids: Sequence[int] = ()) -> None:
    """Writes weights (our names, streamed) + config.json + generation_config.json
    (``stop_token_ids``: more ids that end generation besides the config's end of text)."""
    directory = Path(directory)
    seen: set[torch.dtype] = set()

    def record(items):
        for key, tensor in items:
            if tensor.is_floating_point():
                seen.add(tensor.dtype)
            yield key, tensor

    write_sharded(record(cast_tensors(ours_to_hf_tensors(tensors, cfg), dtype)), directory, max_shard_bytes)
    dtype_name = str(max(seen, key=lambda d: torch.finfo(d).bits) if seen else torch.float32)
    (directory / "config.json").write_text(
        json.dumps(to_hf_config(cfg, dtype_name.removeprefix("torch.")), indent=2) + "\n")
    (directory / "generation_config.json").write_text(
        json.dumps(generation_config(cfg, stop_token_ids), indent=2) + "\n")


Transform = Callable[[Iterator[tuple[str, torch.Tensor]]], Iterable[tuple[str, torch.Tensor]]]


def convert(source: Path, target: Path, direction: str, dtype: torch.dtype | None = None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            log: Callable[[str], None] = print, transform: Transform | None = None,
            stop_token_ids: Sequence[int] = ()) -> None:
    """Weights and config: ``direction`` 'to-hf' (our model dir -> HF dir) or 'from-hf' (HF dir ->
    our model dir). ``transform`` maps the stream of (our name, tensor) between reading and
    writing; ``stop_token_ids`` go into an HF generation_config.json.

    Every key and shape is checked against the config: from the safetensors headers before anything
    is read (without a transform), and on the stream that is written.
    """
    from aria.model import build_model

    source, target = Path(source), Path(target)
    if source.resolve() == target.resolve():
        raise ValueError(f"source and output are the same directory: {source}")
    if direction == "from-hf":
        cfg = read_hf_config(source)
        origin = f"Hugging Face weights in {source}"
        stream = lambda: rename_hf(iter_tensors(source), origin)  # noqa: E731
    elif direction == "to-hf":
        cfg = read_model_config(source)
        origin = f"weights in {source}"
        stream = lambda: iter_tensors(source)  # noqa: E731
    else:
        raise ValueError(f"unknown direction {direction!r}")

    expected = build_model(cfg, device="meta").state_dict()
    tied = cfg.text.tie_word_embeddings
    if transform is None:  # names and shapes from the safetensors headers, before reading data
        shapes = dict(_headers(source, direction))
        check_state(shapes, expected, origin, tied)
        if direction == "to-hf":
            for key in shapes:  # e.g. a router balancing bias: refuse before writing anything
                if not (key == "lm_head.weight" and tied):
                    keymap.ours_to_hf(key)
    tensors = stream() if transform is None else transform(stream())
    if transform is not None:
        origin = f"{origin} after {getattr(transform, '__name__', 'the transform')}"
    seen: set[str] = set()
    checked = _checked(tensors, expected, origin, tied, seen)
    if direction == "from-hf":
        save_model_dir(checked, cfg, target, max_shard_bytes, dtype)
    else:
        write_hf_dir(checked, cfg, target, dtype, max_shard_bytes, stop_token_ids)
    log(f"wrote {target} ({len(seen)} tensors, {cfg.name} config)")


def _checked(tensors: Iterable[tuple[str, torch.Tensor]], expected: dict[str, torch.Tensor], source: str,
             tied_lm_head: bool, seen: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Passes the stream through, recording its keys in ``seen``; raises (inside the writer, which
    then discards its temporary shards) at the first unexpected key or wrong shape, and at the end
    if a key never came."""
    for key, tensor in tensors:
        if key not in expected:
            raise ValueError(f"{source}: tensor '{key}' is not a parameter of the model config")
        if key in seen:
            raise ValueError(f"{source}: tensor '{key}' appears twice")
        keymap.check_shape(source, key, tensor.shape, expected[key].shape)
        seen.add(key)
        yield key, tensor
    keymap.check_keys(seen, expected, source, tied_lm_head)


def _headers(directory: Path, direction: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(our key, shape) of every tensor, read from safetensors headers without loading data."""

    raw = iter_tensors(directory, shapes_only=True)
    if direction == "from-hf":
        return rename_hf(raw, f"Hugging Face weights in {directory}")
    return raw
