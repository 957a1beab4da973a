"""Answer accuracy: greedy generation on the questions of a JSONL dataset, compared with the answers.

Letters: B prompts in a batch, T prompt length, N new tokens.

Design decisions:
- The reference answer is the text of a conversation's last assistant turn; the prompt is
  everything before it plus the generation header, exactly the tokens the model saw in training.
- A prediction is the generated text up to the first ``<|im_end|>``; it is correct when it equals
  the answer after ``normalize`` (case, spacing and one trailing full stop are ignored).
- Prompts are batched with left padding, so every row generates exactly what it would alone
  (``generate`` turns the padding into segment 0); a test holds batched against one-at-a-time.
- ``generate`` takes one crop tensor and no ``image_feature_order``, so a batch is split into
  sub-batches of one crop size (e.g. 980 px images apart from 490 px video frames). A single
  sample that mixes sizes cannot be generated for and raises ``ValueError``.
- Bad records (malformed, no final assistant answer, unreadable media) are handled by
  ``BadInputPolicy`` like in training: skipped and counted by reason, or raised when ``strict``.
  Media are decoded per record before batching, so a bad file costs only its own record.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from aria.data.errors import BadInputPolicy, DataError
from aria.data.processor import Processor, group_crops
from aria.data.loader import read_record
from aria.data.records import Sample
from aria.data.sources import open_source
from aria.model.generation import generate

log = logging.getLogger("aria.evaluate")

NO_QTYPE = "(none)"
"""The ``by_qtype`` key of samples whose record has no ``qtype``."""

_IMAGE_BLOCK = re.compile(r"<fim_prefix>(?:<\|img\|>)+<fim_suffix>")


@dataclass
class SampleResult:
    where: str
    """'file:line' (or 'shard.tar:key') of the record."""
    id: str | None
    qtype: str | None
    prompt: str
    """The decoded prompt, each image block (one per image crop set or video frame) as '<image>'."""
    prediction: str
    answer: str
    correct: bool


@dataclass
class EvalResult:
    samples: list[SampleResult] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    """Records skipped as bad input, by reason (``DataError.kind``)."""

    @property
    def accuracy(self) -> float:
        """Fraction of samples answered correctly; 0 when there are none."""
        return sum(s.correct for s in self.samples) / len(self.samples) if self.samples else 0.0

    @property
    def by_qtype(self) -> dict[str, tuple[int, int]]:
        """qtype -> (correct, total), qtypes sorted."""
        counts: dict[str, list[int]] = {}
        for s in self.samples:
            c = counts.setdefault(s.qtype if s.qtype is not None else NO_QTYPE, [0, 0])
            c[0] += s.correct
            c[1] += 1
        return {q: (c[0], c[1]) for q, c in sorted(counts.items())}

    def table(self) -> str:
        rows = [(q, c, n) for q, (c, n) in self.by_qtype.items()]
        rows.append(("overall", sum(s.correct for s in self.samples), len(self.samples)))
        width = max(len("qtype"), *(len(q) for q, _, _ in rows))
        lines = [f"{'qtype':<{width}}  {'correct':>7}  {'total':>7}  {'accuracy':>8}"]
        for i, (q, c, n) in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("-" * len(lines[0]))
            lines.append(f"{q:<{width}}  {c:>7}  {n:>7}  {c / n if n else 0.0:>8.4f}")
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())))
        return "\n".join(lines)

    def write_jsonl(self, path: str | Path) -> None:
        """One JSON object per sample (the ``SampleResult`` fields), in dataset order."""
        with open(path, "w", encoding="utf-8") as f:
            for s in self.samples:
                f.write(json.dumps(asdict(s), ensure_ascii=False) + "\n")


def normalize(text: str) -> str:
    """Strip, lower-case, collapse whitespace runs to one space, drop one trailing '.'."""
    text = " ".join(text.lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def split_prompt(sample: Sample) -> tuple[Sample, str]:
    """(the conversation before its last turn, the text of that turn) for a conversation ending in
    an assistant text answer; ``DataError`` kind ``no_answer`` otherwise."""
    where = sample.where or None
    if not sample.is_chat:
        raise DataError(f"a {sample.kind} document has no question to answer; evaluation needs "
                        "conversations", "no_answer", where)
    last = sample.turns[-1] if sample.turns else None
    if last is None or last.role != "assistant":
        raise DataError("the conversation must end with an assistant answer to score, but ends with "
                        f"{'a ' + str(last.role) + ' turn' if last else 'nothing'}", "no_answer", where)
    if any(p.type != "text" for p in last.parts):
        raise DataError("the last assistant turn holds media; the reference answer must be text only",
                        "no_answer", where)
    answer = "".join(p.text for p in last.parts)
    if not answer.strip():
        raise DataError("the last assistant turn is empty: no reference answer", "no_answer", where)
    # The last turn has no media, so the media list (indexed by the earlier parts) stays valid.
    return Sample(sample.kind, sample.turns[:-1], sample.media, sample.where), answer


def prompt_inputs(processor: Processor, prompt: Sample) -> dict[str, Any]:
    """``processor.prompt_inputs`` with a generation header; media errors located at the record."""
    try:
        inputs = processor.prompt_inputs(prompt, add_generation_prompt=True)
    except DataError as err:
        raise err.at(prompt.where) from None
    sides = sorted({pv.shape[-1] for pv, _ in inputs["crops"]})
    if len(sides) > 1:
        raise ValueError(f"{prompt.where}: the prompt mixes crops of {sides} px, which needs "
                         "image_feature_order, and generate() does not take it; evaluate with "
                         "data.image_size equal to data.video.image_size")
    return inputs


def prompt_text(processor: Processor, input_ids: torch.Tensor) -> str:
    text = processor.tokenizer.decode(input_ids.reshape(-1).tolist())
    return _IMAGE_BLOCK.sub("<image>", text)


@torch.no_grad()
def generate_answers(model: torch.nn.Module, processor: Processor, inputs: list[dict[str, Any]],
                     max_new_tokens: int) -> list[str]:
    """Greedy answers for prepared ``prompt_inputs``, batched per crop size, in input order."""
    by_side: dict[int | None, list[int]] = {}
    for i, item in enumerate(inputs):
        side = item["crops"][0][0].shape[-1] if item["crops"] else None
        by_side.setdefault(side, []).append(i)
    answers: list[str] = [""] * len(inputs)
    for rows in by_side.values():
        for i, text in zip(rows, _generate_batch(model, processor, [inputs[i] for i in rows],
                                                 max_new_tokens)):
            answers[i] = text
    return answers


def _generate_batch(model: torch.nn.Module, processor: Processor, inputs: list[dict[str, Any]],
                    max_new_tokens: int) -> list[str]:
    tok = processor.tokenizer
    param = next(model.parameters())
    lengths = [item["input_ids"].shape[-1] for item in inputs]
    B, T = len(inputs), max(lengths)
    input_ids_BT = torch.full((B, T), tok.pad_id, dtype=torch.long)
    attention_mask_BT = torch.zeros((B, T), dtype=torch.long)
    for b, (item, n) in enumerate(zip(inputs, lengths)):
        input_ids_BT[b, T - n:] = item["input_ids"].reshape(-1)
        attention_mask_BT[b, T - n:] = 1
    # Crops in row order, each row's in its token order: the order of the <|img|> slots.
    pixels = group_crops([crop for item in inputs for crop in item["crops"]], processor.tokens_per_crop)
    assert pixels["image_feature_order"] is None, "generate_answers groups rows by crop size"
    pixel_values = pixel_mask = None
    if pixels["pixel_values"] is not None:
        pixel_values = pixels["pixel_values"].to(param.device, param.dtype)
        pixel_mask = pixels["pixel_mask"].to(param.device)
    new_BN = generate(model, input_ids_BT.to(param.device), pixel_values, pixel_mask,
                      attention_mask=attention_mask_BT.to(param.device), max_new_tokens=max_new_tokens,
                      eos_token_ids=[tok.im_end_id], pad_token_id=tok.pad_id)
    answers = []
    for row in new_BN.tolist():
        if tok.im_end_id in row:
            row = row[:row.index(tok.im_end_id)]
        answers.append(tok.decode(row, skip_special_tokens=True))
    return answers


def answer_batch(model: torch.nn.Module, processor: Processor, samples: list[Sample],
                 max_new_tokens: int) -> list[str]:
    """Greedy answers to prompt conversations (as ``split_prompt`` returns them), in order."""
    return generate_answers(model, processor, [prompt_inputs(processor, s) for s in samples],
                            max_new_tokens)


@dataclass
class _Pending:
    where: str
    id: str | None
    qtype: str | None
    answer: str
    inputs: dict[str, Any]


def exact_match(model: torch.nn.Module, processor: Processor, dataset: str | Path, split: str = "test",
                max_new_tokens: int = 16, batch_size: int = 8, limit: int | None = None,
                strict: bool = False, device: torch.device | str | None = None) -> EvalResult:
    """Exact-match accuracy of greedy answers on ``dataset`` (a ``.jsonl`` file, a directory holding
    ``{split}.jsonl``, or webdataset shards), read once in order.

    ``limit`` caps the number of scored samples (skipped records do not count); ``strict`` raises
    the first bad record instead of skipping it; ``device`` moves the model there first.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    if device is not None:
        model.to(device)
    policy = BadInputPolicy(strict=strict)
    result = EvalResult()
    pending: list[_Pending] = []

    def flush() -> None:
        predictions = generate_answers(model, processor, [p.inputs for p in pending], max_new_tokens)
        for p, prediction in zip(pending, predictions):
            result.samples.append(SampleResult(
                p.where, p.id, p.qtype, prompt_text(processor, p.inputs["input_ids"]), prediction,
                p.answer, normalize(prediction) == normalize(p.answer)))
        pending.clear()
        log.info("evaluated %d samples: accuracy %.4f", len(result.samples), result.accuracy)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for raw in open_source(dataset, split).iterate_once():
                if limit is not None and len(result.samples) + len(pending) >= limit:
                    break
                loaded = policy.attempt(read_record, raw)  # parsing; bad records skipped
                if loaded is None:
                    continue
                try:
                    prompt, answer = split_prompt(loaded.sample)
                    inputs = prompt_inputs(processor, prompt)
                except DataError as err:
                    policy.handle(err.at(raw.where))
                    continue
                pending.append(_Pending(raw.where, _optional_str(raw.record.get("id")),
                                        _optional_str(raw.record.get("qtype")), answer, inputs))
                if len(pending) == batch_size:
                    flush()
            if pending:
                flush()
    finally:
        model.train(was_training)
    result.skipped = dict(policy.counts)
    return result


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Our model from a model / checkpoint / run directory, or from a Hugging Face directory."""
    from aria.convert.checkpoint import load_hf_dir, load_model_dir
    from aria.train.checkpoint import resolve_model_dir

    path = Path(path)
    if (path / "config.json").is_file() and not (path / "model_config.json").is_file():
        return load_hf_dir(path, device=device)
    return load_model_dir(resolve_model_dir(path), device=device)


def main(argv: list[str] | None = None) -> int:
    """python -m aria.evaluate MODEL DATA [--tokenizer DIR] [--image-size 490] ..."""
    import argparse

    from aria.config import VideoConfig
    from aria.data.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(prog="python -m aria.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="run, checkpoint or model directory, or a Hugging Face directory")
    parser.add_argument("data", help="JSONL dataset (file, or directory with {split}.jsonl) or shards")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the run's data.tokenizer, or MODEL itself)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image-size", type=int, default=980, choices=(490, 980))
    parser.add_argument("--video-frames", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", default=None, help="write per-sample results (JSONL) here")
    args = parser.parse_args(argv)
    tokenizer = args.tokenizer
    if tokenizer is None:
        run_config = Path(args.model) / "config.yaml"
        if run_config.is_file():
            from aria.train.compose import load_resolved

            tokenizer = load_resolved(run_config).data.tokenizer
        else:
            tokenizer = args.model
    model = load_model(args.model)
    processor = Processor.for_model(Tokenizer.load(tokenizer), model.cfg, image_size=args.image_size,
                                    video=VideoConfig(num_frames=args.video_frames))
    result = exact_match(model, processor, args.data, args.split, args.max_new_tokens, args.batch_size,
                         args.limit)
    print(result.table())
    if args.out:
        result.write_jsonl(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
