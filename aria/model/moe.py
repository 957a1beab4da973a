"""Fine-grained MoE MLP: router -> dispatch -> grouped expert GEMMs -> combine, plus shared experts.

Letters: T tokens, K experts per token (top-k), A = T*K assignments, E experts, D model width,
I expert width, R LoRA rank, M rows of the padded expert buffer (A rounded up, plus 8 per expert).

Design decisions:
- Router math is fp32. Experts are chosen by top-k on the raw logits (plus the optional
  selection-only balancing bias); the combine weights are the softmax over the k chosen raw logits,
  which equals a full softmax renormalised over the chosen experts (the reference's rule).
- Dispatch, compute and combine are separate pure functions. ``permute`` sorts the A assignments by
  expert (stable, so token order is kept inside an expert) and counts tokens per expert with a
  scatter-add (no host sync, unlike ``bincount``/``.tolist()``); ``unpermute`` puts expert outputs
  back and sums the k weighted outputs of each token. Expert parallelism inserts its all-to-all
  between the two without touching them.
- Experts are stacked weights (E, in, out) run by ``torch.nn.functional.grouped_mm`` with the
  cumulative counts as offsets, so the GPU never waits for the host. ``experts_loop`` is the readable
  per-expert reference the tests hold the grouped path to.
- When gradients are needed, every expert's group of rows is padded to a multiple of 8 rows and
  never left empty (``padded_groups``): grouped GEMM kernels have hung or read out of bounds on
  zero-row groups (K = 0 in the weight-gradient GEMM), and aligned groups suit their tiles. Without
  a backward there is no weight-gradient GEMM, and padding would make a decode step read the
  weights of all E experts instead of its k: inference runs the exact groups. The buffer has a static size
  (A rounded up to 8, plus 8 rows per expert; the last group takes the slack), so padding needs no
  host sync. Padding rows copy an arbitrary real row instead of being zeroed: their outputs are never
  read, so their output gradients are exactly zero and so are their contributions to every
  gradient. The padding is folded into the gather that builds the expert buffer, and the combine
  gathers each assignment's output straight from its padded row.
- Router losses are returned, not injected through autograd tricks: the trainer adds
  ``aux_loss_coeff * aux + z_loss_coeff * z`` and logs them. Padding tokens are excluded from their
  statistics. With ``balance_scope='global_batch'`` the expert counts (no gradient) are summed over
  the data-parallel group before the Switch loss, whose probability term stays local.
- Long rows (``token_chunk``): the router sees every token at once (its statistics and losses are
  unchanged), the routed experts run chunk by chunk, each chunk checkpointed in training, so the
  dispatch buffers, the expert activations and the expert-parallel exchange hold one chunk at a
  time (64K tokens x top-6 would be 393K expert rows). Every rank of an expert-parallel group has
  the same number of tokens (fixed-length rows), hence the same number of chunks and exchanges.
- Auxiliary-loss-free balancing keeps a per-expert bias used for selection only; the trainer sums
  ``tokens_per_expert`` over the step and calls ``update_expert_bias`` before the optimizer step.
- LoRA on the routed experts (``aria.model.lora``) is per expert: A (E, in, R) and B (E, R, out)
  beside each stacked weight, run by two more grouped GEMMs over the same offsets (so an expert's
  adapter sees exactly that expert's rows), in the grouped path and in the loop reference alike.
  Every parameter of ``Experts`` has the expert as its first dimension, so expert parallelism
  shards and tags adapters exactly like the weights.
- Expert parallelism lives in ``aria.parallel.expert``: it keeps E / P experts per rank and gives
  ``Experts`` an ``exchange`` that carries the expert-sorted rows to their experts' rank and back;
  this module only runs the local experts (``Experts.run_local``) on whatever rows it is handed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from aria.config import MoEConfig
from aria.model.layers import ACT_FNS, Linear, holds_no_data, init_linear


class RouterStats(NamedTuple):
    """Per-layer router statistics of one forward (all scalars/vectors stay on device)."""

    aux_loss: torch.Tensor
    """Switch load-balancing loss (unscaled by its coefficient)."""
    z_loss: torch.Tensor
    """Mean squared log-sum-exp of the router logits (unscaled)."""
    tokens_per_expert: torch.Tensor
    """(E,) assignments per expert among this rank's non-padding tokens."""


# ---------------------------------------------------------------------------------------------
# Routing, dispatch and combine: pure functions
# ---------------------------------------------------------------------------------------------


def route(logits_TE: torch.Tensor, top_k: int, bias_E: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 top-k routing. Returns combine weights (T, K) and expert ids (T, K)."""
    if bias_E is None:
        top_logits_TK, ids_TK = torch.topk(logits_TE, top_k, dim=-1)
    else:
        ids_TK = torch.topk(logits_TE + bias_E, top_k, dim=-1).indices
        top_logits_TK = logits_TE.gather(1, ids_TK)
    return torch.softmax(top_logits_TK, dim=-1), ids_TK


def permute(ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of the A = T*K assignments grouped by expert, and tokens per expert (E,).

    ``order_A[j]`` is the flat assignment index (token * K + slot) that lands at row j of the
    expert-sorted buffer; its token is ``order_A[j] // K``.
    """
    flat_A = ids_TK.reshape(-1)
    order_A = torch.argsort(flat_A, stable=True)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids_TK.device)
    counts_E.scatter_add_(0, flat_A, torch.ones_like(flat_A))
    return order_A, counts_E


def take_rows(x_ND: torch.Tensor, index_M: torch.Tensor) -> torch.Tensor:
    """``x_ND[index_M]``. On the CPU through ``index_select``, whose backward is an ``index_add_``
    (4-6x faster there than the accumulating ``index_put_`` behind ``x[index]``); on CUDA the
    indexing's sort-based backward stays, deterministic where rows repeat (atomics would not be)."""
    return x_ND[index_M] if x_ND.is_cuda else torch.index_select(x_ND, 0, index_M)


def unpermute(y_ND: torch.Tensor, order_A: torch.Tensor, weights_TK: torch.Tensor,
              rows_A: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of ``permute`` followed by the weighted sum over each token's k experts.

    ``y_ND`` holds the expert outputs; sorted assignment j's output is row ``rows_A[j]`` (row j when
    ``rows_A`` is None). One gather brings every token's k outputs next to each other; the sum is a
    batched (1 x k) @ (k x D) product, accumulated in fp32 inside the matmul.
    """
    T, K = weights_TK.shape
    rows_of_sorted_A = torch.arange(order_A.numel(), device=order_A.device) if rows_A is None else rows_A
    row_of_assignment_A = torch.empty_like(order_A).index_copy_(0, order_A, rows_of_sorted_A)
    y_TKD = take_rows(y_ND, row_of_assignment_A).view(T, K, y_ND.shape[-1])
    return torch.bmm(weights_TK.unsqueeze(1).to(y_ND.dtype), y_TKD).squeeze(1)


GROUP_ALIGN = 8
"""Rows per expert group are a multiple of this, and at least this many (see the module docstring)."""


def padded_groups(counts_E: torch.Tensor, num_rows: int, align: int = GROUP_ALIGN
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Layout of the padded expert buffer for ``num_rows`` expert-sorted rows with ``counts_E`` rows
    per expert: each group rounded up to a multiple of ``align`` rows, at least ``align``.

    Returns the buffer row of every sorted row (``pos_A``), the groups' cumulative ends (int32
    offsets for ``grouped_mm``) and the buffer's static row count M = align * (ceil(A / align) + E),
    the last group taking the slack. No host sync.
    """
    E = counts_E.numel()
    M = align * (-(-num_rows // align) + E)
    padded_E = torch.clamp((counts_E + align - 1) // align * align, min=align)
    starts_E = torch.cumsum(padded_E, 0) - padded_E
    shift_E = starts_E - (torch.cumsum(counts_E, 0) - counts_E)  # padded start - sorted start
    ends_E = torch.cat([starts_E[1:], starts_E.new_full((1,), M)])  # the last group takes the slack
    expert_A = torch.repeat_interleave(torch.arange(E, device=counts_E.device), counts_E,
                                       output_size=num_rows)
    pos_A = torch.arange(num_rows, device=counts_E.device) + shift_E[expert_A]
    return pos_A, ends_E.to(torch.int32), M


def needs_padding(weights) -> bool:
    """Whether the grouped GEMMs will have a backward (see the module docstring)."""
    return torch.is_grad_enabled() and any(w.requires_grad for w in weights)


def exact_offsets(counts_E: torch.Tensor) -> torch.Tensor:
    """Cumulative group ends of unpadded groups (int32 offsets for ``grouped_mm``)."""
    return torch.cumsum(counts_E, 0).to(torch.int32)


def grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm(x, w, offs=offsets)``; on the CPU without a backward, one matmul per expert
    that has rows: the CPU kernel visits every expert's weights, empty groups included, so a
    decode step (k of E experts used) would pay for all E. The CPU has no host sync to avoid."""
    if (x_MK.is_cuda or holds_no_data(x_MK)
            or torch.is_grad_enabled() and (x_MK.requires_grad or w_EKN.requires_grad)):
        return F.grouped_mm(x_MK, w_EKN, offs=offsets_E)
    out_MN = x_MK.new_empty(x_MK.shape[0], w_EKN.shape[-1])
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            torch.mm(x_MK[start:end], w_EKN[e], out=out_MN[start:end])
        start = end
    return out_MN


def _swiglu(h_A2I: torch.Tensor) -> torch.Tensor:
    gate, up = h_A2I.chunk(2, dim=-1)
    return F.silu(gate) * up


class ExpertAdapters(NamedTuple):
    """Per-expert LoRA of the stacked weights: w_fc + scale * a_fc @ b_fc, expert by expert."""

    a_fc1_EDR: torch.Tensor
    b_fc1_ER2I: torch.Tensor
    a_fc2_EIR: torch.Tensor
    b_fc2_ERD: torch.Tensor
    scale: float
    dropout: float
    """Dropout probability on the adapters' input (0 outside training)."""


def grouped_swiglu(x_MD: torch.Tensor, w_fc1_ED2I: torch.Tensor, w_fc2_EID: torch.Tensor,
                   offsets_E: torch.Tensor, adapters: ExpertAdapters | None = None) -> torch.Tensor:
    """All experts in two grouped GEMMs over rows grouped by expert (``offsets_E``: cumulative group
    ends, the last = M); with ``adapters`` each GEMM gains its expert's low-rank term (two more
    grouped GEMMs)."""
    h_M2I = grouped_mm(x_MD, w_fc1_ED2I, offsets_E)
    if adapters is not None:
        h_M2I = h_M2I + _grouped_low_rank(x_MD, adapters.a_fc1_EDR, adapters.b_fc1_ER2I, adapters,
                                          offsets_E)
    g_MI = _swiglu(h_M2I)
    y_MD = grouped_mm(g_MI, w_fc2_EID, offsets_E)
    if adapters is not None:
        y_MD = y_MD + _grouped_low_rank(g_MI, adapters.a_fc2_EIR, adapters.b_fc2_ERD, adapters, offsets_E)
    return y_MD


def experts_grouped(x_AD: torch.Tensor, w_fc1_ED2I: torch.Tensor, w_fc2_EID: torch.Tensor,
                    counts_E: torch.Tensor, adapters: ExpertAdapters | None = None) -> torch.Tensor:
    """Expert-sorted rows in, their outputs in the same order out, through the padded grouped path
    (experts may get zero rows). The MoE layer runs the same path with the gathers fused
    (``Experts.run_local``); this is its stand-alone form, for tests and tools."""
    if x_AD.is_cuda and x_AD.dtype != torch.bfloat16:  # CUDA's grouped GEMM takes bf16 only
        return experts_loop(x_AD, w_fc1_ED2I, w_fc2_EID, counts_E, adapters)
    weights = (w_fc1_ED2I, w_fc2_EID, *(adapters[:4] if adapters is not None else ()))
    if not needs_padding(weights):
        return grouped_swiglu(x_AD, w_fc1_ED2I, w_fc2_EID, exact_offsets(counts_E), adapters)
    pos_A, offsets_E, M = padded_groups(counts_E, x_AD.shape[0])
    src_M = pos_A.new_zeros(M).index_copy_(0, pos_A, torch.arange(x_AD.shape[0], device=x_AD.device))
    return take_rows(grouped_swiglu(take_rows(x_AD, src_M), w_fc1_ED2I, w_fc2_EID, offsets_E, adapters), pos_A)


def _grouped_low_rank(x_MN: torch.Tensor, a_ENR: torch.Tensor, b_ERM: torch.Tensor,
                      adapters: ExpertAdapters, offsets_E: torch.Tensor) -> torch.Tensor:
    """scale * (dropout(x) @ A_e) @ B_e over the rows of each expert e."""
    low_MR = grouped_mm(F.dropout(x_MN, adapters.dropout), a_ENR, offsets_E)
    return adapters.scale * grouped_mm(low_MR, b_ERM, offsets_E)


def experts_loop(x_AD: torch.Tensor, w_fc1_ED2I: torch.Tensor, w_fc2_EID: torch.Tensor,
                 counts_E: torch.Tensor, adapters: ExpertAdapters | None = None) -> torch.Tensor:
    """Reference: one matmul pair per expert over its slice of the sorted rows (host sync)."""
    outputs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        x_nD = x_AD[start: start + n]
        h_n2I = x_nD @ w_fc1_ED2I[e]
        if adapters is not None:
            h_n2I = h_n2I + adapters.scale * ((F.dropout(x_nD, adapters.dropout) @ adapters.a_fc1_EDR[e])
                                              @ adapters.b_fc1_ER2I[e])
        g_nI = _swiglu(h_n2I)
        y_nD = g_nI @ w_fc2_EID[e]
        if adapters is not None:
            y_nD = y_nD + adapters.scale * ((F.dropout(g_nI, adapters.dropout) @ adapters.a_fc2_EIR[e])
                                            @ adapters.b_fc2_ERD[e])
        outputs.append(y_nD)
        start += n
    return torch.cat(outputs)


# ---------------------------------------------------------------------------------------------
# Router losses
# ---------------------------------------------------------------------------------------------


def router_z_loss(logits_TE: torch.Tensor, valid_T: torch.Tensor | None,
                  num_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over (non-padding) tokens of logsumexp(logits)^2; with ``num_tokens``
    the sum over these tokens divided by it (their share of a mean over more tokens)."""
    z_T = torch.logsumexp(logits_TE, dim=-1).square()
    if valid_T is not None:
        z_T = z_T * valid_T
    if num_tokens is None:
        num_tokens = torch.full((), float(z_T.shape[0]), device=z_T.device) if valid_T is None else valid_T.sum()
    return z_T.sum() / num_tokens.clamp(min=1)


def load_balancing_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, num_tokens: torch.Tensor,
                        top_k: int, valid_T: torch.Tensor | None = None,
                        local_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Switch loss E * sum_e P_e * f_e with P_e the mean router probability of expert e over this
    rank's tokens and f_e = counts_e / (num_tokens * k) the share of assignments.

    ``counts_E`` and ``num_tokens`` may be summed over data-parallel ranks (global-batch balance);
    ``local_tokens`` is then this rank's token count for P. Both default to the local values.
    """
    E = probs_TE.shape[-1]
    if valid_T is not None:
        probs_TE = probs_TE * valid_T.unsqueeze(-1)
    if local_tokens is None:
        local_tokens = num_tokens
    mean_prob_E = probs_TE.sum(dim=0) / local_tokens.clamp(min=1)
    share_E = counts_E.to(probs_TE.dtype) / (num_tokens.clamp(min=1) * top_k)
    return E * (mean_prob_E * share_E).sum()


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class Router(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))
        if cfg.bias_balancing:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def _apply(self, fn, recurse=True):
        # Casting the model (e.g. to bf16) must not round the balancing bias: its updates are ~1e-3.
        super()._apply(fn, recurse)
        if self.expert_bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns fp32 logits (T, E), combine weights (T, K) and expert ids (T, K)."""
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        weights_TK, ids_TK = route(logits_TE, self.top_k, self.expert_bias)
        return logits_TE, weights_TK, ids_TK


class Experts(nn.Module):
    """Stacked routed experts: w_fc1 (E, D, 2I) = [gate | up], w_fc2 (E, I, D), stored (in, out);
    optionally per-expert LoRA adapters lora_fc{1,2}_{A,B} (``add_adapters``)."""

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.w_fc1 = nn.Parameter(torch.empty(cfg.num_experts, dim, 2 * cfg.intermediate_size))
        self.w_fc2 = nn.Parameter(torch.empty(cfg.num_experts, cfg.intermediate_size, dim))
        # Expert parallelism (set by aria.parallel.expert.shard_experts): this rank holds experts
        # [ep_rank * E/ep_size, (ep_rank + 1) * E/ep_size); ``exchange`` moves rows to them and back.
        self.ep_group: dist.ProcessGroup | None = None
        self.ep_group_name: str | None = None
        self.ep_size, self.ep_rank = 1, 0
        self.exchange = None
        self.lora_scale: float | None = None  # set by add_adapters
        self.lora_dropout = 0.0

    def add_adapters(self, rank: int, scale: float, dropout: float) -> None:
        """Per-expert low-rank adapters A (E, in, rank), B (E, rank, out) for w_fc1 and w_fc2, on
        the weights' device and dtype, uninitialised (``aria.model.lora.init_adapters``)."""
        for name in ("fc1", "fc2"):
            w_ENM = getattr(self, f"w_{name}")
            E, N, M = getattr(w_ENM, "ds_shape", w_ENM.shape)  # a ZeRO-3 parameter keeps its shape there
            like = dict(device=w_ENM.device, dtype=w_ENM.dtype)
            self.register_parameter(f"lora_{name}_A", nn.Parameter(torch.empty(E, N, rank, **like)))
            self.register_parameter(f"lora_{name}_B", nn.Parameter(torch.empty(E, rank, M, **like)))
        self.lora_scale, self.lora_dropout = scale, dropout

    def adapters(self) -> ExpertAdapters | None:
        if self.lora_scale is None:
            return None
        return ExpertAdapters(self.lora_fc1_A, self.lora_fc1_B, self.lora_fc2_A, self.lora_fc2_B,
                              self.lora_scale, self.lora_dropout if self.training else 0.0)

    def forward(self, x_TD: torch.Tensor, token_A: torch.Tensor, counts_E: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token rows ``x_TD``, the token of every expert-sorted assignment (``token_A``) and the
        rows per (global) expert -> expert outputs y_ND and, for sorted assignment j, the row of y_ND
        holding its output (None: row j)."""
        if self.exchange is not None:  # expert parallelism: sorted rows in, sorted outputs back
            return self.exchange(self, take_rows(x_TD, token_A), counts_E), None
        return self.run_local(x_TD, token_A, counts_E)

    def run_local(self, rows_ND: torch.Tensor, src_A: torch.Tensor, counts_E: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's experts on the rows ``rows_ND[src_A]`` (sorted by local expert, ``counts_E``
        per expert): outputs and the output row of every sorted row, as ``forward``.

        CUDA's grouped GEMM takes bf16 only; other dtypes on GPU (fp32 debugging runs) use the loop.
        """
        adapters = self.adapters()
        if rows_ND.is_cuda and rows_ND.dtype != torch.bfloat16:
            return experts_loop(take_rows(rows_ND, src_A), self.w_fc1, self.w_fc2, counts_E, adapters), None
        if not needs_padding(self.parameters(recurse=False)):
            return grouped_swiglu(take_rows(rows_ND, src_A), self.w_fc1, self.w_fc2, exact_offsets(counts_E),
                                  adapters), None
        pos_A, offsets_E, M = padded_groups(counts_E, src_A.numel())
        if rows_ND.shape[0] == 0:  # an expert-parallel rank that received no row: padding only
            x_MD = rows_ND.new_zeros(M, rows_ND.shape[1])
        else:
            x_MD = take_rows(rows_ND, src_A.new_zeros(M).index_copy_(0, pos_A, src_A))
        return grouped_swiglu(x_MD, self.w_fc1, self.w_fc2, offsets_E, adapters), pos_A


class SharedExperts(nn.Module):
    """The S shared experts as one SwiGLU MLP of width S * I (the reference's layout)."""

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        width = cfg.intermediate_size * cfg.num_shared_experts
        self.gate_proj = Linear(dim, width, bias=cfg.shared_bias)
        self.up_proj = Linear(dim, width, bias=cfg.shared_bias)
        self.down_proj = Linear(width, dim, bias=cfg.shared_bias)
        self.act = ACT_FNS[cfg.shared_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(dim, cfg)
        self.experts = Experts(dim, cfg)
        self.shared = SharedExperts(dim, cfg) if cfg.num_shared_experts > 0 else None
        # Data-parallel group for global-batch balance statistics (None = the default group).
        self.balance_group: dist.ProcessGroup | None = None
        # Sequence parallelism (aria.parallel.sequence): the ranks sharing this micro-batch's rows.
        self.sequence_group: dist.ProcessGroup | None = None
        self.sequence_size = 1

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, RouterStats | None]:
        shape = x_BTD.shape
        x_TD = x_BTD.reshape(-1, shape[-1])
        logits_TE, weights_TK, ids_TK = self.router(x_TD)

        C = self.cfg.token_chunk
        if C and x_TD.shape[0] > C:
            chunks = []
            for start in range(0, x_TD.shape[0], C):
                piece = (x_TD[start:start + C], weights_TK[start:start + C], ids_TK[start:start + C])
                if self.training and torch.is_grad_enabled():  # keep only the chunk's inputs
                    chunks.append(torch.utils.checkpoint.checkpoint(self.routed, *piece, use_reentrant=False))
                else:
                    chunks.append(self.routed(*piece))
            out_TD = torch.cat(chunks)
        else:
            out_TD = self.routed(x_TD, weights_TK, ids_TK)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)

        stats = None
        if self.training:
            valid_T = None if valid_BT is None else valid_BT.reshape(-1).to(logits_TE.dtype)
            stats = self.router_stats(logits_TE, ids_TK, valid_T)
        return out_TD.view(shape), stats

    def routed(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        """The routed experts' combined output for tokens ``x_TD`` routed as given:
        dispatch -> experts -> combine."""
        order_A, counts_E = permute(ids_TK, self.cfg.num_experts)
        y_ND, rows_A = self.experts(x_TD, order_A // self.cfg.top_k, counts_E)
        return unpermute(y_ND, order_A, weights_TK, rows_A)

    def router_stats(self, logits_TE: torch.Tensor, ids_TK: torch.Tensor,
                     valid_T: torch.Tensor | None) -> RouterStats:
        """Switch and z losses of this micro-batch and this rank's expert counts. Under sequence
        parallelism a micro-batch's rows are spread over the SP group: its statistics are summed
        over the group and each rank returns its own tokens' part of both losses (the parts add up
        to the losses of the whole rows)."""
        E, K = self.cfg.num_experts, self.cfg.top_k
        with torch.no_grad():
            weight_A = None if valid_T is None else valid_T.repeat_interleave(K)
            counts_E = torch.zeros(E, dtype=torch.float32, device=ids_TK.device)
            counts_E.scatter_add_(0, ids_TK.reshape(-1), torch.ones(ids_TK.numel(), device=ids_TK.device)
                                  if weight_A is None else weight_A)
            local_tokens = (torch.full((), float(ids_TK.shape[0]), device=ids_TK.device)
                            if valid_T is None else valid_T.sum())
            batch_counts_E, batch_tokens = counts_E, local_tokens  # the micro-batch's
            if self.sequence_size > 1:
                packed = torch.cat([counts_E, local_tokens.reshape(1)])
                dist.all_reduce(packed, group=self.sequence_group)
                batch_counts_E, batch_tokens = packed[:E], packed[E]
            share_counts_E, share_tokens = batch_counts_E, batch_tokens  # where the expert shares come from
            if self.cfg.balance_scope == "global_batch" and dist.is_available() and dist.is_initialized():
                packed = torch.cat([counts_E, local_tokens.reshape(1)])
                dist.all_reduce(packed, group=self.balance_group)
                share_counts_E, share_tokens = packed[:E], packed[E]
        probs_TE = torch.softmax(logits_TE, dim=-1)
        aux = load_balancing_loss(probs_TE, share_counts_E, share_tokens, K, valid_T, batch_tokens)
        return RouterStats(aux, router_z_loss(logits_TE, valid_T, batch_tokens), counts_E)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        if self.router.expert_bias is not None:
            self.router.expert_bias.zero_()
        nn.init.normal_(self.experts.w_fc1, std=std)
        nn.init.normal_(self.experts.w_fc2, std=std)
        if self.shared is not None:
            for linear in (self.shared.gate_proj, self.shared.up_proj, self.shared.down_proj):
                init_linear(linear, std)


@torch.no_grad()
def update_expert_bias(moe_layers: list[MoE], tokens_per_expert_LE: torch.Tensor,
                       group: dist.ProcessGroup | None = None, reduce: bool = True) -> None:
    """Auxiliary-loss-free balancing step: bias += rate * sign(mean load - load), per layer.

    ``tokens_per_expert_LE`` is the expert load summed over the step's micro-batches: this rank's,
    summed here over ``group`` (all data-parallel ranks) so every rank applies the same update, or
    with ``reduce=False`` already summed over the ranks (the trainer's step statistics are).
    """
    load_LE = tokens_per_expert_LE.detach().float().clone()
    if reduce and dist.is_available() and dist.is_initialized():
        dist.all_reduce(load_LE, group=group)
    for layer, load_E in zip(moe_layers, load_LE, strict=True):
        if layer.router.expert_bias is None:
            raise ValueError("update_expert_bias called but model.moe.bias_balancing is false")
        layer.router.expert_bias.add_(layer.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E))
