"""aria-generate: greedy answers token for token those of transformers' generate (text, image and
video prompts) on an HF export, batch mode equal to single prompts, our model / run directories,
seeded sampling and its distribution (softmax(logits / T) over the top-p nucleus), incremental
decoding of multi-byte text, and clean errors for bad input."""

from __future__ import annotations

import json
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from aria.cli.generate import StreamDecoder, main
from aria.config import load_model_config
from aria.convert.checkpoint import save_model_dir
from aria.data.processor import Processor
from aria.data.tokenizer import Tokenizer
from aria.model import build_model
from helpers import export_hf_with_tokenizer, shapes_world

MAX_NEW = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    data, tok_dir = shapes_world(root, test_images=2, test_videos=1)
    tok = Tokenizer.load(tok_dir)
    # A larger init than tiny's 0.02 so that the random model's answers depend on the images; the
    # vocabulary is the tokenizer's, so every generated id decodes.
    cfg = load_model_config("tiny", ["text.initializer_range=0.1", f"text.vocab_size={tok.vocab_size}"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    hf_dir = export_hf_with_tokenizer(model, tok_dir, root / "hf")
    return {"root": root, "data": data, "tok_dir": tok_dir, "tok": tok, "model": model, "hf_dir": hf_dir}


@pytest.fixture(scope="module")
def hf_model(world):
    from transformers import AriaForConditionalGeneration

    return AriaForConditionalGeneration.from_pretrained(world["hf_dir"], attn_implementation="eager").eval()


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


PROMPTS = {  # name -> (prompt, images, videos) with paths relative to the dataset directory
    "text": ("Describe a red circle.", [], []),
    "image": ("What colour is the star?", ["images/test_000000.png"], []),
    "video": ("Which way does it move?", [], ["videos/test_000000.mp4"]),
}


@pytest.fixture(scope="module")
def hf_answers(world, hf_model) -> dict[str, list[int]]:
    return {name: hf_greedy(world, hf_model, name) for name in PROMPTS}


def hf_greedy(world, hf_model, name: str) -> list[int]:
    """transformers' greedy tokens for a prompt, fed our processor's input_ids and pixels, cut at
    the first stop token."""
    tok = world["tok"]
    text, images, videos = PROMPTS[name]
    processor = Processor.for_model(tok, world["model"].cfg)  # the CLI's defaults: 980 px, 8 frames
    content = ([{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
               + [{"type": "text", "text": text}])
    inputs = processor([{"role": "user", "content": content}], images=[world["data"] / p for p in images],
                       videos=[world["data"] / p for p in videos])
    kwargs = {}
    if inputs["pixel_values"] is not None:
        kwargs = {"pixel_values": inputs["pixel_values"], "pixel_mask": inputs["pixel_mask"]}
    ids = inputs["input_ids"]
    out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                            do_sample=False, eos_token_id=[tok.im_end_id, tok.eos_id],
                            pad_token_id=tok.pad_id, **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    stops = [i for i, t in enumerate(new) if t in (tok.im_end_id, tok.eos_id)]
    return new[:stops[0]] if stops else new


def streamed(tok, ids: list[int]) -> str:
    """What aria-generate prints for these tokens. (A random model emits byte-fallback tokens that
    are not valid UTF-8; whole-answer decoding turns every byte of such a run into U+FFFD, streaming
    only those it cannot place, so the two may differ there.)"""
    decoder = StreamDecoder(tok)
    return "".join(decoder.push(i) for i in ids) + decoder.flush()


def prompt_argv(world, name: str) -> list:
    text, images, videos = PROMPTS[name]
    argv = ["--prompt", text]
    for p in images:
        argv += ["--image", world["data"] / p]
    for p in videos:
        argv += ["--video", world["data"] / p]
    return argv


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_matches_transformers(world, hf_answers, capsys, name):
    expected = hf_answers[name]
    assert len(expected) >= 3  # the comparison has tokens to compare
    code, out, err = cli(capsys, world["hf_dir"], *prompt_argv(world, name), "--greedy",
                         "--max-new-tokens", MAX_NEW)
    assert code == 0, err
    assert out == streamed(world["tok"], expected) + "\n"
    assert f"[{len(expected)} tokens in" in err


def test_batch_mode_equals_transformers_and_so_single_prompts(world, hf_answers, capsys, tmp_path):
    data = world["data"]
    lines = []
    for name, (text, images, videos) in PROMPTS.items():
        record = {"id": name, "prompt": text}
        if images:
            record["images"] = [str(data / p) for p in images]  # absolute paths
        if videos:
            record["video"] = {"path": str(data / videos[0])}
        lines.append(json.dumps(record))
    # The training schema, media relative to the batch file; its answer is the reference.
    conversation = {"messages": [{"role": "user", "content": [{"type": "image"},
                                                             {"type": "text", "text": PROMPTS["image"][0]}]},
                                 {"role": "assistant", "content": "purple"}],
                    "images": PROMPTS["image"][1]}
    lines.insert(1, "")  # blank lines are skipped
    lines.append(json.dumps(conversation))
    batch = data / "prompts.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    out_file = tmp_path / "answers.jsonl"
    code, out, err = cli(capsys, world["hf_dir"], "--batch", batch, "--out", out_file, "--greedy",
                         "--max-new-tokens", MAX_NEW, "--batch-size", 3)
    assert code == 0, err
    assert out == ""
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r.get("id") for r in rows] == ["text", "image", "video", None]
    assert [r["where"] for r in rows] == [f"{batch}:{n}" for n in (1, 3, 4, 5)]
    assert rows[3]["reference"] == "purple" and "reference" not in rows[1]
    tok = world["tok"]
    # The same tokens as transformers, and so as the single prompts (test_greedy_matches_transformers).
    for row, name in zip(rows, ["text", "image", "video", "image"]):
        expected = hf_answers[name]
        assert row["token_ids"] == expected, name
        assert row["answer"] == tok.decode(expected, skip_special_tokens=True)
        assert row["stopped"] == (len(expected) < MAX_NEW)
    assert len({r["answer"] for r in rows}) == 3  # the prompts get different answers


def test_model_and_run_directories(world, capsys, tmp_path):
    """Our model directory (tokenizer given) and a run directory (tokenizer and image size from its
    config.yaml) answer as the HF export does."""
    from aria.train.compose import compose_run, resolved_yaml

    model_dir = tmp_path / "model"
    save_model_dir(world["model"].state_dict(), world["model"].cfg, model_dir)
    image = prompt_argv(world, "image") + ["--greedy", "--max-new-tokens", MAX_NEW]
    _, from_hf, _ = cli(capsys, world["hf_dir"], *image)
    code, ours, err = cli(capsys, model_dir, *image, "--tokenizer", world["tok_dir"])
    assert code == 0, err
    assert ours == from_hf

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000005"
    save_model_dir(world["model"].state_dict(), world["model"].cfg, ckpt / "model")
    (run / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    cfg = compose_run("config", ["model=tiny", f"run_dir={run}", f"data.train={world['data']}",
                                 f"data.tokenizer={world['tok_dir']}", "data.image_size=490"])
    for config in (run / "config.yaml", ckpt / "config.yaml"):
        config.write_text(resolved_yaml(cfg))
    _, at_490, _ = cli(capsys, world["hf_dir"], *image, "--image-size", 490)
    assert at_490 != from_hf  # the image size matters, so the run's setting is seen below
    for where in (run, ckpt, ckpt / "model"):
        code, out, err = cli(capsys, where, *image)
        assert code == 0, err
        assert out == at_490

    # its HF export carries the 490 px setting in its processor files, and is read with it
    from aria.convert.export import to_hf

    exported = to_hf(run, tmp_path / "hf490", log=lambda _: None)
    code, out, err = cli(capsys, exported, *image)
    assert code == 0, err
    assert out == at_490


def test_sampling_is_reproducible_with_a_seed(world, capsys):
    argv = [world["hf_dir"], *prompt_argv(world, "image"), "--max-new-tokens", MAX_NEW, "--temperature", 1.5]
    first = cli(capsys, *argv, "--seed", 3)[1]
    assert cli(capsys, *argv, "--seed", 3)[1] == first
    assert cli(capsys, *argv, "--seed", 4)[1] != first  # another seed, another answer


class FixedLogits(torch.nn.Module):
    """A stand-in model for ``generate`` whose next-token logits are always ``logits_V``."""

    def __init__(self, logits_V: torch.Tensor) -> None:
        super().__init__()
        self.cfg = load_model_config("tiny")  # for the KV cache generate allocates
        self.logits_V = torch.nn.Parameter(logits_V, requires_grad=False)

    def forward(self, input_ids, *args, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits_V.expand(input_ids.shape[0], 1, -1))


# Unsorted logits; softmax at T = 0.7 gives the sorted masses .392 .192 .125 .108 .061 ..., whose
# running sums .392 .583 .708 .817 reach top-p 0.8 at the 4th token, clear of float32 rounding.
LOGITS = [0.3, 1.8, -0.5, 0.0, -2.0, 1.3, 0.9, -1.0, 0.5, -0.2, 1.0, -3.0]


def nucleus_probs(logits: list[float], temperature: float, top_p: float) -> dict[int, float]:
    """softmax(logits / T) over the smallest set of most likely tokens whose mass reaches top_p,
    renormalised; in float64, independently of the code under test."""
    weights = [math.exp(x / temperature) for x in logits]
    probs = sorted(((w / sum(weights), i) for i, w in enumerate(weights)), reverse=True)
    kept, mass = [], 0.0
    for p, i in probs:
        if mass >= top_p:
            break
        kept.append((i, p))
        mass += p
    return {i: p / mass for i, p in kept}


def chi_square_p_value(counts: dict[int, int], probs: dict[int, float]) -> float:
    n = sum(counts.values())
    stat = sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in probs.items())
    dof = len(probs) - 1  # P(chi2_dof > stat) is the regularised upper incomplete gamma
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                   torch.tensor(stat / 2, dtype=torch.float64)).item()


@pytest.mark.parametrize("temperature, top_p", [(0.7, 0.8), (1.5, 1.0)])
def test_sampling_draws_from_the_tempered_nucleus(temperature, top_p):
    """aria-generate's sampler settings through ``generate``: 20000 draws (2000 rows x 10 steps)
    follow softmax(logits / T) renormalised over the top-p nucleus; tokens outside it never come.
    A 20% error in the temperature is rejected by the same test."""
    from argparse import Namespace

    from aria.cli.generate import sampling_settings
    from aria.model.generation import generate

    args = Namespace(greedy=False, temperature=temperature, top_p=top_p, seed=0)
    rows, steps = 2000, 10
    tokens = generate(FixedLogits(torch.tensor(LOGITS)), torch.zeros(rows, 1, dtype=torch.long),
                      max_new_tokens=steps, **sampling_settings(args, "cpu"))
    assert tokens.shape == (rows, steps)
    counts = Counter(tokens.flatten().tolist())
    expected = nucleus_probs(LOGITS, temperature, top_p)
    assert set(counts) <= set(expected), f"tokens outside the nucleus {sorted(expected)}: {counts}"
    if top_p < 1:
        assert 1 < len(expected) < len(LOGITS)  # the nucleus really cuts
    assert chi_square_p_value(counts, expected) > 1e-3, (counts, expected)
    for wrong in (temperature * 1.2, temperature / 1.2):
        assert chi_square_p_value(counts, nucleus_probs(LOGITS, wrong, top_p)) < 1e-6, wrong


@pytest.mark.parametrize("backend", ["tokenizer.json", "tokenizer.model"])
def test_stream_decoder_prints_multibyte_characters_whole(world, backend):
    tok = Tokenizer.load(world["tok_dir"] / backend if backend.endswith(".model") else world["tok_dir"])
    text = "A red circle ✓ 日本語 Ünïcode — 🙂 end."
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # byte-fallback pieces: several tokens per character
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_bad_inputs_give_one_clean_message(world, capsys, tmp_path):
    hf = world["hf_dir"]
    broken_video = tmp_path / "broken.mp4"
    broken_video.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "hi"}\n{"prompt": "oops"\n')
    missing_media = tmp_path / "missing.jsonl"
    missing_media.write_text(json.dumps({"prompt": "hi", "images": ["nope.png"]}) + "\n")
    no_prompt = tmp_path / "noprompt.jsonl"
    no_prompt.write_text(json.dumps({"question": "hi"}) + "\n")
    cases = [
        ([hf, "--prompt", "hi", "--image", tmp_path / "nope.png"], "--image", "nope.png"),
        ([hf, "--prompt", "hi", "--video", broken_video], "cannot open video file", "broken.mp4"),
        ([not_a_model, "--prompt", "hi"], "is not a model directory", str(not_a_model)),
        ([tmp_path / "absent", "--prompt", "hi"], "model directory not found", "absent"),
        ([llama, "--prompt", "hi"], "has model_type 'llama'; expected 'aria'", f"{llama}/config.json"),
        ([hf, "--prompt", "hi", "--tokenizer", tmp_path / "notok"], "tokenizer not found", "notok"),
        ([hf, "--batch", bad_json, "--out", tmp_path / "o.jsonl"], "malformed JSON", f"{bad_json}:2"),
        ([hf, "--batch", missing_media, "--out", tmp_path / "o.jsonl"], "not found", f"{missing_media}:1"),
        ([hf, "--batch", no_prompt, "--out", tmp_path / "o.jsonl"], "needs 'prompt'", f"{no_prompt}:1"),
        ([hf, "--batch", tmp_path / "none.jsonl", "--out", tmp_path / "o.jsonl"], "--batch file not found",
         "none.jsonl"),
        ([hf, "--batch", bad_json], "--batch needs --out", ""),
        ([hf, "--prompt", "hi", "--greedy", "--top-p", "0.5"], "--top-p", ""),
        ([hf, "--prompt", "hi", "--temperature", "0"], "--temperature must be > 0", ""),
        ([hf], "give --prompt", ""),
        ([hf, "--prompt", "hi", "--decode", "cuda_graph"], "decode='cuda_graph' needs a bf16 model on CUDA", ""),
    ]
    for argv, message, names in cases:
        code, out, err = cli(capsys, *argv)
        assert code == 1, (argv, err)
        assert err.startswith("aria-generate: error: ") and err.count("\n") == 1, err
        assert message in err and names in err, (message, names, err)
        assert out == ""
