"""Answer-accuracy evaluation: normalisation, prompt/answer split, batched == one-at-a-time greedy
answers (images and videos, one and two crop sizes), the accuracy arithmetic against a scripted
model, the report, bad records; aria-eval on an HF export: exact match against transformers'
greedy answers and forced answers, multiple choice against log-likelihoods computed with
transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import aria.evaluate as evaluate
import aria.inference as inference
from aria.config import load_model_config
from aria.data.errors import DataError
from aria.data.processor import Processor
from aria.data.records import MediaResolver, parse_record
from aria.data.tokenizer import Tokenizer
from aria.evaluate import EvalResult, SampleResult, exact_match, normalize, split_prompt
from aria.inference import answer_batch
from aria.model import build_model
from helpers import export_hf_with_tokenizer, shapes_world

# A larger init than tiny's 0.02 so that the random model's answers depend clearly on the images.
TINY = load_model_config("tiny", ["text.initializer_range=0.1"])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    return shapes_world(tmp_path_factory.mktemp("world"))  # 4 test images, 2 test videos


@pytest.fixture(scope="module")
def shapes(world) -> Path:
    return world[0]


@pytest.fixture(scope="module")
def tok(world) -> Tokenizer:
    return Tokenizer.load(world[1])


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
    # 980 px images beside 490 px video frames, across the batch and inside one prompt: the crops
    # go to the model per size, with the order of their features.
    processor = Processor.for_model(tok, TINY, image_size=980)
    recs = records(shapes / "chat_test.jsonl")
    mixed = {"messages": [{"role": "user", "content": [{"type": "video"}, {"type": "image"},
                                                       {"type": "text", "text": "Same colour?"}]},
                          {"role": "assistant", "content": "Left."}],
             "images": recs[0]["images"], "video": recs[-1]["video"]}
    chosen = [recs[0], recs[-1], mixed, recs[5], recs[-2]]  # image, video, both, image, video
    prompts = [split_prompt(chat_sample(r, shapes, f"test:{i}"))[0] for i, r in enumerate(chosen)]
    together = answer_batch(model, processor, prompts, max_new_tokens=5)
    alone = [answer_batch(model, processor, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone
    assert len(set(alone)) > 1


# -- scoring, with a scripted model -------------------------------------------------------------


def scripted_generate(tok: Tokenizer, outputs: list[str]):
    """A stand-in for ``generate`` that answers the i-th prompt it sees with ``outputs[i]``, then
    <|im_end|>, then tokens that must be cut off."""
    seen = []

    def fake(model, input_ids, pixel_values=None, pixel_mask=None, attention_mask=None,
             max_new_tokens=32, eos_token_ids=(), pad_token_id=None, **kwargs):
        assert list(eos_token_ids) == [tok.im_end_id, tok.eos_id] and pad_token_id == tok.pad_id
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
    monkeypatch.setattr(inference, "generate", fake)
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

    monkeypatch.setattr(inference, "generate", scripted_generate(tok, outputs)[0])
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


# -- aria-eval on a Hugging Face export ---------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(model, world, tmp_path_factory) -> Path:
    return export_hf_with_tokenizer(model, world[1], tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    from transformers import AriaForConditionalGeneration

    return AriaForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager").eval()


def eval_cli(capsys, *argv) -> tuple[int, str, str]:
    from aria.cli.eval import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def subset(shapes: Path, name: str, transform=lambda i, r: r) -> tuple[Path, list[dict]]:
    """Four image questions (four qtypes) and the two video questions, as ``name``.jsonl."""
    recs = records(shapes / "chat_test.jsonl")
    chosen = [transform(i, r) for i, r in enumerate(recs[:4] + recs[-2:])]
    path = shapes / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return path, chosen


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_aria_eval_exact_against_transformers_and_forced_answers(shapes, tok, hf_dir, hf_model, capsys):
    path, recs = subset(shapes, "exact")
    out_file = shapes / "exact_results.jsonl"
    code, out, err = eval_cli(capsys, hf_dir, path, "--max-new-tokens", 6, "--batch-size", 4,
                              "--out", out_file)
    assert code == 0, err
    rows = read_results(out_file)
    assert [r["id"] for r in rows] == [r["id"] for r in recs]
    assert "options" not in rows[0] and "scores" not in rows[0]
    assert len({r["prediction"] for r in rows}) > 1

    # The predictions are transformers' greedy answers (an image and a video question).
    processor = Processor.for_model(tok, TINY)  # the CLI's defaults for an HF directory
    for i in (0, 5):
        prompt, _ = split_prompt(chat_sample(recs[i], shapes))
        inputs = processor.prompt_inputs(prompt)
        new = hf_model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                pixel_mask=inputs["pixel_mask"], max_new_tokens=6, do_sample=False,
                                eos_token_id=[tok.im_end_id, tok.eos_id], pad_token_id=tok.pad_id)
        new = new[0, inputs["input_ids"].shape[1]:].tolist()
        stop = next((k for k, t in enumerate(new) if t in (tok.im_end_id, tok.eos_id)), len(new))
        assert rows[i]["prediction"] == tok.decode(new[:stop], skip_special_tokens=True)

    # Force the answers: even samples get the model's own prediction (in other case and spacing,
    # so correct), odd ones a wrong answer. The accuracy is then known by hand.
    predictions = [r["prediction"] for r in rows]

    def force(i, r):
        usable = i % 2 == 0 and normalize(predictions[i]) != ""
        answer = f"  {predictions[i].upper()} " if usable else "zzz " + predictions[i]
        return {**r, "messages": r["messages"][:-1] + [{"role": "assistant", "content": answer}]}

    forced, _ = subset(shapes, "forced", force)
    expected = [i % 2 == 0 and normalize(predictions[i]) != "" for i in range(len(recs))]
    code, out, err = eval_cli(capsys, hf_dir, forced, "--max-new-tokens", 6, "--batch-size", 4,
                              "--out", out_file)
    assert code == 0, err
    assert [r["correct"] for r in read_results(out_file)] == expected
    assert sum(expected) >= 2
    overall = out.splitlines()[-1].split()
    assert overall == ["overall", str(sum(expected)), str(len(recs)), f"{sum(expected) / len(recs):.4f}"]


def hf_option_score(hf_model, processor: Processor, prompt, option: str) -> float:
    """log p(option + <|im_end|> | prompt) with transformers' full forward over the whole
    conversation, tokenized as one string by our processor."""
    from aria.data.records import Part, Sample, Turn

    answered = Sample("chat", prompt.turns + [Turn("assistant", [Part("text", option)])], prompt.media,
                      prompt.where)
    full = processor.prompt_inputs(answered, add_generation_prompt=False)
    ids = full["input_ids"]
    P = processor.prompt_inputs(prompt)["input_ids"].shape[1]
    tok = processor.tokenizer
    assert ids[0, -2].item() == tok.im_end_id and tok.decode([ids[0, -1].item()]) == "\n"
    with torch.no_grad():
        logits = hf_model(input_ids=ids[:, :-1], pixel_values=full["pixel_values"],
                          pixel_mask=full["pixel_mask"]).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[t - 1, ids[0, t]].item() for t in range(P, ids.shape[1] - 1))


# Option scores are fp32 sums of a few log-probabilities of magnitude up to ~35, where fp32 steps
# by 3.8e-6. Measured: 4.8e-6 against transformers (batches of 4), 2.9e-6 (one at a time), 3.8e-6
# batched against alone. 5e-5 is ten times that; an error in one token's log-probability is far above.
SCORE_TOL = 5e-5


def test_aria_eval_choice_against_transformers(shapes, tok, hf_dir, hf_model, model, capsys):
    from data_tools.make_shapes import ANSWERS

    path, recs = subset(shapes, "choice", lambda i, r: {**r, "options": list(ANSWERS[r["qtype"]])})
    out_file = shapes / "choice_results.jsonl"
    # 490 px images: transformers' vision tower is slow on 980 px crops. Batches of 4 mix image and
    # video prompts of different lengths.
    code, out, err = eval_cli(capsys, hf_dir, path, "--metric", "choice", "--batch-size", 4,
                              "--image-size", 490, "--out", out_file)
    assert code == 0, err
    rows = read_results(out_file)
    assert [r["id"] for r in rows] == [r["id"] for r in recs]
    processor = Processor.for_model(tok, TINY, image_size=490)
    picked = set()
    for rec, row in zip(recs, rows):
        assert row["options"] == rec["options"]
        prompt, answer = split_prompt(chat_sample(rec, shapes))
        expected = [hf_option_score(hf_model, processor, prompt, o) for o in rec["options"]]
        assert row["scores"] == pytest.approx(expected, abs=SCORE_TOL), rec["id"]
        best = max(range(len(expected)), key=lambda k: expected[k])
        assert row["prediction"] == rec["options"][best]
        assert row["correct"] == (normalize(row["prediction"]) == normalize(answer))
        picked.add(best / len(expected))
    assert len(picked) > 1  # not always the same option
    correct = sum(r["correct"] for r in rows)
    assert out.splitlines()[-1].split() == ["overall", str(correct), str(len(rows)),
                                            f"{correct / len(rows):.4f}"]

    # 980 px images beside 490 px frames in one batch score as they do alone.
    processor = Processor.for_model(tok, TINY, image_size=980)
    together = evaluate.multiple_choice(model, processor, str(path), batch_size=4)
    alone = evaluate.multiple_choice(model, processor, str(path), batch_size=1)
    for a, b in zip(together.samples, alone.samples):
        assert a.scores == pytest.approx(b.scores, abs=SCORE_TOL) and a.prediction == b.prediction


def test_choice_option_errors(shapes, processor, model, capsys, hf_dir):
    recs = records(shapes / "chat_test.jsonl")
    colour = recs[0]  # answer is one of the colours
    answer = colour["messages"][-1]["content"][0]["text"]
    lines = [
        {**colour, "options": [answer, "zzz"]},
        colour,                                          # no options
        {**colour, "options": [answer]},                 # one option
        {**colour, "options": ["zzz", "yyy"]},           # answer not among them
        {**colour, "options": [answer, answer.upper() + "."]},  # the same option twice
        {**colour, "options": [answer, 3]},              # not a string
        {**colour, "options": [answer, "a <|im_end|> b"]},  # special token in an option
    ]
    path = shapes / "bad_options.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = evaluate.evaluate(model, processor, str(path), "choice")
    assert [s.where for s in result.samples] == [f"{path}:1"]
    assert result.skipped == {"bad_options": 5, "special_token_in_text": 1}

    code, out, err = eval_cli(capsys, hf_dir, path, "--metric", "choice", "--strict")
    assert code == 1 and out == ""
    assert err == f"aria-eval: error: {path}:2: 'options' must be a list of two or more strings, got None\n"


def test_aria_eval_bad_arguments(shapes, hf_dir, capsys, tmp_path):
    for argv, message in [
        ([tmp_path / "absent", shapes / "chat_test.jsonl"], "model directory not found"),
        ([hf_dir, tmp_path / "none.jsonl"], "dataset file not found"),
        ([hf_dir, shapes / "chat_test.jsonl", "--limit", "-1"], "--limit must be >= 0"),
        ([hf_dir, shapes / "chat_test.jsonl", "--out", tmp_path / "no" / "r.jsonl"], "does not exist"),
    ]:
        code, out, err = eval_cli(capsys, *argv)
        assert code == 1 and err.startswith("aria-eval: error: ") and message in err, err
