"""Stage 0 by caption words (``aria.train.caption_words``): the loss and the caption pairs' loss
against per-document float64 computations, the image side being the LM head over each document's
mean projector output or the log-mean-exp of the LM head over each of them, clear errors for
documents that are not an image and its caption and for pairs without the token-wise pool, and 2
gloo processes against 1."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aria.config import IGNORE_INDEX, load_model_config
from aria.convert.checkpoint import read_model_config
from aria.model import build_model
from aria.model.aria import Aria
from aria.train import weights
from aria.train.caption_words import caption_words_loss_sum, pair_losses, step_classes
from aria.train.compose import compose_run
from aria.train.trainer import train
from helpers import packed_documents, run_distributed, shapes_world

IMG = 9  # model=tiny's <|img|> id
V = 12

# rows of documents; each document: tokens before its images, image slots, caption tokens
LAYOUT = [[(1, 3, 4), (0, 2, 3), (2, 4, 2)],
          [(0, 5, 6), (1, 1, 1)]]


def packed(layout, T: int = 26, seed: int = 0):
    """Packed rows with random caption tokens, random (S, V) word logits, and per document the set
    of its caption's tokens."""
    g = torch.Generator().manual_seed(seed)
    input_ids, segment_ids, targets, docs = packed_documents(
        layout, T, lambda n: torch.randint(0, V, (n,), generator=g), IMG)  # repeats are likely
    words = [set(targets[b, text].tolist()) for b, _, text in docs]
    return torch.randn(len(words), V, generator=g) * 3, input_ids, segment_ids, targets, words


def reference_loss(logits, words, classes) -> float:
    """Binary cross-entropy of every (document, class token), averaged over the classes, summed over
    documents."""
    total = 0.0
    for row, present in zip(logits.double().tolist(), words):
        total += sum(math.log1p(math.exp(-row[v] if v in present else row[v])) for v in classes) / len(classes)
    return total


def test_loss_is_the_class_mean_cross_entropy_of_each_documents_caption_tokens():
    logits, input_ids, segment_ids, targets, words = packed(LAYOUT)
    assert any(len(w) < n for w, n in zip(words, [4, 3, 2, 6, 1]))  # a repeated token is one label
    # the step's classes: the tokens of these captions and of another micro-batch's
    _, _, _, other, other_words = packed([[(0, 2, 3)]], seed=1)
    present = step_classes([targets, other], V)
    classes = sorted(set().union(*words, *other_words))
    assert present.tolist() == [float(v in classes) for v in range(V)] and len(classes) < V
    loss, documents = caption_words_loss_sum(logits, input_ids, segment_ids, targets, IMG, present > 0)
    assert documents == len(words) == 5
    want = reference_loss(logits, words, classes)
    assert abs(float(loss) - want) <= 1e-6 * want, (float(loss), want)


def reference_pair_loss(logits_NV, rows: range, caption: list[int], window: int, breaks=()) -> float:
    """One document's pair loss in float64: over the distinct pairs of distinct caption tokens, the
    binary cross-entropy of log mean over its image tokens of exp(logit a + logit b) against "a and
    b stand at most ``window`` apart somewhere, no token of ``breaks`` after a up to b", averaged; 0
    without a pair."""
    near: dict[tuple[int, int], bool] = {}
    for i, a in enumerate(caption):
        for j in range(i + 1, len(caption)):
            if caption[j] != a:
                key = (min(a, caption[j]), max(a, caption[j]))
                one_clause = not set(caption[i + 1:j + 1]) & set(breaks)
                near[key] = near.get(key, False) or (j - i <= window and one_clause)
    z = logits_NV.double().tolist()
    total = 0.0
    for (a, b), positive in near.items():
        said = math.log(sum(math.exp(z[t][a] + z[t][b]) for t in rows) / len(rows))
        total += math.log1p(math.exp(-said if positive else said))
    return total / max(len(near), 1)


@pytest.mark.parametrize("window,breaks", [(1, ()), (2, ()), (5, ()), (5, (3, 7)), (30, (2,))])
def test_pairs_loss_is_each_captions_pairs_scored_on_single_image_tokens(window, breaks):
    layout = [[(1, 3, 6), (0, 2, 3), (2, 4, 1)], [(0, 5, 8), (1, 1, 2)]]
    _, input_ids, segment_ids, targets, words = packed(layout, T=30)
    g = torch.Generator().manual_seed(2)
    docs = packed_documents(layout, 30, lambda n: torch.zeros(n, dtype=torch.long), IMG)[3]
    N = int((input_ids == IMG).sum())
    logits_NV = torch.randn(N, V, generator=g) * 2
    documents_N = torch.cat([torch.full((len(image),), d) for d, (_, image, _) in enumerate(docs)])
    break_ids = torch.tensor(breaks, dtype=torch.long) if breaks else None
    got = pair_losses(logits_NV, documents_N, len(docs), targets, segment_ids, window, break_ids)
    start, want, unbroken = 0, [], []
    for b, image, text in docs:
        rows, caption = range(start, start + len(image)), targets[b, text].tolist()
        want.append(reference_pair_loss(logits_NV, rows, caption, window, breaks))
        unbroken.append(reference_pair_loss(logits_NV, rows, caption, window))
        start += len(image)
    assert want[2] == 0.0 and all(w > 0 for i, w in enumerate(want) if i != 2)  # doc 2: one caption token
    assert not breaks or want != unbroken  # the breaks change some document's pairs
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6), (got, want)
    # the total adds them to the words' loss
    present = step_classes([targets], V) > 0
    words_only, _ = caption_words_loss_sum(torch.zeros(len(docs), V), input_ids, segment_ids, targets, IMG, present)
    both, _ = caption_words_loss_sum(torch.zeros(len(docs), V), input_ids, segment_ids, targets, IMG, present,
                                     token_logits_NV=logits_NV, documents_N=documents_N, pairs=window,
                                     pair_breaks=break_ids)
    assert float(both - words_only) == pytest.approx(sum(want), rel=1e-5)


def test_pairs_need_the_token_wise_pool():
    from aria.config import CaptionWordsConfig

    with pytest.raises(ValueError, match=r"'caption_words.pairs' = 2 is invalid: expected 0 with "
                                         r"caption_words.pool=mean"):
        CaptionWordsConfig(pool="mean", pairs=2)
    with pytest.raises(ValueError, match=r"'caption_words.pool' = 'max' is invalid"):
        CaptionWordsConfig(pool="max")
    with pytest.raises(ValueError, match=r"'caption_words.pair_breaks' = \[','\] is invalid: expected \[\] with "
                                         r"caption_words.pairs=0"):
        CaptionWordsConfig(pool="lme", pair_breaks=[","])
    with pytest.raises(ValueError, match=r"'caption_words.pair_breaks' = ',' is invalid: expected a list of words"):
        CaptionWordsConfig(pool="lme", pairs=2, pair_breaks=",")


def test_pair_breaks_are_every_token_of_their_words(tmp_path):
    """A break word stands for each token that decodes to it (with and without its leading space),
    and a word of no token is named."""
    from aria.data.tokenizer import Tokenizer
    from aria.train.caption_words import break_ids

    _, tok = shapes_world(tmp_path, train_images=8, test_images=2, train_videos=0, test_videos=0)
    tokenizer = Tokenizer.load(tok)
    caption = tokenizer.encode("A red circle at the top, a blue star on the left and a green square.")
    ids = break_ids([",", "and"], tokenizer).tolist()
    assert [tokenizer.decode([i]).strip() for i in caption if i in ids] == [",", "and"]
    assert all(tokenizer.decode([i]).strip() in (",", "and") for i in ids)
    with pytest.raises(ValueError, match=r"'caption_words.pair_breaks' = \[',', 'zebra'\] is invalid: no token "
                                         r"of the tokenizer .* decodes to \['zebra'\]"):
        break_ids([",", "zebra"], tokenizer)


def test_a_document_without_an_image_or_a_caption_is_named():
    for layout, want in (([[(1, 3, 4), (2, 0, 3)]], r"document 1 of the micro-batch \(b.jsonl:7\) has 0 image "
                                                     r"tokens and 3 supervised text tokens"),
                         ([[(1, 3, 0), (2, 2, 3)]], r"document 0 of the micro-batch \(a.jsonl:1\) has 3 image "
                                                     r"tokens and 0 supervised")):
        _, input_ids, segment_ids, targets, _ = packed(layout)
        with pytest.raises(ValueError, match=want):
            caption_words_loss_sum(torch.zeros(2, V), input_ids, segment_ids, targets, IMG,
                                   torch.ones(V, dtype=torch.bool), ["a.jsonl:1", "b.jsonl:7"])


@pytest.mark.parametrize("pool", ["mean", "lme"])
def test_the_words_are_the_lm_head_over_each_documents_image_tokens(pool):
    """mean: over each document's mean image token; lme: over each image token, then the log of
    the mean of their exponentials."""
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    Q = cfg.projector.patch_to_query[49]
    # row 0: [a token, 1 image, caption] + [2 images (a video's frames), caption]; row 1: one document
    doc1 = [11] + [IMG] * Q + [20, 21, 22]
    doc2 = [IMG] * (2 * Q) + [30, 31]
    doc3 = [12, 13] + [IMG] * Q + [40]
    T = len(doc1) + len(doc2) + 2
    input_ids = torch.tensor([doc1 + doc2 + [2, 2], doc3 + [2] * (T - len(doc3))])
    segment_ids = torch.tensor([[1] * len(doc1) + [2] * len(doc2) + [0, 0],
                                [1] * len(doc3) + [0] * (T - len(doc3))])
    pixels = torch.randint(0, 256, (4, 3, 490, 490), dtype=torch.uint8)
    with torch.no_grad():
        out = model(input_ids, pixels, segment_ids=segment_ids, words=pool)
        features = model.image_features(pixels)  # crops in slot order: doc1, doc2 (2), doc3
        per_document = [features[0], features[1:3].flatten(0, 1), features[3]]
        if pool == "mean":
            want = model.lm_head(model.decoder.norm(torch.stack([f.mean(0) for f in per_document])))
        else:
            tokens = [model.lm_head(model.decoder.norm(f)).double() for f in per_document]
            want = torch.stack([t.exp().mean(0).log() for t in tokens]).float()
            assert torch.equal(out.image_documents_N, torch.tensor([0] * Q + [1] * 2 * Q + [2] * Q))
            assert torch.allclose(out.token_logits_NV, torch.cat(tokens).float(), atol=1e-5)
    assert out.word_logits_SV.shape == (3, cfg.text.vocab_size)
    assert torch.allclose(out.word_logits_SV, want, atol=1e-5), (out.word_logits_SV - want).abs().max()
    assert out.loss_sum is None and out.router_loss is None  # no decoder layer ran


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["mean", "lme"])
def test_at_full_size_the_words_step_trains_the_vision_side_and_the_head_alone(pool):
    """``model=aria`` on fake tensors (shapes, no memory): a 4K row of 22 image captions of 490 px
    runs, and the loss reaches the vision encoder, the projector, the final norm and the LM head
    only (no embedding lookup, no decoder layer); lme reads the head over each image token, on
    tensors without values over every position of the row (an upper bound: 4,096 x 100,352 logits,
    0.8 GiB in bf16)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = load_model_config("aria")
    torch.set_default_dtype(torch.bfloat16)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = Aria(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        Q = cfg.projector.patch_to_query[(490 // cfg.vision.patch_size) ** 2]
        input_ids = torch.full((1, 4096), 100)
        segment_ids = torch.zeros(1, 4096, dtype=torch.long)
        for d in range(22):
            input_ids[0, d * (Q + 50):d * (Q + 50) + Q] = cfg.image_token_id
            segment_ids[0, d * (Q + 50):(d + 1) * (Q + 50)] = d + 1
        out = model(input_ids, torch.zeros(22, 3, 490, 490, dtype=torch.uint8), segment_ids=segment_ids,
                    words=pool)
        out.word_logits_SV.float().sum().backward()
    # without values the document count is not read: one document a row (``document_ids``)
    assert tuple(out.word_logits_SV.shape) == (1, cfg.text.vocab_size)
    if pool == "lme":
        assert tuple(out.token_logits_NV.shape) == (4096, cfg.text.vocab_size)
    reached = {name.split(".")[0] if not name.startswith("decoder.") else ".".join(name.split(".")[:2])
               for name, p in model.named_parameters() if p.grad is not None}
    assert reached == {"vision", "projector", "decoder.norm", "lm_head"}, reached


def _train(rank: int, world: int, args: list[str]) -> None:
    assert train(compose_run("quickstart_vision", args)) == 0


def _records(run_dir, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if key in r]


@pytest.mark.slow
@pytest.mark.parametrize("zero,ep,pool,pairs,breaks", [(1, 2, "mean", 0, "[]"), (3, 1, "lme", 4, "[',',and]")])
def test_stage0_by_caption_words_on_two_processes_equals_one(tmp_path, zero, ep, pool, pairs, breaks):
    """Two ranks of one row each (the experts split over both with ``ep`` = 2) as one rank of two
    rows: the same losses, weights and held-out loss, which equals a float64 per-document sum read
    from the last checkpoint; the decoder layers, which no step runs, keep their initial weights.
    Both pools, the token-wise one with the caption pairs, their clauses ended by "," and "and".
    Every caption document (16 image tokens + 7-23 caption tokens + 3) fills more than half of a
    48-token row, so every row holds one document and both layouts read the same rows; the text
    documents of the mix are skipped."""
    from aria.convert.store import iter_tensors

    data, tok = shapes_world(tmp_path, train_images=24, test_images=4, train_videos=0, test_videos=0)
    common = [f"data.train=[{{path:'{data / 'caption_train.jsonl'}',weight:3}},"
              f"{{path:'{data / 'text_train.jsonl'}',weight:1}}]", f"data.tokenizer={tok}", "logging=quiet",
              f"data.eval={data / 'caption_test.jsonl'}", "train.max_steps=3", "train.seq_len=48",
              "checkpoint.every_steps=0", "data.num_workers=0", "optim.eps=1e-3", f"parallel.zero_stage={zero}",
              f"caption_words.pool={pool}", f"caption_words.pairs={pairs}", f"caption_words.pair_breaks={breaks}",
              "optim.weight_decay=0.0",  # the recipe's decay would shrink the decoder layers that no step runs
              # the recipe keeps patch embeddings, which ZeRO-3 refuses (aria.config.check_image_token_cache)
              f"stage.image_token_cache_gb={0 if zero == 3 else 1}"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_distributed(_train, 1, ([f"run_dir={one}", "train.micro_batch_size=2", *common],), timeout=300)
    run_distributed(_train, 2, ([f"run_dir={two}", "train.micro_batch_size=1", f"parallel.ep_size={ep}",
                                 *common],), timeout=300)
    a, b = _records(one, "loss"), _records(two, "loss")
    assert len(a) == 3 and all(x > 0 for x in a)
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)
    last = one / "checkpoints" / "step_00000003" / "model"
    wa = dict(iter_tensors(last))
    wb = dict(iter_tensors(two / "checkpoints" / "step_00000003" / "model"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    fresh = build_model(read_model_config(last), init=False)
    weights.init_weights(fresh, 0)
    initial = fresh.state_dict()
    moved = {k for k in wa if not torch.equal(wa[k], initial[k])}
    assert moved and all(k.startswith(("vision.", "projector.", "lm_head.", "decoder.norm.")) for k in moved), moved
    assert any(k.startswith("vision.") for k in moved) and any(k.startswith("projector.") for k in moved)
    (held_out,) = _records(one, "eval_loss")
    assert held_out == pytest.approx(_records(two, "eval_loss")[0], abs=1e-6)
    assert held_out == pytest.approx(_held_out_reference(last, [f"run_dir={one}", *common], pool, pairs), rel=1e-5)


def _held_out_reference(directory, args: list[str], pool: str, pairs: int) -> float:
    """The held-out loss of a checkpoint per document in float64: each test caption's image encoded
    alone, its mean token (or each of its tokens, log-mean-exp) read by the final norm and LM head,
    against the caption's tokens, over the tokens of all test captions; plus each caption's pair
    loss."""
    from aria.data.loader import eval_batches
    from aria.data.processor import Processor

    cfg = compose_run("quickstart_vision", args)
    model = build_model(read_model_config(directory), init=False).eval()
    weights.load_weights(model, directory)
    processor = Processor.from_config(cfg.data, model.cfg)
    logits, words, pair_loss, broken = [], [], 0.0, 0
    for batch in eval_batches(cfg.data.eval, processor, cfg.train.seq_len, 1):
        assert int(batch.segment_ids.max()) == 1  # one document per row
        caption = batch.targets[batch.targets != IGNORE_INDEX].tolist()
        with torch.no_grad():
            image = model.image_features(batch.pixel_values).flatten(0, 1)
            if pool == "mean":
                logits.append(model.lm_head(model.decoder.norm(image.mean(0))))
            else:
                tokens = model.lm_head(model.decoder.norm(image)).double()
                logits.append(tokens.exp().mean(0).log())
                breaks = [t for t in caption if processor.tokenizer.decode([t]).strip() in cfg.caption_words.pair_breaks]
                broken += len(breaks)
                pair_loss += reference_pair_loss(tokens, range(len(tokens)), caption, pairs, breaks) if pairs else 0.0
        words.append(set(caption))
    assert len(words) == 4 and (broken > 0) == bool(cfg.caption_words.pair_breaks)
    return (reference_loss(torch.stack(logits), words, sorted(set().union(*words))) + pair_loss) / len(words)


def _frozen_experts(rank: int, world: int, args: list[str]) -> None:
    with pytest.raises(ValueError, match=r"parallel.ep_size' = 2 with no trainable expert weight"):
        train(compose_run("quickstart_vision", args))


@pytest.mark.slow
def test_expert_parallelism_with_frozen_experts_is_refused_by_name(tmp_path):
    """(DeepSpeed's ZeRO would stop on an assertion about optimizer groups.)"""
    data, tok = shapes_world(tmp_path, train_images=4, test_images=1, train_videos=0, test_videos=0)
    args = [f"run_dir={tmp_path / 'run'}", f"data.train={data / 'caption_train.jsonl'}", f"data.tokenizer={tok}",
            "logging=quiet", "data.num_workers=0", "parallel.ep_size=2", "stage.trainable.experts=false",
            "stage.trainable.router=false"]
    run_distributed(_frozen_experts, 2, (args,), timeout=120)
