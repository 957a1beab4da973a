"""Small building blocks shared by the vision encoder, projector and decoder, and attention by document.

Letters: B batch, T query length, S key length, H query heads, Hkv key/value heads, d head width,
D model width, N = B * T tokens of the rows laid end to end, R documents of all rows (R + 1 offsets).

Design decisions:
- RMSNorm is ``F.rms_norm``: it normalises and multiplies by the weight in fp32 and rounds once to
  the input dtype. The reference rounds the normalised input to bf16 before the weight multiplies
  it (a second rounding): in fp32 the two are the same bits; in bf16 ours is closer to the exact
  result (within half a bf16 step, tested). On CUDA it is one fused kernel where the reference's
  form is five (square, mean, add, rsqrt, multiply, plus the casts); a full-size decode step on an
  H200 ran 7% faster (7.87 -> 7.33 ms at batch 1, CUDA graphs). For backward that kernel keeps its
  input and the fp32 1/rms of each row, where the composite form torch runs elsewhere keeps fp32
  copies of the input: on fake tensors standing for a GPU (``FAKE_DEVICE``, the memory plan) the
  norm keeps what the CUDA kernel keeps (``_FusedRMSNormFootprint``).
- RoPE uses the rotate-half layout (HF checkpoints store q/k in that layout), cos/sin computed once
  per forward from ``position_ids`` and shared by all layers.
- Packed rows carry ``segment_ids`` (B, T): a token attends to the tokens of its own segment at or
  before its position, so documents in one row never see each other. Padding is a segment too (id 0
  by convention): padded tokens attend among themselves, their outputs are never used, and since
  every query sees at least itself no row of the softmax is empty (no NaN).
- **Attention by document, never a T x T mask in training.** ``DocumentLayout`` reads the segment
  ids once per forward (one host sync) and cuts the rows, laid end to end as N = B * T tokens, into
  R documents (maximal runs of one segment id; the packer writes documents one after the other).
  ``document_attention`` flattens q/k/v to (N, H, d) and runs causal attention inside each
  document, then restores (B, H, T, d). Work is sum(L_i^2) over the documents instead of B T^2,
  and memory is O(N): no mask, no scores, no additive bias.
- The kernel (``document_kernel``): on CUDA in bf16/fp16, torch's variable-length flash attention
  (``torch.nn.attention.varlen.varlen_attn``: one call per layer over all N tokens with the
  documents' ``cu_seqlens``, no padding to a common length). Chosen over FlexAttention with a
  document-causal block mask because it calls the flash kernels directly: nothing to compile (flex
  is only fast under ``torch.compile``, and recompiles as block masks change shape), no block mask
  to build per forward, exactly the causal math of SDPA's flash kernel, and blocks straddling a
  document boundary cost nothing extra. Elsewhere (CPU, fp32 on CUDA, fake tensors), the reference
  ``per_document_causal``: one causal SDPA per document, which on the CPU is a flash kernel of
  O(L) memory (measured in ``scripts/bench_attention.py``). A Python loop over documents per layer
  is fine at the dozens of documents a row holds. The varlen signature changed between torch
  releases (``is_causal=`` before, ``window_size=(-1, 0)`` in 2.13, ``enable_gqa`` added): it is
  inspected once and called accordingly; without ``enable_gqa`` k/v heads are repeated.
- On fake or meta tensors (``aria.train.plan`` traces the model on them) the segment ids hold no
  values: every row is taken as one document, the worst case for memory.
- Decode steps and left-padded generation (a KV cache) keep a boolean (B, 1, T, S) mask
  (``segment_causal_mask``); T is one token, or a prompt, there.
- ``linear`` / ``Linear``: a decode step at batch 1 on the CPU in bf16 multiplies one row by each
  weight; on a CPU with AMX ``torch.mv`` reads the weight 1.3-1.7x faster than the GEMM path
  ``F.linear`` takes (measured with weights out of cache, 0.7-34 MB), with the same fp32
  accumulation and the same bits, so it takes ``torch.mv`` there (``bf16_mv_faster``). On one with
  AVX512-BF16 and no AMX the reverse holds (``F.linear`` 1.0-1.5x faster on the same weights).
  Everything else (more rows, a bias, autograd, fp32, CUDA) is ``F.linear``.
- ``cpu_native_bf16``: not every x86 CPU multiplies bf16 in hardware; without AVX512-BF16 or AMX
  torch's CPU bf16 matmuls are ~50-100x slower than fp32, and training, inference and the
  benchmarks warn (``slow_bf16_warning``) or choose fp32.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import varlen


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACT_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if holds_no_data(x) and FAKE_DEVICE.get() == "cuda" and torch.is_grad_enabled():
            return _FusedRMSNormFootprint.apply(x, self.weight)
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


class _FusedRMSNormFootprint(torch.autograd.Function):
    """Shapes only: the tensors CUDA's fused RMSNorm allocates and keeps for backward (its input,
    the weight, the fp32 1/rms per row), for the memory plan's trace on fake tensors."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        inv_rms = x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)
        ctx.save_for_backward(x, weight, inv_rms)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, weight, _ = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(weight)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE, evaluated at arbitrary (per-document) positions.

    The frequencies are recomputed in fp32 at each forward (d/2 numbers) instead of living in a
    buffer, so casting the model to bf16 can never round them.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    @torch.no_grad()
    def forward(self, position_ids_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=position_ids_BT.device)
        inv_freq = 1.0 / (self.theta ** (exponents.float() / self.head_dim))
        freqs_BTh = position_ids_BT[..., None].float() * inv_freq
        emb_BTd = torch.cat((freqs_BTh, freqs_BTh), dim=-1)
        return emb_BTd.cos().to(dtype), emb_BTd.sin().to(dtype)


def apply_rope(x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BTd[:, None], sin_BTd[:, None]
    half = x_BHTd.shape[-1] // 2
    rotated = torch.cat((-x_BHTd[..., half:], x_BHTd[..., :half]), dim=-1)
    return x_BHTd * cos + rotated * sin


def segment_causal_mask(q_segments_BT: torch.Tensor, k_segments_BS: torch.Tensor,
                        q_offset: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, T, S), True = attend: same segment and key position <= query position.

    Query i sits at absolute position ``q_offset + i``; keys sit at 0..S-1 (a KV cache prefix plus
    the new tokens).
    """
    T, S = q_segments_BT.shape[1], k_segments_BS.shape[1]
    q_pos = torch.arange(q_offset, q_offset + T, device=q_segments_BT.device)
    k_pos = torch.arange(S, device=q_segments_BT.device)
    causal_TS = k_pos[None, :] <= q_pos[:, None]
    same_BTS = q_segments_BT[:, :, None] == k_segments_BS[:, None, :]
    return (same_BTS & causal_TS)[:, None]


def key_padding_mask(valid_BS: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, 1, S) for bidirectional attention over the valid keys."""
    return valid_BS[:, None, None, :]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; one bf16 row on the CPU without bias or autograd (a decode
    step at batch 1) through the matrix-vector kernel where it is the faster one
    (``bf16_mv_faster``), bit for bit the same result."""
    if (bias is None and x.numel() == x.shape[-1] and x.dtype == torch.bfloat16
            and x.device.type == "cpu" and weight.dtype == torch.bfloat16 and not holds_no_data(x)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and bf16_mv_faster()):
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


@functools.cache
def bf16_mv_faster() -> bool:
    """Whether ``torch.mv`` multiplies one bf16 row by a weight faster than ``F.linear`` on this
    CPU: with AMX (1.3-1.7x, weights out of cache), not on a 2-core AMD EPYC with AVX512-BF16 and
    no AMX (``F.linear`` 1.0-1.5x faster: 2.95 against 3.77 ms for a 32768 x 512 weight)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return probe is not None and probe()


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) computed by ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without either, torch's
    bf16 matmuls on the CPU take a generic path ~50-100x slower than fp32 (1.2 against 95 GFLOP/s
    for 512^3 on a 2-core AVX2 AMD EPYC); an older torch that cannot tell counts as yes."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [probe for probe in probes if probe is not None]
    return not probes or any(probe() for probe in probes)


def slow_bf16_warning(device: torch.device | str, dtype: torch.dtype, fix: str) -> str | None:
    """A one-line warning when ``dtype`` is bf16 on a CPU without native bf16 (``fix`` says what
    to pass instead), else None."""
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu" or cpu_native_bf16():
        return None
    return (f"warning: bf16 on a CPU without AVX512-BF16 or AMX (torch uses "
            f"{torch.backends.cpu.get_cpu_capability()}): its bf16 matmuls run ~50-100x slower than "
            f"fp32 there; {fix}")


FAKE_DEVICE: contextvars.ContextVar[str] = contextvars.ContextVar("fake_device", default="cuda")
"""The device type that fake tensors stand for (``aria.train.plan`` sets it to the planned device)."""


def holds_no_data(t: torch.Tensor) -> bool:
    """Meta or fake tensors (``aria.train.plan`` runs the model on them): shapes without values, so
    a check that reads values on the host cannot run."""
    return t.is_meta or isinstance(t, torch._subclasses.FakeTensor)


@dataclass(frozen=True, eq=False)
class DocumentLayout:
    """Where the documents of B packed rows of T tokens lie, for every attention layer of a forward.

    Built by ``from_segments`` from the rows' segment ids alone (and lives on their device); holds
    host integers and one small int32 tensor, so passing it through ``torch.utils.checkpoint`` (or
    to any subset of heads, as sequence parallelism does) costs nothing.
    """

    batch: int
    """B rows."""
    seq_len: int
    """T tokens per row."""
    lengths: tuple[int, ...]
    """R document lengths in token order, row after row (a document never spans two rows)."""
    cu_seqlens: torch.Tensor
    """(R + 1,) int32 offsets of the documents in the N = B * T tokens laid end to end."""
    max_len: int
    """The longest document (the varlen kernel's ``max_q`` / ``max_k``)."""

    @classmethod
    def from_segments(cls, segment_ids_BT: torch.Tensor) -> DocumentLayout:
        """A document is a maximal run of one segment id within a row (padding, id 0, included).
        The one host sync of the layout: the ids are read once, the offsets computed on the host
        and copied to the ids' device. A document id that comes back after another document
        raises (the dense mask would join the two runs; nothing we write produces that)."""
        B, T = segment_ids_BT.shape
        device = segment_ids_BT.device
        if holds_no_data(segment_ids_BT):  # no values to read: one document per row
            cu_seqlens = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)
            return cls(B, T, (T,) * B, cu_seqlens, T)
        segments_BT = segment_ids_BT.cpu()
        starts_BT = torch.ones(B, T, dtype=torch.bool)
        starts_BT[:, 1:] = segments_BT[:, 1:] != segments_BT[:, :-1]
        starts_R = starts_BT.flatten().nonzero().flatten()
        ids_R, rows_R = segments_BT.flatten()[starts_R], starts_R // T
        docs_R = ids_R > 0
        keys = rows_R[docs_R] * (int(ids_R.max()) + 1) + ids_R[docs_R]
        if keys.unique().numel() != keys.numel():
            for row in range(B):
                runs = segments_BT[row].unique_consecutive()
                runs = runs[runs > 0]
                if runs.unique().numel() < runs.numel():
                    raise ValueError(f"segment_ids row {row} uses one document id in two places (runs "
                                     f"{runs.tolist()}): a document must be one contiguous run of its "
                                     f"id (only padding, 0, may recur)")
        cu_seqlens = torch.cat([starts_R, torch.tensor([B * T])]).to(torch.int32)
        lengths = cu_seqlens.diff().tolist()
        return cls(B, T, tuple(lengths), cu_seqlens.to(device), max(lengths))


def per_document_causal(q_NHd: torch.Tensor, k_NHd: torch.Tensor, v_NHd: torch.Tensor,
                        docs: DocumentLayout, enable_gqa: bool) -> torch.Tensor:
    """The reference kernel: one causal SDPA per document (on the CPU a flash kernel, O(L) memory)."""
    out = []
    for q_LHd, k_LHd, v_LHd in zip(q_NHd.split(docs.lengths), k_NHd.split(docs.lengths),
                                   v_NHd.split(docs.lengths)):
        out_1HLd = F.scaled_dot_product_attention(q_LHd.transpose(0, 1)[None], k_LHd.transpose(0, 1)[None],
                                                  v_LHd.transpose(0, 1)[None], is_causal=True,
                                                  enable_gqa=enable_gqa)
        out.append(out_1HLd[0].transpose(0, 1))
    return torch.cat(out)


@functools.lru_cache(maxsize=None)
def _varlen_options(varlen_fn: Callable) -> tuple[dict, bool]:
    """Keyword arguments that make ``varlen_fn`` causal, and whether it takes ``enable_gqa``:
    torch 2.13 has ``window_size=(-1, 0)`` (a tuple: it compares with ==), earlier releases
    ``is_causal=True``."""
    params = inspect.signature(varlen_fn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return causal, "enable_gqa" in params


def varlen_causal(q_NHd: torch.Tensor, k_NHd: torch.Tensor, v_NHd: torch.Tensor,
                  docs: DocumentLayout, enable_gqa: bool) -> torch.Tensor:
    """torch's variable-length flash attention (CUDA, bf16/fp16): one call for all documents."""
    varlen_fn = varlen.varlen_attn  # looked up per call, so a test can stand in for the CUDA kernel
    causal, takes_gqa = _varlen_options(varlen_fn)
    if enable_gqa and not takes_gqa:
        repeats = q_NHd.shape[1] // k_NHd.shape[1]
        k_NHd, v_NHd = k_NHd.repeat_interleave(repeats, dim=1), v_NHd.repeat_interleave(repeats, dim=1)
    elif enable_gqa:
        causal = {**causal, "enable_gqa": True}
    return varlen_fn(q_NHd, k_NHd, v_NHd, docs.cu_seqlens, docs.cu_seqlens, docs.max_len, docs.max_len,
                     **causal)


def document_kernel(q_NHd: torch.Tensor) -> Callable:
    """The varlen kernel where it runs (CUDA, half precision, flash's head widths: multiples of 8 up
    to 256), the per-document reference elsewhere."""
    d = q_NHd.shape[-1]
    if q_NHd.is_cuda and q_NHd.dtype in (torch.bfloat16, torch.float16) and d % 8 == 0 and d <= 256:
        return varlen_causal
    return per_document_causal


def document_attention(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor,
                       docs: DocumentLayout, enable_gqa: bool = False) -> torch.Tensor:
    """Causal attention within each document of ``docs``; q (B, H, T, d), k/v (B, Hkv, T, d) ->
    (B, H, T, d). The rows are laid end to end as N = B * T tokens for the kernel and back."""
    B, H, T, d = q_BHTd.shape
    if (B, T) != (docs.batch, docs.seq_len):
        raise ValueError(f"attention over {B} rows of {T} tokens got a document layout of "
                         f"{docs.batch} rows of {docs.seq_len} tokens")
    q_NHd, k_NHd, v_NHd = (x.transpose(1, 2).reshape(B * T, x.shape[1], d) for x in (q_BHTd, k_BHTd, v_BHTd))
    out_NHd = document_kernel(q_NHd)(q_NHd, k_NHd, v_NHd, docs, enable_gqa)
    return out_NHd.view(B, T, H, d).transpose(1, 2)


def init_linear(module: nn.Linear, std: float) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def init_linears_and_norms(root: nn.Module, std: float) -> None:
    """Linear layers normal(0, std) with zero bias; LayerNorms to weight one, bias zero."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            init_linear(module, std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
