"""Sequence parallelism (Ulysses) on 2 gloo processes against one: the all-to-alls on
hand-checkable tensors, the whole model on packed rows (documents crossing the shard boundary,
padding, an image), with expert parallelism too, and training runs that resume."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from aria.model import build_model
from aria.parallel.sequence import SequenceParallel, enable_sequence_parallel
from aria.train.compose import compose_run
from helpers import make_config, perturb, rewind, run_distributed
from test_train import assert_same_training, overrides, records, run


def _exchange_worker(rank: int, world: int) -> None:
    torch.manual_seed(0)
    full_BHTd = torch.randn(2, 4, 6, 3)  # 4 heads, 6 tokens
    sp = SequenceParallel(None, world, rank)
    mine_BHtd = full_BHTd[:, :, rank * 3:(rank + 1) * 3]
    heads_BhTd = sp.to_heads(mine_BHtd)
    assert torch.equal(heads_BhTd, full_BHTd[:, rank * 2:(rank + 1) * 2])  # all tokens, my 2 heads
    assert torch.equal(sp.to_tokens(heads_BhTd), mine_BHtd)


def test_ulysses_exchanges_trade_tokens_for_heads_and_back():
    run_distributed(_exchange_worker, world=2)


def packed_inputs(cfg, seed: int = 0):
    """Two rows of 12 tokens: documents of 5, 6 (crossing the middle) and 1 tokens, and one with a
    3-crop image block, a document crossing the middle, and padding."""
    g = torch.Generator().manual_seed(seed)
    T = 12
    ids = torch.randint(10, cfg.text.vocab_size, (2, T), generator=g)
    segments = torch.tensor([[1] * 5 + [2] * 6 + [3], [1] * 4 + [2] * 6 + [0] * 2])
    ids[1, 1:4] = cfg.image_token_id  # 3 <|img|> slots (crops of 4 patches -> 3 queries)
    positions = torch.zeros_like(ids)
    for b in range(2):
        for s in segments[b].unique():
            where = (segments[b] == s).nonzero().squeeze(1)
            positions[b, where] = torch.arange(len(where))
    targets = torch.roll(ids, -1, dims=1)
    targets[segments != torch.roll(segments, -1, dims=1)] = -100  # no prediction across documents
    targets[segments == 0] = -100
    pixels = torch.randn(1, 3, 8, 8, generator=g)
    return dict(input_ids=ids, position_ids=positions, segment_ids=segments, targets=targets,
                pixel_values=pixels)


def _model():
    cfg = make_config(moe={"num_experts": 4, "top_k": 2}, patch_to_query={4: 3})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    perturb(model)
    return model


def _sp_worker(rank: int, world: int, ep: bool, packed: bool) -> None:
    """Each rank's loss and gradients, summed over the group, equal one process's on the rows."""
    whole = _model()
    model = _model()
    if ep:
        from aria.parallel.expert import shard_experts_over

        shard_experts_over(model.moe_layers, dist.new_group([0, 1]), "ep_size_2")
    enable_sequence_parallel(model, SequenceParallel(dist.new_group([0, 1]), world, rank))
    inputs = packed_inputs(whole.cfg)
    if not packed:  # one causal sequence per row: no segments, positions 0..T-1
        del inputs["segment_ids"], inputs["position_ids"]
        inputs["targets"] = torch.roll(inputs["input_ids"], -1, dims=1)
        inputs["targets"][:, -1] = -100

    def total(m):
        out = m(**inputs)
        return out.loss_sum + out.router_loss, out

    ref_loss, ref = total(whole)
    ref_loss.backward()
    loss, out = total(model)
    loss.backward()
    sums = torch.stack([out.loss_sum.detach(), out.router_loss.detach(), out.num_targets.float()])
    dist.all_reduce(sums)
    torch.testing.assert_close(sums, torch.stack([ref.loss_sum.detach(), ref.router_loss.detach(),
                                                  ref.num_targets.float()]), atol=1e-5, rtol=1e-5)
    assert 0 < out.num_targets < ref.num_targets  # each rank really holds part of the rows
    expected = dict(whole.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        reference = expected[name].grad
        if ".moe.experts." in name and ep:  # this rank's experts saw the tokens of both ranks
            local = grad.shape[0]
            reference = reference[rank * local:(rank + 1) * local]
        else:  # each rank's part of the rows' gradient
            dist.all_reduce(grad)
        torch.testing.assert_close(grad, reference, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("ep,packed", [(False, True), (False, False), (True, True)])
def test_two_ranks_of_a_row_give_one_process_loss_and_gradients(ep, packed):
    run_distributed(_sp_worker, world=2, args=(ep, packed))


def test_sequence_parallel_training_equals_one_process_and_resumes(setup, tmp_path):
    """2 processes splitting every row (and with expert parallelism over the same 2) = 1 process."""
    one = tmp_path / "one"
    run(1, overrides(setup, one, "train.micro_batch_size=2"))
    for name, extra in (("sp2", []), ("sp2_ep2", ["parallel.ep_size=2", "parallel.zero_stage=2"])):
        run_dir = tmp_path / name
        args = overrides(setup, run_dir, "train.micro_batch_size=2", "parallel.sp_size=2", *extra)
        run(2, args)
        assert_same_training(one, run_dir)
    again = rewind(tmp_path / "sp2", tmp_path / "again")
    run(2, overrides(setup, again, "train.micro_batch_size=2", "parallel.sp_size=2"))
    assert records(again) == records(tmp_path / "sp2")


def test_layouts_sequence_parallelism_cannot_split_are_refused():
    base = ["run_dir=/x", "data.train=/d", "data.tokenizer=/t"]
    with pytest.raises(ValueError, match=r"parallel.sp_size' = 3 must divide model.text.num_heads"):
        compose_run("config", base + ["parallel.sp_size=3"])
    with pytest.raises(ValueError, match=r"must divide train.seq_len = 1000"):
        compose_run("config", base + ["parallel.sp_size=16", "model.text.num_heads=16",
                                      "model.text.num_kv_heads=16", "train.seq_len=1000"])
