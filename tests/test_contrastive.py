"""Stage 0's image-caption loss (``aria.train.contrastive``): the sum against a direct
per-document computation, the text tower seeing each caption alone, clear errors for documents
that are not an image and its caption, and 2 gloo processes against 1."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from aria.config import IGNORE_INDEX, ContrastiveConfig, load_model_config
from aria.model import build_model
from aria.convert.checkpoint import read_model_config
from aria.train import checkpoint as ckpt
from aria.train import weights
from aria.train.contrastive import contrastive_loss_sum
from aria.train.compose import compose_run
from aria.train.trainer import train
from helpers import packed_documents, rewind, run_distributed, shapes_world

IMG = 9  # model=tiny's <|img|> id

# rows of documents; each document: tokens before its images, image slots, caption tokens
LAYOUT = [[(1, 3, 4), (0, 2, 3), (2, 4, 2)],
          [(0, 5, 6), (1, 1, 1)]]


def packed(layout, T: int = 26, D: int = 8, seed: int = 0):
    """Random embeddings and hidden states over packed rows, and per document the (row, positions)
    of its image slots and of its caption (supervised) tokens."""
    g = torch.Generator().manual_seed(seed)
    input_ids, segment_ids, targets, docs = packed_documents(layout, T, lambda n: 7, IMG)
    embeds = torch.randn(len(layout), T, D, generator=g)
    hidden = torch.randn(len(layout), T, D, generator=g)
    return embeds, hidden, input_ids, segment_ids, targets, docs


def reference_loss(embeds, hidden, docs, cfg: ContrastiveConfig) -> float:
    """The SigLIP sum written per document, in float64."""
    def unit(v):
        return v / v.norm()

    images = [[embeds[b, p].double() for p in img] for b, img, _ in docs]
    captions = [[hidden[b, p].double() for p in txt] for b, _, txt in docs]
    total = 0.0
    for i, image in enumerate(images):
        for j, caption in enumerate(captions):
            if cfg.similarity == "pooled":
                s = float(unit(sum(image) / len(image)) @ unit(caption[-1]))
            else:
                s = sum(max(float(unit(q) @ unit(k)) for q in image) for k in caption) / len(caption)
            logit = cfg.scale * s + cfg.bias
            z = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-z * logit))
    return total


@pytest.mark.parametrize("similarity", ["late", "pooled"])
def test_loss_is_the_sigmoid_sum_over_every_image_caption_pair(similarity):
    embeds, hidden, input_ids, segment_ids, targets, docs = packed(LAYOUT)
    cfg = ContrastiveConfig(similarity=similarity, scale=4.0, bias=-2.0)
    loss, images = contrastive_loss_sum(embeds, hidden, input_ids, segment_ids, targets, IMG, cfg)
    assert images == len(docs) == 5
    want = reference_loss(embeds, hidden, docs, cfg)
    assert abs(float(loss) - want) <= 1e-5 * want, (float(loss), want)


def test_a_document_without_an_image_or_a_caption_is_named():
    cfg = ContrastiveConfig()
    embeds, hidden, input_ids, segment_ids, targets, _ = packed([[(1, 3, 4), (2, 0, 3)]])
    with pytest.raises(ValueError, match=r"document 1 of the micro-batch \(b.jsonl:7\) has 0 image tokens "
                                         r"and 3 supervised text tokens"):
        contrastive_loss_sum(embeds, hidden, input_ids, segment_ids, targets, IMG, cfg,
                             ["a.jsonl:1", "b.jsonl:7"])
    for layout in ([[(1, 3, 0), (2, 2, 3)]], [[(1, 3, 0)]]):  # the second: no caption token at all
        embeds, hidden, input_ids, segment_ids, targets, _ = packed(layout)
        for similarity in ("pooled", "late"):
            with pytest.raises(ValueError, match="document 0 .* has 3 image tokens and 0 supervised"):
                contrastive_loss_sum(embeds, hidden, input_ids, segment_ids, targets, IMG,
                                     ContrastiveConfig(similarity=similarity))


def test_the_text_tower_reads_each_caption_alone_and_the_image_side_is_the_projector():
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    Q = cfg.projector.patch_to_query[49]
    # two documents in one row, the second starting with text right after the first one's caption:
    # [a token, 16 image slots, caption of 5] + [a token, 16 image slots, caption of 4]
    doc1 = [11] + [IMG] * Q + [20, 21, 22, 23, 24]
    doc2 = [12] + [IMG] * Q + [30, 31, 32, 33]
    input_ids = torch.tensor([doc1 + doc2 + [2, 2]])
    segment_ids = torch.tensor([[1] * len(doc1) + [2] * len(doc2) + [0, 0]])
    position_ids = torch.tensor([list(range(len(doc1))) + list(range(len(doc2))) + [0, 0]])
    pixels = torch.randint(0, 256, (2, 3, 490, 490), dtype=torch.uint8)
    with torch.no_grad():
        out = model(input_ids, pixels, position_ids=position_ids, segment_ids=segment_ids, towers=True)
        features = model.image_features(pixels)
        assert torch.equal(out.embeds_BTD[0][input_ids[0] == IMG], features.flatten(0, 1))
        for start, caption in ((0, doc1[:1]), (1 + Q, doc1[1 + Q:]), (len(doc1), doc2[:1]),
                               (len(doc1) + 1 + Q, doc2[1 + Q:])):
            ids = torch.tensor([caption])
            positions = position_ids[:, start:start + len(caption)]
            alone = model.decoder(model.decoder.embed(ids), positions, torch.ones_like(ids), None, None)
            got = out.hidden_BTD[0, start:start + len(caption)]
            gap = (got - alone.hidden_BTD[0]).abs().max()
            assert gap <= 1e-5, gap
        # and the caption is not what it reads inside its document with the image
        seen = model.decoder(out.embeds_BTD, position_ids, segment_ids, None, segment_ids > 0).hidden_BTD
        assert not torch.allclose(seen[0, 1 + Q:len(doc1)], out.hidden_BTD[0, 1 + Q:len(doc1)], atol=1e-3)


def test_contrastive_config_is_checked():
    with pytest.raises(ValueError, match="contrastive.similarity"):
        ContrastiveConfig(similarity="mean")
    with pytest.raises(ValueError, match="contrastive.scale"):
        ContrastiveConfig(scale=0)
    with pytest.raises(ValueError, match="train.objective"):
        compose_run("config", ["run_dir=/x", "data.train=/d", "data.tokenizer=/t", "train.objective=clip"])
    paths = ["run_dir=/x", "data.train=/d", "data.tokenizer=/t"]
    with pytest.raises(ValueError, match=r"init.groups.*null unless init.from_hf or init.from_checkpoint"):
        compose_run("quickstart", [*paths, "init.groups=[vision]"])
    with pytest.raises(ValueError, match=r"init.groups.*a non-empty list of"):
        compose_run("quickstart", [*paths, "init.from_checkpoint=/c", "init.groups=[eyes]"])
    with pytest.raises(ValueError, match=r"init.groups.*null or a list"):
        compose_run("quickstart", [*paths, "init.from_checkpoint=/c", "init.groups=vision"])
    with pytest.raises(ValueError, match="parallel.sp_size"):
        compose_run("stage0_vision", [*paths, "parallel.sp_size=2"])


def _train(rank: int, world: int, args: list[str]) -> None:
    assert train(compose_run("quickstart_vision", args)) == 0


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("similarity,zero,ep", [("late", 1, 2), ("pooled", 3, 1)])
def test_stage0_on_two_processes_equals_one_and_the_next_stage_starts_from_it(tmp_path, similarity, zero, ep):
    """Two ranks of two rows each (the experts split over both with ``ep`` = 2) see the captions of
    all four (the all-gather), as one rank of four rows: the same losses, weights and held-out loss,
    which equals a float64 sum over the held-out pairs; then recipe=quickstart starts from the
    stage-0 run, and resuming it does not start from the stage-0 run again. Every caption document
    (16 image tokens + 7-23 caption tokens + 3) fills more than half of a 48-token row, so every row
    holds one document and both layouts read the same rows (the held-out set: records 0, 2 on rank
    0 and 1, 3 on rank 1, one micro-batch of four); the text documents of the mix are skipped."""
    from aria.convert.store import iter_tensors

    data, tok = shapes_world(tmp_path, train_images=24, test_images=4, train_videos=0, test_videos=0)
    # text documents in the mix: the loader skips them (not an image and its caption)
    common = [f"data.train=[{{path:'{data / 'caption_train.jsonl'}',weight:3}},"
              f"{{path:'{data / 'text_train.jsonl'}',weight:1}}]", f"data.tokenizer={tok}", "logging=quiet",
              f"data.eval={data / 'caption_test.jsonl'}",
              "train.max_steps=3", "train.seq_len=48", "checkpoint.every_steps=0", "data.num_workers=0",
              "optim.eps=1e-3", f"contrastive.similarity={similarity}", "model.moe.aux_loss_coeff=0",
              "train.objective=contrastive",  # (recipe=quickstart_vision's own stage 0 is caption words)
              # bias 0: other ranks' captions weigh as much as the own one (at -10 their gradient
              # is 1e-4 of it, too little to tell a lost cross-rank gradient from rounding)
              "contrastive.bias=0", "contrastive.scale=5", f"parallel.zero_stage={zero}",
              "model.moe.z_loss_coeff=0",
              # the recipe keeps patch embeddings, which ZeRO-3 refuses (aria.config.check_image_token_cache)
              f"stage.image_token_cache_gb={0 if zero == 3 else 1}"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_distributed(_train, 1, ([f"run_dir={one}", "train.micro_batch_size=4", *common],), timeout=300)
    run_distributed(_train, 2, ([f"run_dir={two}", "train.micro_batch_size=2", f"parallel.ep_size={ep}",
                                 *common],), timeout=300)
    a, b = _losses(one), _losses(two)
    assert len(a) == 3 and all(x > 0 for x in a)
    for run in (one, two):  # the text documents were skipped, and the metrics count every rank's
        saved = ckpt.read_trainer_states(run / "checkpoints" / "step_00000003")
        per_rank = [position["skipped"].get("not_image_caption", 0)
                    for state in saved for position in state["data"]["positions"].values()]
        assert _last(run)["skipped_samples"] == {"not_image_caption": sum(per_rank)}
        assert all(n > 0 for n in per_rank) and len(per_rank) == len(saved), per_rank
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    wa = dict(iter_tensors(one / "checkpoints" / "step_00000003" / "model"))
    wb = dict(iter_tensors(two / "checkpoints" / "step_00000003" / "model"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    held_out = _eval_loss(one)
    assert held_out == pytest.approx(_eval_loss(two), abs=1e-5)
    assert held_out == pytest.approx(_held_out_reference(one, [f"run_dir={one}", *common]), rel=1e-5)
    # the next stage starts from the stage-0 run's vision encoder and projector, the rest as from scratch
    nxt = tmp_path / "next"
    nxt_args = [f"init.from_checkpoint={one}", "init.groups=[vision,projector]", f"data.tokenizer={tok}",
                f"data.train={data / 'dialog_train.jsonl'}", "logging=quiet", "train.max_steps=2",
                "train.seq_len=256", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
                "data.num_workers=0"]
    run_distributed(_next, 1, ([f"run_dir={nxt}", *nxt_args],), timeout=300)
    started = json.loads((nxt / "init.json").read_text())
    assert started["source"] == str(one)
    # the fresh groups at the next run's init std (recipe=quickstart's), not stage 0's
    source_cfg = read_model_config(one / "checkpoints" / "step_00000003" / "model")
    std = compose_run("quickstart", [f"run_dir={nxt}", *nxt_args]).model.text.initializer_range
    assert std != source_cfg.text.initializer_range
    text_cfg = dataclasses.replace(source_cfg.text, initializer_range=std)
    model = build_model(dataclasses.replace(source_cfg, text=text_cfg), init=False)
    weights.init_weights(model, 0)
    fresh = sum(float(t.double().abs().sum()) for t in model.state_dict().values())
    moved = 0
    for key, value in wa.items():
        if key.startswith(("vision.", "projector.")):
            moved += not torch.equal(model.state_dict()[key], value)
            model.state_dict()[key].copy_(value)
    expected = sum(float(t.double().abs().sum()) for t in model.state_dict().values())
    assert moved > 10  # stage 0 trained the vision encoder and projector
    assert started["fingerprint"] == pytest.approx(expected, rel=1e-12) and expected != fresh
    assert all(math.isfinite(x) for x in _losses(nxt))
    # resumed after step 1, it continues from its own checkpoint (init.groups is not applied again)
    resumed = rewind(nxt, tmp_path / "resumed", step=1)
    run_distributed(_next, 1, ([f"run_dir={resumed}", *nxt_args],), timeout=300)
    assert len(_losses(resumed)) == 2 and _losses(resumed)[-1] == pytest.approx(_losses(nxt)[-1], abs=1e-6)
    wn = dict(iter_tensors(nxt / "checkpoints" / "step_00000002" / "model"))
    wr = dict(iter_tensors(resumed / "checkpoints" / "step_00000002" / "model"))
    assert max((wn[k] - wr[k]).abs().max().item() for k in wn) <= 1e-6


def _last(run_dir) -> dict:
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "loss" in r][-1]


def _eval_loss(run_dir) -> float:
    (value,) = [r["eval_loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "eval_loss" in r]
    return value


def _held_out_reference(run_dir, args: list[str]) -> float:
    """The held-out loss of the run's last checkpoint written per document in float64: its one
    micro-batch of four documents, the images and captions read from the model's towers."""
    from aria.data.loader import eval_batches
    from aria.data.processor import Processor

    cfg = compose_run("quickstart_vision", args)
    directory = run_dir / "checkpoints" / "step_00000003" / "model"
    model = build_model(read_model_config(directory), init=False)
    weights.load_weights(model, directory)
    processor = Processor.from_config(cfg.data, model.cfg)
    (batch,) = eval_batches(cfg.data.eval, processor, cfg.train.seq_len, 4)
    with torch.no_grad():
        out = model.eval()(**batch.model_inputs(), towers=True)
    docs = []
    for b in range(batch.input_ids.shape[0]):
        for s in range(1, int(batch.segment_ids[b].max()) + 1):
            own = batch.segment_ids[b] == s
            docs.append((b, (own & (batch.input_ids[b] == IMG)).nonzero()[:, 0].tolist(),
                         (own & (batch.targets[b] != IGNORE_INDEX)).nonzero()[:, 0].tolist()))
    assert len(docs) == 4 and all(img and txt for _, img, txt in docs)
    return reference_loss(out.embeds_BTD, out.hidden_BTD, docs, cfg.contrastive) / len(docs)


def _next(rank: int, world: int, args: list[str]) -> None:
    assert train(compose_run("quickstart", args)) == 0


def _one_bad_rank(rank: int, world: int) -> None:
    layout = [[(1, 3, 4), (2, 2, 3)]] if rank == 0 else [[(1, 3, 4), (2, 0, 3)]]  # rank 1: no image
    embeds, hidden, input_ids, segment_ids, targets, _ = packed(layout, seed=rank)
    want = "document 1 of the micro-batch on rank 1" if rank == 1 else "rank 1 holds a document"
    with pytest.raises(ValueError, match=want):
        contrastive_loss_sum(embeds, hidden, input_ids, segment_ids, targets, IMG, ContrastiveConfig())


@pytest.mark.slow
def test_a_bad_document_on_one_rank_stops_every_rank_instead_of_hanging():
    run_distributed(_one_bad_rank, 2, (), timeout=60)
