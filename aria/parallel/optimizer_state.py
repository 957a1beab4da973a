"""The optimizer's state by parameter, on any ZeRO stage and layout: fp32 master weights and Adam's
two moments, saved as flat ranges of each global tensor and loaded onto any other layout.

Design decisions:
- DeepSpeed keeps the fp32 master weights and the client optimizer's state (AdamW: exp_avg,
  exp_avg_sq) as flat tensors per parameter group, partitioned over ranks. The piece of parameter p
  that this rank optimizes is a *fragment*: found through DeepSpeed's fragment mapping
  (``_hp_mapping``: ZeRO-1/2 and the bf16 optimizer), its ZeRO-3 ``grad_position``, or, without
  ZeRO in fp32, the parameter itself.
- A fragment is named by (parameter, first element in the flattened *global* tensor: all experts,
  unpartitioned), so what one layout writes any other reads: each rank reads exactly the ranges it
  now owns (safetensors slices of 1-D tensors), from however many files cover them.
- Every rank writes its own fragments (``rank{r}-{i}.safetensors``, a few GB each, so that only
  one file's worth is on the host at a time): ZeRO partitions are disjoint, so nothing is written
  twice; without ZeRO, where ranks hold copies, only the first copy is written.
- Adam's state is created lazily by the optimizer's first step; loading before it creates the
  state (zeros, the saved step count) and fills the fragments, so the first step continues it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from aria.parallel.shards import EXPERTS, REPLICATED, local_parts

FIELDS = ("master", "exp_avg", "exp_avg_sq")


class Fragment(NamedTuple):
    name: str
    start: int
    """First element in the flattened global tensor."""
    numel: int
    flat: torch.Tensor
    """The optimizer's fp32 parameter holding it (a key of ``optimizer.state``)."""
    offset: int
    """Where the fragment starts in ``flat`` (flattened)."""
    writer: bool
    """This rank writes it (False only for extra copies of a replicated fragment)."""


def basic_optimizer(engine) -> torch.optim.Optimizer:
    """The client optimizer (AdamW) under DeepSpeed's wrapper, holding the state."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def fragments(engine, model: nn.Module) -> list[Fragment]:
    """This rank's fragment of every trainable parameter that has one."""
    parts = local_parts(model, buffers=False)
    wrapper, basic = engine.optimizer, basic_optimizer(engine)
    out = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = parts[name]
        if hasattr(param, "ds_id"):  # ZeRO-3
            group, offset, _ = wrapper.grad_position[wrapper.get_param_id(param)]
            flat = wrapper.fp32_partitioned_groups_flat[group]
            if part.end > part.start:
                out.append(Fragment(name, part.start, part.end - part.start, flat, offset, True))
        elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer
            mapping = param._hp_mapping
            if mapping is None:
                continue
            flat = basic.param_groups[mapping.param_group_index]["params"][0]
            offset = mapping.hp_fragment_address.start
            assert mapping.hp_fragment.data_ptr() == flat.data_ptr() + offset * flat.element_size()
            out.append(Fragment(name, part.start + mapping.lp_fragment_address.start,
                                mapping.lp_fragment_address.numel, flat, offset, True))
        else:  # no ZeRO: the optimizer holds the parameter itself, on every data-parallel rank
            assert param.dtype == torch.float32, "without ZeRO only fp32 parameters are optimized directly"
            out.append(Fragment(name, part.start, param.numel(), param, 0, _first_copy(part)))
    return out


def _first_copy(part) -> bool:
    """Whether this rank holds the first copy of a tensor that data-parallel ranks replicate."""
    if part.kind == REPLICATED:
        return dist.get_rank() == 0
    if part.kind == EXPERTS:  # replicated over the expert-data-parallel group (strided ranks)
        return dist.get_rank() < dist.get_world_size(part.group)
    return True


def _views(basic: torch.optim.Optimizer, frag: Fragment) -> dict[str, torch.Tensor]:
    flat = frag.flat.data.view(-1)
    views = {"master": flat.narrow(0, frag.offset, frag.numel)}
    state = basic.state[frag.flat]
    for field in FIELDS[1:]:
        views[field] = state[field].view(-1).narrow(0, frag.offset, frag.numel)
    return views


FILE_BYTES = 2 * 1024 ** 3
"""A rank writes its fragments in files of about this size, so that it never holds more of its
optimizer state on the host at once (at Aria size one rank's share is tens of GB)."""


def save(engine, model: nn.Module, directory: Path, rank: int, meta: dict) -> None:
    """Writes this rank's fragments to ``directory/rank{rank}-{i}.safetensors``; rank 0 also
    writes ``state.json`` (``meta``: step and layout). Call after an optimizer step."""
    directory.mkdir(parents=True, exist_ok=True)
    basic = basic_optimizer(engine)
    parts = local_parts(model, buffers=False)
    tensors, shapes, size, files = {}, {}, 0, 0

    def flush() -> None:
        nonlocal tensors, shapes, size, files
        path = directory / f"rank{rank:05d}-{files:03d}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, tmp, metadata={"shapes": json.dumps(shapes)})
        os.replace(tmp, path)
        tensors, shapes, size, files = {}, {}, 0, files + 1

    for frag in fragments(engine, model):
        if not frag.writer:
            continue
        for field, view in _views(basic, frag).items():
            tensors[f"{frag.name}@{frag.start}/{field}"] = view.detach().to("cpu", torch.float32, copy=True)
        shapes[frag.name] = list(parts[frag.name].shape)
        size += 4 * len(FIELDS) * frag.numel
        if size >= FILE_BYTES:
            flush()
    if tensors or files == 0:
        flush()
    if rank == 0:
        (directory / "state.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(directory: Path) -> dict:
    directory = Path(directory)
    path = directory / "state.json"
    if not path.is_file():
        ckpt = directory.parent
        if (ckpt / "deepspeed").is_dir() or any(ckpt.glob("trainer_rank*.pt")):
            raise ValueError(f"{ckpt} was written by an earlier version of this code (DeepSpeed's own "
                             "checkpoint format), which cannot be resumed here: start a new run from "
                             f"its weights with init.from_checkpoint={ckpt}")
        raise FileNotFoundError(f"{path} is missing: {ckpt} is not a complete checkpoint")
    return json.loads(path.read_text())


@torch.no_grad()
def load(engine, model: nn.Module, directory: Path, step: int) -> int:
    """Fills this rank's fragments from the files of ``directory`` (written by any layout) and
    sets Adam's step count; returns the bytes read."""
    directory = Path(directory)
    pieces: dict[str, list[tuple[int, int, str, Path]]] = {}  # name -> (start, numel, key prefix, file)
    shapes: dict[str, list[int]] = {}
    files = sorted(directory.glob("rank*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no optimizer state (rank*.safetensors)")
    handles = {}
    for path in files:
        handle = handles[path] = safe_open(path, framework="pt")
        shapes.update(json.loads(handle.metadata()["shapes"]))
        for key in handle.keys():
            prefix, field = key.rsplit("/", 1)
            if field != "master":
                continue
            name, start = prefix.rsplit("@", 1)
            numel = handle.get_slice(key).get_shape()[0]
            pieces.setdefault(name, []).append((int(start), numel, prefix, path))
    basic = basic_optimizer(engine)
    frags = fragments(engine, model)
    for flat in {id(f.flat): f.flat for f in frags}.values():
        if flat not in basic.state or not basic.state[flat]:
            basic.state[flat] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}
        else:
            basic.state[flat]["step"].fill_(float(step))
    parts = local_parts(model, buffers=False)
    bytes_read = 0
    for frag in frags:
        if frag.name not in pieces:
            raise ValueError(f"{directory} holds no optimizer state for '{frag.name}': was it trained "
                             "in the run that wrote this checkpoint? (a stage that trains more groups "
                             "than the saved one must start with init.from_checkpoint, not resume)")
        if list(parts[frag.name].shape) != shapes[frag.name]:
            raise ValueError(f"{directory}: '{frag.name}' had shape {shapes[frag.name]}, the model has "
                             f"{list(parts[frag.name].shape)}")
        views = _views(basic, frag)
        covered = 0
        end = frag.start + frag.numel
        for start, numel, prefix, path in pieces[frag.name]:
            a, b = max(start, frag.start), min(start + numel, end)
            if a >= b:
                continue
            for field, view in views.items():
                values = handles[path].get_slice(f"{prefix}/{field}")[a - start:b - start]
                view[a - frag.start:b - frag.start].copy_(values)
                bytes_read += values.numel() * values.element_size()
            covered += b - a
        if covered != frag.numel:
            raise ValueError(f"{directory}: the saved optimizer state covers {covered} of the "
                             f"{frag.numel} elements [{frag.start}, {end}) of '{frag.name}' this rank "
                             "needs: the checkpoint is incomplete")
    return bytes_read
