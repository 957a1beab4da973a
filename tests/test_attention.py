"""Attention by document against the dense (B, 1, T, T) segment mask: layouts, both kernels (the CPU
reference and the CUDA varlen call, through a CPU stand-in), the whole model with and without
activation checkpointing, the vision encoder's mask skipping, memory without T^2, and the KV
cache's layouts, the static one a CUDA graph replays included."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import varlen
from torch.utils._python_dispatch import TorchDispatchMode

import aria.model.vision as vision_module
from aria.model import build_model, layers
from aria.model.decoder import Attention, KVCache, TextDecoder
from aria.model.generation import decode_step
from aria.model.layers import DocumentLayout, RotaryEmbedding, key_padding_mask, segment_causal_mask
from helpers import make_config, perturb

ROOT = Path(__file__).resolve().parents[1]
CFG = make_config()  # GQA: 4 query heads, 2 key/value heads


def packed_rows(docs_per_row: list[list[int]], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ids and restarting positions (B, T) of rows holding documents of the given lengths,
    one after the other, padding (segment 0, position 0) after them."""
    segments = torch.zeros(len(docs_per_row), T, dtype=torch.long)
    positions = torch.zeros_like(segments)
    for b, lengths in enumerate(docs_per_row):
        at = 0
        for i, n in enumerate(lengths):
            segments[b, at: at + n] = i + 1
            positions[b, at: at + n] = torch.arange(n)
            at += n
        assert at <= T
    return segments, positions


# very different lengths, one-token documents, padding, a row that is one document, a padding row
ROWS_T64 = [[50, 1, 1, 12], [1, 30, 20], [64], [], [1] * 10 + [40]]


def varlen_stand_in(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch 2.13's ``varlen_attn`` semantics on the CPU: (N, H, d) tokens, int32 offsets, causal when
    ``window_size == (-1, 0)``, one SDPA per sequence."""
    assert window_size == (-1, 0), "the decoder's attention is causal"
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    bounds = cu_seq_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == query.shape[0]
    assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:]))
    out = [F.scaled_dot_product_attention(query[a:b].transpose(0, 1), key[a:b].transpose(0, 1),
                                          value[a:b].transpose(0, 1), is_causal=True,
                                          enable_gqa=enable_gqa).transpose(0, 1)
           for a, b in zip(bounds, bounds[1:])]
    return torch.cat(out)


def varlen_stand_in_old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The earlier signature (``is_causal``, no ``enable_gqa``: k/v must have every query head)."""
    assert is_causal and key.shape[1] == query.shape[1] == value.shape[1]
    return varlen_stand_in(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, 0))


@pytest.fixture(params=["reference", "varlen", "varlen-old-signature"])
def kernel(request, monkeypatch):
    """The document kernel under test: the CPU reference, or the CUDA path (packing of the rows,
    offsets, the varlen call) with a CPU stand-in for torch's varlen kernel."""
    if request.param != "reference":
        stand_in = varlen_stand_in if request.param == "varlen" else varlen_stand_in_old
        monkeypatch.setattr(varlen, "varlen_attn", stand_in)
        monkeypatch.setattr(layers, "document_kernel", lambda q: layers.varlen_causal)
    return request.param


def test_layout_cuts_rows_into_runs_of_one_segment_id():
    segments = torch.tensor([[1, 1, 1, 2, 0, 0], [0, 0, 3, 4, 4, 4]])  # right and left padding
    docs = DocumentLayout.from_segments(segments)
    assert (docs.batch, docs.seq_len, docs.max_len) == (2, 6, 3)
    assert docs.lengths == (3, 1, 2, 2, 1, 3)
    assert docs.cu_seqlens.dtype == torch.int32
    assert docs.cu_seqlens.tolist() == [0, 3, 4, 6, 8, 9, 12]


def test_a_document_id_in_two_places_is_refused():
    DocumentLayout.from_segments(torch.tensor([[1, 0, 2, 0, 0]]))  # padding may recur
    with pytest.raises(ValueError, match=r"row 1 uses one document id in two places \(runs \[1, 2, 1\]\)"):
        DocumentLayout.from_segments(torch.tensor([[1, 1, 2, 2, 2], [1, 2, 2, 1, 0]]))


def test_fake_segment_ids_give_one_document_per_row():
    """The plan traces on fake tensors: no values, so each row is one document (the memory worst case)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        docs = DocumentLayout.from_segments(torch.ones(3, 8, dtype=torch.long))
    assert docs.lengths == (8, 8, 8) and docs.max_len == 8 and tuple(docs.cu_seqlens.shape) == (4,)


@pytest.mark.parametrize("num_kv_heads", [2, 4])
def test_attention_and_gradients_equal_the_dense_mask(kernel, num_kv_heads):
    cfg = make_config(text=dict(num_kv_heads=num_kv_heads)).text
    torch.manual_seed(0)
    attn = Attention(cfg, 0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    segments, positions = packed_rows(ROWS_T64, 64)
    rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(positions, torch.float32)
    x = torch.randn(len(ROWS_T64), 64, cfg.hidden_size)

    def run(layout):
        attn.zero_grad()
        x_ = x.clone().requires_grad_()
        out = attn(x_, rope, layout, None)
        # a loss whose gradients are O(1): a sum over the B * T tokens would make them O(100)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().div(out.shape[0] * out.shape[1]).backward()
        return out.detach(), {"x": x_.grad, **{n: p.grad.clone() for n, p in attn.named_parameters()}}

    out, grads = run(TextDecoder.attention_layout(*segments.shape, segments, None, x.device))
    dense_out, dense_grads = run(segment_causal_mask(segments, segments, 0))
    assert torch.isfinite(out).all()  # padding rows and runs included
    torch.testing.assert_close(out, dense_out, atol=1e-5, rtol=0)
    for name in dense_grads:
        torch.testing.assert_close(grads[name], dense_grads[name], atol=1e-5, rtol=0, msg=name)


def dense_attention_layout(B, T, segment_ids_BT, cache, device):
    """The dense path: the (B, 1, T, T) segment mask whenever there is no cache."""
    if cache is None and segment_ids_BT is not None:
        return segment_causal_mask(segment_ids_BT, segment_ids_BT, 0)
    return DENSE_ORIGINAL(B, T, segment_ids_BT, cache, device)


DENSE_ORIGINAL = TextDecoder.attention_layout


@pytest.mark.parametrize("checkpointing", [False, True])
def test_whole_model_logits_and_every_gradient_equal_the_dense_mask(kernel, checkpointing, monkeypatch):
    torch.manual_seed(0)
    model = build_model(CFG).train()
    perturb(model)
    model.set_gradient_checkpointing(vision=checkpointing, decoder=checkpointing)
    rows = [[30, 1, 1, 10], [1, 40, 7]]
    T = 48
    segments, positions = packed_rows(rows, T)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 99, (2, T), generator=g)
    ids[segments == 0] = CFG.text.pad_token_id
    ids[0, 2:8] = CFG.image_token_id  # the first document holds a 16 px crop (6 queries)
    pixels = torch.randn(1, 3, 16, 16, generator=g)
    targets = ids.roll(-1, 1)
    starts = positions == 0
    targets[starts.roll(-1, 1) | (segments == 0)] = -100  # no target across documents or in padding
    calls = []
    original = DocumentLayout.from_segments.__func__
    monkeypatch.setattr(DocumentLayout, "from_segments",
                        classmethod(lambda cls, s: calls.append(1) or original(cls, s)))

    def run():
        model.zero_grad()
        out = model(ids, pixels, position_ids=positions, segment_ids=segments)
        loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        (loss + out.router_loss).backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits, grads = run()
    assert len(calls) == 1  # one layout per forward, reused by every layer (and by the recomputation)
    monkeypatch.setattr(TextDecoder, "attention_layout", staticmethod(dense_attention_layout))
    dense_logits, dense_grads = run()
    assert len(calls) == 1
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=0)
    assert grads.keys() == dense_grads.keys() and any("attn.q_proj" in n for n in grads)
    for name in dense_grads:
        torch.testing.assert_close(grads[name], dense_grads[name], atol=1e-5, rtol=0, msg=name)


def test_every_layer_gets_the_one_layout_of_its_forward(monkeypatch):
    model = build_model(CFG).eval()
    seen = []
    original = Attention.attend
    monkeypatch.setattr(Attention, "attend",
                        lambda self, q, k, v, layout: seen.append(layout) or original(self, q, k, v, layout))
    segments, positions = packed_rows([[5, 3], [8]], 8)
    with torch.no_grad():
        model(torch.randint(10, 99, (2, 8)), position_ids=positions, segment_ids=segments)
    assert len(seen) == CFG.text.num_layers and all(layout is seen[0] for layout in seen)
    assert isinstance(seen[0], DocumentLayout) and seen[0].lengths == (5, 3, 8)
    seen.clear()
    with torch.no_grad():
        model(torch.randint(10, 99, (2, 8)))
    assert seen == ["causal"] * CFG.text.num_layers


def test_generation_keeps_its_cached_layouts():
    """A KV cache (decode, left-padded batches) keeps SDPA's causal / full / mask paths."""
    B, T = 2, 5
    layout = TextDecoder.attention_layout
    cache = KVCache(CFG.text, B, 16, torch.float32, "cpu")
    assert layout(B, T, None, cache, "cpu") == "causal"
    cache.advance(T)
    assert layout(B, 1, None, cache, "cpu") == "full"
    padded = KVCache(CFG.text, B, 16, torch.float32, "cpu")
    mask = layout(B, T, torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), padded, "cpu")
    assert mask.dtype == torch.bool and tuple(mask.shape) == (B, 1, T, T)


class OpLog(TorchDispatchMode):
    """Every op that runs, with the shapes of its tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor))
        self.ops.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_a_static_decode_step_is_replayable(mode):
    """What a CUDA graph needs of the decode step it captures (``decode="cuda_graph"``): every step
    runs the same ops on the same shapes and reads no value on the host. Run on fake tensors, which
    take the GPU's code path (grouped GEMM, no expert loop) and raise on any host read; the dynamic
    step, whose keys grow by one per token, is the contrast."""
    model = build_model(CFG).to(torch.bfloat16).eval()
    B, T = 2, 6
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        cache = KVCache(CFG.text, B, T + 4, torch.bfloat16, "cpu")
        model(torch.randint(10, 99, (B, T)), cache=cache, logits_to_keep=1)
        step = decode_step(model, cache, torch.full((B, 1), T), padded=False, mode=mode)
        logs = []
        for _ in range(3):
            with OpLog() as log:
                logits = step(torch.randint(10, 99, (B,)))
            logs.append(log.ops)
    assert tuple(logits.shape) == (B, CFG.text.vocab_size)
    assert not any("_local_scalar_dense" in op for op, _ in logs[0])
    if mode == "static":
        assert len(logs[0]) > 50 and logs[0] == logs[1] == logs[2]
    else:
        assert logs[0] != logs[1]


def test_vision_encoder_and_projector_drop_an_all_valid_mask(monkeypatch):
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    perturb(model)
    pixels = torch.randn(3, 3, 16, 16)
    all_valid = torch.ones(3, 16, 16, dtype=torch.bool)
    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        patches, valid = model.vision(pixels, all_valid)
        features = model.projector(patches, valid)
        assert valid is None and masks == [None] * (CFG.vision.layers_used + 1)
        torch.testing.assert_close(patches, model.vision(pixels)[0], atol=0, rtol=0)
        # the masked path (what fake tensors keep): the same numbers
        with monkeypatch.context() as m:
            m.setattr(vision_module, "holds_no_data", lambda t: True)
            masked_patches, masked_valid = model.vision(pixels, all_valid)
        assert masked_valid.all() and masks[-1] is not None
        torch.testing.assert_close(patches, masked_patches, atol=1e-5, rtol=0)
        torch.testing.assert_close(features, model.projector(patches, masked_valid), atol=1e-5, rtol=0)
        # a crop with padding keeps its mask, in the encoder and in the projector
        masks.clear()
        partial = all_valid.clone()
        partial[1, :, 8:] = False
        _, valid = model.vision(pixels, partial)
        model.projector(patches, valid)
        assert valid.sum() == 3 * 16 - 8 and all(mask is not None for mask in masks)
        assert torch.equal(masks[-1], key_padding_mask(valid))


def _bench_script():
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "scripts" / "bench_attention.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_attention"] = module
    spec.loader.exec_module(module)
    return module


def test_document_attention_memory_is_linear_in_T_without_any_T2_buffer():
    """Peak allocated bytes of one attention layer's forward + backward (torch's profiler, every
    allocation of the CPU allocator, kernels' own buffers included), documents of 1024 tokens."""
    bench = _bench_script()
    small = dict(dtype="fp32", heads=2, head_dim=16)
    docs_4k = bench.run_case(4096, 1024, "docs", **small)["peak_bytes"]
    docs_16k = bench.run_case(16384, 1024, "docs", **small)["peak_bytes"]
    dense_4k = bench.run_case(4096, 1024, "dense", **small)["peak_bytes"]
    assert docs_16k < 4.5 * docs_4k  # 4x the tokens, 4x the bytes (not 16x)
    assert docs_16k < 16384 ** 2 / 8  # far below even one byte per (query, key) pair
    assert dense_4k > 4096 ** 2 * 4  # the dense path holds the mask and its fp32 bias (4 bytes a pair)
