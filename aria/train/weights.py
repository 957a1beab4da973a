"""A run's weights on any layout: random initialisation, loading our model directory or a Hugging
Face one, saving a model directory and a fingerprint of what a run started from. Every rank touches
only its own part of every tensor (``aria.parallel.shards``): whole tensors, expert slices under
expert parallelism, ZeRO-3 partitions.

Design decisions:
- Initialisation runs ``Aria.init_units`` one unit at a time on a full-size fp32 copy of the unit
  alone (at most one decoder layer: ~3.5 GB at Aria size), seeded by (seed, unit name), and keeps
  this rank's part, rounded to the run's dtype (a bf16 run starts from the fp32 run's values). Every tensor's initial values are thus the same for any number of ranks, expert
  parallelism or ZeRO stage: expert e of layer l is a function of (seed, l, e) only.
- Loading reads only this rank's part of every tensor (``TensorStore`` reads safetensors slices):
  with experts over P ranks each rank reads 1/P of the expert bytes, under ZeRO-3 1/N of all.
- Saving spreads the writing over the ranks and copies to the host only what a rank writes. Expert
  slices are written by the first replica of each expert-parallel rank (ranks 0..P-1, one file
  each); every other tensor gets one writer, assigned greedily by bytes on top of the expert files
  (``writer_plan``: deterministic, so every rank knows the plan and rank 0 writes the index without
  asking). A ZeRO-3 tensor is gathered (a collective of its partition group) and copied by its
  writer only. Every collective comes before the first write, so a rank slow to write never keeps
  the others waiting inside a collective (whose timeout would abort the run). The result is an
  ordinary sharded model directory (index + files) that conversion and the next stage read like
  any other.
- LoRA adapters are saved apart (``adapters.safetensors`` + ``lora.json``, rank 0): expert adapters
  are all-gathered over the expert-parallel group into all E experts. A directory with adapters
  stands for base + adapters: a run that trains the same adapters loads them, a run without LoRA
  starts from the merged weights.
- A LoRA run whose base came from a directory saves no base weights at all: its model directory
  holds the adapters and ``base.json``, the base's path and fingerprint
  (``aria.convert.lora_base``), checked whenever the directory is read. Only a LoRA run on a random
  initialisation (no base on disk) writes its base weights beside the adapters.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from aria.config import LoRAConfig, ModelConfig
from aria.convert import keymap
from aria.convert.lora_base import read_base, reference, write_base
from aria.convert.store import INDEX, LAYOUT, TensorStore, expert_file
from aria.model.aria import Aria, module_groups, seeded
from aria.model.lora import (ADAPTERS_FILE, EXPERT_ADAPTER_KEY, LORA_JSON, LoRAMerger, is_adapter, lora_json,
                             read_adapters)
from aria.parallel.shards import EXPERTS, PARTITIONED, Part, local_parts, sum_over_parts
from aria.rundir import MODEL_CONFIG


# ---------------------------------------------------------------------------------------------
# Initialisation and loading
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def init_weights(model: Aria, seed: int) -> None:
    """From-scratch initialisation of ``model`` (any layout) to what ``Aria.init_weights(seed)``
    gives a whole model: unit by unit, keeping this rank's part of each tensor."""
    parts = local_parts(model)
    device = next(t.local.device for t in parts.values())
    with torch.device("meta"):
        pristine = Aria(model.cfg)  # unsharded, unpartitioned, without adapters
    for name, unit, init in pristine.init_units():
        full = copy.deepcopy(unit).to_empty(device=device)
        with seeded(seed, name, full):
            init(full)
        for key, tensor in full.state_dict().items():
            part = parts.get(f"{name}.{key}")
            if part is not None:  # (a tied LM head is the embedding)
                part.local.copy_(tensor.reshape(-1)[part.start:part.end].to(part.local.dtype))
        del full


class Loaded(NamedTuple):
    adapters: bool
    """LoRA adapters were loaded (the model trains the same adapters the directory holds)."""
    bytes_read: int
    bytes_stored: int
    """Bytes this rank read, and the size of every tensor the directory holds."""


def group_keys(model: Aria, groups) -> set[str]:
    """The names of the weights (parameters, and the routers' balancing bias) in the module
    ``groups`` (``aria.config.MODULE_GROUPS``)."""
    wanted = {id(p) for g in groups for p in module_groups(model)[g]}
    keys = {name for name, p in model.named_parameters() if id(p) in wanted}
    if "router" in groups:
        keys |= {name for name, _ in model.named_buffers() if name.endswith(".router.expert_bias")}
    return keys


@torch.no_grad()
def load_weights(model: Aria, source: Path, hf: bool = False, groups=None) -> Loaded:
    """Copy weights from our model directory (any expert-parallel layout) or an HF directory into
    this rank's part of every tensor of ``model``, reading only those bytes. ``groups``: only the
    weights of these module groups (the others keep what they hold); None: all.

    A directory with LoRA adapters: when ``model`` has the same adapters (rank, alpha, targets)
    they are loaded too; a model without adapters gets the base weights merged with them; other
    adapter settings are refused. A router balancing bias the source lacks starts at zero.

    A model with adapters keeps, as ``model.lora_base``, the reference to the base weights it reads
    (the source, or the base an adapters-only source names): ``save_weights`` then writes adapters
    and that reference only.
    """
    source = Path(source)
    store = TensorStore(source, hf=hf)  # an adapters-only source: its base, checked
    parts = {k: v for k, v in local_parts(model).items() if not is_adapter(k)}
    saved = None if hf else read_adapters(source)
    lora = getattr(model, "lora_config", None)
    merger = None
    if saved is not None:
        if lora is not None:
            _check_same_adapters(saved[1], lora, source)
        else:
            merger = LoRAMerger(*saved)
    optional = {k for k in parts if k.endswith(".router.expert_bias") and k not in store.pieces}
    keymap.check_keys(store.keys(), set(parts) - optional, f"{'Hugging Face weights' if hf else 'weights'} "
                      f"in {source}", tied_lm_head=False)
    if groups is not None:  # the source matches the whole model; only these groups are read
        keep = group_keys(model, groups)
        parts = {k: v for k, v in parts.items() if k in keep}
    for key, part in parts.items():
        if key in optional:
            part.local.zero_()
            continue
        keymap.check_shape(str(source), key, store.shape(key), part.shape)
        values = store.read(key, part.start, part.end)
        if merger is not None:
            values = merger.merge_range(key, values, part.shape, part.start, part.end)
        part.local.copy_(values.to(part.local.dtype))
    if merger is not None:
        merger.check_complete()
    stored = sum(store.nbytes(k) for k in store.keys())
    if saved is not None and lora is not None:
        load_adapters(model, saved[0], str(source / ADAPTERS_FILE))
    if lora is not None:
        # a LoRA checkpoint passes on its own base reference (None: it holds its base weights itself,
        # and so will this run's checkpoints); plain weights are the base
        model.lora_base = read_base(source) if saved is not None else reference(source, hf)
    return Loaded(saved is not None and lora is not None, store.bytes_read, stored)


def load_adapters(model: Aria, adapters: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved (whole, as saved) adapters into this rank's part of every adapter of ``model``:
    the same parts as the weights (expert slices, ZeRO-3 partitions)."""
    parts = {k: p for k, p in local_parts(model).items() if is_adapter(k)}
    keymap.check_keys(adapters, parts, source, tied_lm_head=False)
    for key, part in parts.items():
        keymap.check_shape(source, key, adapters[key].shape, part.shape)
        part.local.copy_(adapters[key].reshape(-1)[part.start:part.end].to(part.local.dtype))


def _check_same_adapters(saved: LoRAConfig, lora: LoRAConfig, source: Path) -> None:
    for name in ("rank", "alpha", "targets"):
        ours, theirs = getattr(lora, name), getattr(saved, name)
        same = sorted(ours) == sorted(theirs) if name == "targets" else ours == theirs
        if not same:
            raise ValueError(f"config field 'lora.{name}' = {ours!r} differs from the adapters in "
                             f"{source} ({LORA_JSON}: {name} = {theirs!r}). Use the same lora.rank, "
                             f"lora.alpha and lora.targets to keep training those adapters, or "
                             f"lora.enabled=false to train the weights with the adapters merged in")


@torch.no_grad()
def weights_fingerprint(model: Aria) -> float:
    """Sum of |w| over every base weight of the model, whatever its layout (parts summed over the
    ranks holding them): what a run started from, comparable with the same sum over a saved model
    directory's weights."""
    parts = {k: v for k, v in local_parts(model).items() if not is_adapter(k)}
    device = next(iter(parts.values())).local.device
    return float(sum_over_parts(parts, ((k, p.local.double().abs().sum()) for k, p in parts.items()), device))


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def writer_plan(sizes: dict[str, int], preload: list[int]) -> dict[str, int]:
    """Tensor -> the rank that writes it: largest first, each to the rank with the fewest bytes so
    far (``preload``: bytes a rank writes anyway, e.g. its expert file); ties go to the lowest rank."""
    load = list(preload)
    plan = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        rank = min(range(len(load)), key=lambda r: (load[r], r))
        plan[key] = rank
        load[rank] += sizes[key]
    return plan


def shard_file(rank: int, world: int) -> str:
    return f"model-{rank + 1:05d}-of-{world:05d}.safetensors"


def _nbytes(part: Part, dtype: torch.dtype) -> int:
    numel = 1
    for n in part.shape:
        numel *= n
    return numel * dtype.itemsize


def save_weights(model: Aria, cfg: ModelConfig, directory: Path, rank: int, world: int) -> None:
    """Our model directory from a training model of any layout, written by all ranks together
    (see the module docstring). Every rank must call it (gathers are collective)."""
    import deepspeed

    directory.mkdir(parents=True, exist_ok=True)
    base_ref = getattr(model, "lora_base", None) if getattr(model, "lora_config", None) else None
    if base_ref is not None:  # a LoRA run on a base on disk: adapters + the reference, no base copy
        adapters = _gather_adapters(model, local_parts(model), rank)
        if rank == 0:
            _write_adapters(model, adapters, directory)
            write_base(directory, base_ref)
            (directory / MODEL_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        return
    experts = model.moe_layers[0].experts
    P = experts.ep_size
    parts = local_parts(model)
    base = {k: p for k, p in parts.items() if not is_adapter(k)}
    dtypes = dict(model.state_dict(keep_vars=True))
    expert_keys = [k for k, p in base.items() if p.kind == EXPERTS]
    expert_bytes = sum(_nbytes(base[k], dtypes[k].dtype) for k in expert_keys) // max(P, 1)
    preload = [expert_bytes if r < P and expert_keys else 0 for r in range(world)]
    sizes = {k: _nbytes(p, dtypes[k].dtype) for k, p in base.items() if p.kind != EXPERTS}
    plan = writer_plan(sizes, preload)
    params = dict(model.named_parameters())

    mine: dict[str, torch.Tensor] = {}
    for key in sorted(sizes):  # the same order on every rank: ZeRO-3 gathers are collective
        part, writer = base[key], plan[key]
        if part.kind == PARTITIONED:
            with deepspeed.zero.GatheredParameters([params[key]]):
                if writer == rank:
                    mine[key] = params[key].detach().to("cpu", copy=True)
        elif writer == rank:
            mine[key] = dtypes[key].detach().cpu()
    adapters = _gather_adapters(model, parts, rank)  # the last collective: nobody writes before it
    if mine:
        _save_atomic(mine, directory / shard_file(rank, world))
    if expert_keys:
        from deepspeed.utils import groups

        if groups._get_expert_data_parallel_rank(experts.ep_group_name) == 0:
            assert rank < P, "expert-parallel groups are expected to be consecutive ranks"
            _save_atomic({k: dtypes[k].detach().cpu() for k in expert_keys},
                         expert_file(directory, experts.ep_rank, P))
    if rank == 0:
        weight_map = {k: shard_file(plan[k], world) for k in sizes}
        index = {"metadata": {"total_size": sum(sizes.values()) + expert_bytes * P},
                 "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if expert_keys:
            (directory / LAYOUT).write_text(json.dumps({"ep_size": P}) + "\n")
        if getattr(model, "lora_config", None) is not None:
            _write_adapters(model, adapters, directory)
        (directory / MODEL_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def _write_adapters(model: Aria, adapters: dict[str, torch.Tensor], directory: Path) -> None:
    if not adapters or any(t.numel() == 0 for t in adapters.values()):
        raise RuntimeError(f"LoRA is enabled but the adapters gathered for {directory} are empty")
    _save_atomic(adapters, directory / ADAPTERS_FILE)
    (directory / LORA_JSON).write_text(lora_json(model.lora_config))


def _gather_adapters(model: Aria, parts: dict[str, Part], rank: int) -> dict[str, torch.Tensor]:
    """Every LoRA adapter whole, on rank 0 (the others take part in the gathers and keep nothing):
    ZeRO-3 partitions gathered, expert adapters all-gathered over the expert-parallel group into all
    E experts."""
    import deepspeed

    params = dict(model.named_parameters())
    out = {}
    for key in sorted(k for k in parts if is_adapter(k)):  # the same order on every rank
        part, param = parts[key], params[key]
        if part.kind == PARTITIONED:
            with deepspeed.zero.GatheredParameters([param]):
                if rank == 0:
                    out[key] = param.detach().to("cpu", copy=True)
        elif part.kind == EXPERTS and EXPERT_ADAPTER_KEY.search(key):
            local = param.detach().contiguous()  # NCCL gathers device tensors
            pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(part.group))]
            dist.all_gather(pieces, local, group=part.group)
            if rank == 0:
                out[key] = torch.cat(pieces).cpu()
        elif rank == 0:
            out[key] = param.detach().cpu()
    return out


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
