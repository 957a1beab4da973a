"""The data pipeline: tokenizer, chat format and labels against transformers' AriaProcessor, video
layout, packing through the model, webdataset splitting and exact resume, mixing, bad input, tools."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from aria.config import DataConfig, VideoConfig, load_model_config
from aria.data.errors import BadInputPolicy, DataError
from aria.data.loader import StreamSpec, TrainLoader, build_train_loader, iterate_samples
from aria.data.packing import Packer, Piece, collate
from aria.data.processor import CHAT_TEMPLATE, Processor
from aria.data.records import MediaResolver, parse_record
from aria.data.sources import JsonlSource, ShardSource
from aria.data.tokenizer import Tokenizer
from aria.model import IGNORE_INDEX, build_model
from data_tools.make_shapes import make_shapes

ROOT = Path(__file__).resolve().parents[1]
TINY = load_model_config("tiny")
TABLE = {490: 16, 980: 32}  # tiny: 70 px patches -> 49 / 196 patches -> 16 / 32 queries


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, seed=1, train_images=24, test_images=6, train_videos=6, test_videos=3, wds=False,
                workers=1)
    return out


@pytest.fixture(scope="session")
def tok_dir(shapes, tmp_path_factory) -> Path:
    from data_tools.train_tokenizer import train

    corpus = tmp_path_factory.mktemp("corpus") / "extra.txt"
    corpus.write_text("Describe the image.\nWhat is shown here? A cat sits on a red mat. Ünïcode ✓\n")
    return train([str(shapes / "text_train.jsonl"), str(shapes / "chat_train.jsonl"), str(corpus)],
                 tmp_path_factory.mktemp("tok"), vocab_size=600)


@pytest.fixture(scope="session")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


def processor(tok, **kw) -> Processor:
    return Processor(tok, TABLE, **kw)


def gradient(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([255 * x / w, 255 * y / h, rng.integers(0, 255) + 0 * x], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def write_video(path: Path, frames: int = 12, fps: int = 6, size: int = 32) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            arr = np.full((size, size, 3), (i * 20) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------------------
# Tokenizer and processor against transformers
# ---------------------------------------------------------------------------------------------


def test_tokenizer_loads_in_transformers_and_both_backends_agree(tok_dir, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    spm = Tokenizer.load(Path(tok_dir) / "tokenizer.model")
    text = "<|im_start|>user\nWhat colour is it? Ünïcode ✓<fim_prefix><|img|><fim_suffix><|im_end|>\n"
    assert hf(text)["input_ids"] == tok.encode(text) == spm.encode(text)
    assert hf.image_token == "<|img|>" and hf.image_token_id == tok.image_id == 9
    assert (tok.im_start_id, tok.im_end_id, tok.eos_id) == (4, 5, 2)
    assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == "user\nWhat colour is it? Ünïcode ✓\n"


def test_tokenizer_without_aria_tokens_is_refused(tmp_path):
    import sentencepiece as spm

    (tmp_path / "c.txt").write_text("plain text only\n" * 20)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "t"),
                                   vocab_size=15, minloglevel=2)
    with pytest.raises(ValueError, match=r"lacks the Aria special token\(s\) .*<\|img\|>"):
        Tokenizer.load(tmp_path / "t.model")


MESSAGES = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
]


@pytest.fixture(scope="module")
def hf_processor(tok_dir):
    from transformers import AriaProcessor, AutoTokenizer
    from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil

    return AriaProcessor(image_processor=AriaImageProcessorPil(), tokenizer=AutoTokenizer.from_pretrained(tok_dir),
                         chat_template=CHAT_TEMPLATE, size_conversion=TABLE)


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_text_equals_the_hf_template(tok, hf_processor, generation_prompt):
    ours = processor(tok).render(MESSAGES, add_generation_prompt=generation_prompt)
    assert ours == hf_processor.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("side", [490, 980])
@pytest.mark.parametrize("sizes", [[(300, 500), (980, 100)], [(33, 1200), (700, 700)]])
def test_inputs_equal_hf_processor(tok, hf_processor, side, sizes):
    images = [gradient(h, w, i) for i, (h, w) in enumerate(sizes)]
    ours = processor(tok, image_size=side)(MESSAGES, images=images)
    text = hf_processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    ref = hf_processor(text=text, images=images, max_image_size=side, return_tensors="pt")
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(ours["pixel_mask"], ref["pixel_mask"].bool())
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() < 1e-2


@pytest.mark.parametrize("size", [(300, 1500), (1200, 900), (50, 3600), (100, 100)])
def test_split_image_inputs_equal_hf_processor(tok, hf_processor, size):
    image = gradient(*size)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]}]
    ours = processor(tok, image_size=490, split_image=True)(messages, images=[image])
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    ref = hf_processor(text=text, images=[image], max_image_size=490, split_image=True, return_tensors="pt")
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(ours["pixel_mask"], ref["pixel_mask"].bool())
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() < 1e-2


def test_split_crop_counts_are_per_image(tok):
    wide, small = gradient(50, 3600), gradient(64, 64)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]
    out = processor(tok, image_size=490, split_image=True)(messages, images=[wide, small])
    crops = out["pixel_values"].shape[0]
    assert int((out["input_ids"] == tok.image_id).sum()) == crops * 16
    count = processor(tok, image_size=490, split_image=True).images.num_crops
    assert crops == count(50, 3600) + count(64, 64) and count(50, 3600) != count(64, 64)


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


def supervised_text(tok: Tokenizer, encoded) -> str:
    """The tokens that are someone's target, in order."""
    ids = encoded.input_ids.tolist()
    positions = [t + 1 for t, y in enumerate(encoded.targets.tolist()) if y != IGNORE_INDEX]
    assert all(encoded.targets[t - 1] == ids[t] for t in positions)
    return tok.decode([ids[t] for t in positions])


def encode_record(proc: Processor, record: dict, base: Path):
    return proc.encode(parse_record(record, "test", MediaResolver(base)))


def test_only_assistant_turns_are_supervised(tok, shapes):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Direction?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "moves left"}]}],
        "images": ["images/train_000000.png"], "video": {"path": "videos/train_000000.mp4", "num_frames": 3}}
    encoded = encode_record(processor(tok, image_size=490), record, shapes)
    assert supervised_text(tok, encoded) == "red<|im_end|>\nmoves left<|im_end|>\n"
    assert encoded.num_images == 1 and encoded.num_frames == 3 and encoded.num_crops == 4
    assert int((encoded.input_ids == tok.image_id).sum()) == 4 * 16
    assert encoded.targets[-1] == IGNORE_INDEX


def test_documents_supervise_text_and_end_of_text_not_images(tok, shapes):
    record = {"kind": "caption", "images": ["images/train_000001.png"], "text": "A red circle."}
    encoded = encode_record(processor(tok, image_size=490), record, shapes)
    assert supervised_text(tok, encoded) == "A red circle.</s>"
    assert encoded.input_ids[0] == tok.fim_prefix_id and encoded.input_ids[-1] == tok.eos_id


def test_video_frames_with_timestamps(tok, shapes):
    record = {"messages": [{"role": "user", "content": [{"type": "video"}]},
                           {"role": "assistant", "content": "up"}],
              "video": {"path": "videos/train_000001.mp4", "fps": 4, "max_frames": 16}}
    proc = processor(tok, image_size=490, video=VideoConfig(timestamps=True))
    encoded = encode_record(proc, record, shapes)
    text = tok.decode(encoded.input_ids.tolist())
    # 8 frames at 8 fps = 1 s; 4 fps sampling takes t = 0, .25, .5, .75 -> all "[00:00]"
    assert encoded.num_frames == 4 and text.count("[00:00]<fim_prefix>") == 4
    assert text.count("<fim_suffix>\n") == 4


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def encoded_samples(tok, shapes, n: int, split: str = "train"):
    proc = processor(tok, image_size=490)
    return [e for _, e in iterate_samples(str(shapes / f"chat_{split}.jsonl"), proc, split)][:n], proc


def test_packing_keeps_image_blocks_whole_and_restarts_positions(tok, shapes):
    samples, proc = encoded_samples(tok, shapes, 12)
    packer, rows = Packer(seq_len=100), []
    for s in samples:
        for piece in packer.pieces(s, None):
            closed = packer.add(piece)
            rows += [closed] if closed else []
    rows.append(packer.row)
    batch = collate(rows, 100, tok.pad_id, proc.tokens_per_crop)
    assert sum(len(r.pieces) for r in rows) == 12 and batch.num_samples == 12
    for b in range(len(rows)):
        for seg in range(1, int(batch.segment_ids[b].max()) + 1):
            where = (batch.segment_ids[b] == seg).nonzero().flatten()
            ids = batch.input_ids[b, where]
            assert batch.position_ids[b, where].tolist() == list(range(len(where)))
            starts = (ids == tok.fim_prefix_id).nonzero().flatten().tolist()
            ends = (ids == tok.fim_suffix_id).nonzero().flatten().tolist()
            assert len(starts) == len(ends) and all(e - s - 1 == 16 for s, e in zip(starts, ends))
    assert int((batch.input_ids == tok.image_id).sum()) == batch.pixel_values.shape[0] * 16


def test_packed_row_gives_each_sample_its_own_loss(tok, shapes):
    samples, proc = encoded_samples(tok, shapes, 3)
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    packer = Packer(seq_len=sum(len(s) for s in samples) + 5)
    for s in samples:
        assert packer.add(Piece(s, None)) is None
    batch = collate([packer.row], packer.seq_len, tok.pad_id, proc.tokens_per_crop)
    with torch.no_grad():
        logits = model(batch.input_ids, batch.pixel_values, batch.pixel_mask, position_ids=batch.position_ids,
                       segment_ids=batch.segment_ids).logits[0]
        ce = F.cross_entropy(logits, batch.targets[0], ignore_index=IGNORE_INDEX, reduction="none")
        for seg, s in enumerate(samples, start=1):
            pv = torch.cat([c[0] for c in s.crops])
            pm = torch.cat([c[1] for c in s.crops])
            alone = model(s.input_ids[None], pv, pm, targets=s.targets[None]).loss_sum
            packed = ce[batch.segment_ids[0] == seg].sum()
            assert abs(packed.item() - alone.item()) < 1e-4 * max(1.0, alone.item())


def test_too_long_is_skipped_but_text_documents_are_split(tok, shapes):
    samples, _ = encoded_samples(tok, shapes, 1)
    with pytest.raises(DataError, match="longer than the row") as err:
        Packer(seq_len=20).pieces(samples[0], None)
    assert err.value.kind == "too_long"
    doc = processor(tok).encode(parse_record({"kind": "text", "text": "word " * 50}, "d", MediaResolver()))
    pieces = Packer(seq_len=16).pieces(doc, None)
    assert [len(p.sample) for p in pieces[:-1]] == [16] * (len(pieces) - 1)
    assert torch.equal(torch.cat([p.sample.input_ids for p in pieces]), doc.input_ids)


def test_images_and_video_frames_of_two_sizes_share_a_batch(tok, shapes):
    proc = processor(tok, image_size=980, video=VideoConfig(num_frames=2, image_size=490))
    record = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "image"}]},
                           {"role": "assistant", "content": "ok"}],
              "images": ["images/train_000002.png", "images/train_000003.png"], "video": {"path": "videos/train_000002.mp4"}}
    encoded = encode_record(proc, record, shapes)
    batch = collate([type(Packer(1).row)([Piece(encoded, None)], len(encoded))], len(encoded) + 3, tok.pad_id, TABLE)
    assert [pv.shape[-1] for pv in batch.pixel_values] == [490, 980]
    assert int((batch.input_ids == tok.image_id).sum()) == 2 * 32 + 2 * 16
    out = build_model(TINY).eval()(**{k: v for k, v in batch.model_inputs().items() if k != "targets"})
    assert torch.isfinite(out.logits).all()


# ---------------------------------------------------------------------------------------------
# Sources: splitting across ranks and workers, resume, mixing
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    path.write_text("".join(json.dumps({"kind": "text", "text": f"document number {i} " * (1 + i % 5)}) + "\n"
                            for i in range(60)))
    return path


@pytest.fixture(scope="module")
def text_shards(text_jsonl, tmp_path_factory) -> Path:
    from data_tools.jsonl_to_wds import convert

    out = tmp_path_factory.mktemp("wds")
    convert(text_jsonl, out, "docs", samples_per_shard=7, log=lambda _: None)
    return out


def one_epoch(source, slot: int, slots: int) -> list[str]:
    seen = []
    for raw, position in source.iterate(slot, slots, seed=3):
        if position["epoch"] > 0:
            break
        seen.append(raw.record["text"])
    return seen


@pytest.mark.parametrize("kind", ["jsonl", "shards", "few_shards"])
def test_slots_see_disjoint_samples_covering_the_epoch(text_jsonl, text_shards, tmp_path, kind):
    if kind == "jsonl":
        source = JsonlSource(text_jsonl)
    elif kind == "shards":
        source = ShardSource(text_shards)  # 9 shards for 4 slots: whole shards per slot
    else:
        source = ShardSource(str(text_shards / "docs-00000[0-2].tar"))  # 3 shards < 4 slots
    per_slot = [one_epoch(source, slot, 4) for slot in range(4)]  # 2 ranks x 2 workers
    everything = [t for slot in per_slot for t in slot]
    expected = 60 if kind != "few_shards" else 21
    assert len(everything) == len(set(everything)) == expected
    assert all(per_slot)


def loader(path, rank: int, world: int, workers: int, tok, seed: int = 0) -> TrainLoader:
    spec = StreamSpec([(str(path), 1.0)], processor(tok), seq_len=24, batch_size=2, rank=rank,
                      world_size=world, seed=seed)
    return TrainLoader(spec, workers)


@pytest.mark.parametrize("dataset", ["jsonl", "shards"])
def test_restored_loader_continues_exactly(text_jsonl, text_shards, tok, dataset):
    path = text_jsonl if dataset == "jsonl" else text_shards
    first = loader(path, rank=1, world=2, workers=2, tok=tok)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    following = [next(it).input_ids for _ in range(6)]
    it.close()
    resumed = loader(path, rank=1, world=2, workers=2, tok=tok)
    resumed.load_state_dict(state)
    it = iter(resumed)
    again = [next(it).input_ids for _ in range(6)]
    it.close()
    assert all(torch.equal(a, b) for a, b in zip(following, again))
    wrong = loader(path, rank=1, world=2, workers=1, tok=tok)
    with pytest.raises(ValueError, match="same world size and data.num_workers"):
        wrong.load_state_dict(state)


def test_mixing_draws_by_weight_and_is_seeded_and_resumable(text_jsonl, tmp_path):
    from aria.data.loader import Mixture

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"kind": "text", "text": f"other {i}"}) + "\n" for i in range(40)))
    sources = [JsonlSource(text_jsonl), JsonlSource(other)]

    def draws(seed, n=400, state=None):
        mix = Mixture(sources, [3.0, 1.0], slot=0, num_slots=1, seed=seed, state=state)
        out = [mix.next()[0].record["text"] for _ in range(n)]
        return out, mix.state()

    a, _ = draws(0)
    share = sum(t.startswith("other") for t in a) / len(a)
    assert 0.2 < share < 0.3  # weight 1 of 4
    assert a == draws(0)[0] and a != draws(1)[0]
    head, state = draws(0, n=150)
    tail, _ = draws(0, n=250, state=json.loads(json.dumps(state)))
    assert head + tail == a


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_dataset(shapes, tmp_path_factory) -> tuple[Path, Counter]:
    d = tmp_path_factory.mktemp("bad")
    (d / "images").mkdir()
    Image.open(shapes / "images/train_000000.png").save(d / "images/good.png")
    raw = (d / "images/good.png").read_bytes()
    (d / "images/truncated.png").write_bytes(raw[: len(raw) // 2])
    (d / "images/not_an_image.png").write_text("hello")
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    (d.parent / "outside.png").write_bytes(raw)
    good = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                         {"role": "assistant", "content": "red"}], "images": ["images/good.png"]}

    def with_image(path):
        return {**good, "images": [path]}

    lines = [
        (json.dumps(good), None),
        ('{"messages": [', "bad_json"),
        (json.dumps({**good, "messages": [{"role": "robot", "content": "hi"}, good["messages"][1]]}), "unknown_role"),
        (json.dumps({**good, "messages": [{"role": "user", "content": [{"type": "audio"}]}, good["messages"][1]]}),
         "unknown_content_type"),
        (json.dumps({**good, "images": []}), "image_count_mismatch"),
        (json.dumps(with_image("images/missing.png")), "missing_file"),
        (json.dumps(with_image("images/truncated.png")), "bad_image"),
        (json.dumps(with_image("images/not_an_image.png")), "bad_image"),
        (json.dumps({"messages": [{"role": "user", "content": [{"type": "video"}]}, good["messages"][1]],
                     "video": {"path": "broken.mp4"}}), "bad_video"),
        (json.dumps(with_image("../outside.png")), "path_escape"),
        (json.dumps({"messages": [{"role": "user", "content": "<|img|> hi"}, good["messages"][1]]}),
         "special_token_in_text"),
        (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no_assistant"),
        (json.dumps({"kind": "caption", "images": ["images/good.png"], "text": "long " * 300}), "too_long"),
        (json.dumps(good), None),
    ]
    (d / "train.jsonl").write_text("\n".join(line for line, _ in lines) + "\n")
    return d, Counter(kind for _, kind in lines if kind)


def test_every_bad_record_is_skipped_and_counted_with_its_line(tok, bad_dataset):
    d, expected = bad_dataset
    policy = BadInputPolicy(keep=True)
    proc = processor(tok, image_size=490)
    good = 0
    for _, encoded in iterate_samples(str(d), proc, "train", policy=policy):
        try:
            Packer(seq_len=256).pieces(encoded, None)
            good += 1
        except DataError as err:
            policy.handle(err)
    assert good == 2
    assert policy.counts == expected
    lines = sorted(int(str(e).split(":")[1]) for e in policy.errors if str(e).startswith(str(d)))
    assert lines == list(range(2, 14))


def test_strict_mode_raises_at_the_first_bad_record(tok, bad_dataset):
    d, _ = bad_dataset
    with pytest.raises(DataError, match=r"train\.jsonl:2: malformed JSON"):
        for _ in iterate_samples(str(d), processor(tok, image_size=490), "train", strict=True):
            pass


def test_outside_media_is_allowed_on_request(tok, bad_dataset):
    d, _ = bad_dataset
    record = {"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}],
              "images": ["../outside.png"]}
    with pytest.raises(DataError, match="outside the dataset directory"):
        parse_record(record, "r", MediaResolver(d))
    assert parse_record(record, "r", MediaResolver(d, allow_outside=True)).media[0].path.is_file()


def test_empty_and_all_bad_datasets_are_errors(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        build_train_loader(DataConfig(train=str(tmp_path / "empty.jsonl"), num_workers=0), processor(tok), 64, 1)
    (tmp_path / "bad.jsonl").write_text("{oops\n" * 5)
    batches = iter(build_train_loader(DataConfig(train=str(tmp_path / "bad.jsonl"), num_workers=0),
                                      processor(tok), 64, 1))
    with pytest.raises(RuntimeError, match="no usable sample in a whole epoch.*bad_json"):
        next(batches)


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_validate_reports_bad_lines_and_statistics(tok_dir, bad_dataset, shapes):
    d, expected = bad_dataset
    done = run_tool("-m", "data_tools.validate", str(d), "--tokenizer", str(tok_dir), "--image-size", "490",
                    "--seq-len", "256")
    assert done.returncode == 1
    assert f"{sum(expected.values())} bad record(s)" in done.stdout
    assert f"{d / 'train.jsonl'}:5: 0 image item(s)" not in done.stdout  # messages name counts, not zero
    assert f"{d / 'train.jsonl'}:5: 1 image item(s) in the content but 0 path(s)" in done.stdout
    done = run_tool("-m", "data_tools.validate", str(shapes / "chat_test.jsonl"), "--tokenizer", str(tok_dir),
                    "--image-size", "490")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[2:] if line[:1].isalpha()}
    assert rows["chat:image"][0] == "24" and rows["chat:video"][0] == "3"  # 6 images x 4 questions, 3 videos
    assert rows["chat:video"][5] == str(3 * 8)  # frames


def test_text_and_jsonl_to_wds_tools(tmp_path, shapes, tok):
    (tmp_path / "a.txt").write_text("first document\n\nsecond\nline\n")
    done = run_tool("-m", "data_tools.text_to_wds", str(tmp_path / "a.txt"), "--out", str(tmp_path / "t"),
                    "--documents", "paragraphs")
    assert done.returncode == 0, done.stderr
    texts = [r.record["text"] for r in ShardSource(tmp_path / "t").iterate_once()]
    assert texts == ["first document", "second\nline"]
    done = run_tool("-m", "data_tools.jsonl_to_wds", str(shapes / "chat_test.jsonl"), "--out", str(tmp_path / "w"),
                    "--samples-per-shard", "10")
    assert done.returncode == 0, done.stderr
    from_shards = [e.input_ids for _, e in iterate_samples(str(tmp_path / "w"), processor(tok, image_size=490))]
    from_jsonl = [e.input_ids for _, e in iterate_samples(str(shapes / "chat_test.jsonl"), processor(tok, image_size=490))]
    assert len(from_shards) == len(from_jsonl) == 27
    assert all(torch.equal(a, b) for a, b in zip(from_shards, from_jsonl))


def test_bench_data_runs():
    done = run_tool(str(ROOT / "scripts" / "bench_data.py"), "--quick")
    assert done.returncode == 0, done.stderr[-3000:]
    for header in ("== images", "== video", "== loader", "ours/HF", "frames/s", "samples/s"):
        assert header in done.stdout
