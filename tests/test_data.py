"""The data pipeline: tokenizer, chat format and labels against transformers' AriaProcessor, video
layout, packing through the model, webdataset splitting and exact resume, mixing, bad input (every
case through the loader, default and strict), tools."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from aria.config import DataConfig, VideoConfig, load_model_config
import aria.data.loader as loader_module
import aria.data.sources as sources_module
from aria.data.errors import BadInputPolicy, DataError
from aria.data.loader import (StreamSpec, TrainLoader, build_train_loader, eval_batches, iterate_samples,
                              read_record)
from aria.data.packing import Packer, Piece, Row, collate
from aria.data.processor import CHAT_TEMPLATE, Processor
from aria.data.records import MediaResolver, parse_record
from aria.data.sources import JsonlSource, ShardSource, open_source
from aria.data.tokenizer import Tokenizer
from aria.model import IGNORE_INDEX, build_model
from data_tools.make_shapes import make_shapes

ROOT = Path(__file__).resolve().parents[1]
TINY = load_model_config("tiny")
TABLE = {490: 16, 980: 32}  # tiny: 70 px patches -> 49 / 196 patches -> 16 / 32 queries
# Pixels against transformers: measured at most 1.2e-7 (float32 rounding); one intensity level is
# 2/255 = 7.8e-3, so an off-by-one pixel fails.
PIXEL_TOL = 1e-5


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
        container.start_encoding()  # writes the header even when there are no frames
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


def test_trained_tokenizer_holds_each_chat_role_in_one_token(tok):
    # the chat template writes "<|im_start|>{role}\n" before every turn: a role split into
    # letters would cost every turn of every record several tokens
    header = len(tok.encode("<|im_start|>\n"))
    for role in ("user", "assistant"):
        assert len(tok.encode(f"<|im_start|>{role}\n")) == header + 1, role


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


def T(text: str) -> dict:
    return {"type": "text", "text": text}


IMAGE = {"type": "image"}
CHATS = {
    "system_multi_turn_images": MESSAGES,
    "string_content": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                       {"role": "user", "content": "Bye"}],
    "string_and_list_mixed": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": [T("What is shown here?")]},
                              {"role": "assistant", "content": "A cat."}],
    "images_start_middle_end": [{"role": "user", "content": [IMAGE, T("left "), IMAGE, T(" right"), IMAGE]}],
    "empty_text_items": [{"role": "system", "content": [T("")]},
                         {"role": "user", "content": [T(""), IMAGE, T("")]},
                         {"role": "assistant", "content": ""}],
    "unicode_and_whitespace": [{"role": "user", "content": "  Ünïcode ✓ ψ \t tabs\n\nnew lines  "},
                               {"role": "assistant", "content": [T(" é "), T("\n")]},
                               {"role": "user", "content": [T("\n"), IMAGE, T(" \u00a0 ")]}],
    "assistant_with_image": [{"role": "user", "content": "Draw it"},
                             {"role": "assistant", "content": [T("Here:"), IMAGE]}],
}


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("name", list(CHATS))
def test_chat_template_parity_through_the_real_path(tok, hf_processor, name, generation_prompt):
    messages = CHATS[name]
    n = sum(isinstance(m["content"], list) and sum(i["type"] == "image" for i in m["content"]) for m in messages)
    images = [gradient(40 + 30 * i, 60 + 20 * i, i) for i in range(n)]
    ours = processor(tok, image_size=490)(messages, images=images, add_generation_prompt=generation_prompt)
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    ref = hf_processor(text=text, images=images or None, max_image_size=490, return_tensors="pt")
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    expanded = text.replace("<fim_prefix><|img|><fim_suffix>", "<fim_prefix>" + "<|img|>" * 16 + "<fim_suffix>")
    assert tok.decode(ours["input_ids"][0].tolist()) == expanded


def test_transparent_in_memory_image_is_composited_like_hf(tok, hf_processor):
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[..., 0] = 200  # red under the transparent half too: dropping alpha would show it
    rgba[30:, :, 3] = 255
    messages = [{"role": "user", "content": [IMAGE, T("Colour?")]}]
    for image in (Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba[..., 2:], "LA")):
        ours = processor(tok, image_size=490)(messages, images=[image])
        text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
        ref = hf_processor(text=text, images=[image], max_image_size=490, return_tensors="pt")
        assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() < PIXEL_TOL


@pytest.mark.parametrize("side", [490, 980])
@pytest.mark.parametrize("sizes", [[(300, 500), (980, 100)], [(33, 1200), (700, 700)]])
def test_inputs_equal_hf_processor(tok, hf_processor, side, sizes):
    images = [gradient(h, w, i) for i, (h, w) in enumerate(sizes)]
    ours = processor(tok, image_size=side)(MESSAGES, images=images)
    text = hf_processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    ref = hf_processor(text=text, images=images, max_image_size=side, return_tensors="pt")
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(ours["pixel_mask"], ref["pixel_mask"].bool())
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() < PIXEL_TOL


@pytest.mark.parametrize("size", [(300, 1500), (1200, 900), (50, 3600), (100, 100)])
def test_split_image_inputs_equal_hf_processor(tok, hf_processor, size):
    image = gradient(*size)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]}]
    ours = processor(tok, image_size=490, split_image=True)(messages, images=[image])
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    ref = hf_processor(text=text, images=[image], max_image_size=490, split_image=True, return_tensors="pt")
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(ours["pixel_mask"], ref["pixel_mask"].bool())
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() < PIXEL_TOL


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


@pytest.fixture(scope="session", params=["tokenizer.json", "tokenizer.model"])
def any_tok(request, tok_dir) -> Tokenizer:
    """The test tokenizer through either backend."""
    return Tokenizer.load(tok_dir if request.param == "tokenizer.json" else Path(tok_dir) / "tokenizer.model")


def test_only_assistant_turns_are_supervised(any_tok, shapes):
    tok = any_tok
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
    assert encoded.targets[-1] == IGNORE_INDEX and not encoded.document


def test_non_ascii_answer_start_is_supervised_with_both_backends(any_tok):
    # ψ, é and ✓ are not in the test vocabulary: they become byte-fallback tokens, and the first
    # byte of the answer must be supervised like the others.
    tok = any_tok
    record = {"messages": [{"role": "system", "content": "Réponds."}, {"role": "user", "content": "Quel symbole ?"},
                           {"role": "assistant", "content": "ψ est « psi » ✓"},
                           {"role": "user", "content": "Et ?"},
                           {"role": "assistant", "content": [{"type": "text", "text": "éà"}]}]}
    encoded = processor(tok).encode(parse_record(record, "r", MediaResolver()))
    assert supervised_text(tok, encoded) == "ψ est « psi » ✓<|im_end|>\néà<|im_end|>\n"
    answer_ids = tok.encode("ψ est « psi » ✓<|im_end|>\n") + tok.encode("éà<|im_end|>\n")
    assert int((encoded.targets != IGNORE_INDEX).sum()) == len(answer_ids)


@pytest.mark.parametrize("token", ["</s>", "<pad>", "<s>", "<unk>", "<reserved_0>", "<|img|>", "<|im_end|>"])
def test_special_token_strings_in_text_are_refused(any_tok, token):
    record = {"messages": [{"role": "user", "content": "fine"},
                           {"role": "assistant", "content": [{"type": "text", "text": f"a {token} b"}]}]}
    with pytest.raises(DataError, match=r"r: 'messages\[1\]\.content\[0\]\.text' contains the special token") as err:
        processor(any_tok).encode(parse_record(record, "r", MediaResolver()))
    assert err.value.kind == "special_token_in_text" and token in str(err.value)
    ordinary = {"messages": [{"role": "user", "content": "a\nb <b> </ s>"}, {"role": "assistant", "content": "ok"}]}
    processor(any_tok).encode(parse_record(ordinary, "r", MediaResolver()))


def test_uniform_video_sampling_is_capped_by_max_frames(tok, shapes):
    record = {"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "up"}],
              "video": {"path": "videos/train_000001.mp4", "num_frames": 8, "max_frames": 3}}
    assert encode_record(processor(tok, image_size=490), record, shapes).num_frames == 3
    del record["video"]["max_frames"]
    proc = processor(tok, image_size=490, video=VideoConfig(num_frames=8, max_frames=2))
    assert encode_record(proc, record, shapes).num_frames == 2


def test_too_long_media_sample_is_refused_before_decoding(tok, shapes, tmp_path):
    raw = (shapes / "images/train_000000.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])  # header intact, pixels truncated
    record = {"kind": "caption", "images": ["cut.png"], "text": "A red circle."}
    sample = parse_record(record, "r", MediaResolver(tmp_path))
    with pytest.raises(DataError, match="longer than the row") as err:
        processor(tok, image_size=490).encode(sample, max_tokens=10)
    assert err.value.kind == "too_long"  # not bad_image: the pixels were never decoded
    with pytest.raises(DataError) as err:
        processor(tok, image_size=490).encode(sample, max_tokens=100)
    assert err.value.kind == "bad_image"


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
    assert proc.encode(parse_record(record, "r", MediaResolver(shapes)), max_tokens=len(encoded)).num_frames == 4
    text = tok.decode(encoded.input_ids.tolist())
    # 8 frames at 8 fps = 1 s; 4 fps sampling takes t = 0, .25, .5, .75 -> all "[00:00]"
    assert encoded.num_frames == 4 and text.count("[00:00]<fim_prefix>") == 4
    assert text.count("<fim_suffix>\n") == 4


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def encoded_samples(tok, shapes, n: int, split: str = "train"):
    proc = processor(tok, image_size=490)
    return [e for _, e in itertools.islice(iterate_samples(str(shapes / f"chat_{split}.jsonl"), proc, split), n)], proc


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


@pytest.mark.parametrize("level", ["tokens", "patches"])
def test_image_token_cache_leaves_seen_media_undecoded_and_embeds_the_same(tok, shapes, tmp_path, level):
    """With the model's image-token cache as the processor's ``cached_media``, media already seen
    come without pixels, and their <|img|> slots get the tokens of their first pass (level
    "tokens"), or the vision layers and projector over the patch embeddings of their first pass
    (level "patches"): a packed batch of images (each asked several questions, one of them wide, so
    part of its crop is padding) and videos embeds exactly as without the cache, when every block is
    new, when every block is cached, and when some are."""
    from aria.model.aria import ImageTokenCache

    samples = [s for s, _ in itertools.islice(iterate_samples(str(shapes / "chat_train.jsonl"),
                                                              processor(tok, image_size=490), "train"), 12)]
    videos = {s.media[0].path: s for s, e in iterate_samples(str(shapes / "chat_train.jsonl"),
                                                             processor(tok, image_size=490), "train") if e.num_frames}
    samples += list(videos.values())[:2]  # two videos of 8 frames
    record = json.loads((shapes / "chat_train.jsonl").read_text().splitlines()[0])
    Image.open(shapes / record["images"][0]).crop((0, 0, 490, 280)).save(tmp_path / "wide.png")
    (tmp_path / "wide.jsonl").write_text(json.dumps({**record, "images": ["wide.png"]}) + "\n")
    samples += [s for s, _ in iterate_samples(str(tmp_path / "wide.jsonl"), processor(tok, image_size=490), "train")]
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    plain, cached = processor(tok, image_size=490), processor(tok, image_size=490)
    model.image_token_cache = cached.cached_media = ImageTokenCache(2**30, level)

    def batch(proc, chosen=samples):
        encoded = [proc.encode(s) for s in chosen]
        row = Row([Piece(e, None) for e in encoded], sum(len(e) for e in encoded))
        return collate([row], row.length, tok.pad_id, proc.tokens_per_crop)

    def embed(b):
        with torch.no_grad():
            return model.embed(b.input_ids, b.pixel_values, b.pixel_mask, b.image_feature_order,
                               image_blocks=b.image_blocks)

    reference, first = batch(plain), batch(cached)
    assert reference.image_blocks is None and reference.num_frames == 16
    assert not bool(reference.pixel_mask.all())  # the wide image's padding
    frames = [key for key, _, _ in first.image_blocks if key.startswith("video:")]
    assert len(first.image_blocks) == 13 + 16 and len(frames) == len(set(frames)) == 16
    assert not any(c for _, _, c in first.image_blocks) and torch.equal(first.pixel_values, reference.pixel_values)
    assert torch.equal(embed(first), embed(reference))
    assert len(model.image_token_cache) == len({key for key, _, _ in first.image_blocks}) < 29  # repeats kept once
    second = batch(cached)
    assert second.pixel_values is None and all(c for _, _, c in second.image_blocks)
    assert [(k, n) for k, n, _ in second.image_blocks] == [(k, n) for k, n, _ in first.image_blocks]
    assert torch.equal(embed(second), embed(reference))
    assert model.image_token_cache.reads == 29
    # some blocks cached, the others new, in one batch: the first video and the wide image seen before
    model.image_token_cache = cached.cached_media = ImageTokenCache(2**30, level)
    embed(batch(cached, [samples[12], samples[14]]))
    mixed = batch(cached)
    assert 0 < sum(c for _, _, c in mixed.image_blocks) < len(mixed.image_blocks)
    assert torch.equal(embed(mixed), embed(reference))
    model.image_token_cache = None  # a batch that leans on a cache the model does not have is refused
    with pytest.raises(ValueError, match="no image-token cache"):
        embed(second)


def test_kept_media_are_planned_without_opening_their_files(tok, shapes, tmp_path):
    """Once the image-token cache holds every block of a file's media, its header is remembered:
    the image and the video then encode without their files (the same tokens, every block cached);
    media the cache does not hold, or a processor without a cache, still read theirs."""
    records = [json.loads(line) for line in (shapes / "chat_train.jsonl").read_text().splitlines()]
    image = next(r for r in records if "images" in r)
    video = next(r for r in records if "video" in r)
    for name in (image["images"][0], video["video"]["path"]):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes((shapes / name).read_bytes())
    samples = [parse_record(r, f"d.jsonl:{i}", MediaResolver(tmp_path)) for i, r in enumerate((image, video))]
    kept: set[str] = set()
    cached, plain = processor(tok, image_size=490), processor(tok, image_size=490)
    cached.cached_media = kept

    def encode(proc):
        return [proc.encode(s) for s in samples]

    first = encode(cached)
    assert all(e.crops and not any(c for _, _, c in e.image_blocks) for e in first)
    assert not cached._headers  # nothing kept yet: nothing remembered
    kept.update(key for e in first for key, _, _ in e.image_blocks)
    assert len(kept) == 1 + first[1].num_frames > 2
    encode(cached)  # every block kept: the headers are remembered
    for name in (image["images"][0], video["video"]["path"]):
        (tmp_path / name).rename(tmp_path / f"{name}.away")
    without_files = encode(cached)
    for before, after in zip(first, without_files):
        assert not after.crops and all(c for _, _, c in after.image_blocks)
        assert torch.equal(after.input_ids, before.input_ids) and torch.equal(after.targets, before.targets)
        assert [(k, n) for k, n, _ in after.image_blocks] == [(k, n) for k, n, _ in before.image_blocks]
    kept.discard(f"image:{tmp_path / image['images'][0]}")  # the cache dropped the image: it is read again
    with pytest.raises(DataError, match="does not exist"):
        cached.encode(samples[0])
    kept.discard(next(k for k in kept if k.startswith("video:")))  # and one video frame: the video is
    with pytest.raises(DataError, match="does not exist"):  # opened again for its frames
        cached.encode(samples[1])
    with pytest.raises(DataError, match="does not exist"):
        encode(plain)


def test_too_long_is_skipped_but_text_documents_are_split(tok, shapes):
    samples, _ = encoded_samples(tok, shapes, 1)
    with pytest.raises(DataError, match="longer than the row") as err:
        Packer(seq_len=20).pieces(samples[0], None)
    assert err.value.kind == "too_long"
    doc = processor(tok).encode(parse_record({"kind": "text", "text": "word " * 50}, "d", MediaResolver()))
    pieces = Packer(seq_len=16).pieces(doc, None)
    assert [len(p.sample) for p in pieces[:-1]] == [16] * (len(pieces) - 1)
    assert torch.equal(torch.cat([p.sample.input_ids for p in pieces]), doc.input_ids)
    assert all(p.sample.document for p in pieces)


def test_text_only_conversation_is_never_split(tok):
    # A cut conversation could put an answer in a row without its question.
    chat = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "yes"}]}
    encoded = processor(tok).encode(parse_record(chat, "c", MediaResolver()))
    assert not encoded.crops and not encoded.document
    with pytest.raises(DataError, match="longer than the row") as err:
        Packer(seq_len=16).pieces(encoded, None)
    assert err.value.kind == "too_long" and err.value.where == "c"


def test_images_and_video_frames_of_two_sizes_share_a_batch(tok, shapes):
    proc = processor(tok, image_size=980, video=VideoConfig(num_frames=2, image_size=490))
    record = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "image"}]},
                           {"role": "assistant", "content": "ok"}],
              "images": ["images/train_000002.png", "images/train_000003.png"],
              "video": {"path": "videos/train_000002.mp4"}}
    encoded = encode_record(proc, record, shapes)
    batch = collate([Row([Piece(encoded, None)], len(encoded))], len(encoded) + 3, tok.pad_id, TABLE)
    assert [pv.shape[-1] for pv in batch.pixel_values] == [490, 980]
    assert int((batch.input_ids == tok.image_id).sum()) == 2 * 32 + 2 * 16
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    with torch.no_grad():
        embeds_BTD = model.embed(batch.input_ids, batch.pixel_values, batch.pixel_mask, batch.image_feature_order)
        # each <|img|> slot, in token order, holds the features of its own crop computed alone
        per_crop = torch.cat([model.image_features(pv, pm).flatten(0, 1) for pv, pm in encoded.crops])
        assert [pv.shape[-1] for pv, _ in encoded.crops] == [980, 490, 490, 980]
        torch.testing.assert_close(embeds_BTD[batch.input_ids == tok.image_id], per_crop)
        out = model(**{k: v for k, v in batch.model_inputs().items() if k != "targets"})
    assert torch.isfinite(out.logits).all()


# ---------------------------------------------------------------------------------------------
# Sources: splitting into streams, resume, mixing
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


def one_epoch(source, stream: int, streams: int, seed: int = 3) -> list[str]:
    seen = []
    for read in source.iterate(stream, streams, seed=seed):
        if read.epoch > 0:
            break
        seen.append(read.raw.where)
    return seen


def dataset_path(kind: str, text_jsonl: Path, text_shards: Path) -> str:
    return {"jsonl": str(text_jsonl), "shards": str(text_shards),  # 9 shards for 4 streams: whole shards
            "few_shards": str(text_shards / "docs-00000[0-2].tar")}[kind]  # 3 shards of 7 < 4 streams


@pytest.mark.parametrize("kind", ["jsonl", "shards", "few_shards"])
def test_streams_see_disjoint_samples_covering_the_epoch(text_jsonl, text_shards, kind):
    source = open_source(dataset_path(kind, text_jsonl, text_shards))
    per_stream = [one_epoch(source, stream, 4) for stream in range(4)]
    everything = [t for stream in per_stream for t in stream]
    expected = 60 if kind != "few_shards" else 21
    assert len(everything) == len(set(everything)) == expected
    assert all(per_stream)
    if kind != "shards":  # a running index over the epoch: shares differ by at most one
        assert max(map(len, per_stream)) - min(map(len, per_stream)) <= 1


def test_few_shard_mode_parses_only_the_streams_own_samples(text_shards, monkeypatch):
    calls = []
    real = sources_module.parse_json_line
    monkeypatch.setattr(sources_module, "parse_json_line",
                        lambda line, where: (calls.append(where), real(line, where))[1])
    source = ShardSource(str(text_shards / "docs-00000[0-2].tar"))
    for stream in range(4):
        calls.clear()
        mine = one_epoch(source, stream, 4)
        assert len(calls) == len(mine) + 1  # its own samples, and the first of the next epoch


def loader(datasets, rank: int, world: int, workers: int, tok, seed: int = 3, seq_len: int = 128,
           batch_size: int = 2, proc: Processor | None = None, strict: bool = False,
           shuffle_buffer: int = 0) -> TrainLoader:
    datasets = [(str(datasets), 1.0)] if isinstance(datasets, (str, Path)) else datasets
    spec = StreamSpec(datasets, proc or processor(tok, image_size=490), seq_len=seq_len, batch_size=batch_size,
                      rank=rank, world_size=world, seed=seed, strict=strict, shuffle_buffer=shuffle_buffer)
    return TrainLoader(spec, workers)


def take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("kind", ["jsonl", "shards", "few_shards"])
def test_ranks_and_workers_through_the_loader_are_disjoint_and_cover_the_epoch(text_jsonl, text_shards, tok, kind):
    """2 ranks x 2 workers (4 streams) through TrainLoader, each rank stopped after 3 batches and
    resumed (so its workers' turns are rotated): every stream's epoch share is its own, rank r reads
    streams r and r + 2 only, and together they cover the epoch."""
    path = dataset_path(kind, text_jsonl, text_shards)
    shares = [len(one_epoch(open_source(path), stream, 4)) for stream in range(4)]
    seen: dict[int, list[str]] = {stream: [] for stream in range(4)}

    def record(batches, rank):
        for batch in batches:
            assert batch.state["stream"] % 2 == rank
            seen[batch.state["stream"]].extend(batch.where)

    for rank in (0, 1):
        first = loader(path, rank, 2, 2, tok)
        it = iter(first)
        record(take(it, 3), rank)
        it.close()
        resumed = loader(path, rank, 2, 2, tok)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert resumed.streams_in_turn() == [rank + 2, rank]  # global index 6 + rank is next
        it = iter(resumed)
        while any(len(seen[s]) < shares[s] for s in (rank, rank + 2)):
            record(take(it, 1), rank)
        it.close()
    assert not any("[tokens" in w for ws in seen.values() for w in ws)  # no document was split
    epoch = [w for stream in range(4) for w in seen[stream][: shares[stream]]]
    assert len(epoch) == len(set(epoch)) == (21 if kind == "few_shards" else 60)


@pytest.fixture(scope="module")
def image_jsonl(shapes) -> Path:
    """16 image questions of the shapes world (media paths relative to its directory)."""
    lines = [line for line in (shapes / "chat_train.jsonl").read_text().splitlines() if '"images"' in line]
    path = shapes / "chat_images.jsonl"
    path.write_text("\n".join(lines[:16]) + "\n")
    return path


def fingerprint(batch) -> tuple:
    pixels = batch.pixel_values
    pixel_sum = None if pixels is None else round(float(pixels.double().sum()), 3)
    return batch.input_ids.tolist(), batch.where, pixel_sum


def epoch_of(position: dict | None) -> int | None:
    """The reading epoch of a source's position (a shard source's is its shuffle buffer's tail)."""
    if position and "tail" in position:
        position = position["tail"]
    return position and position["epoch"]


def epochs_of(state: dict) -> list:
    return [epoch_of(p) for pos in state["positions"].values() for p in pos["mixture"]["positions"]]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("setup", ["mixture_of_two_jsonl_0_workers", "images_and_shards_2_ranks_2_workers",
                                   "few_shards_3_workers", "few_shards_3_workers_shuffle_buffer_5"])
def test_resume_is_exact_across_epochs_and_twice(text_jsonl, text_shards, image_jsonl, tmp_path, tok, setup):
    small = tmp_path / "small.jsonl"  # 7 documents: several epochs within the run
    small.write_text("".join(json.dumps({"kind": "text", "text": f"small {i}"}) + "\n" for i in range(7)))
    few_shards = [(str(text_shards / "docs-00000[0-1].tar"), 1.0)]
    datasets, rank, world, workers = {
        "mixture_of_two_jsonl_0_workers": ([(str(text_jsonl), 1.0), (str(small), 2.0)], 0, 1, 0),
        "images_and_shards_2_ranks_2_workers": ([(str(image_jsonl), 1.0), (str(text_shards), 1.0)], 1, 2, 2),
        "few_shards_3_workers": (few_shards, 0, 1, 3),
        "few_shards_3_workers_shuffle_buffer_5": (few_shards, 0, 1, 3),
    }[setup]
    buffer = 5 if setup.endswith("shuffle_buffer_5") else 0
    total, cuts = 12, (4, 9)

    def run(state, n):
        got = loader(datasets, rank, world, workers, tok, shuffle_buffer=buffer)
        if state is not None:
            got.load_state_dict(json.loads(json.dumps(state)))
        it = iter(got)
        batches = [fingerprint(b) for b in take(it, n)]
        it.close()
        return batches, got.state_dict()

    reference, _ = run(None, total)
    head, state1 = run(None, cuts[0])
    middle, state2 = run(state1, cuts[1] - cuts[0])  # a resumed loader ...
    tail, _ = run(state2, total - cuts[1])  # ... resumed again
    assert head + middle + tail == reference
    assert epochs_of(state1) != epochs_of(state2), "the cut points should lie in different epochs"


def test_datasets_of_a_mixture_are_shuffled_differently(tmp_path):
    from aria.data.loader import Mixture

    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"kind": "text", "text": f"{name} {i}"}) + "\n"
                                                       for i in range(30)))
    mix = Mixture([JsonlSource(tmp_path / "a.jsonl"), JsonlSource(tmp_path / "b.jsonl")], [1.0, 1.0], 0, 1, seed=0)
    lines: dict[int, list[int]] = {0: [], 1: []}
    for _ in range(40):
        read, _, k = mix.next()
        lines[k].append(int(read.raw.where.rsplit(":", 1)[1]))
    n = min(len(lines[0]), len(lines[1]))
    assert n > 10 and lines[0][:n] != lines[1][:n]


def test_jsonl_is_indexed_once_and_compactly(text_jsonl, tok, tmp_path, monkeypatch):
    made = []
    real_init = JsonlSource.__init__
    monkeypatch.setattr(JsonlSource, "__init__", lambda self, *a, **k: (made.append(1), real_init(self, *a, **k))[1])
    it = iter(build_train_loader(DataConfig(train=str(text_jsonl), num_workers=0), processor(tok), 64, 1))
    take(it, 3)
    assert len(made) == 1  # by build_train_loader; the stream (and forked workers) reuse it
    source = JsonlSource(text_jsonl)
    assert source.offsets.dtype == np.int64 and source.line_numbers is None
    (tmp_path / "gaps.jsonl").write_text('\n{"kind": "text", "text": "a"}\n  \n\n{"kind": "text", "text": "b"}\n')
    gaps = JsonlSource(tmp_path / "gaps.jsonl")
    assert [raw.where.rsplit(":", 1)[1] for raw in gaps.iterate_once()] == ["2", "5"]


def test_mixing_draws_by_weight_and_is_seeded_and_resumable(text_jsonl, tmp_path):
    from aria.data.loader import Mixture

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"kind": "text", "text": f"other {i}"}) + "\n" for i in range(40)))
    sources = [JsonlSource(text_jsonl), JsonlSource(other)]

    def draws(seed, n=400, state=None):
        mix = Mixture(sources, [3.0, 1.0], stream=0, num_streams=1, seed=seed, state=state)
        out = [mix.next()[0].raw.record["text"] for _ in range(n)]
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


GOOD = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                     {"role": "assistant", "content": "red"}], "images": ["images/good.png"]}
ANSWER = GOOD["messages"][1]


def with_image(path: str) -> dict:
    return {**GOOD, "images": [path]}


def video_question(video) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "video"}]}, ANSWER], "video": video}


def says(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}, ANSWER]}


BAD_CASES = [  # (name, record or raw JSON line, kind)
    ("malformed_json", '{"messages": [', "bad_json"),
    ("unknown_role", {**GOOD, "messages": [{"role": "robot", "content": "hi"}, ANSWER]}, "unknown_role"),
    ("unknown_content_type", {**GOOD, "messages": [{"role": "user", "content": [{"type": "audio"}]}, ANSWER]},
     "unknown_content_type"),
    ("image_count_mismatch", {**GOOD, "images": []}, "image_count_mismatch"),
    ("missing_file", with_image("images/missing.png"), "missing_file"),
    ("truncated_image", with_image("images/truncated.png"), "bad_image"),
    ("not_an_image", with_image("images/not_an_image.png"), "bad_image"),
    ("undecodable_video", video_question({"path": "broken.mp4"}), "bad_video"),
    ("path_escape", with_image("../outside.png"), "path_escape"),
    ("aria_marker_in_text", says("<|img|> hi"), "special_token_in_text"),
    ("no_assistant", {"messages": [{"role": "user", "content": "only a question"}]}, "no_assistant"),
    ("too_long_caption", {"kind": "caption", "images": ["images/good.png"], "text": "long " * 300}, "too_long"),
    ("deeply_nested_json", '{"a": ' * 100_000 + "1" + "}" * 100_000, "bad_json"),
    ("images_not_a_list", {"kind": "caption", "images": 5, "text": "x"}, "invalid_record"),
    ("nul_in_path", with_image("images/a\u0000b.png"), "invalid_record"),
    ("lone_surrogate", says("broken \ud800 text"), "bad_text"),
    ("infinite_fps", video_question({"path": "zero.mp4", "fps": float("inf")}), "invalid_record"),
    ("nan_fps", video_question({"path": "zero.mp4", "fps": float("nan")}), "invalid_record"),
    ("boolean_num_frames", video_question({"path": "zero.mp4", "num_frames": True}), "invalid_record"),
    ("end_of_text_in_text", says("stop </s> here"), "special_token_in_text"),
    ("pad_in_text", says("<pad>"), "special_token_in_text"),
    ("zero_frame_video", video_question({"path": "zero.mp4"}), "empty_video"),
    ("too_long_conversation", says("long " * 300), "too_long"),
    ("unknown_message_key", {**GOOD, "messages": [{"role": "user", "content": "hi", "weight": 0}, ANSWER]},
     "invalid_record"),
]
BAD_SEQ_LEN = 56  # one good sample per row (so that rows start at known places), too_long cases longer
GOOD_TAIL = 9


@pytest.fixture(scope="module")
def bad_dataset(shapes, tmp_path_factory) -> tuple[Path, Counter]:
    """train.jsonl: a good line, every bad case in order, GOOD_TAIL good lines; case_<name>.jsonl:
    one bad case twice (strict-mode runs)."""
    d = tmp_path_factory.mktemp("bad")
    (d / "images").mkdir()
    Image.open(shapes / "images/train_000000.png").save(d / "images/good.png")
    raw = (d / "images/good.png").read_bytes()
    (d / "images/truncated.png").write_bytes(raw[: len(raw) // 2])
    (d / "images/not_an_image.png").write_text("hello")
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    write_video(d / "zero.mp4", frames=0)
    (d.parent / "outside.png").write_bytes(raw)
    lines = [line if isinstance(line, str) else json.dumps(line) for _, line, _ in BAD_CASES]
    (d / "train.jsonl").write_text("\n".join([json.dumps(GOOD), *lines, *[json.dumps(GOOD)] * GOOD_TAIL]) + "\n")
    for (name, _, _), line in zip(BAD_CASES, lines):
        (d / f"case_{name}.jsonl").write_text(f"{line}\n{line}\n")
    return d, Counter(kind for _, _, kind in BAD_CASES)


def test_every_bad_record_is_skipped_and_counted_with_its_line(tok, bad_dataset):
    d, expected = bad_dataset
    policy = BadInputPolicy(keep=True)
    good = list(iterate_samples(str(d), processor(tok, image_size=490), "train", policy=policy, seq_len=BAD_SEQ_LEN))
    assert len(good) == 1 + GOOD_TAIL and 2 * len(good[0][1]) > BAD_SEQ_LEN
    assert policy.counts == expected
    lines = [int(str(e).split(":")[1]) for e in policy.errors]
    assert lines == list(range(2, 2 + len(BAD_CASES)))


@pytest.mark.parametrize("workers", [0, 2])
def test_every_bad_record_is_counted_by_the_loader(tok, bad_dataset, workers):
    d, expected = bad_dataset
    it = iter(got := loader(d / "train.jsonl", 0, 1, workers, tok, seq_len=BAD_SEQ_LEN, batch_size=1))
    for _ in range(200):  # until every stream's resume point (a row's first sample) is in its second epoch
        next(it)
        starts = [p["mixture"]["positions"][0] for p in got.positions.values()]
        if len(starts) == max(1, workers) and all(s and s["epoch"] >= 1 for s in starts):
            break
    it.close()
    skipped = got.skipped()
    # all of the first epoch's bad records, and some of the second's
    assert expected <= skipped <= expected + expected, skipped


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("case", [name for name, _, _ in BAD_CASES])
def test_strict_mode_raises_every_case_with_its_kind_and_line(tok, bad_dataset, case, workers):
    d, _ = bad_dataset
    kind = {name: k for name, _, k in BAD_CASES}[case]
    it = iter(loader(d / f"case_{case}.jsonl", 0, 1, workers, tok, seq_len=BAD_SEQ_LEN, batch_size=1, strict=True))
    with pytest.raises(DataError) as err:
        take(it, 5)
    it.close()
    assert err.value.kind == kind  # the worker's error arrives whole, not re-raised by message
    assert err.value.where in (f"{d}/case_{case}.jsonl:1", f"{d}/case_{case}.jsonl:2")


def test_strict_mode_raises_at_the_first_bad_record(tok, bad_dataset):
    d, _ = bad_dataset
    with pytest.raises(DataError, match=r"train\.jsonl:2: malformed JSON"):
        for _ in iterate_samples(str(d), processor(tok, image_size=490), "train", strict=True):
            pass


def test_unexpected_exception_is_a_located_data_error(tok, text_jsonl, monkeypatch):
    real_encode = Processor.encode

    def flaky(self, sample, max_tokens=None):
        if sample.where.endswith(":3"):
            raise ZeroDivisionError("a bug somewhere")
        return real_encode(self, sample, max_tokens)

    monkeypatch.setattr(Processor, "encode", flaky)
    policy = BadInputPolicy(keep=True)
    assert len(list(iterate_samples(str(text_jsonl), processor(tok), policy=policy))) == 59
    (err,) = policy.errors
    assert err.kind == "unexpected_error" and err.where == f"{text_jsonl}:3" and "ZeroDivisionError" in str(err)
    with pytest.raises(DataError, match=r"docs\.jsonl:3: unexpected ZeroDivisionError") as err:
        take(iter(loader(text_jsonl, 0, 1, 0, tok, strict=True, batch_size=8)), 10)
    assert err.value.kind == "unexpected_error"


def test_records_ignore_unknown_top_level_keys_and_errors_name_the_message():
    parse_record({"kind": "text", "text": "x", "meta": {"lang": "en"}, "qtype": "colour"}, "r", MediaResolver())
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": [{"type": "text", "text": 5}]}]}
    with pytest.raises(DataError, match=r"^r: 'messages\[2\]\.content\[0\]\.text' must be a string"):
        parse_record(record, "r", MediaResolver())
    record["messages"][2]["content"] = [{"type": "text", "text": "x", "lang": "en"}]
    with pytest.raises(DataError, match=r"'messages\[2\]\.content\[0\]' has unknown key\(s\) \['lang'\]"):
        parse_record(record, "r", MediaResolver())
    official = {"messages": [{"role": "user", "content": [{"type": "image", "text": None}]}, ANSWER],
                "images": ["a.png"]}
    assert parse_record(official, "r", MediaResolver()).media[0].kind == "image"


def stage0_dataset(good_image: Path, out: Path) -> Path:
    """stage0.jsonl: an image question, a text-only chat, an image after an answer, an image dialog,
    a text document, interleaved text before its image, a caption, a video record (lines 1-8)."""
    text_only = {"messages": [{"role": "user", "content": "Colour?"}, ANSWER]}
    image_last = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                               *GOOD["messages"]], "images": GOOD["images"]}
    dialog = {"messages": [*GOOD["messages"], {"role": "user", "content": "Sure?"},
                           {"role": "assistant", "content": "yes"}], "images": GOOD["images"]}
    document = {"kind": "text", "text": "A red circle."}
    interleaved = {"kind": "interleaved", "images": GOOD["images"],
                   "content": [{"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": "red."}]}
    caption = {"kind": "caption", "images": GOOD["images"], "text": "A red circle."}
    video = {"kind": "video", "video": {"path": "clip.mp4", "num_frames": 2}, "text": "A circle moves left."}
    write_video(out / "clip.mp4", frames=8)
    lines = [GOOD, text_only, image_last, dialog, document, interleaved, caption, video]
    (out / "images").mkdir()
    (out / "images" / "good.png").write_bytes(good_image.read_bytes())
    data = out / "stage0.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return data


def test_stage0_data_takes_only_an_image_then_its_text(tok, bad_dataset, tmp_path):
    """With ``image_caption`` (stage 0's objectives) a sample that is not an image (or a
    video) followed by its text is skipped as ``not_image_caption``, counted by the train loader and
    raised with its line in strict mode; images followed by their text pass."""
    data = stage0_dataset(bad_dataset[0] / "images" / "good.png", tmp_path)
    proc = processor(tok, image_size=490)
    policy = BadInputPolicy(keep=True)
    kept = [policy.attempt(read_record, raw, proc, None, None, True) is not None
            for raw in open_source(str(data), "train").iterate_once()]
    assert kept == [True, False, False, True, False, False, True, True]
    assert [e.where.rsplit(":", 1)[1] for e in policy.errors] == ["2", "3", "5", "6"]
    assert {e.kind for e in policy.errors} == {"not_image_caption"}
    assert "no image" in str(policy.errors[0]) and "text supervised before an image" in str(policy.errors[1])
    # without the flag every one of them is a usable sample
    assert all(policy.attempt(read_record, raw, proc, None, None) is not None
               for raw in open_source(str(data), "train").iterate_once())

    config = DataConfig(train=str(data), num_workers=0)
    it = iter(got := build_train_loader(config, proc, 128, 1, image_caption=True))
    documents = 0
    for batch in take(it, 5):  # more than an epoch (four usable samples)
        for doc in range(1, int(batch.segment_ids.max()) + 1):
            own = batch.segment_ids[0] == doc
            images = (own & (batch.input_ids[0] == tok.image_id)).nonzero()[:, 0]
            supervised = (own & (batch.targets[0] != IGNORE_INDEX)).nonzero()[:, 0]
            assert len(images) and len(supervised) and int(images.max()) < int(supervised.min())
            documents += 1
    assert documents >= 5
    it.close()
    assert got.skipped()["not_image_caption"] >= 4
    with pytest.raises(DataError, match=r"stage0\.jsonl:2: stage 0 \(train\.objective=contrastive or "
                                        r"caption_words\) takes an image"):
        list(eval_batches(str(data), proc, 128, 1, strict=True, image_caption=True))


def test_outside_media_is_allowed_on_request(tok, bad_dataset):
    d, _ = bad_dataset
    record = {"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}],
              "images": ["../outside.png"]}
    resolver = MediaResolver(d)
    for _ in range(2):  # a name it remembers is refused again
        with pytest.raises(DataError, match="outside the dataset directory"):
            parse_record(record, "r", resolver)
    assert parse_record(record, "r", MediaResolver(d, allow_outside=True)).media[0].path.is_file()


def test_a_resolver_remembers_names_and_resolves_them_alike(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    resolver = MediaResolver(tmp_path)
    names = ["a.png", "sub/../a.png", "./a.png", "missing.png"]
    first = [resolver("image", n, "images[0]").path for n in names]
    assert first == [resolver("image", n, "images[0]").path for n in names]
    assert first == [MediaResolver(tmp_path)("image", n, "images[0]").path for n in names]
    assert first[:3] == [(tmp_path / "a.png").resolve()] * 3
    assert resolver._resolved.cache_info().hits == len(names)


def test_empty_and_all_bad_datasets_are_errors(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        build_train_loader(DataConfig(train=str(tmp_path / "empty.jsonl"), num_workers=0), processor(tok), 64, 1)
    (tmp_path / "bad.jsonl").write_text("{oops\n" * 5)
    batches = iter(build_train_loader(DataConfig(train=str(tmp_path / "bad.jsonl"), num_workers=0),
                                      processor(tok), 64, 1))
    with pytest.raises(RuntimeError, match="no usable sample in a whole epoch.*bad_json"):
        next(batches)
    (tmp_path / "no_shards").mkdir()
    with pytest.raises(FileNotFoundError, match="neither train.jsonl, train.json, \\*.tar shards nor"):
        build_train_loader(DataConfig(train=str(tmp_path / "no_shards"), num_workers=0), processor(tok), 64, 1)
    (tmp_path / "empty_shards").mkdir()
    import tarfile
    tarfile.open(tmp_path / "empty_shards" / "a-000000.tar", "w").close()
    batches = iter(build_train_loader(DataConfig(train=str(tmp_path / "empty_shards"), num_workers=0),
                                      processor(tok), 64, 1))
    with pytest.raises(ValueError, match="no sample in a whole epoch"):
        next(batches)


def test_loader_options_reach_the_dataloader(tok, text_jsonl, monkeypatch):
    seen = {}

    class FakeDataLoader:
        def __init__(self, dataset, batch_size=None, **kwargs):
            seen.clear()
            seen.update(kwargs)

        def __iter__(self):
            return iter(())

    monkeypatch.setattr(loader_module, "DataLoader", FakeDataLoader)
    data = DataConfig(train=str(text_jsonl), num_workers=2)
    list(build_train_loader(data, processor(tok), 64, 1))
    assert seen["prefetch_factor"] == 2 and seen["timeout"] == 600
    list(build_train_loader(data, processor(tok), 64, 1, prefetch_factor=1, timeout=30))
    assert seen["prefetch_factor"] == 1 and seen["timeout"] == 30


def simulated_ranks(world: int, job) -> tuple[list, list]:
    """``job(rank, most)`` on ``world`` threads, ``most(value)`` being the maximum of the ranks'
    values (an all-reduce; a rank that stops calling it breaks the barrier instead of hanging the
    test). (results, exceptions), by rank."""
    barrier, values = threading.Barrier(world, timeout=30), [0] * world
    results, errors = [None] * world, [None] * world

    def most_for(rank: int):
        def most(value: int) -> int:
            values[rank] = value
            barrier.wait()
            top = max(values)
            barrier.wait()
            return top
        return most

    def run(rank: int) -> None:
        try:
            results[rank] = job(rank, most_for(rank))
        except BaseException as exc:
            errors[rank] = exc

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


@pytest.mark.parametrize("world", [2, 3])
def test_eval_ranks_read_only_their_share_and_stay_matched(tok, tmp_path, world, monkeypatch):
    eval_set = tmp_path / "eval.jsonl"  # rank 0 of 2 or 3 gets the long documents: more batches
    eval_set.write_text("".join(json.dumps({"kind": "text", "text": "document number " * (6 if i % 6 == 0 else 1)
                                            + str(i)}) + "\n" for i in range(36)))
    encoded = Counter()  # samples each rank encoded
    real_encode = Processor.encode
    rank_of = {}

    def counting(self, sample, max_tokens=None):
        encoded[rank_of[threading.get_ident()]] += 1
        return real_encode(self, sample, max_tokens)

    monkeypatch.setattr(Processor, "encode", counting)

    def job(rank, most):
        rank_of[threading.get_ident()] = rank
        own = list(eval_batches(str(eval_set), processor(tok), 128, 2, rank, world))
        matched = list(eval_batches(str(eval_set), processor(tok), 128, 2, rank, world, most=most))
        return own, matched

    results, errors = simulated_ranks(world, job)
    assert errors == [None] * world
    own_counts = [len(own) for own, _ in results]
    assert len(set(own_counts)) > 1, "the shares should pack into different numbers of batches"
    for rank, (own, matched) in enumerate(results):
        assert len(matched) == max(own_counts)  # every rank runs as many batches as the busiest
        assert [b.where for b in matched[: len(own)]] == [b.where for b in own]
        pads = matched[len(own):]
        assert all(b.padding and b.num_tokens == b.num_targets == 0 and b.input_ids.shape == (2, 128)
                   for b in pads)
        lines = [int(w.rsplit(":", 1)[1]) for b in own for w in b.where]
        assert all((line - 1) % world == rank for line in lines)  # records rank, rank + W, ...
        assert encoded[rank] == 2 * len(lines)  # its own share only (twice: two passes above)
    assert sorted(int(w.rsplit(":", 1)[1]) for own, _ in results for b in own for w in b.where) == list(range(1, 37))


def test_sharded_eval_loss_equals_one_process(tok, text_jsonl, image_jsonl, tmp_path):
    """Summed cross-entropy and target counts over the ranks' batches (padding included, run through
    the model like the others) equal one process's, for images and text."""
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(image_jsonl.read_text() + "".join(text_jsonl.read_text().splitlines(keepends=True)[:20]))
    (tmp_path / "images").symlink_to(image_jsonl.parent / "images")
    torch.manual_seed(0)
    model = build_model(TINY).eval()

    def sums(rank, world, most):
        ce, n, batches = 0.0, 0, 0
        for batch in eval_batches(str(mixed), processor(tok, image_size=490), 160, 2, rank, world, most=most):
            with torch.no_grad():
                ce += float(model(**batch.model_inputs()).loss_sum)
            n, batches = n + batch.num_targets, batches + 1
        return ce, n, batches

    one, _ = simulated_ranks(1, lambda rank, most: sums(rank, 1, None))
    for world in (2, 3):
        results, errors = simulated_ranks(world, lambda rank, most: sums(rank, world, most))
        assert errors == [None] * world
        assert sum(n for _, n, _ in results) == one[0][1] > 0
        assert abs(sum(ce for ce, _, _ in results) - one[0][0]) < 1e-5 * one[0][0]
        assert len({b for _, _, b in results}) == 1


def test_a_failing_rank_stops_every_rank_of_the_evaluation(tok, text_jsonl, tmp_path):
    lines = text_jsonl.read_text().splitlines(keepends=True)[:12]
    lines[7] = '{"kind": "text", "text": 5}\n'  # line 8: rank 1's of 2
    (tmp_path / "eval.jsonl").write_text("".join(lines))

    def job(rank, most):
        return list(eval_batches(str(tmp_path / "eval.jsonl"), processor(tok), 64, 1, rank, 2, strict=True,
                                 most=most))

    _, errors = simulated_ranks(2, job)
    assert isinstance(errors[1], DataError) and errors[1].where.endswith("eval.jsonl:8")
    assert isinstance(errors[0], RuntimeError) and "another rank failed" in str(errors[0])


def _training_run(rank: int, world: int, args: list[str]) -> None:
    from aria.train.compose import compose_run
    from aria.train.trainer import train

    assert train(compose_run("config", args)) == 0


@pytest.mark.slow
def test_trainer_evaluation_on_two_zero3_processes_equals_one(tok_dir, text_jsonl, image_jsonl, tmp_path):
    """``Trainer.evaluate`` through DeepSpeed: 2 ZeRO-3 processes (a parameter gather in every
    forward, so unmatched batch counts would hang) report the held-out losses of 1 process. The
    learning rate is 0: both evaluate the initial weights."""
    from aria.convert.checkpoint import save_model_dir
    from helpers import run_distributed

    uneven = tmp_path / "uneven.jsonl"  # rank 0 of 2 gets the long documents: more batches
    uneven.write_text("".join(json.dumps({"kind": "text", "text": "document number " * (6 if i % 4 == 0 else 1)
                                          + str(i)}) + "\n" for i in range(24)))
    torch.manual_seed(0)
    save_model_dir(build_model(TINY).state_dict(), TINY, tmp_path / "init")
    losses = {}
    for world, extra in ((1, []), (2, ["parallel.zero_stage=3"])):
        run_dir = tmp_path / f"run{world}"
        args = [f"run_dir={run_dir}", f"data.train={text_jsonl}", f"data.eval=[{uneven},{image_jsonl}]",
                f"data.tokenizer={tok_dir}", f"init.from_checkpoint={tmp_path / 'init'}", "data.image_size=490",
                "train.seq_len=128", "train.max_steps=1", "optim.lr=0", "logging=quiet", "data.num_workers=0",
                "checkpoint.every_steps=0", *extra]
        run_distributed(_training_run, world, (args,))
        losses[world] = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][-1]
    keys = ["eval_loss", "eval_loss/uneven", "eval_loss/chat_images"]
    assert all(losses[1][k] > 0 for k in keys)
    assert all(abs(losses[2][k] - losses[1][k]) < 1e-5 * losses[1][k] for k in keys), losses


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def validate(capsys, *args: str) -> tuple[int, str]:
    from data_tools.validate import main

    code = main(list(args))
    captured = capsys.readouterr()
    if code == 2:  # the dataset could not be read: the error goes to stderr, nothing to stdout
        assert not captured.out and captured.err.startswith("validate: error: ")
        return code, captured.err
    return code, captured.out


def stats_rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line[:1].isalpha()}


def test_validate_reports_bad_lines_and_statistics(tok_dir, bad_dataset, shapes, capsys):
    d, expected = bad_dataset
    code, out = validate(capsys, str(d), "--tokenizer", str(tok_dir), "--image-size", "490", "--seq-len", "256")
    assert code == 1
    assert f"{sum(expected.values())} bad record(s)" in out
    assert f"{d / 'train.jsonl'}:5: 1 image item(s) in the content but 0 path(s)" in out
    code, out = validate(capsys, str(shapes / "chat_test.jsonl"), "--tokenizer", str(tok_dir), "--image-size", "490")
    assert code == 0, out
    rows = stats_rows(out)
    assert rows["chat:image"][0] == "24" and rows["chat:video"][0] == "3"  # 6 images x 4 questions, 3 videos
    assert rows["chat:video"][5] == str(3 * 8)  # frames
    code, out = validate(capsys, str(shapes / "chat_test.jsonl"), "--tokenizer", str(tok_dir), "--image-size", "490",
                         "--max-frames", "3", "--min-image-size", "100")
    assert code == 0 and stats_rows(out)["chat:video"][5] == str(3 * 3)
    code, out = validate(capsys, str(shapes / "chat_test.jsonl"), "--tokenizer", str(tok_dir), "--image-size", "490",
                         "--min-image-size", "600")
    assert code == 2 and "min_image_size" in out


def test_validate_takes_settings_from_a_run_config(tok_dir, shapes, tmp_path, capsys):
    from aria.config import RunConfig
    from aria.train.compose import resolved_yaml

    cfg = RunConfig.from_dict({"run_dir": str(tmp_path / "run"), "model": TINY.to_dict(),
                               "data": {"tokenizer": str(tok_dir), "image_size": 490, "video": {"max_frames": 2}}})
    (tmp_path / "config.yaml").write_text(resolved_yaml(cfg))
    code, out = validate(capsys, str(shapes / "chat_test.jsonl"), "--config", str(tmp_path / "config.yaml"))
    assert code == 0, out
    assert stats_rows(out)["chat:video"][5] == str(3 * 2)
    with pytest.raises(SystemExit):
        validate(capsys, str(shapes / "chat_test.jsonl"), "--config", str(tmp_path / "config.yaml"),
                 "--max-frames", "4")


def test_validate_checks_a_stage0_dataset(tok_dir, bad_dataset, tmp_path, capsys):
    from aria.config import RunConfig
    from aria.train.compose import resolved_yaml

    data = stage0_dataset(bad_dataset[0] / "images" / "good.png", tmp_path)
    settings = ("--tokenizer", str(tok_dir), "--image-size", "490", "--num-frames", "2")
    code, out = validate(capsys, str(data), *settings)
    assert code == 0, out
    code, out = validate(capsys, str(data), *settings, "--image-caption")
    assert code == 1 and "4 bad record(s)" in out and f"{data}:6: stage 0 (train.objective=contrastive" in out
    cfg = RunConfig.from_dict({"run_dir": str(tmp_path / "run"), "model": TINY.to_dict(),
                               "train": {"objective": "contrastive"},
                               "data": {"tokenizer": str(tok_dir), "image_size": 490, "video": {"num_frames": 2}}})
    (tmp_path / "config.yaml").write_text(resolved_yaml(cfg))
    code, out = validate(capsys, str(data), "--config", str(tmp_path / "config.yaml"))
    assert code == 1 and "4 bad record(s)" in out


def test_text_and_jsonl_to_wds_tools(tmp_path, shapes, tok, bad_dataset, capsys):
    from data_tools import jsonl_to_wds, text_to_wds

    (tmp_path / "a.txt").write_text("first document\n\nsecond\nline\n")
    assert text_to_wds.main([str(tmp_path / "a.txt"), "--out", str(tmp_path / "t"), "--documents", "paragraphs"]) == 0
    texts = [r.record["text"] for r in ShardSource(tmp_path / "t").iterate_once()]
    assert texts == ["first document", "second\nline"]
    assert jsonl_to_wds.main([str(shapes / "chat_test.jsonl"), "--out", str(tmp_path / "w"),
                              "--samples-per-shard", "10"]) == 0
    # records that fail parsing or whose media cannot be read are skipped and counted
    d, _ = bad_dataset
    done = jsonl_to_wds.convert(d, tmp_path / "b", log=lambda _: None)
    assert done["samples"] > 1 + GOOD_TAIL  # the good ones, and those whose media fail only to decode
    assert {"bad_json", "missing_file", "path_escape", "bad_text", "invalid_record"} <= set(done["skipped"])
    from_shards = [e.input_ids for _, e in iterate_samples(str(tmp_path / "w"), processor(tok, image_size=490))]
    from_jsonl = [e.input_ids for _, e in iterate_samples(str(shapes / "chat_test.jsonl"),
                                                          processor(tok, image_size=490))]
    assert len(from_shards) == len(from_jsonl) == 27
    assert all(torch.equal(a, b) for a, b in zip(from_shards, from_jsonl))


@pytest.mark.slow
def test_bench_data_runs():
    done = run_tool(str(ROOT / "scripts" / "bench_data.py"), "--quick")
    assert done.returncode == 0, done.stderr[-3000:]
    for header in ("== images", "== video", "== loader", "== loader at Aria scale", "ours/HF", "frames/s",
                   "samples/s", "crops/s", "batches/s"):
        assert header in done.stdout
