"""Expert specialisation report: routed-token counts per modality against counts made here from the
token ids, against a hook-free re-run of the routers and against the model's own load metric; image
vs video slots when crop sizes cannot tell; the specialisation arithmetic by hand; the files and
plots; bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from aria.config import load_model_config
from aria.convert.checkpoint import save_model_dir
from aria.data.processor import Processor, group_crops
from aria.data.records import MediaResolver, parse_record
from aria.data.tokenizer import Tokenizer
from aria.model import build_model
from aria.tools.experts import (CAP, COLUMNS, IMAGE, TEXT, VIDEO, BlockKinds, ExpertCounts,
                                collate_samples, count_routing, expert_rows, main, plot_load,
                                plot_specialisation, summary, token_modalities)
from data_tools.make_shapes import make_shapes

# A larger init than tiny's 0.02, so that routing differs clearly between tokens.
TINY = load_model_config("tiny", ["text.initializer_range=0.1"])
K, E, L = TINY.moe.top_k, TINY.moe.num_experts, TINY.text.num_layers
FRAMES = 8  # frames per shapes video (make_shapes' default, asked for by its records)
# Tiny's <|img|> slots per crop: 16 at 490 px, 32 at 980 px.
SLOTS = {round(p ** 0.5) * TINY.vision.patch_size: q for p, q in TINY.projector.patch_to_query.items()}
MIXED = {"messages": [{"role": "user", "content": [
    {"type": "image"}, {"type": "text", "text": "then"}, {"type": "video"},
    {"type": "text", "text": "and"}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
    "images": ["images/test_000000.png", "images/test_000001.png"],
    "video": {"path": "videos/test_000000.mp4", "num_frames": FRAMES}}


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, seed=0, train_images=4, test_images=2, train_videos=1, test_videos=1,
                video_frames=FRAMES, wds=False, workers=1)
    # an image and a video question, a text document, an image caption, and a conversation mixing
    # two images around a video
    chat = lines(out / "chat_test.jsonl")
    records = [chat[0], next(c for c in chat if '"video"' in c), lines(out / "text_test.jsonl")[0],
               lines(out / "caption_test.jsonl")[0], json.dumps(MIXED)]
    (out / "mix.jsonl").write_text("\n".join(records) + "\n")
    return out


@pytest.fixture(scope="module")
def tok(shapes, tmp_path_factory) -> Path:
    from data_tools.train_tokenizer import train

    return Path(train([str(shapes / "text_train.jsonl"), str(shapes / "chat_train.jsonl")],
                      tmp_path_factory.mktemp("tok"), vocab_size=600))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(TINY).eval()


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    save_model_dir(model.state_dict(), TINY, out)
    return out


def make_processor(tok: Path, image_size: int) -> Processor:
    return Processor.for_model(Tokenizer.load(tok), TINY, image_size=image_size)


def encoded_records(processor: Processor, dataset: Path):
    for i, line in enumerate(lines(dataset)):
        sample = parse_record(json.loads(line), f"{dataset}:{i + 1}", MediaResolver(dataset.parent))
        yield processor.encode(sample)


def kinds_by_block_length(input_ids: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """At 980 px an image block holds 32 <|img|> slots and a video frame 16: label every token from
    the blocks of ``input_ids`` alone."""
    kinds = torch.full_like(input_ids, TEXT)
    ids, t = input_ids.tolist(), 0
    while t < len(ids):
        if ids[t] == tokenizer.fim_prefix_id:
            end = ids.index(tokenizer.fim_suffix_id, t)
            n = end - t - 1
            assert n in (SLOTS[980], SLOTS[490]) and all(i == tokenizer.image_id for i in ids[t + 1:end])
            kinds[t + 1:end] = IMAGE if n == SLOTS[980] else VIDEO
            t = end
        t += 1
    return kinds


@torch.no_grad()
def routers_by_hand(model, processor: Processor, encoded) -> list[torch.Tensor]:
    """Every layer's (T, K) expert ids for one sample alone, by running the decoder layer by layer
    here and taking the router's top-k of its input directly (no hooks, no padding)."""
    pixels = group_crops(encoded.crops, processor.tokens_per_crop)
    x = model.embed(encoded.input_ids[None], pixels["pixel_values"], pixels["pixel_mask"],
                    pixels["image_feature_order"])
    rope = model.decoder.rope(torch.arange(x.shape[1])[None], x.dtype)
    ids = []
    for layer in model.decoder.layers:
        h = x + layer.attn(layer.attn_norm(x), rope, "causal", None)
        logits_TE = layer.mlp_norm(h)[0].float() @ layer.moe.router.weight.float().T
        ids.append(logits_TE.topk(K, dim=-1).indices)
        x = layer(x, rope, "causal", None, None)[0]
    return ids


# -- counting -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor_980(tok) -> Processor:
    return make_processor(tok, 980)


@pytest.fixture(scope="module")
def counts_980(model, processor_980, shapes) -> ExpertCounts:
    # batches of 2 rows: padding, a last partial batch, and 980 px images beside 490 px frames
    return count_routing(model, processor_980, shapes / "mix.jsonl", batch_size=2)


@pytest.fixture(scope="module")
def labelled_980(processor_980, shapes) -> list:
    """(encoded sample, kinds of its tokens from its image blocks' lengths) of every record."""
    return [(e, kinds_by_block_length(e.input_ids, processor_980.tokenizer))
            for e in encoded_records(processor_980, shapes / "mix.jsonl")]


def test_counts_sum_to_tokens_of_each_modality_times_top_k(counts_980, labelled_980, model):
    expected = torch.zeros(3, dtype=torch.long)
    for _, kinds in labelled_980:
        expected += torch.stack([(kinds == k).sum() for k in (TEXT, IMAGE, VIDEO)])
    assert expected.tolist()[1:] == [SLOTS[980] * 4, SLOTS[490] * FRAMES * 2]  # the records' media
    assert counts_980.samples == 5
    assert counts_980.tokens_M.tolist() == expected.tolist()
    assert counts_980.counts_LME.shape == (L, 3, E)
    for layer in range(L):
        assert counts_980.counts_LME[layer].sum(-1).tolist() == (expected * K).tolist()
    assert all(not layer.router._forward_hooks for layer in model.moe_layers)  # hooks removed


def test_counts_equal_routers_run_by_hand(counts_980, labelled_980, model, processor_980):
    by_hand = torch.zeros(L, 3, E, dtype=torch.long)
    for encoded, kinds_T in labelled_980:
        for layer, ids_TK in enumerate(routers_by_hand(model, processor_980, encoded)):
            for m, kind in enumerate((TEXT, IMAGE, VIDEO)):
                by_hand[layer, m] += torch.bincount(ids_TK[kinds_T == kind].reshape(-1), minlength=E)
    assert torch.equal(counts_980.counts_LME, by_hand)


def test_counts_equal_the_models_tokens_per_expert(counts_980, labelled_980, model, processor_980):
    batch, kinds_BT = collate_samples([e for e, _ in labelled_980], [k for _, k in labelled_980],
                                      processor_980)
    assert int((kinds_BT > 0).sum()) == batch.num_tokens  # padding is exactly segment 0
    model.train()
    try:
        with torch.no_grad():
            out = model(batch.input_ids, batch.pixel_values, batch.pixel_mask, batch.position_ids,
                        batch.segment_ids, image_feature_order=batch.image_feature_order)
    finally:
        model.eval()
    assert torch.equal(out.tokens_per_expert_LE.long(), counts_980.counts_LME.sum(1))


def test_image_and_video_slots_told_apart_at_one_crop_size(tok, shapes):
    processor = make_processor(tok, 490)  # images and frames both 490 px: 16 slots per block
    blocks = BlockKinds(processor)
    sample = parse_record(MIXED, "mixed", MediaResolver(shapes))
    encoded = blocks.processor.encode(sample)
    kinds_T = token_modalities(encoded, blocks.take(encoded), processor.tokenizer.image_id,
                               processor.tokens_per_crop)
    slots = (encoded.input_ids == processor.tokenizer.image_id).nonzero().reshape(-1)
    n = SLOTS[490]
    assert slots.numel() == n * (FRAMES + 2)
    # image, then the video's frames, then the second image
    assert kinds_T[slots].tolist() == [IMAGE] * n + [VIDEO] * n * FRAMES + [IMAGE] * n
    text = torch.ones_like(kinds_T, dtype=torch.bool)
    text[slots] = False
    assert (kinds_T[text] == TEXT).all()
    assert not hasattr(processor.images, "log")  # the caller's processor is left as it was


# -- arithmetic -----------------------------------------------------------------------------------


def hand_counts() -> ExpertCounts:
    # one layer, five experts, top-1: 10 text tokens, 4 image tokens, no video
    text = [6, 2, 2, 0, 0]
    image = [0, 2, 1, 1, 0]
    return ExpertCounts(torch.tensor([[text, image, [0] * 5]]), torch.tensor([10, 4, 0]), top_k=1,
                        samples=3, skipped={"missing_file": 2})


def test_shares_and_specialisation_by_hand():
    rows = expert_rows(hand_counts())
    assert [r["total"] for r in rows] == [6, 4, 3, 1, 0]
    assert [r["text_share"] for r in rows] == pytest.approx([0.6, 0.2, 0.2, 0.0, 0.0])
    assert [r["visual_share"] for r in rows] == pytest.approx([0.0, 0.5, 0.25, 0.25, 0.0])
    assert [r["load_share"] for r in rows] == pytest.approx([6 / 14, 4 / 14, 3 / 14, 1 / 14, 0.0])
    assert [r["load_over_mean"] for r in rows] == pytest.approx([6 / 2.8, 4 / 2.8, 3 / 2.8, 1 / 2.8, 0.0])
    spec = [r["visual_specialisation"] for r in rows]
    # 0 / 0.6; 0.5 / 0.2; 0.25 / 0.2; visual only -> the cap; no token at all -> undefined
    assert spec[:4] == pytest.approx([0.0, 2.5, 1.25, CAP]) and spec[4] != spec[4]
    assert [r["image_specialisation"] for r in rows][:4] == pytest.approx(spec[:4])
    assert all(r["video_specialisation"] != r["video_specialisation"] for r in rows)  # no video: NaN
    text = summary(hand_counts())
    assert "3 samples: 10 text, 4 image, 0 video tokens" in text
    assert "    0           2.14  e3 50.00  e1 2.50  e2 1.25" in text  # max/mean = 6 / 2.8
    assert "missing_file=2" in text


# -- files, plots, command line -------------------------------------------------------------------


def test_report_files_and_plots(model_dir, tok, shapes, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(model_dir), str(shapes / "mix.jsonl"), "--out", str(out), "--tokenizer", str(tok),
                 "--image-size", "490", "--batch-size", "3", "--limit", "4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "4 samples:" in printed and "load max/mean" in printed
    assert sum(line.split()[:1] in (["0"], ["1"]) for line in printed.splitlines()) == L

    with open(out / "experts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COLUMNS)
    assert [(int(r["layer"]), int(r["expert"])) for r in rows] == [(l, e) for l in range(L) for e in range(E)]
    for r in rows:
        assert int(r["text"]) + int(r["image"]) + int(r["video"]) == int(r["total"])
    report = json.loads((out / "experts.json").read_text())
    assert report["samples"] == 4 and report["top_k"] == K and report["image_size"] == 490
    assert len(report["experts"]) == L * E and len(report["layers"]) == L
    tokens = report["tokens"]
    assert tokens["image"] == SLOTS[490] * 2 and tokens["video"] == SLOTS[490] * FRAMES
    for layer in range(L):
        assert sum(r["total"] for r in report["experts"] if r["layer"] == layer) == K * sum(tokens.values())

    for name in ("visual_specialisation.png", "load_histogram.png"):
        with Image.open(out / name) as image:
            image.load()
            assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_plots_are_layer_by_expert(counts_980, tmp_path):
    panels = plot_specialisation(counts_980, tmp_path / "spec.png")
    assert list(panels) == ["visual", "image", "video"]  # the data hold images and videos
    assert all(p.shape == (L, E) for p in panels.values())
    assert plot_load(counts_980, tmp_path / "load.png").shape == (L, E)
    # one panel per ratio: the figure grows with the panels
    one = plot_specialisation(hand_counts(), tmp_path / "one.png")
    assert list(one) == ["visual"]
    with Image.open(tmp_path / "spec.png") as three_panels, Image.open(tmp_path / "one.png") as one_panel:
        assert three_panels.height > 2 * one_panel.height


def test_bad_model_path(shapes, tok, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert main([str(missing), str(shapes / "mix.jsonl"), "--tokenizer", str(tok),
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "error" in err and str(missing) in err and "not found" in err
    not_a_model = tmp_path / "empty_dir"
    not_a_model.mkdir()
    assert main([str(not_a_model), str(shapes / "mix.jsonl"), "--tokenizer", str(tok)]) == 1
    assert str(not_a_model) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_empty_and_unusable_datasets(model_dir, tok, shapes, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main([str(model_dir), str(empty), "--tokenizer", str(tok), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert str(empty) in err and "empty" in err

    bad = shapes / "bad.jsonl"  # beside the media, so only the missing image is wrong
    bad.write_text(json.dumps({"kind": "caption", "images": ["images/nope.png"], "text": "x"}) + "\n")
    assert main([str(model_dir), str(bad), "--tokenizer", str(tok), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "no usable sample" in err and "missing_file=1" in err
    assert not (tmp_path / "o").exists()
