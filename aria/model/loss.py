"""Chunked LM head + cross-entropy that never materialises the full (tokens x vocab) logits.

Letters: N tokens, V vocabulary, D model width, n tokens in one chunk.

Design decisions:
- The loss is a *sum* over supervised tokens; the trainer divides by the number of supervised
  tokens of the global batch (all ranks, all micro-batches), so every token weighs the same.
- Forward walks over token chunks: logits of one chunk in fp32, log-sum-exp, target logit, and, when
  gradients are needed, the chunk's gradient (softmax - one-hot) folded at once into dL/dhidden and
  dL/dweight. Backward only rescales those by the incoming gradient (the loss is linear in the
  chunk terms). Peak extra memory is one chunk of fp32 logits plus the two gradients, so a 64K x
  100K-vocab step never holds the 26 GB of fp32 logits.
- ``targets`` are already shifted (position t holds the id that should follow token t, or
  ``IGNORE_INDEX``), so packed documents never predict across their boundary.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
LOGITS_BUDGET = 2 ** 27  # fp32 logit elements per chunk (512 MiB)


def default_chunk_size(vocab_size: int) -> int:
    return max(64, LOGITS_BUDGET // vocab_size)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                chunk_size: int, need_h: bool, need_w: bool) -> torch.Tensor:
        N = hidden_ND.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden_ND.device)
        grad_h_ND = torch.empty_like(hidden_ND) if need_h else None
        grad_w_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if need_w else None
        for start in range(0, N, chunk_size):
            h_nD = hidden_ND[start: start + chunk_size]
            t_n = targets_N[start: start + chunk_size]
            valid_n = t_n != IGNORE_INDEX
            t_safe_n = torch.where(valid_n, t_n, 0)
            logits_nV = (h_nD @ weight_VD.t()).float()
            lse_n = torch.logsumexp(logits_nV, dim=-1)
            target_logit_n = logits_nV.gather(1, t_safe_n[:, None]).squeeze(1)
            loss += ((lse_n - target_logit_n) * valid_n).sum()
            if need_h or need_w:
                grad_nV = logits_nV.sub_(lse_n[:, None]).exp_()  # softmax, in place
                grad_nV[torch.arange(len(t_n), device=t_n.device), t_safe_n] -= 1.0
                grad_nV.mul_(valid_n[:, None])
                grad_nV = grad_nV.to(hidden_ND.dtype)
                if need_h:
                    grad_h_ND[start: start + chunk_size] = grad_nV @ weight_VD
                if need_w:
                    grad_w_VD += (grad_nV.t() @ h_nD).float()
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
    # Under no_grad (evaluation) skip the gradient work entirely: no V x D buffer, no extra matmuls.
    grad = torch.is_grad_enabled()
    return _ChunkedLinearCrossEntropy.apply(hidden_ND, weight_VD, targets_N, chunk,
                                            grad and hidden_ND.requires_grad, grad and weight_VD.requires_grad)
