"""Which part of every tensor this rank holds, on any layout.

A *global* tensor is what a model directory stores: all experts, unpartitioned. A rank holds one
contiguous range of its row-major flattening:
- the whole tensor (``replicated``: every data-parallel rank holds a copy);
- experts [r * e, (r + 1) * e) (``experts``: expert parallelism over P ranks, e = E / P; experts are
  the leading dimension, so a rank's experts are one flat range);
- its ZeRO-3 partition (``partitioned``: DeepSpeed keeps rank r's 1/N of the flattened parameter in
  ``ds_tensor``; the last partition is padded).

Design decisions:
- ``local_parts`` describes every parameter and buffer the same way (global shape, flat range,
  1-D view of this rank's storage, and the group whose ranks hold disjoint parts), so loading,
  initialisation, fingerprints and optimizer-state checkpoints have one code path for every layout
  and never materialise a whole tensor a rank does not keep.
- ``sum_over_parts`` adds per-tensor values (e.g. |w| sums of a fingerprint) over the ranks that
  hold disjoint parts, counting replicated tensors once: one all-reduce per kind of layout, no host
  sync until the caller reads the result.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

REPLICATED, EXPERTS, PARTITIONED = "replicated", "experts", "partitioned"


class Part(NamedTuple):
    shape: tuple[int, ...]
    """Shape of the global tensor."""
    start: int
    end: int
    """This rank's elements [start, end) of the flattened global tensor (may be empty)."""
    local: torch.Tensor
    """1-D view of this rank's storage of those elements."""
    kind: str
    """replicated | experts | partitioned."""
    group: dist.ProcessGroup | None
    """Ranks holding disjoint parts of the tensor (the EP group, ZeRO-3's partition group)."""


def is_partitioned(tensor: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its data lives in ``ds_tensor``)."""
    return hasattr(tensor, "ds_id")


def part_of(tensor: torch.Tensor, experts: nn.Module | None = None) -> Part:
    """This rank's part of ``tensor``; ``experts`` is the owning ``Experts`` module for an expert
    parameter (sharded when its ``ep_size`` > 1)."""
    if is_partitioned(tensor):
        numel, size = tensor.ds_numel, tensor.ds_tensor.ds_numel
        rank = getattr(tensor, "ds_zero_partition_rank", None)
        if rank is None:
            rank = dist.get_rank(group=tensor.ds_process_group)
        start = min(rank * size, numel)
        end = min(start + size, numel)
        return Part(tuple(tensor.ds_shape), start, end, tensor.ds_tensor.narrow(0, 0, end - start),
                    PARTITIONED, tensor.ds_process_group)
    if experts is not None and experts.ep_size > 1:
        n = tensor.numel()
        shape = (tensor.shape[0] * experts.ep_size, *tensor.shape[1:])
        return Part(shape, experts.ep_rank * n, (experts.ep_rank + 1) * n, tensor.data.view(-1), EXPERTS,
                    experts.ep_group)
    return Part(tuple(tensor.shape), 0, tensor.numel(), tensor.data.view(-1), REPLICATED, None)


def local_parts(model: nn.Module, buffers: bool = True) -> dict[str, Part]:
    """Name -> this rank's part, for every parameter (and persistent buffer) of ``model``."""
    from aria.model.moe import Experts

    owners = {}
    for module_name, module in model.named_modules():
        if isinstance(module, Experts):
            for name, _ in module.named_parameters(recurse=False):
                owners[f"{module_name}.{name}"] = module
    tensors = dict(model.named_parameters())
    if buffers:
        persistent = model.state_dict(keep_vars=True)
        tensors.update({k: v for k, v in model.named_buffers() if k in persistent})
    return {name: part_of(t, owners.get(name)) for name, t in tensors.items()}


def sum_over_parts(parts: dict[str, Part], values: Iterable[tuple[str, torch.Tensor]],
                   device: torch.device) -> torch.Tensor:
    """Sum of per-tensor float64 scalars ``(name, value of this rank's part)``, adding the values of
    disjoint parts over their group and counting replicated tensors once."""
    totals: dict[tuple[str, object], torch.Tensor] = {}
    for name, value in values:
        part = parts[name]
        key = (part.kind, part.group)
        totals[key] = totals.get(key, torch.zeros((), dtype=torch.float64, device=device)) + value
    total = torch.zeros((), dtype=torch.float64, device=device)
    for (kind, group), value in sorted(totals.items(), key=lambda kv: kv[0][0]):
        if kind != REPLICATED and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(value, group=group)
        total += value
    return total
