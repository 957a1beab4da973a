"""Model behaviour beyond HF parity: packing, losses, seams that must fail loudly, sizes, FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aria.config import load_model_config
from aria.model import IGNORE_INDEX, build_model, chunked_cross_entropy, generate, layers
from aria.model.flops import count_parameters, text_flops_per_token, vision_flops_per_crop
from helpers import make_config, perturb

CFG = make_config()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(CFG).eval()
    perturb(m)
    return m


def test_packed_documents_equal_separate_runs(model):
    g = torch.Generator().manual_seed(0)
    doc_a = torch.randint(10, 99, (1, 7), generator=g)
    doc_b = torch.randint(10, 99, (1, 12), generator=g)
    doc_b[0, 3:9] = CFG.image_token_id  # doc b holds one 16 px crop (6 queries)
    pixels = torch.randn(1, 3, 16, 16, generator=g)
    packed = torch.cat([doc_a, doc_b, torch.full((1, 3), CFG.text.pad_token_id)], dim=1)
    segments = torch.tensor([[1] * 7 + [2] * 12 + [0] * 3])
    positions = torch.cat([torch.arange(7), torch.arange(12), torch.zeros(3, dtype=torch.long)])[None]
    with torch.no_grad():
        both = model(packed, pixels, position_ids=positions, segment_ids=segments).logits
        alone_a = model(doc_a).logits
        alone_b = model(doc_b, pixels).logits
    torch.testing.assert_close(both[:, :7], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(both[:, 7:19], alone_b, atol=1e-5, rtol=0)
    # without segments the second document sees the first: the test can tell the difference
    with torch.no_grad():
        leaky = model(packed, pixels, position_ids=positions).logits
    assert (leaky[:, 7:19] - alone_b).abs().max() > 1e-3


def test_targets_give_the_same_loss_and_gradients_as_full_logits():
    torch.manual_seed(0)
    m = build_model(CFG).train()
    ids = torch.randint(10, 99, (2, 9))
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    targets[0, :3] = IGNORE_INDEX
    out = m(ids, targets=targets)
    assert out.logits is None and out.num_targets.item() == 2 * 8 - 3
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    logits = m(ids).logits
    ref = F.cross_entropy(logits.reshape(-1, 99).float(), targets.reshape(-1), reduction="sum")
    ref.backward()
    torch.testing.assert_close(out.loss_sum, ref, atol=1e-5, rtol=1e-6)
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_chunked_cross_entropy_bf16_is_close_to_fp32():
    torch.manual_seed(0)
    h, w = torch.randn(40, 32), torch.randn(64, 32) * 0.2
    t = torch.randint(0, 64, (40,))
    exact = F.cross_entropy(h @ w.t(), t, reduction="sum")
    approx = chunked_cross_entropy(h.bfloat16(), w.bfloat16(), t, chunk_size=16)
    assert approx.dtype == torch.float32
    assert abs(approx.item() - exact.item()) / exact.item() < 2e-2


@pytest.mark.parametrize("dtype, chunk, rows_per_block", [
    (torch.float32, 1, None), (torch.float32, 5, None), (torch.float32, 64, None), (torch.float32, 64, 3),
    (torch.bfloat16, 7, None), (torch.bfloat16, 64, 3)])
def test_chunked_cross_entropy_matches_the_full_logits_loss(dtype, chunk, rows_per_block, monkeypatch):
    """The loss is transformers' (logits in the model dtype upcast to fp32, then cross-entropy) and
    the gradients are that loss's autograd gradients (up to bf16 rounding), over several chunks
    (dL/dweight accumulated in fp32), row blocks within a chunk and unsupervised tokens."""
    import aria.model.loss as loss_module

    if rows_per_block:
        monkeypatch.setattr(loss_module, "CACHE_BLOCK", rows_per_block * 64)
    torch.manual_seed(0)
    h = torch.randn(40, 32).to(dtype).requires_grad_()
    w = (torch.randn(64, 32) * 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, 64, (40,))
    t[[3, 4, 39]] = IGNORE_INDEX
    loss = chunked_cross_entropy(h, w, t, chunk_size=chunk)
    (loss * 0.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.t()).float(), t, reduction="sum", ignore_index=IGNORE_INDEX)
    (ref * 0.5).backward()
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == dtype
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(gh, h.grad, **tol)
    torch.testing.assert_close(gw, w.grad, **tol)
    assert gh[[3, 4, 39]].abs().max() == 0 and gh.abs().max() > 0.05


def test_chunked_cross_entropy_takes_only_supervised_tokens_on_the_cpu(monkeypatch):
    """On the CPU only supervised tokens reach the head (so a non-finite unsupervised row leaves
    the loss finite); none gives a zero loss and zero gradients."""
    import aria.model.loss as loss_module

    rows = []
    real = loss_module._ChunkedLinearCrossEntropy.apply
    monkeypatch.setattr(loss_module._ChunkedLinearCrossEntropy, "apply",
                        lambda h, *args: rows.append(h.shape[0]) or real(h, *args))
    h = torch.randn(12, 32)
    h[3] = float("nan")
    h.requires_grad_()
    w = torch.randn(64, 32, requires_grad=True)
    t = torch.randint(0, 64, (12,))
    t[[0, 3, 7]] = IGNORE_INDEX
    loss = chunked_cross_entropy(h, w, t, chunk_size=5)
    loss.backward()
    assert rows == [9] and torch.isfinite(loss) and torch.isfinite(h.grad).all() and h.grad[3].abs().max() == 0
    h.grad = w.grad = None
    loss = chunked_cross_entropy(h, w, torch.full((12,), IGNORE_INDEX), chunk_size=5)
    loss.backward()
    assert rows == [9, 0] and loss.item() == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


@pytest.mark.parametrize("avx512_bf16, amx, native", [(False, False, False), (True, False, True),
                                                     (False, True, True), (True, True, True)])
def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert layers.cpu_native_bf16() is native
    warning = layers.slow_bf16_warning("cpu", torch.bfloat16, "use fp32")
    if native:
        assert warning is None
    else:
        assert warning.startswith("warning: bf16 on a CPU without AVX512-BF16 or AMX")
        assert torch.backends.cpu.get_cpu_capability() in warning and warning.endswith("; use fp32")
    assert layers.slow_bf16_warning("cpu", torch.float32, "use fp32") is None
    assert layers.slow_bf16_warning(torch.device("cuda", 0), torch.bfloat16, "use fp32") is None


def test_bf16_detection_without_the_probes_assumes_native(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert layers.cpu_native_bf16() and layers.slow_bf16_warning("cpu", torch.bfloat16, "use fp32") is None


def test_rms_norm_rounds_once_in_bf16_and_matches_the_reference_form_in_fp32():
    """In bf16 every output is the exact result rounded once (within half a bf16 step); in fp32 it
    is the reference's form (normalise in fp32, cast, then multiply by the weight)."""
    torch.manual_seed(0)
    norm = layers.RMSNorm(256, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    x = torch.randn(64, 256) * 3
    x_fp32 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), norm.weight * x_fp32, rtol=1e-6, atol=1e-6)
    x16, norm16 = x.bfloat16(), norm.bfloat16()
    x64, w64 = x16.double(), norm16.weight.double()
    exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    out = norm16(x16).double()
    half_step = 2.0 ** (torch.floor(torch.log2(exact.abs())) - 8)  # bf16 keeps 8 significant bits
    assert ((out - exact).abs() <= half_step * (1 + 1e-3)).all()


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_rms_norm_on_fake_tensors_keeps_what_the_planned_devices_kernel_keeps(device):
    """The memory plan's trace: standing for a GPU, the norm keeps what CUDA's fused kernel keeps
    for backward (its bf16 input, the weight, an fp32 1/rms per row); standing for the CPU, what
    torch's composite form keeps there, which includes an fp32 copy of the input."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    norm = layers.RMSNorm(64, eps=1e-6).bfloat16()
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    planned = layers.FAKE_DEVICE.set(device)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = norm(x)
            grad_x, grad_w = torch.autograd.grad(out.sum(), (x, norm.weight))
    finally:
        layers.FAKE_DEVICE.reset(planned)
    assert out.shape == grad_x.shape == x.shape and grad_w.shape == norm.weight.shape
    assert out.dtype == grad_x.dtype == grad_w.dtype == torch.bfloat16
    fused = x.nbytes + norm.weight.nbytes + 3 * 5 * 4
    if device == "cuda":
        assert sum(saved.values()) == fused
    else:
        assert sum(saved.values()) >= fused - x.nbytes + 2 * x.nbytes


@pytest.mark.parametrize("mv_faster", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 512), (1, 1, 333)])
def test_one_bf16_row_takes_the_matrix_vector_kernel_with_the_same_bits(shape, mv_faster, monkeypatch):
    # whether the CPU reads a weight faster by torch.mv (AMX) or by F.linear (AVX512-BF16 alone)
    from aria.model import layers
    from aria.model.layers import Linear, linear

    monkeypatch.setattr(layers, "bf16_mv_faster", lambda: mv_faster)
    torch.manual_seed(0)
    x = torch.randn(shape).bfloat16()
    for rows in (7, 1536, 32768):
        w = torch.randn(rows, shape[-1]).bfloat16()
        with torch.profiler.profile() as prof:
            out = linear(x, w)
        ops = {e.name for e in prof.events()}
        assert ("aten::mv" in ops) == mv_faster and ("aten::mm" in ops) != mv_faster, ops
        assert out.shape == (*shape[:-1], rows)
        assert torch.equal(out, F.linear(x, w))
    module = Linear(shape[-1], 16).bfloat16()
    assert torch.equal(module(x), F.linear(x, module.weight, module.bias))  # with a bias: F.linear
    for a, b in ((x.expand(2, *shape[1:]), w), (x.float(), w.float()), (x.requires_grad_(), w)):
        with torch.profiler.profile() as prof:  # more rows, fp32, autograd
            linear(a, b)
        assert "aten::mv" not in {e.name for e in prof.events()}


def test_router_loss_is_the_weighted_sum_of_layer_losses():
    torch.manual_seed(0)
    m = build_model(make_config(moe=dict(aux_loss_coeff=0.5, z_loss_coeff=0.25))).train()
    out = m(torch.randint(10, 99, (2, 6)))
    assert out.aux_loss_L.shape == (2,) and out.tokens_per_expert_LE.shape == (2, 4)
    torch.testing.assert_close(out.router_loss, 0.5 * out.aux_loss_L.sum() + 0.25 * out.z_loss_L.sum())
    assert out.tokens_per_expert_LE.sum(1).tolist() == [2 * 6 * 2] * 2
    m.eval()
    assert m(torch.randint(10, 99, (2, 6))).router_loss is None


def test_image_token_count_mismatch_names_both_counts(model):
    ids = torch.randint(10, 99, (1, 12))
    ids[0, :5] = CFG.image_token_id  # 5 slots, but one 16 px crop gives 6 features
    with pytest.raises(ValueError, match=r"5 <\|img\|> tokens but 6 image features were computed \(1 crops x 6 queries\)"):
        model(ids, torch.randn(1, 3, 16, 16))


def test_crop_size_without_query_count_is_a_clear_error(model):
    ids = torch.randint(10, 99, (1, 12))
    with pytest.raises(ValueError, match=r"a crop of 9 patches has no entry .*patch_to_query"):
        model(ids, torch.randn(1, 3, 12, 12))
    with pytest.raises(ValueError, match="exceed the position table"):
        model(ids, torch.randn(1, 3, 20, 20))
    with pytest.raises(ValueError, match="multiples of patch_size=4"):
        model(ids, torch.randn(1, 3, 15, 15))


def test_released_size_counts_match_the_paper():
    cfg = load_model_config("aria")
    meta = build_model(cfg, device="meta")
    built = sum(p.numel() for p in meta.parameters())
    c = count_parameters(cfg)
    assert built == c.total  # the analytic count agrees with the module tree
    assert c.total / 1e9 == pytest.approx(25.3, abs=0.05)  # paper: 25.3B in all
    assert c.language_model / 1e9 == pytest.approx(24.9, abs=0.05)  # paper: 24.9B MoE decoder
    assert (c.vision_encoder + c.projector) / 1e6 == pytest.approx(438, abs=1)  # paper: 438M
    # Active per text token, by hand: 28 layers x (q, k, v, o of 2560 x 2560 + router 64 x 2560 +
    # 6 routed and 2 shared SwiGLU experts of 3 x 2560 x 1664).
    by_hand = 28 * (4 * 2560 * 2560 + 64 * 2560 + 8 * 3 * 2560 * 1664)
    assert c.active_per_text_token == by_hand == 3_601_203_200
    assert c.active_per_visual_token == by_hand + c.vision_encoder + c.projector
    # The paper says 3.5B / 3.9B without stating its convention; ours is non-embedding (flops.py).
    assert c.active_per_text_token / 1e9 == pytest.approx(3.5, rel=0.03)
    assert c.active_per_visual_token / 1e9 == pytest.approx(3.9, rel=0.04)
    proxy = count_parameters(load_model_config("proxy"))
    assert proxy.vision_encoder == c.vision_encoder
    assert sum(p.numel() for p in build_model(load_model_config("proxy"), device="meta").parameters()) \
        == proxy.total


def test_flop_counts_on_a_hand_computed_config():
    cfg = make_config(text=dict(vocab_size=100, hidden_size=16, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=8),
                      moe=dict(num_experts=4, top_k=2, intermediate_size=8, num_shared_experts=1),
                      vision=dict(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                                  patch_size=4, image_size=16),
                      patch_to_query={16: 4, 4: 2})
    # attention q,o: 2*16*16; k,v: 2*16*8; router 4*16; 2 routed + 1 shared expert of 3*16*8
    active = 512 + 256 + 64 + 3 * 384
    assert count_parameters(cfg).active_per_text_token == active
    head = 100 * 16
    # forward: 2 * (active + head) + attention 4 * heads * d * (s + 1) / 2 per layer, s = 9
    assert text_flops_per_token(cfg, 9, training=False) == 2 * (active + head) + 4 * 2 * 8 * 5
    assert text_flops_per_token(cfg, 9) == 3 * text_flops_per_token(cfg, 9, training=False)
    # vision, 16 patches, 4 queries: layer 2*(4*64 + 2*8*16) + 4*8*16 per patch; patch embed
    # 2*3*16*8 per patch; projector: q 4*2*(2*64), kv 16*2*(4*64), attention 4*4*8*16,
    # out/linear/ffn 4*2*(2*64 + 8*16 + 16*16)
    layer = 16 * (2 * (4 * 64 + 2 * 8 * 16) + 4 * 8 * 16)
    embed = 16 * 2 * 3 * 16 * 8
    proj = 4 * 2 * 128 + 16 * 2 * 256 + 4 * 4 * 8 * 16 + 4 * 2 * (128 + 128 + 256)
    assert vision_flops_per_crop(cfg, 16, training=False) == layer + embed + proj


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = build_model(CFG).train()
    ids = torch.randint(10, 99, (2, 14))
    ids[0, 1:7] = CFG.image_token_id
    pixels = torch.randn(1, 3, 16, 16)
    targets = ids.roll(-1, 1)

    def grads():
        m.zero_grad()
        out = m(ids, pixels, targets=targets)
        (out.loss_sum / out.num_targets + out.router_loss).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = grads()
    m.set_gradient_checkpointing(vision=True, decoder=True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(plain[n], checkpointed[n], atol=1e-6, rtol=1e-5, msg=n)


def test_crop_chunks_give_the_same_image_features_and_gradients():
    """vision.crop_chunk runs the encoder and projector over 2 of the 5 crops at a time (the last
    chunk uneven, one crop padded), each chunk recomputed in backward: same features, same grads."""
    cfg = make_config(patch_to_query={16: 6, 4: 3})
    torch.manual_seed(0)
    whole = build_model(cfg).train()
    perturb(whole)
    chunked = build_model(make_config(patch_to_query={16: 6, 4: 3}, vision={"crop_chunk": 2})).train()
    chunked.load_state_dict(whole.state_dict())
    pixels = torch.randn(5, 3, 16, 16)
    mask = torch.ones(5, 16, 16, dtype=torch.bool)
    mask[3, :, 12:] = False  # a padded crop keeps its mask
    features = []
    for model in (whole, chunked):
        out = model.image_features(pixels, mask)
        out.square().sum().backward()
        features.append(out)
    torch.testing.assert_close(features[0], features[1], atol=1e-6, rtol=1e-6)
    for (name, a), (_, b) in zip(whole.named_parameters(), chunked.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6, msg=name)
    assert whole.vision.patch_embed.weight.grad.abs().sum() > 0


def test_bf16_model_tracks_fp32_and_keeps_router_state_fp32():
    cfg = make_config(moe=dict(bias_balancing=True))
    torch.manual_seed(0)
    m32 = build_model(cfg).eval()
    m16 = build_model(cfg, dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    assert m16.moe_layers[0].router.expert_bias.dtype == torch.float32
    assert m16.decoder.embed.weight.dtype == torch.bfloat16
    ids = torch.randint(10, 99, (2, 12))
    ids[1, 2:8] = cfg.image_token_id
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = m32(ids, pixels).logits
        low = m16(ids, pixels).logits.float()
    # bf16 keeps ~3 significant digits; a token whose top-k routing flips near a tie may move more
    assert (low - ref).abs().mean() < 0.02 * ref.abs().mean()


def test_bad_model_inputs_are_named(model):
    ids = torch.randint(10, 99, (2, 8))
    with pytest.raises(ValueError, match=r"segment_ids of shape \(2, 7\) does not match input_ids \(2, 8\)"):
        model(ids, segment_ids=torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position_ids of shape"):
        model(ids, position_ids=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids in \[10, 120\] but the vocabulary has 99 tokens"):
        model(torch.tensor([[10, 120]]))
    with pytest.raises(ValueError, match=r"2 <\|img\|> tokens .* no pixel_values"):
        model(torch.tensor([[10, CFG.image_token_id, CFG.image_token_id, 11]]))


def test_generation_refuses_right_padding(model):
    ids = torch.randint(10, 99, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("ahead", [False, True])
def test_generation_stops_at_eos_streams_each_token_once_and_queues_at_most_one_step_ahead(
        model, monkeypatch, ahead):
    """Stopping at an end token gives the same tokens whether or not the next step is queued before
    the host reads the stop flag (what CUDA does, forced here on the CPU); ``on_token`` sees each
    step's tokens once, in order; queuing ahead computes exactly one step more, and only when the
    rows finish before ``max_new_tokens``."""
    from aria.model import generation

    ids = torch.randint(10, 99, (2, 6), generator=torch.Generator().manual_seed(1))
    reference = generate(model, ids, max_new_tokens=8, eos_token_ids=[])
    monkeypatch.setattr(generation, "queue_ahead", lambda device: ahead)
    steps = []
    make_step = generation.decode_step

    def counting_decode_step(*args, **kwargs):
        step = make_step(*args, **kwargs)
        return lambda token_B: steps.append(1) or step(token_B)

    monkeypatch.setattr(generation, "decode_step", counting_decode_step)
    # each row stops at its own token 3 (or earlier, where that token comes sooner in the row)
    eos = reference[:, 3].tolist()
    stop_at = [next(i for i, t in enumerate(row) if t in eos) for row in reference.tolist()]
    streamed = []
    out = generate(model, ids, max_new_tokens=8, eos_token_ids=eos, pad_token_id=0,
                   on_token=lambda token_B: streamed.append(token_B.tolist()))
    n = max(stop_at) + 1
    assert out.shape == (2, n) and streamed == out.t().tolist()
    for row, stop in enumerate(stop_at):
        assert out[row, :stop + 1].tolist() == reference[row, :stop + 1].tolist()
        assert (out[row, stop + 1:] == 0).all()
    assert len(steps) == n - 1 + ahead
    steps.clear()
    assert torch.equal(generate(model, ids, max_new_tokens=8, eos_token_ids=[]), reference)
    assert len(steps) == 7  # stopped by max_new_tokens: no step ahead to throw away


def test_crops_of_two_sizes_fill_their_slots_in_order(model):
    """980-style and 490-style crops in one batch: per-size groups plus the slot order."""
    from aria.data.processor import group_crops

    g = torch.Generator().manual_seed(0)
    big = [torch.randn(1, 3, 16, 16, generator=g) for _ in range(2)]  # 16 patches -> 6 queries
    small = torch.randn(2, 3, 8, 8, generator=g)  # 4 patches -> 3 queries each
    masks = lambda x: torch.ones(x.shape[0], x.shape[2], x.shape[3], dtype=torch.bool)  # noqa: E731
    crops = [(big[0], masks(big[0])), (small, masks(small)), (big[1], masks(big[1]))]  # token order
    grouped = group_crops(crops, {16: 6, 8: 3})
    assert [pv.shape[-1] for pv in grouped["pixel_values"]] == [8, 16]
    ids = torch.full((1, 6 + 6 + 6 + 4), 11)
    ids[0, 1:7] = ids[0, 8:14] = ids[0, 15:21] = CFG.image_token_id  # 6 | 3 + 3 | 6 slots
    with torch.no_grad():
        embeds = model.embed(ids, grouped["pixel_values"], grouped["pixel_mask"],
                             grouped["image_feature_order"])
        expected = torch.cat([model.image_features(big[0]).flatten(0, 1),
                              model.image_features(small).flatten(0, 1),
                              model.image_features(big[1]).flatten(0, 1)])
    torch.testing.assert_close(embeds[0, ids[0] == CFG.image_token_id], expected)


def test_uint8_pixels_are_normalised_like_the_processor(model):
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    normalised = (raw.float() / 255.0 - 0.5) / 0.5  # the HF processor's rescale + normalise
    with torch.no_grad():
        torch.testing.assert_close(model.image_features(raw), model.image_features(normalised))


def test_patch_projection_is_the_stride_p_convolution():
    """The GEMM over flattened patches against ``F.conv2d`` with the same (Conv2d-layout) weight, on
    float pixels and on uint8 ones (normalised as the processor does), H != W."""
    from aria.model.vision import PatchEmbed

    cfg = load_model_config("tiny").vision  # 70 px patches
    P, g = cfg.patch_size, torch.Generator().manual_seed(0)
    embed = PatchEmbed(cfg)
    with torch.no_grad():
        embed.weight.copy_(torch.randn(embed.weight.shape, generator=g) * 0.01)
        embed.bias.copy_(torch.randn(embed.bias.shape, generator=g))
    raw = torch.randint(0, 256, (2, 3, 2 * P, 3 * P), generator=g, dtype=torch.uint8)
    normalised = raw.float() * (2 / 255) - 1
    want = F.conv2d(normalised, embed.weight, embed.bias, stride=P).flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(embed(normalised), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(embed(raw), want, rtol=1e-5, atol=1e-4)
    assert want.shape == (2, 6, cfg.hidden_size) and want.abs().max() > 0.5


def test_patch_mask_marks_a_patch_valid_when_any_of_its_pixels_is():
    """Against a loop over the patches: bottom/right padding as the processor pads, single valid
    pixels at patch corners, an empty crop, a random sparse mask and a non-contiguous one."""
    from aria.model.vision import patch_mask_from_pixels

    P, g = 7, torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 3 * P, 2 * P, dtype=torch.bool)
    mask[0] = True
    mask[1, : 2 * P + 1, : P - 2] = True      # one pixel row into the third patch row
    mask[2, P, 2 * P - 1] = True               # one patch's top-right pixel, another's bottom-left
    mask[2, 3 * P - 1, 0] = True
    # mask[3] stays empty
    for m in (mask, torch.rand(3, 2 * P, 3 * P, generator=g) > 0.995, mask.transpose(1, 2)):
        want = torch.tensor([[[bool(m[n, i * P:(i + 1) * P, j * P:(j + 1) * P].any())
                               for j in range(m.shape[2] // P)] for i in range(m.shape[1] // P)]
                             for n in range(m.shape[0])])
        assert torch.equal(patch_mask_from_pixels(m, P), want)
    assert patch_mask_from_pixels(mask, P)[2].sum() == 2 and not patch_mask_from_pixels(mask, P)[3].any()


def test_projector_attention_weights_are_the_ones_its_forward_applies():
    """``CrossAttention.attention_weights`` (diagnostics) against the forward's SDPA: the weights
    times v, through the output projections, give the forward's output; padded patches get none."""
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    projector = build_model(cfg).projector
    projector.init_weights(0.15)  # weights far from uniform and from one-hot: their scale shows
    attn, g = projector.cross_attn, torch.Generator().manual_seed(1)
    patches = torch.randn(2, 49, cfg.vision.hidden_size, generator=g)
    valid = torch.ones(2, 49, dtype=torch.bool)
    valid[1, 40:] = False
    queries = projector.queries(patches)
    with torch.no_grad():
        for mask in (None, valid):
            weights = attn.attention_weights(queries, patches, mask)
            _, _, v = attn.heads(queries, patches)
            N, Q, D = queries.shape
            mixed = (weights @ v).transpose(1, 2).reshape(N, Q, D)
            torch.testing.assert_close(attn.linear(attn.out_proj(mixed)), attn(queries, patches, mask))
            torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert weights[1, ..., 40:].abs().max() == 0
        assert 0.1 < weights.max(-1).values.mean() < 0.9


def test_position_table_init_follows_siglip_unless_set():
    from dataclasses import replace

    from aria.model.vision import VisionEncoder

    cfg = load_model_config("tiny").vision  # 196 x 64 positions
    torch.manual_seed(0)
    default, raised = VisionEncoder(cfg), VisionEncoder(replace(cfg, position_init_std=1.0))
    default.init_weights()
    raised.init_weights()
    assert default.pos_embed.weight.std().item() == pytest.approx(cfg.hidden_size ** -0.5, rel=0.05)
    assert raised.pos_embed.weight.std().item() == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError, match="model.vision.position_init_std"):
        replace(cfg, position_init_std=-1.0)


def _dct_ortho(x_NP: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last axis by way of an FFT of the even extension (a route
    independent of the cosine table under test)."""
    P = x_NP.shape[-1]
    spectrum = torch.fft.fft(torch.cat([x_NP, x_NP.flip(-1)], dim=-1).double())[..., :P]
    k = torch.arange(P, dtype=torch.float64)
    coeffs = (spectrum * torch.exp(-1j * torch.pi * k / (2 * P))).real / 2
    scale = torch.full((P,), (2 / P) ** 0.5, dtype=torch.float64)
    scale[0] = (1 / P) ** 0.5
    return coeffs * scale


def test_dct_patch_init_gives_each_channels_lowest_cosines():
    """vision.patch_init=dct: output k of a patch is the orthonormal 2-D DCT coefficient of channel
    k % C at the (k // C)-th lowest frequency (by u + v, then u), times sqrt(Dv / K)."""
    from dataclasses import replace

    from aria.model.vision import VisionEncoder

    cfg = replace(load_model_config("tiny").vision, patch_init="dct")  # 64 wide, 70 px patches
    encoder = VisionEncoder(cfg)
    encoder.init_weights()
    C, P, Dv = cfg.num_channels, cfg.patch_size, cfg.hidden_size
    torch.manual_seed(0)
    patch_CPP = torch.rand(C, P, P) * 2 - 1
    out_D = encoder.patch_embed(patch_CPP[None]).reshape(Dv).double()
    coeffs_CPP = _dct_ortho(_dct_ortho(patch_CPP).transpose(1, 2)).transpose(1, 2)  # rows u, columns v
    frequencies = sorted(((u, v) for u in range(P) for v in range(P)), key=lambda f: (sum(f), f[0]))
    expected_D = torch.stack([coeffs_CPP[k % C][frequencies[k // C]] for k in range(Dv)])
    torch.testing.assert_close(out_D, expected_D * (Dv / (C * P * P)) ** 0.5, atol=1e-5, rtol=1e-4)
    # a flat grey patch has only the three mean (DC) outputs, the pixel value times P * sqrt(Dv / K)
    flat = encoder.patch_embed(torch.full((1, C, P, P), 0.5)).reshape(Dv)
    assert flat[:C].tolist() == pytest.approx([0.5 * P * (Dv / (C * P * P)) ** 0.5] * C, rel=1e-4)
    assert flat[C:].abs().max() < 1e-5
    with pytest.raises(ValueError, match="model.vision.patch_init"):
        replace(cfg, patch_init="uniform")
    with pytest.raises(ValueError, match="model.vision.hidden_size"):  # 64 outputs, 3 x 4 x 4 = 48 values
        replace(cfg, patch_size=4)
