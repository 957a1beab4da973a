"""Answer-accuracy evaluation: normalisation, prompt/answer split, batched == one-at-a-time greedy
answers (images and videos, one and two crop sizes), the accuracy arithmetic against a scripted
model, the report, and bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import aria.evaluate as evaluate
from aria.config import load_model_config
from aria.data.errors import DataError
from aria.data.processor import Processor
from aria.data.records import MediaResolver, parse_record
from aria.data.tokenizer import Tokenizer
from aria.evaluate import (EvalResult, SampleResult, answer_batch, exact_match, normalize,
                           split_prompt)
from aria.model import build_model
from data_tools.make_shapes import make_shapes

# A larger init than tiny's 0.02 so that the random model's answers depend clearly on the images.
TINY = load_model_config("tiny", ["text.initializer_range=0.1"])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, seed=0, train_images=8, test_images=4, train_videos=2, test_videos=2, wds=False,
                workers=1)
    return out


@pytest.fixture(scope="module")
def tok(shapes, tmp_path_factory) -> Tokenizer:
    from data_tools.train_tokenizer import train

    return Tokenizer.load(train([str(shapes / "text_train.jsonl"), str(shapes / "chat_train.jsonl")],
                                tmp_path_factory.mktemp("tok"), vocab_size=600))


@pytest.fixture(scope="module")
def processor(tok) -> Processor:
    # Images and video frames both at 490 px: one crop size.
    return Processor.for_model(tok, TINY, image_size=490)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(TINY).eval()


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chat_sample(record: dict, base: Path, where: str = "test:1"):
    return parse_record(record, where, MediaResolver(base))


# -- normalize / split_prompt -------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Red.", "red"),
    ("  Top   Left \n", "top left"),
    ("red", "red"),
    ("3..", "3."),          # one full stop only
    ("Blue .", "blue"),
    ("", ""),
    ("\tTWO\twords. ", "two words"),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_split_prompt_multi_turn(shapes, processor):
    record = {"messages": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A "},
                                          {"type": "text", "text": "star."}]}],
        "images": ["images/test_000000.png"]}
    sample = chat_sample(record, shapes)
    prompt, answer = split_prompt(sample)
    assert answer == "A star."
    assert [t.role for t in prompt.turns] == ["system", "user", "assistant", "user"]
    assert prompt.media == sample.media and prompt.where == sample.where
    assert len(sample.turns) == 5  # the input is not modified
    inputs = processor.prompt_inputs(prompt, add_generation_prompt=True)
    text = evaluate.prompt_text(processor, inputs["input_ids"])
    assert text == ("<|im_start|>system\nAnswer in one word.<|im_end|>\n"
                    "<|im_start|>user\n<image>What colour is it?<|im_end|>\n"
                    "<|im_start|>assistant\nRed.<|im_end|>\n"
                    "<|im_start|>user\nAnd the shape?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "Still there?"}]},
    {"messages": [{"role": "user", "content": "Draw it"},
                  {"role": "assistant", "content": [{"type": "text", "text": "Here:"}, {"type": "image"}]}],
     "images": ["images/test_000000.png"]},
    {"messages": [{"role": "user", "content": "Say nothing"}, {"role": "assistant", "content": "  "}]},
    {"kind": "text", "text": "A document, not a question."},
], ids=["ends_with_user", "media_answer", "empty_answer", "document"])
def test_split_prompt_without_answer(shapes, record):
    with pytest.raises(DataError) as err:
        split_prompt(chat_sample(record, shapes, "data.jsonl:7"))
    assert err.value.kind == "no_answer"
    assert err.value.where == "data.jsonl:7"


# -- batching -----------------------------------------------------------------------------------


def test_batched_equals_one_at_a_time(shapes, processor, model):
    path = shapes / "chat_test.jsonl"
    kinds = ["video" if "video" in r else "image" for r in records(path)]
    assert kinds.count("video") == 2 and kinds[-2:] == ["video", "video"]
    single = exact_match(model, processor, str(path), batch_size=1, max_new_tokens=6)
    # 18 records in batches of 5: the last batch mixes image prompts and longer video prompts.
    batched = exact_match(model, processor, str(path), batch_size=5, max_new_tokens=6)
    assert len(single.samples) == len(kinds) and not single.skipped
    assert [s.where for s in batched.samples] == [s.where for s in single.samples]
    assert [s.prediction for s in batched.samples] == [s.prediction for s in single.samples]
    # Otherwise the comparison proves little: the random model's answers depend on the input.
    assert len({s.prediction for s in single.samples}) > 1


def test_batched_equals_one_at_a_time_two_crop_sizes(shapes, tok, model):
    # 980 px images beside 490 px video frames: answer_batch splits the batch by crop size and
    # puts the answers back in order.
    processor = Processor.for_model(tok, TINY, image_size=980)
    recs = records(shapes / "chat_test.jsonl")
    chosen = [recs[0], recs[-1], recs[5], recs[-2]]  # image, video, image, video
    prompts = [split_prompt(chat_sample(r, shapes, f"test:{i}"))[0] for i, r in enumerate(chosen)]
    together = answer_batch(model, processor, prompts, max_new_tokens=5)
    alone = [answer_batch(model, processor, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone
    assert len(set(alone)) > 1

    mixed = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "video"}]},
                          {"role": "assistant", "content": "Left."}],
             "images": recs[0]["images"], "video": recs[-1]["video"]}
    with pytest.raises(ValueError, match="image_feature_order"):
        answer_batch(model, processor, [split_prompt(chat_sample(mixed, shapes))[0]], max_new_tokens=2)


# -- scoring, with a scripted model -------------------------------------------------------------


def scripted_generate(tok: Tokenizer, outputs: list[str]):
    """A stand-in for ``generate`` that answers the i-th prompt it sees with ``outputs[i]``, then
    <|im_end|>, then tokens that must be cut off."""
    seen = []

    def fake(model, input_ids, pixel_values=None, pixel_mask=None, attention_mask=None,
             max_new_tokens=32, eos_token_ids=(), pad_token_id=None, **kwargs):
        assert list(eos_token_ids) == [tok.im_end_id] and pad_token_id == tok.pad_id
        assert bool(attention_mask[:, -1].all())  # left padding, with the pad id
        assert bool((input_ids[attention_mask == 0] == tok.pad_id).all())
        rows = []
        for _ in range(input_ids.shape[0]):
            rows.append(tok.encode(outputs[len(seen)]) + [tok.im_end_id] + tok.encode("junk"))
            seen.append(len(seen))
        width = max(map(len, rows))
        return torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])

    return fake, seen


def test_accuracy_arithmetic(shapes, processor, tok, model, monkeypatch):
    recs = records(shapes / "chat_test.jsonl")
    answers = [r["messages"][-1]["content"][0]["text"] for r in recs]
    # Even samples: the answer in another case and spacing; odd samples: a wrong answer.
    outputs = [f" {a.upper()} ." if i % 2 == 0 else "wrong" for i, a in enumerate(answers)]
    # A special token in an answer is dropped from the prediction.
    fake, seen = scripted_generate(tok, ["<fim_prefix>" + outputs[0]] + outputs[1:])
    monkeypatch.setattr(evaluate, "generate", fake)
    result = exact_match(model, processor, str(shapes / "chat_test.jsonl"), batch_size=4)

    assert len(seen) == len(recs)
    assert [s.prediction for s in result.samples] == outputs  # cut at <|im_end|>, no specials
    assert [s.answer for s in result.samples] == answers
    assert [s.correct for s in result.samples] == [i % 2 == 0 for i in range(len(recs))]
    assert [s.id for s in result.samples] == [r["id"] for r in recs]
    assert result.accuracy == pytest.approx(len(range(0, len(recs), 2)) / len(recs))
    expected: dict[str, list[int]] = {}
    for i, r in enumerate(recs):
        expected.setdefault(r["qtype"], [0, 0])
        expected[r["qtype"]][0] += i % 2 == 0
        expected[r["qtype"]][1] += 1
    assert result.by_qtype == {q: tuple(c) for q, c in sorted(expected.items())}
    assert result.by_qtype["direction"] == (1, 2)  # the two videos: one right, one wrong

    table = result.table()
    for q, (c, n) in result.by_qtype.items():
        assert any(line.split()[:3] == [q, str(c), str(n)] for line in table.splitlines())
    overall = table.splitlines()[-1].split()
    assert overall == ["overall", str(sum(result.by_qtype[q][0] for q in expected)), str(len(recs)),
                       f"{result.accuracy:.4f}"]

    monkeypatch.setattr(evaluate, "generate", scripted_generate(tok, outputs)[0])
    limited = exact_match(model, processor, str(shapes / "chat_test.jsonl"), batch_size=4, limit=3)
    assert [s.where for s in limited.samples] == [s.where for s in result.samples[:3]]


def test_empty_result():
    result = EvalResult()
    assert result.accuracy == 0.0 and result.by_qtype == {}
    assert result.table().splitlines()[-1].split() == ["overall", "0", "0", "0.0000"]


def test_write_jsonl_round_trips(tmp_path):
    result = EvalResult([
        SampleResult("a.jsonl:1", "x1", "colour", "<|im_start|>user\n<image>Q?", "Red", "red.", True),
        SampleResult("a.jsonl:2", None, None, "Ünïcode ✓\n", "", "blue", False)], {"bad_json": 1})
    path = tmp_path / "out.jsonl"
    result.write_jsonl(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert [SampleResult(**json.loads(line)) for line in lines] == result.samples
    assert "(none)" in result.table() and "bad_json=1" in result.table()


# -- bad records ----------------------------------------------------------------------------------


def test_bad_records_are_skipped_and_counted(shapes, processor, model):
    recs = records(shapes / "chat_test.jsonl")
    ends_with_user = {"messages": recs[1]["messages"] + [{"role": "user", "content": "Sure?"}],
                      "images": recs[1]["images"]}
    missing_image = {**recs[2], "images": ["images/nope.png"]}
    bad_role = {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]}
    lines = [json.dumps(recs[0]), "{not json", json.dumps(ends_with_user), json.dumps(missing_image),
             json.dumps(recs[-1]), json.dumps(bad_role)]
    path = shapes / "with_bad.jsonl"
    path.write_text("\n".join(lines) + "\n")

    result = exact_match(model, processor, str(path), batch_size=8, max_new_tokens=2)
    assert [s.where for s in result.samples] == [f"{path}:1", f"{path}:5"]
    assert [s.id for s in result.samples] == [recs[0]["id"], recs[-1]["id"]]
    assert result.skipped == {"bad_json": 1, "no_answer": 1, "missing_file": 1, "unknown_role": 1}

    with pytest.raises(DataError) as err:
        exact_match(model, processor, str(path), strict=True, max_new_tokens=2)
    assert err.value.kind == "bad_json" and err.value.where == f"{path}:2"
