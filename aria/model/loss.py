"""Chunked LM head + cross-entropy that never materialises the full (tokens x vocab) logits.

Letters: N tokens, V vocabulary, D model width, n tokens in one chunk.

Design decisions:
- The loss is a *sum* over supervised tokens; the trainer divides by the number of supervised
  tokens of the global batch (all ranks, all micro-batches), so every token weighs the same.
- Forward walks over token chunks: the chunk's logits in the model dtype, their log-softmax in fp32
  (the loss is exact for the logits the model computed, as transformers' upcast loss), and, when
  gradients are needed, the chunk's gradient (softmax - one-hot) folded at once into dL/dhidden
  and dL/dweight. Backward only rescales those by the incoming gradient (the loss is linear in the
  chunk terms). Peak extra memory is one chunk of logits in the model dtype, one row block's fp32
  log-probabilities (and, from a bf16 chunk, their fp32 input) and the two gradients, so a 64K x
  100K-vocab step never holds the 26 GB of fp32 logits.
- The (chunk x V) buffers are where a step's time goes outside matmuls: every pass over them is
  as many bytes as the LM head's weight times the chunk. A chunk is walked row block by row
  block: the fp32 log-softmax for the loss and the softmax in the model dtype for the gradient,
  written over the logits (the gradient's target entries are then set from the fp32
  log-probabilities), instead of the nine whole-chunk passes of cast, log-sum-exp, subtract, exp,
  one-hot and mask (unsupervised tokens are masked on the chunk x D side). On the CPU a row block
  is a cache's worth (``CACHE_BLOCK`` fp32 elements): its passes run in cache, 1.5-1.8x faster
  than whole-chunk passes at width 512 / 32K vocabulary; on a GPU a block is a quarter of the
  logits budget (``GPU_BLOCK``: a few kernels per block, fp32 temporaries of 128 MiB each). The
  gradient goes straight into its slice of dL/dhidden, and dL/dweight accumulates in fp32 only
  from a second chunk on (one chunk: no fp32 copy).
- On the CPU only the supervised tokens go through the head: reading the targets there stalls
  nothing (on a GPU it would be a host sync), and a fine-tuning row supervises few of its tokens
  (the quickstart's dialogs about one in ten: the head and loss over all of them took ~20 ms of its
  ~0.2 s step, over the supervised ones ~3.5 ms). Elsewhere unsupervised tokens are masked as above.
- ``targets`` are already shifted (position t holds the id that should follow token t, or
  ``IGNORE_INDEX``), so packed documents never predict across their boundary.
"""

from __future__ import annotations

import torch

from aria.config import IGNORE_INDEX
from aria.model.layers import FAKE_DEVICE, holds_no_data

LOGITS_BUDGET = 2 ** 27  # fp32 logit elements per chunk (512 MiB)
CACHE_BLOCK = 2 ** 21  # fp32 logit elements per row block on the CPU (8 MiB)
GPU_BLOCK = LOGITS_BUDGET // 4  # fp32 logit elements per row block on a GPU (128 MiB)


def default_chunk_size(vocab_size: int) -> int:
    return max(64, LOGITS_BUDGET // vocab_size)


def _row_block(logits_nV: torch.Tensor) -> int:
    """Rows of a chunk's logits processed at a time: a cache's worth on the CPU, a quarter of the
    logits budget on a GPU."""
    V = logits_nV.shape[1]
    device = FAKE_DEVICE.get() if holds_no_data(logits_nV) else logits_nV.device.type
    return max(1, (CACHE_BLOCK if device == "cpu" else GPU_BLOCK) // V)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                chunk_size: int, need_h: bool, need_w: bool) -> torch.Tensor:
        N = hidden_ND.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden_ND.device)
        grad_h_ND = torch.empty_like(hidden_ND) if need_h else None
        grad_w_VD = None
        for start in range(0, N, chunk_size):
            h_nD = hidden_ND[start: start + chunk_size]
            t_n = targets_N[start: start + chunk_size]
            valid_n = t_n != IGNORE_INDEX
            t_safe_n = torch.where(valid_n, t_n, 0)
            logits_nV = h_nD @ weight_VD.t()
            target_logp_n = torch.empty(len(t_n), dtype=torch.float32, device=t_n.device)
            block = _row_block(logits_nV)
            for row in range(0, len(t_n), block):
                logits_bV = logits_nV[row: row + block]
                logp_bV = torch.log_softmax(logits_bV, dim=-1, dtype=torch.float32)
                target_logp_n[row: row + block] = logp_bV.gather(1, t_safe_n[row: row + block, None]).squeeze(1)
                if need_h or need_w:  # the gradient replaces the logits; fp32 inside the kernel
                    logits_bV.copy_(torch.softmax(logits_bV, dim=-1))
            loss -= (target_logp_n * valid_n).sum()
            if not (need_h or need_w):
                continue
            grad_nV = logits_nV
            rows_n = torch.arange(len(t_n), device=t_n.device)
            grad_nV[rows_n, t_safe_n] = (target_logp_n.exp() - 1.0).to(grad_nV.dtype)
            # Unsupervised rows' gradient rows are not zeroed (a pass over chunk x V): their
            # products are, on the (chunk x D) side.
            keep_n1 = valid_n[:, None].to(hidden_ND.dtype)
            if need_h:
                torch.mm(grad_nV, weight_VD, out=grad_h_ND[start: start + chunk_size]).mul_(keep_n1)
            if need_w:
                part_VD = grad_nV.t() @ (h_nD * keep_n1)
                if grad_w_VD is None:
                    grad_w_VD = part_VD
                else:  # a second chunk: accumulate in fp32 (the add casts on the fly, no copy)
                    grad_w_VD = grad_w_VD.float() if grad_w_VD.dtype != torch.float32 else grad_w_VD
                    grad_w_VD += part_VD
        if need_w and grad_w_VD is None:  # no tokens
            grad_w_VD = torch.zeros_like(weight_VD)
        ctx.save_for_backward(*(g for g in (grad_h_ND, grad_w_VD) if g is not None))
        ctx.need = (need_h, need_w)
        ctx.weight_dtype = weight_VD.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.need
        grad_h = grad_w = None
        if need_h:
            grad_h_ND = saved.pop(0)
            grad_h = grad_h_ND * grad_loss.to(grad_h_ND.dtype)
        if need_w:
            grad_w = (saved.pop(0) * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def chunked_cross_entropy(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                          chunk_size: int | None = None) -> torch.Tensor:
    """Sum over tokens with ``targets != IGNORE_INDEX`` of CE(hidden @ weight.T, target), fp32."""
    if hidden_ND.shape[0] != targets_N.shape[0]:
        raise ValueError(f"{hidden_ND.shape[0]} hidden states but {targets_N.shape[0]} targets")
    chunk = chunk_size or default_chunk_size(weight_VD.shape[0])
    if hidden_ND.device.type == "cpu" and not holds_no_data(targets_N):
        supervised = (targets_N != IGNORE_INDEX).nonzero().squeeze(1)
        if len(supervised) < len(targets_N):
            hidden_ND, targets_N = hidden_ND.index_select(0, supervised), targets_N[supervised]
    # Under no_grad (evaluation) skip the gradient work entirely: no V x D buffer, no extra matmuls.
    grad = torch.is_grad_enabled()
    return _ChunkedLinearCrossEntropy.apply(hidden_ND, weight_VD, targets_N, chunk,
                                            grad and hidden_ND.requires_grad, grad and weight_VD.requires_grad)
