"""MoE pieces on hand-derived tensors: routing, dispatch/combine, grouped GEMM vs the per-expert
loop, router losses, auxiliary-loss-free balancing, and global-batch balance over 2 processes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from aria.config import MoEConfig
from aria.model.moe import (MoE, exact_offsets, experts_grouped, experts_loop, grouped_mm,
                            load_balancing_loss, padded_groups, permute, route, router_z_loss, unpermute,
                            update_expert_bias)
from aria.parallel.expert import regroup_order, simulate_expert_parallel
from helpers import run_distributed


def test_route_is_topk_on_raw_logits_then_softmax_over_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.6, -1.0, 0.5, 4.0]])
    weights, ids = route(logits, top_k=2)
    assert ids.tolist() == [[1, 2], [3, 0]]
    e = math.exp
    assert torch.allclose(weights[0], torch.tensor([e(3) / (e(3) + e(2)), e(2) / (e(3) + e(2))]))
    assert torch.allclose(weights[1], torch.tensor([e(4) / (e(4) + e(.6)), e(.6) / (e(4) + e(.6))]))


def test_balancing_bias_changes_selection_but_not_weights():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    weights, ids = route(logits, top_k=2, bias_E=torch.tensor([0.0, -5.0, 0.0, 2.5]))
    assert ids.tolist() == [[3, 2]]  # scores 1, -2, 2, 2.5
    e = math.exp
    assert torch.allclose(weights[0], torch.tensor([e(0) / (e(0) + e(2)), e(2) / (e(0) + e(2))]))


def test_permute_and_unpermute_on_hand_derived_tensors():
    # 3 tokens, top-2, 4 experts; expert 2 receives no token
    ids = torch.tensor([[3, 0], [0, 1], [3, 1]])
    order, counts = permute(ids, num_experts=4)
    # flat assignments: a0=e3 a1=e0 a2=e0 a3=e1 a4=e3 a5=e1 -> sorted by expert, stable
    assert order.tolist() == [1, 2, 3, 5, 0, 4]
    assert counts.tolist() == [2, 2, 0, 2]
    assert (order // 2).tolist() == [0, 1, 1, 2, 0, 2]  # token of each sorted row

    # expert "outputs": row j of the sorted buffer holds 10 * (j + 1)
    y = torch.tensor([[10.0], [20.0], [30.0], [40.0], [50.0], [60.0]])
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.125, 0.875]])
    out = unpermute(y, order, weights)
    # token 0: slot 0 (e3) at row 4 -> 50, slot 1 (e0) at row 0 -> 10
    # token 1: slot 0 (e0) at row 1 -> 20, slot 1 (e1) at row 2 -> 30
    # token 2: slot 0 (e3) at row 5 -> 60, slot 1 (e1) at row 3 -> 40
    expected = torch.tensor([[0.75 * 50 + 0.25 * 10], [0.5 * 20 + 0.5 * 30], [0.125 * 60 + 0.875 * 40]])
    assert torch.allclose(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_equals_per_expert_loop_including_empty_experts(dtype):
    torch.manual_seed(0)
    E, D, I = 6, 16, 8
    counts = torch.tensor([3, 0, 5, 0, 1, 7])  # two experts without tokens
    x = torch.randn(int(counts.sum()), D, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(E, D, 2 * I) * 0.2).to(dtype).requires_grad_()
    w2 = (torch.randn(E, I, D) * 0.2).to(dtype).requires_grad_()
    grad_out = torch.randn(int(counts.sum()), D, dtype=dtype)

    fast = experts_grouped(x, w1, w2, counts)
    grads_fast = torch.autograd.grad(fast, (x, w1, w2), grad_out)
    slow = experts_loop(x, w1, w2, counts)
    grads_slow = torch.autograd.grad(slow, (x, w1, w2), grad_out)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fast, slow, **tol)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, **tol)
    assert grads_fast[1][1].abs().sum() == 0 and grads_fast[1][3].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_grouped_mm_on_the_cpu_runs_only_the_experts_that_have_rows(dtype):
    """Without a backward the CPU path is one matmul per non-empty expert (the CPU kernel would
    visit all E), equal to torch's grouped GEMM."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountMatmuls.calls += func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    counts = torch.tensor([0, 3, 0, 0, 1, 0, 0, 2])
    x = torch.randn(6, 16, dtype=dtype)
    w = torch.randn(8, 16, 24, dtype=dtype)
    offsets = exact_offsets(counts)
    with torch.no_grad(), CountMatmuls():
        out = grouped_mm(x, w, offsets)
    assert CountMatmuls.calls == 3
    torch.testing.assert_close(out, F.grouped_mm(x, w, offs=offsets))
    expected = torch.cat([x[0:3] @ w[1], x[3:4] @ w[4], x[4:6] @ w[7]])
    torch.testing.assert_close(out, expected)


def test_padded_groups_on_hand_derived_counts():
    # 4 experts with 3, 0, 9, 1 rows (A = 13); align 4: groups of 4, 4 (empty: still 4), 12, 4
    counts = torch.tensor([3, 0, 9, 1])
    pos, offsets, M = padded_groups(counts, 13, align=4)
    assert M == 4 * (4 + 4)  # A rounded up to 16, plus 4 rows per expert
    # group starts 0, 4, 8, 20; the last group takes the slack up to M = 32
    assert offsets.tolist() == [4, 8, 20, 32] and offsets.dtype == torch.int32
    assert pos.tolist() == [0, 1, 2, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20]
    # every group is non-empty and aligned: no K = 0 GEMM, whatever the routing
    sizes = torch.diff(offsets, prepend=torch.zeros(1, dtype=torch.int32))
    assert (sizes > 0).all() and (sizes % 4 == 0).all()


def test_moe_layer_with_experts_that_get_no_token_equals_the_loop_reference():
    """Forward and every gradient through the padded grouped path, with a router that sends every
    token to experts 0 and 5 only (the other six get nothing)."""
    layer = moe_layer().train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[5, 1] = 5.0, 5.0
    x = torch.randn(3, 4, 32)
    x[..., :2] = x[..., :2].abs() + 1.0  # positive features 0 and 1: experts 0 and 5 win
    reference = moe_layer().train()
    reference.load_state_dict(layer.state_dict())
    reference.experts.run_local = lambda rows, src, counts: (
        experts_loop(rows[src], reference.experts.w_fc1, reference.experts.w_fc2, counts), None)
    out, stats = layer(x)
    assert stats.tokens_per_expert.tolist() == [12, 0, 0, 0, 0, 12, 0, 0]
    expected, _ = reference(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    (expected * grad_out).sum().backward()
    for (name, a), (_, b) in zip(layer.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert layer.experts.w_fc1.grad[1:5].abs().sum() == 0  # experts without tokens get no gradient


def test_inference_runs_the_exact_groups_training_the_padded_ones():
    """Without a backward no group is padded (a decode step must not read every expert's weights);
    both give the same outputs."""
    layer = moe_layer().eval()
    x = torch.randn(1, 1, 32)  # one token: 2 of the 8 experts
    token_A = torch.zeros(2, dtype=torch.long)
    _, ids = layer.router(x.view(1, 32))[1:]
    order, counts = permute(ids, 8)
    with torch.no_grad():
        y_exact, rows = layer.experts.run_local(x.view(1, 32), token_A, counts)
        out_exact, _ = layer(x)
    assert rows is None and y_exact.shape == (2, 32)
    y_padded, rows = layer.experts.run_local(x.view(1, 32), token_A, counts)
    assert y_padded.shape == (8 * (1 + 8), 32)  # 2 rows rounded up to 8, plus 8 per expert
    torch.testing.assert_close(y_padded[rows], y_exact)
    torch.testing.assert_close(layer(x)[0], out_exact)


def test_token_chunks_give_the_unchunked_outputs_gradients_and_router_statistics():
    whole, chunked = moe_layer().train(), moe_layer(token_chunk=5).train()  # 12 tokens: 5 + 5 + 2
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(2, 6, 32)
    outs = []
    for layer in (whole, chunked):
        out, stats = layer(x)
        (out.square().sum() + stats.aux_loss + stats.z_loss).backward()
        outs.append((out, stats))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
    for (name, a), (_, b) in zip(whole.named_parameters(), chunked.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6, msg=name)


def _expert_parallel_worker(rank, world, chunk):
    from aria.parallel.expert import shard_experts_over

    torch.manual_seed(3)
    x_all = torch.randn(world, 2, 7, 32)
    reference = moe_layer().train()
    layer = moe_layer(token_chunk=chunk).train()
    layer.load_state_dict(reference.state_dict())
    shard_experts_over([layer], dist.new_group(list(range(world))), "ep_size_2")
    out, _ = layer(x_all[rank])
    ref, _ = reference(x_all[rank])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    E = reference.cfg.num_experts // world
    grad_ref = reference.experts.w_fc1.grad.clone()  # experts receive gradients from every rank's tokens
    dist.all_reduce(grad_ref)
    torch.testing.assert_close(layer.experts.w_fc1.grad, grad_ref[rank * E:(rank + 1) * E], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.router.weight.grad, reference.router.weight.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, 4])
def test_expert_parallel_exchange_over_two_processes_equals_the_whole_layer(chunk):
    """Experts sharded over 2 gloo ranks (all-to-all there and back, per token chunk when set):
    each rank's outputs and gradients equal the unsharded layer's on its tokens."""
    run_distributed(_expert_parallel_worker, world=2, args=(chunk,))


def test_regroup_order_on_hand_derived_counts():
    # 2 source ranks, 2 local experts; received source-major:
    # rank 0 sent e0: 2 rows, e1: 1 row -> rows 0 1 | 2; rank 1 sent e0: 0, e1: 3 -> rows 3 4 5
    recv = torch.tensor([[2, 1], [0, 3]])
    # expert-major, sources in rank order: e0 <- rows 0, 1; e1 <- row 2 (rank 0), rows 3, 4, 5
    assert regroup_order(recv, 6).tolist() == [0, 1, 2, 3, 4, 5]
    recv = torch.tensor([[1, 2], [3, 1]])  # rank 0: e0 row 0, e1 rows 1 2; rank 1: e0 rows 3 4 5, e1 row 6
    assert regroup_order(recv, 7).tolist() == [0, 3, 4, 5, 1, 2, 6]


def test_simulated_expert_parallelism_keeps_the_local_experts_and_real_shapes():
    """The planning stand-in for an EP group: experts sliced like a real rank 0, the exchange
    shape-true, and the layer still runs forward and backward."""
    layer = moe_layer().train()
    full = layer.experts.w_fc1.detach().clone()
    simulate_expert_parallel([layer], 4)
    assert torch.equal(layer.experts.w_fc1, full[:2]) and layer.experts.ep_size == 4
    out, _ = layer(torch.randn(2, 5, 32))
    assert out.shape == (2, 5, 32)
    out.sum().backward()
    assert layer.experts.w_fc1.grad.shape == (2, 32, 32)


def moe_layer(**overrides) -> MoE:
    cfg = MoEConfig(**{**dict(num_experts=8, top_k=2, intermediate_size=16, num_shared_experts=1),
                       **overrides})
    torch.manual_seed(0)
    layer = MoE(32, cfg)
    layer.init_weights(0.1)
    return layer


def test_moe_layer_equals_token_by_token_reference():
    layer = moe_layer().eval()
    x = torch.randn(2, 5, 32)
    out, stats = layer(x)
    assert stats is None  # eval mode computes no router losses
    x_TD = x.reshape(-1, 32)
    logits = x_TD @ layer.router.weight.t()
    expected = []
    for t in range(x_TD.shape[0]):
        top, ids = logits[t].topk(2)
        w = top.softmax(-1)
        y = layer.shared(x_TD[t])
        for k in range(2):
            e = ids[k]
            g, u = (x_TD[t] @ layer.experts.w_fc1[e]).chunk(2)
            y = y + w[k] * ((torch.nn.functional.silu(g) * u) @ layer.experts.w_fc2[e])
        expected.append(y)
    torch.testing.assert_close(out.reshape(-1, 32), torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_router_losses_on_a_hand_computed_case():
    # 2 tokens, 2 experts, top-1. probs: [.25 .75] and [.75 .25]; each expert chosen once.
    logits = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0]])
    probs = logits.softmax(-1)
    aux = load_balancing_loss(probs, torch.tensor([1.0, 1.0]), torch.tensor(2.0), top_k=1)
    assert aux.item() == pytest.approx(2 / (2 * 1) * (0.5 * 1 + 0.5 * 1))  # = 1.0
    assert router_z_loss(logits, None).item() == pytest.approx(math.log(4) ** 2)
    # collapsed routing: both tokens prefer expert 0 with p = .75 -> 2/2 * (.75 * 2) = 1.5
    logits = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]])
    aux = load_balancing_loss(logits.softmax(-1), torch.tensor([2.0, 0.0]), torch.tensor(2.0), top_k=1)
    assert aux.item() == pytest.approx(1.5)


def test_router_stats_ignore_padding_tokens():
    layer = moe_layer().train()
    x = torch.randn(1, 6, 32)
    valid = torch.tensor([[True, True, True, True, False, False]])
    _, stats_masked = layer(x, valid)
    _, stats_cut = layer(x[:, :4])
    torch.testing.assert_close(stats_masked.aux_loss, stats_cut.aux_loss)
    torch.testing.assert_close(stats_masked.z_loss, stats_cut.z_loss)
    assert torch.equal(stats_masked.tokens_per_expert, stats_cut.tokens_per_expert)
    assert stats_cut.tokens_per_expert.sum() == 4 * 2


def test_aux_loss_gradient_reaches_the_router():
    layer = moe_layer().train()
    _, stats = layer(torch.randn(3, 4, 32))
    stats.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_expert_bias_update_moves_towards_balance():
    layers = [moe_layer(bias_balancing=True, bias_update_rate=0.01) for _ in range(2)]
    load = torch.tensor([[10.0, 0, 2, 4, 4, 4, 4, 4], [4.0] * 8])
    update_expert_bias(layers, load)
    mean = 4.0
    expected0 = 0.01 * torch.sign(mean - load[0])
    assert torch.equal(layers[0].router.expert_bias, expected0)
    assert torch.equal(layers[1].router.expert_bias, torch.zeros(8))
    with pytest.raises(ValueError, match="bias_balancing is false"):
        update_expert_bias([moe_layer()], load[:1])


def _global_balance_worker(rank, world, x_full, valid_full):
    layer = moe_layer(balance_scope="global_batch").train()
    half = x_full.shape[0] // world
    x, valid = x_full[rank * half:(rank + 1) * half], valid_full[rank * half:(rank + 1) * half]
    _, stats = layer(x, valid)
    # what a data-parallel gradient all-reduce averages
    aux = stats.aux_loss.detach().clone()
    dist.all_reduce(aux)
    aux /= world
    single = moe_layer(balance_scope="micro_batch").train()
    _, ref = single(x_full, valid_full)
    torch.testing.assert_close(aux, ref.aux_loss, rtol=1e-6, atol=1e-7)
    counts = stats.tokens_per_expert.clone()  # this rank's assignments; summed over ranks = the batch's
    dist.all_reduce(counts)
    assert torch.equal(counts, ref.tokens_per_expert)
    # micro-batch scope differs on the same shard: the global option really is global
    _, local = moe_layer(balance_scope="micro_batch").train()(x, valid)
    assert not torch.allclose(local.aux_loss, ref.aux_loss)


def test_global_batch_balance_over_two_processes_equals_one_process():
    torch.manual_seed(1)
    x = torch.randn(4, 6, 32)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[0, 4:] = False
    valid[3, 4:] = False
    # equal valid tokens per rank (ranks hold rows 0-1 and 2-3), so the mean of the two ranks'
    # losses equals the one-process loss
    run_distributed(_global_balance_worker, world=2, args=(x, valid))


def test_router_stats_of_a_layer_on_a_hand_computed_case():
    """Through MoE.forward: k = 2, one padding token excluded, counts / aux / z derived by hand."""
    cfg = MoEConfig(num_experts=3, top_k=2, intermediate_size=8, num_shared_experts=0)
    layer = MoE(8, cfg).train()
    with torch.no_grad():
        layer.init_weights(0.1)
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0  # logits = [x0, x1, -0.1 (x0 + x1)]
        layer.router.weight[1, 1] = 1.0
        layer.router.weight[2, :2] = -0.1
    x = torch.zeros(1, 3, 8)
    x[0, 0, :2] = torch.tensor([1.0, 0.5])  # logits [1, .5, -.15] -> experts 0, 1
    x[0, 1, :2] = torch.tensor([0.0, 2.0])  # logits [0, 2, -.2]  -> experts 1, 0
    x[0, 2, :2] = torch.tensor([-3.0, -3.0])  # padding: must not count
    _, stats = layer(x, torch.tensor([[True, True, False]]))

    logits = [[1.0, 0.5, -0.15], [0.0, 2.0, -0.2]]
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits]
    probs = [[math.exp(v - l) for v in row] for row, l in zip(logits, lse)]
    mean_p = [(probs[0][e] + probs[1][e]) / 2 for e in range(3)]
    counts = [2, 2, 0]
    aux = 3 / (2 * 2) * sum(p * c for p, c in zip(mean_p, counts))
    assert stats.tokens_per_expert.tolist() == counts
    assert stats.aux_loss.item() == pytest.approx(aux, rel=1e-6)
    assert stats.z_loss.item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)


def test_balancing_bias_stays_fp32_when_the_model_is_cast():
    layer = moe_layer(bias_balancing=True)
    layer.router.expert_bias.fill_(0.5)
    layer.bfloat16()
    assert layer.router.expert_bias.dtype == torch.float32
    assert layer.router.weight.dtype == torch.bfloat16
    for _ in range(10):
        update_expert_bias([layer], torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0]]))
    assert layer.router.expert_bias[0].item() == pytest.approx(0.5 - 10 * 1e-3, abs=1e-6)
