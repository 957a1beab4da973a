"""Expert parallelism: each rank of an expert-parallel (EP) group of P ranks holds E / P experts of
every MoE layer, and the rows routed to an expert travel to its rank and back.

Letters: A expert-sorted rows this rank sends (its tokens' assignments), R rows it receives, P ranks
of the EP group, E global experts, e = E / P local experts, D model width.

Design decisions:
- The model knows nothing of process groups: ``shard_experts`` slices every expert parameter
  (weights and LoRA adapters, expert-major) to this rank's experts and gives each ``Experts`` module
  an ``exchange``. ``Experts.forward`` hands the exchange the rows sorted by global expert; the
  exchange returns their outputs in the same order, having run ``Experts.run_local`` on the rows
  other ranks sent here.
- ``AllToAll``: one all-to-all of the per-(rank, local expert) counts, then the rows (sorted by
  global expert, so the rows for rank p are one contiguous block), a regroup by local expert
  (``regroup_order``, folded into the expert buffer's gather), the local grouped GEMMs, and the
  inverse all-to-all. A variable all-to-all needs its split sizes on the host: that is one host sync
  per layer, and only when P > 1.
- ``BalancedExchange`` is the same dataflow without communication, for planning memory on fake
  tensors (``aria.train.plan``): a rank receives as many rows as it sends (perfect balance) or a
  chosen multiple of them, each exchange allocating its output buffer as the real one does.
- Expert parameters carry DeepSpeed's MoE attributes (``allreduce=False`` and the EP group's name),
  so ZeRO reduces their gradients over the expert-data-parallel group only.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from aria.model.moe import MoE


def regroup_order(recv_counts_PE: torch.Tensor, total: int) -> torch.Tensor:
    """Rows received source-major ([from rank 0: expert 0, 1, ...], [from rank 1: ...]) -> for each
    position of the expert-major order (local expert by local expert, sources in rank order inside
    an expert), the received row that goes there."""
    P, E = recv_counts_PE.shape
    starts_PE = (torch.cumsum(recv_counts_PE.reshape(-1), 0) - recv_counts_PE.reshape(-1)).view(P, E)
    lengths = recv_counts_PE.t().reshape(-1)  # expert-major blocks
    starts = starts_PE.t().reshape(-1)
    block_start_in_output = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(total, device=recv_counts_PE.device) - torch.repeat_interleave(
        block_start_in_output, lengths, output_size=total)
    return torch.repeat_interleave(starts, lengths, output_size=total) + within


def _local_outputs(experts, x_RD: torch.Tensor, recv_counts_PE: torch.Tensor) -> torch.Tensor:
    """Run the local experts on the received rows; outputs back in received (source-major) order."""
    R = x_RD.shape[0]
    order_R = regroup_order(recv_counts_PE, R)
    y_MD, pos_R = experts.run_local(x_RD, order_R, recv_counts_PE.sum(0))
    if pos_R is None:
        pos_R = torch.arange(R, device=x_RD.device)
    return y_MD[torch.empty_like(order_R).index_copy_(0, order_R, pos_R)]


class AllToAll:
    """The token exchange of an EP group (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup, size: int) -> None:
        self.group, self.size = group, size

    def __call__(self, experts, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_to_all_single as all_to_all_autograd

        send_counts_PE = counts_E.view(self.size, -1)  # rows for rank p, per local expert of rank p
        recv_counts_PE = torch.empty_like(send_counts_PE)
        dist.all_to_all_single(recv_counts_PE, send_counts_PE, group=self.group)
        send, recv = torch.stack([send_counts_PE.sum(1), recv_counts_PE.sum(1)]).tolist()  # host sync
        x_RD = all_to_all_autograd(x_AD.new_empty(sum(recv), x_AD.shape[1]), x_AD.contiguous(),
                                   recv, send, group=self.group)
        y_RD = _local_outputs(experts, x_RD, recv_counts_PE)
        return all_to_all_autograd(y_RD.new_empty(sum(send), y_RD.shape[1]), y_RD, send, recv,
                                   group=self.group)


class BalancedExchange:
    """Shapes and buffers of ``AllToAll`` without a process group, for planning on fake tensors:
    this rank receives ``imbalance`` times the rows it sends (1 = perfect balance; routing that
    favours this rank's experts makes it more), each exchange allocating its output buffer as the
    real one does. The received rows' values are not meaningful."""

    def __init__(self, size: int, imbalance: float = 1.0) -> None:
        if imbalance < 1:
            raise ValueError(f"expert-parallel imbalance {imbalance} must be at least 1 (1 = balanced)")
        self.size, self.imbalance = size, imbalance

    def __call__(self, experts, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        A = x_AD.shape[0]
        R = math.ceil(self.imbalance * A)
        copies, rest = divmod(R, max(A, 1))
        x_RD = torch.cat([x_AD] * copies + [x_AD[:rest]]) if A else x_AD.clone()  # the receive buffer
        y_RD = _local_outputs(experts, x_RD, counts_E.view(self.size, -1))
        return y_RD[:A].clone()  # the buffer the inverse exchange fills


@torch.no_grad()
def shard_experts(moe_layers: list[MoE], size: int, rank: int, exchange,
                  group: dist.ProcessGroup | None = None, group_name: str | None = None) -> None:
    """Keep only experts [rank * E/size, (rank + 1) * E/size) of every layer: the slice of every
    expert parameter (weights and LoRA adapters alike), and route through ``exchange``."""
    for layer in moe_layers:
        E = layer.cfg.num_experts
        if E % size:
            raise ValueError(f"model.moe.num_experts={E} is not divisible by parallel.ep_size={size}")
        experts, local = layer.experts, E // size
        for name, full in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, nn.Parameter(full.detach()[rank * local:(rank + 1) * local].clone(),
                                                requires_grad=full.requires_grad))
        experts.ep_group, experts.ep_group_name, experts.ep_size, experts.ep_rank = group, group_name, size, rank
        experts.exchange = exchange
    tag_expert_parameters(moe_layers)


def shard_experts_over(moe_layers: list[MoE], group: dist.ProcessGroup, group_name: str) -> None:
    """Expert parallelism over the process group ``group`` (DeepSpeed's EP group ``group_name``)."""
    size = dist.get_world_size(group)
    shard_experts(moe_layers, size, dist.get_rank(group), AllToAll(group, size), group, group_name)


def simulate_expert_parallel(moe_layers: list[MoE], size: int, imbalance: float = 1.0) -> None:
    """Make the layers behave as rank 0 of an EP group of ``size`` ranks receiving ``imbalance``
    times its share of rows (``BalancedExchange``), with no process group: for memory planning on
    fake tensors."""
    shard_experts(moe_layers, size, 0, BalancedExchange(size, imbalance))


def tag_expert_parameters(moe_layers: list[MoE]) -> None:
    """(Re)attach DeepSpeed's MoE attributes to sharded expert parameters; moving a module between
    devices (``to_empty``) creates new parameter objects without them."""
    for layer in moe_layers:
        experts = layer.experts
        if experts.ep_size > 1 and experts.ep_group_name is not None:
            for p in experts.parameters():  # the weights and their LoRA adapters
                p.allreduce, p.group_name = False, experts.ep_group_name
