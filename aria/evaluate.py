"""Answer accuracy on a dataset: exact match of greedy answers, or multiple choice by
log-likelihood.

Letters: B prompts in a batch, T prompt length, N new tokens, R option rows (every option of every
prompt in the batch), O option length, V vocabulary.

Dataset schema: the conversation records of training (docs/data_format.md), each ending with an
assistant text turn, the reference answer. Optional top-level fields:

- ``id``: copied to the per-sample results;
- ``qtype`` (or ``category``): the group of the per-type table;
- ``options`` (``choice`` metric): two or more distinct candidate answers (strings), one of which
  equals the reference answer after ``normalize``. Whether the question lists them is up to the
  data; the model is never shown the options, only asked how likely each is as its answer::

    {"id": "q7", "qtype": "colour", "options": ["red", "green", "blue"], "images": ["img/7.png"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                  {"role": "assistant", "content": "green"}]}

Design decisions:
- The prompt is everything before the last turn plus the generation header, exactly the tokens the
  model saw in training.
- ``exact``: a prediction is the greedy answer up to the first stop token (``<|im_end|>`` or the
  end-of-text token); correct when it equals the reference after ``normalize`` (case, spacing and
  one trailing full stop are ignored).
- ``choice``: an option's score is the summed log-probability of its tokens followed by
  ``<|im_end|>``, i.e. of the option as the whole assistant answer (the end marker keeps "red" from
  winning as a prefix of "red circle"). The prediction is the best-scoring option, the first listed
  on a tie. An option is tokenized behind the ``<|im_start|>assistant\\n`` header and the header's
  tokens are checked to be unchanged, so its tokens are those the full conversation would have.
- ``choice`` batching: one prefill over the B prompts (left-padded), then every prompt's KV cache
  row is copied once per option and one forward over all R option rows (right-padded as segment
  0) gives every option token's log-probability. Images and prompts are encoded once, not once per
  option; a test holds the scores against transformers' full forward of each prompt + option.
- Prompts are batched as ``aria.inference`` batches them (left padding: every row generates exactly
  what it would alone).
- Bad records (malformed, no final assistant answer, bad options, unreadable media) are handled by
  ``BadInputPolicy`` like in training: skipped and counted by reason, or raised when ``strict``.
  Media are decoded per record before batching, so a bad file costs only its own record.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from aria.data.errors import BadInputPolicy, DataError
from aria.data.loader import read_record
from aria.data.processor import IM_END, IM_START, Processor
from aria.data.records import Sample
from aria.data.sources import open_source
from aria.inference import batch_model_inputs, generate_answers, prompt_inputs
from aria.model.generation import left_padded_positions

log = logging.getLogger("aria.evaluate")

NO_QTYPE = "(none)"
"""The ``by_qtype`` key of samples whose record has no ``qtype`` (or ``category``)."""
METRICS = ("exact", "choice")

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
    options: list[str] | None = None
    """The candidate answers (``choice`` metric only)."""
    scores: list[float] | None = None
    """Summed log-probability of each option (``choice`` metric only)."""


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
        """One JSON object per sample (the ``SampleResult`` fields; ``options`` and ``scores`` only
        for the choice metric), in dataset order."""
        with open(path, "w", encoding="utf-8") as f:
            for s in self.samples:
                row = {k: v for k, v in asdict(s).items()
                       if v is not None or k not in ("options", "scores")}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


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


def prompt_text(processor: Processor, input_ids: torch.Tensor) -> str:
    text = processor.tokenizer.decode(input_ids.reshape(-1).tolist())
    return _IMAGE_BLOCK.sub("<image>", text)


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------


def check_options(options: Any, answer: str) -> tuple[list[str], int]:
    """(the options, the index of the reference answer among them); ``DataError`` kind
    ``bad_options`` unless ``options`` is a list of >= 2 distinct non-empty strings holding the
    answer (compared after ``normalize``)."""
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise DataError(f"'options' must be a list of two or more strings, got {options!r}", "bad_options")
    keys = [normalize(o) for o in options]
    if not all(keys):
        raise DataError(f"'options' holds an empty option: {options!r}", "bad_options")
    if len(set(keys)) < len(keys):
        raise DataError(f"'options' holds the same option twice (after normalising case, spaces and "
                        f"a final full stop): {options!r}", "bad_options")
    if normalize(answer) not in keys:
        raise DataError(f"the reference answer {answer!r} is not one of the options {options!r}",
                        "bad_options")
    return options, keys.index(normalize(answer))


def option_token_ids(processor: Processor, option: str) -> list[int]:
    """The tokens of ``option`` + ``<|im_end|>`` as they follow the ``<|im_start|>assistant\\n``
    header in a tokenized conversation."""
    tok = processor.tokenizer
    special = tok.find_special_token(option)
    if special is not None:
        raise DataError(f"option {option!r} contains the special token {special} as text",
                        "special_token_in_text")
    header = f"{IM_START}assistant\n"
    header_ids = tok.encode(header)
    ids = tok.encode(header + option + IM_END)
    if ids[:len(header_ids)] != header_ids or len(ids) == len(header_ids) or ids[-1] != tok.im_end_id:
        raise DataError(f"option {option!r} does not tokenize on its own after the assistant header "
                        "(its first characters merge with the header's line break)", "tokenizer_mismatch")
    return ids[len(header_ids):]


@torch.no_grad()
def score_options(model: torch.nn.Module, processor: Processor, inputs: list[dict[str, Any]],
                  options: list[list[str]]) -> list[list[float]]:
    """Summed log-probability of each option of each prompt as its assistant answer (see the module
    docstring): one prefill over the prompts, one forward over all their options."""
    from aria.model.decoder import KVCache

    tok = processor.tokenizer
    batch = batch_model_inputs(model, processor, inputs)
    device = batch["input_ids"].device
    option_ids = [[option_token_ids(processor, o) for o in opts] for opts in options]
    rows = [(b, ids) for b, per_prompt in enumerate(option_ids) for ids in per_prompt]
    B, T = batch["input_ids"].shape
    R, O = len(rows), max(len(ids) for _, ids in rows)

    # Prefill: positions count real tokens only, padding is segment 0 (as in ``generate``).
    segments_BT = batch["attention_mask"]
    positions_BT = left_padded_positions(segments_BT)
    cache = KVCache(model.cfg.text, B, T + O, next(model.parameters()).dtype, device)
    out = model(batch["input_ids"], batch["pixel_values"], batch["pixel_mask"], position_ids=positions_BT,
                segment_ids=segments_BT, cache=cache, logits_to_keep=1,
                image_feature_order=batch["image_feature_order"])
    first_logp_BV = torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    # One cache row per option, copied from its prompt's row.
    src_R = torch.tensor([b for b, _ in rows], device=device)
    option_cache = copy.copy(cache)
    option_cache.k, option_cache.v = cache.k[:, src_R], cache.v[:, src_R]
    option_cache.segments_BS = cache.segments_BS[src_R]
    ids_RO = torch.full((R, O), tok.pad_id, dtype=torch.long)
    segments_RO = torch.zeros((R, O), dtype=torch.long)
    for r, (_, ids) in enumerate(rows):
        ids_RO[r, :len(ids)] = torch.tensor(ids)
        segments_RO[r, :len(ids)] = 1
    ids_RO, segments_RO = ids_RO.to(device), segments_RO.to(device)
    positions_RO = segments_BT.sum(dim=1)[src_R, None] + torch.arange(O, device=device)
    logits_ROV = model(ids_RO, position_ids=positions_RO, segment_ids=segments_RO,
                       cache=option_cache).logits

    # log p(token j) comes from the prefill's last logits for j = 0, else from option position j-1.
    logp_RO = torch.empty((R, O), device=device)
    logp_RO[:, 0] = first_logp_BV[src_R].gather(1, ids_RO[:, :1]).squeeze(1)
    if O > 1:
        logp_RO[:, 1:] = torch.log_softmax(logits_ROV[:, :-1].float(), dim=-1).gather(
            2, ids_RO[:, 1:, None]).squeeze(2)
    scores_R = (logp_RO * segments_RO).sum(dim=1).tolist()
    result, r = [], 0
    for per_prompt in option_ids:
        result.append(scores_R[r: r + len(per_prompt)])
        r += len(per_prompt)
    return result


# ---------------------------------------------------------------------------------------------
# The evaluation loop
# ---------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    where: str
    id: str | None
    qtype: str | None
    answer: str
    inputs: dict[str, Any]
    options: list[str] | None = None
    answer_index: int | None = None


def evaluate(model: torch.nn.Module, processor: Processor, dataset: str | Path, metric: str = "exact",
             split: str = "test", max_new_tokens: int = 16, batch_size: int = 8,
             limit: int | None = None, strict: bool = False, device: torch.device | str | None = None,
             allow_outside_media: bool = False) -> EvalResult:
    """Accuracy of ``model`` on ``dataset`` (a ``.jsonl`` file, a directory holding
    ``{split}.jsonl``, or webdataset shards), read once in order, by ``metric`` 'exact' (greedy
    answers, ``max_new_tokens`` at most) or 'choice' (the record's ``options`` by likelihood).

    ``limit`` caps the number of scored samples (skipped records do not count); ``strict`` raises
    the first bad record instead of skipping it; ``device`` moves the model there first.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
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
        inputs = [p.inputs for p in pending]
        if metric == "exact":
            predictions = generate_answers(model, processor, inputs, max_new_tokens)
            for p, prediction in zip(pending, predictions):
                result.samples.append(SampleResult(
                    p.where, p.id, p.qtype, prompt_text(processor, p.inputs["input_ids"]), prediction,
                    p.answer, normalize(prediction) == normalize(p.answer)))
        else:
            all_scores = score_options(model, processor, inputs, [p.options for p in pending])
            for p, scores in zip(pending, all_scores):
                best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first of equals
                result.samples.append(SampleResult(
                    p.where, p.id, p.qtype, prompt_text(processor, p.inputs["input_ids"]),
                    p.options[best], p.answer, best == p.answer_index, p.options, scores))
        pending.clear()
        log.info("evaluated %d samples: accuracy %.4f", len(result.samples), result.accuracy)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for raw in open_source(dataset, split, allow_outside_media).iterate_once():
                if limit is not None and len(result.samples) + len(pending) >= limit:
                    break
                loaded = policy.attempt(read_record, raw)  # parsing; bad records skipped
                if loaded is None:
                    continue
                try:
                    prompt, answer = split_prompt(loaded.sample)
                    item = _Pending(raw.where, _optional_str(raw.record.get("id")),
                                    _optional_str(raw.record.get("qtype", raw.record.get("category"))),
                                    answer, {})
                    if metric == "choice":
                        item.options, item.answer_index = check_options(raw.record.get("options"), answer)
                        for option in item.options:
                            option_token_ids(processor, option)  # refuse it now, not mid-batch
                    item.inputs = prompt_inputs(processor, prompt)
                except DataError as err:
                    policy.handle(err.at(raw.where))
                    continue
                pending.append(item)
                if len(pending) == batch_size:
                    flush()
            if pending:
                flush()
    finally:
        model.train(was_training)
    result.skipped = dict(policy.counts)
    return result


def exact_match(model: torch.nn.Module, processor: Processor, dataset: str | Path, split: str = "test",
                max_new_tokens: int = 16, batch_size: int = 8, limit: int | None = None,
                strict: bool = False, device: torch.device | str | None = None) -> EvalResult:
    """``evaluate`` with the exact-match metric."""
    return evaluate(model, processor, dataset, "exact", split, max_new_tokens, batch_size, limit,
                    strict, device)


def multiple_choice(model: torch.nn.Module, processor: Processor, dataset: str | Path,
                    split: str = "test", batch_size: int = 8, limit: int | None = None,
                    strict: bool = False, device: torch.device | str | None = None) -> EvalResult:
    """``evaluate`` with the multiple-choice metric (records need ``options``)."""
    return evaluate(model, processor, dataset, "choice", split, batch_size=batch_size, limit=limit,
                    strict=strict, device=device)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)
