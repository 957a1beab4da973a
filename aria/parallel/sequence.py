"""Sequence parallelism, DeepSpeed-Ulysses style: the tokens of a row are split over the P ranks of a
sequence-parallel (SP) group, and attention trades the split for a split of the heads.

Letters: B rows, T tokens of the whole row, t = T / P tokens of this rank, H heads, h = H / P heads
of this rank inside attention, d head width, P ranks of the group.

Design decisions:
- Everything but attention works on this rank's t consecutive tokens of every row: embeddings are
  looked up for the whole row (cheap) and sliced, so image features land in their slots whatever
  shard holds them; the decoder layers, the MoE (and its expert-parallel exchange), the final norm
  and the chunked loss see t tokens. Every rank of the group computes the row's image features
  (the vision encoder is small next to the decoder at long context; its gradients from each rank's
  slots add up in the data-parallel reduction like any other gradient).
- Attention (``attend``): q, k, v of the t local tokens and all H heads go through one all-to-all
  to all T tokens and h heads, the document-causal attention runs on the whole row (documents that
  cross a shard boundary are exact: every query sees its document's keys), and a second all-to-all
  brings the output back to t tokens and H heads. Both exchanges are autograd-aware. H and the
  key/value heads must be divisible by P (checked by the config).
- Gradients: DeepSpeed sees every rank as data-parallel. The trainer normalises the loss of every
  rank by the supervised tokens of the global batch (counted once, not once per SP rank), and
  router losses are split into parts that add up over the group (``aria.model.moe``: statistics
  all-reduced over the group, each rank's part over its own tokens), scaled by P because DeepSpeed
  averages over all ranks. So an SP group computes exactly the gradient one rank would on the row.
- Ranks: SP groups are consecutive ranks; the data loader serves rank ``r`` as data-parallel rank
  ``r // P`` of ``world / P``, so the ranks of a group read the same rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class SequenceParallel:
    """This rank's place in its SP group and the group's all-to-alls (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup | None, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's consecutive 1/P of ``x`` along ``dim`` (the tokens of a row)."""
        T = x.shape[dim]
        if T % self.size:
            raise ValueError(f"{T} tokens per row cannot be split over parallel.sp_size={self.size} ranks")
        t = T // self.size
        return x.narrow(dim, self.rank * t, t)

    def _exchange(self, x_PX: torch.Tensor) -> torch.Tensor:
        """Block p of dim 0 goes to rank p; block p of the result came from rank p."""
        from torch.distributed.nn.functional import all_to_all_single

        x_PX = x_PX.contiguous()  # (empty_like of a strided view would keep its strides)
        return all_to_all_single(torch.empty_like(x_PX), x_PX, group=self.group)

    def to_heads(self, x_BHtd: torch.Tensor) -> torch.Tensor:
        """(B, H, t, d) of this rank's tokens -> (B, h, T, d): all tokens of this rank's heads."""
        B, H, t, d = x_BHtd.shape
        P = self.size
        x_PBhtd = x_BHtd.view(B, P, H // P, t, d).transpose(0, 1)  # head group p goes to rank p
        y_PBhtd = self._exchange(x_PBhtd)  # from rank p: its tokens, our heads
        return y_PBhtd.permute(1, 2, 0, 3, 4).reshape(B, H // P, P * t, d)

    def to_tokens(self, y_BhTd: torch.Tensor) -> torch.Tensor:
        """(B, h, T, d) -> (B, H, t, d): the inverse of ``to_heads``."""
        B, h, T, d = y_BhTd.shape
        P = self.size
        y_PBhtd = y_BhTd.view(B, h, P, T // P, d).permute(2, 0, 1, 3, 4)  # token shard p goes to rank p
        x_PBhtd = self._exchange(y_PBhtd)  # from rank p: our tokens, its heads
        return x_PBhtd.transpose(0, 1).reshape(B, P * h, T // P, d)

    def attend(self, attend_fn, q_BHtd: torch.Tensor, k_BHtd: torch.Tensor, v_BHtd: torch.Tensor, layout):
        """``attend_fn(q, k, v, layout)`` over the whole row with this rank's heads, back to this
        rank's tokens with all heads."""
        out_BhTd = attend_fn(self.to_heads(q_BHtd), self.to_heads(k_BHtd), self.to_heads(v_BHtd), layout)
        return self.to_tokens(out_BhTd)


class SimulatedSequenceParallel(SequenceParallel):
    """The shapes and buffers of an SP group without a process group, for planning memory on fake
    tensors (``aria.train.plan``): every exchange allocates its output as the real one does."""

    def __init__(self, size: int) -> None:
        super().__init__(None, size, 0)

    def _exchange(self, x_PX: torch.Tensor) -> torch.Tensor:
        return x_PX.contiguous().clone()


def enable_sequence_parallel(model: nn.Module, sp: SequenceParallel) -> None:
    """Make ``model`` (an ``Aria``) compute its share of every row over ``sp``'s group."""
    model.sequence_parallel = sp
    for layer in model.decoder.layers:
        layer.attn.sequence_parallel = sp
        layer.moe.sequence_group = sp.group
        layer.moe.sequence_size = sp.size


def simulate_sequence_parallel(model: nn.Module, size: int) -> None:
    """Make ``model`` compute one rank's share of every row of a group of ``size`` ranks, without a
    process group (planning on fake tensors). The router statistics stay local: summing E + 1
    numbers over the group changes no shape."""
    enable_sequence_parallel(model, SimulatedSequenceParallel(size))
    for layer in model.decoder.layers:
        layer.moe.sequence_group, layer.moe.sequence_size = None, 1
