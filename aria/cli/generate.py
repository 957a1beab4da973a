"""aria-generate: answer a prompt (text, images, videos) with a model, streaming the answer, or
answer a JSONL file of prompts.

    aria-generate MODEL --prompt TEXT [--image PATH ...] [--video PATH ... [--num-frames N]]
                  [--system TEXT] [--max-new-tokens N] [--greedy | --temperature T [--top-p P]]
                  [--seed S] [--tokenizer DIR] [--image-size 490|980] [--device D] [--dtype bf16|fp32]
                  [--decode dynamic|static|cuda_graph]
    aria-generate MODEL --batch PROMPTS.jsonl --out ANSWERS.jsonl [--batch-size B] [the options above]

MODEL is a Hugging Face directory or our model, checkpoint or run directory. The tokenizer is
``--tokenizer``, else the run config's ``data.tokenizer``, else MODEL itself; image size and video
sampling not given default to the run's data config, else to the directory's processor files,
else to the model's largest crop size (980 px for Aria); 8 video frames at 490 px
(``aria.inference.load_inference``).

One prompt is one user turn holding the images, then the videos, then the text (after a system
turn with ``--system``). The answer streams to stdout; the token count and speed go to stderr.

A batch file holds one JSON object per line, in one of two forms:

- ``{"prompt": "What is it?", "images": ["a.png"], "video": "v.mp4", "system": "...", "id": 7}``:
  every key but ``prompt`` optional; ``video`` is a path, ``{"path": ..., "num_frames": N}`` or a
  list of them; the media come before the text, as for one prompt;
- a conversation in the training schema (docs/data_format.md: ``messages`` + ``images`` /
  ``video``); if it ends with an assistant turn, that turn is the reference (copied to the output)
  and the model answers the turns before it.

Media paths are relative to the batch file's directory (absolute paths work too). Each output line
is ``{"where": "FILE:LINE", "id": ... (if given), "answer": TEXT, "token_ids": [...],
"stopped": true|false, "reference": ... (if given)}``, in input order; ``stopped`` is false when
``--max-new-tokens`` cut the answer.

Design decisions:
- Sampling by default (temperature 0.9, top-p 1.0, as in the official Aria examples); ``--greedy``
  for deterministic answers, token for token those of transformers' ``generate``. Without
  ``--seed`` the sampler is seeded from the OS.
- Greedy answers in a batch equal the single-prompt answers (left-padded batches; tested). Sampled
  rows share one generator, so a sampled answer depends on the seed and on its batch.
- Streaming decodes incrementally: a token's text is the decode of a short window of recent
  tokens minus that window's earlier text, held back while it ends in an incomplete UTF-8
  character (U+FFFD), so a character spread over byte-fallback tokens prints whole, and the
  printed pieces add up to the decode of the whole answer (tested). Only byte tokens that form no
  valid UTF-8 at all (a random model's) may print differently: whole-answer decoding turns every
  byte of such a run into U+FFFD.
- A batch file is parsed and its media paths checked before the model loads, so a bad line
  fails in seconds. Errors a user can cause (a missing file, an unreadable image or video, a
  directory that is not a model, a bad line) print one message naming the file and exit 1.
- ``--decode cuda_graph`` (CUDA, bf16) replays one captured decode step per token instead of
  launching its ~3,000 ops one by one (see ``aria.model.generation``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from aria.commands import add_model_arguments, run_command
from aria.config import DECODE_MODES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aria-generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1].split("\nDesign decisions")[0])
    add_model_arguments(parser)
    parser.add_argument("--prompt", help="the question (one prompt)")
    parser.add_argument("--image", action="extend", nargs="+", default=[], metavar="PATH",
                        help="image file(s), in order (repeatable)")
    parser.add_argument("--video", action="extend", nargs="+", default=[], metavar="PATH",
                        help="video file(s), in order (repeatable)")
    parser.add_argument("--system", default=None, help="a system turn before the prompt")
    parser.add_argument("--batch", default=None, metavar="FILE.jsonl",
                        help="answer every prompt of this file")
    parser.add_argument("--out", default=None, metavar="FILE.jsonl", help="where --batch writes its answers")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (--batch)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--greedy", action="store_true", help="always take the most likely token")
    sampling.add_argument("--temperature", type=float, default=None,
                          help="sampling temperature (default 0.9)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (reproducible answers)")
    parser.add_argument("--decode", choices=DECODE_MODES, default="dynamic",
                        help="how decode steps run: 'cuda_graph' replays one captured step per token "
                             "(CUDA, bf16; fastest at small batches)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot express; ``ValueError`` naming the flag."""
    if args.batch is None:
        if args.prompt is None:
            raise ValueError("give --prompt TEXT (or --batch FILE.jsonl --out FILE.jsonl)")
        if args.out is not None:
            raise ValueError("--out is for --batch; one prompt's answer goes to stdout")
        if args.num_frames is not None and not args.video:
            raise ValueError("--num-frames needs --video (or --batch)")
    else:
        given = [f for f, v in (("--prompt", args.prompt), ("--image", args.image), ("--video", args.video),
                                ("--system", args.system)) if v]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be combined with --batch: the prompts come "
                             "from the batch file")
        if args.out is None:
            raise ValueError("--batch needs --out FILE.jsonl")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_frames is not None and args.num_frames < 1:
        raise ValueError(f"--num-frames must be >= 1, got {args.num_frames}")
    if args.temperature is not None and not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0 (use --greedy for greedy answers), got "
                         f"{args.temperature}")
    if args.top_p is not None:
        if args.greedy:
            raise ValueError("--top-p is for sampling; it cannot be combined with --greedy")
        if not 0 < args.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


# A prompt has no answer yet, but a conversation record must hold an assistant turn: records are
# parsed (and so validated) with this placeholder appended, which is then dropped.
_PLACEHOLDER = {"role": "assistant", "content": "placeholder"}


def shorthand_record(record: dict) -> dict:
    """``{"prompt", "images", "video", "system"}`` -> a conversation record (training schema)."""
    from aria.data.errors import DataError

    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        raise DataError(f"'prompt' must be a string, got {type(prompt).__name__}", "invalid_record")
    images = record.get("images", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list):
        raise DataError(f"'images' must be a list of paths, got {type(images).__name__}", "invalid_record")
    videos = record.get("video", [])
    videos = videos if isinstance(videos, list) else [videos]
    content = ([{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
               + [{"type": "text", "text": prompt}])
    messages = [{"role": "user", "content": content}]
    if record.get("system") is not None:
        messages.insert(0, {"role": "system", "content": record["system"]})
    converted = {"messages": messages, "images": images}
    if videos:
        converted["video"] = videos
    return converted


def prompt_sample(record: Any, where: str, resolver):
    """(the conversation to continue, the reference answer or None) of a batch record (either form)
    or of the record built from the command line; ``DataError`` located at ``where``."""
    from aria.data.errors import DataError
    from aria.data.records import Sample, parse_record
    from aria.evaluate import split_prompt

    if not isinstance(record, dict):
        raise DataError(f"a prompt must be a JSON object, got {type(record).__name__}", "invalid_record",
                        where)
    try:
        if "messages" not in record:
            if "prompt" not in record:
                raise DataError("a prompt record needs 'prompt' (a string) or 'messages' (a conversation)",
                                "invalid_record")
            record = shorthand_record(record)
        messages = record["messages"]
        last = messages[-1] if isinstance(messages, list) and messages else None
        if isinstance(last, dict) and last.get("role") == "assistant":
            return split_prompt(parse_record(record, where, resolver))
        sample = parse_record({**record, "messages": messages + [_PLACEHOLDER]} if isinstance(messages, list)
                              else record, where, resolver)
        return Sample(sample.kind, sample.turns[:-1], sample.media, sample.where), None
    except DataError as err:
        raise err.at(where) from None


def check_media_exist(sample) -> None:
    from aria.data.errors import MediaError

    for ref in sample.media:
        if ref.path is not None and not ref.path.is_file():
            raise MediaError(f"{ref.kind} file {ref.name or ref.path} not found ({ref.path})",
                             "missing_file", sample.where)


def read_batch_file(path: str | Path) -> list[tuple[dict, Any, str | None]]:
    """(record, prompt sample, reference) of every non-empty line, all checked first."""
    from aria.data.records import MediaResolver, parse_json_line

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--batch file not found: {path}")
    resolver = MediaResolver(path.parent, allow_outside=True)
    prompts = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            record = parse_json_line(line, where)
            sample, reference = prompt_sample(record, where, resolver)
            check_media_exist(sample)
            prompts.append((record, sample, reference))
    if not prompts:
        raise ValueError(f"--batch file {path} holds no prompts")
    return prompts


def command_line_sample(args: argparse.Namespace):
    from aria.data.records import MediaResolver

    for flag, paths in (("--image", args.image), ("--video", args.video)):
        for p in paths:
            if not Path(p).is_file():
                raise FileNotFoundError(f"{flag} {p}: file not found")
    record = {"prompt": args.prompt, "images": args.image, "video": args.video, "system": args.system}
    return prompt_sample(record, "prompt", MediaResolver(None, allow_outside=True))[0]


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


class StreamDecoder:
    """Incremental detokenizer: ``push(token_id)`` returns the new text that token completes (maybe
    ''), ``flush()`` whatever is held back; for valid UTF-8 the pieces add up to the decode of all
    the tokens."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: context that makes a piece decode as it does mid-text
        self.read = 0  # tokens whose text was returned

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._text(self.ids[self.prefix:self.read])
        text = self._text(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        before = self._text(self.ids[self.prefix:self.read])
        text = self._text(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def sampling_settings(args: argparse.Namespace, device) -> dict[str, Any]:
    import torch

    if args.greedy:
        return {"temperature": 0.0, "top_p": 1.0, "generator": None}
    generator = torch.Generator(device=device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()
    return {"temperature": 0.9 if args.temperature is None else args.temperature,
            "top_p": 1.0 if args.top_p is None else args.top_p, "generator": generator}


def answer_one(args: argparse.Namespace, model, processor, sample) -> None:
    from aria.inference import generate_batch, prompt_inputs, stop_ids

    inputs = prompt_inputs(processor, sample)
    decoder, stops = StreamDecoder(processor.tokenizer), set(stop_ids(processor))
    state = {"count": 0, "stopped": False}

    def on_token(token_B) -> None:
        token = int(token_B[0])
        if state["stopped"] or token in stops:
            state["stopped"] = True
            return
        state["count"] += 1
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()

    start = time.perf_counter()
    generate_batch(model, processor, [inputs], args.max_new_tokens, on_token=on_token, decode=args.decode,
                   **sampling_settings(args, next(model.parameters()).device))
    seconds = time.perf_counter() - start
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    ending = "" if state["stopped"] else f", stopped at --max-new-tokens {args.max_new_tokens}"
    print(f"[{state['count']} tokens in {seconds:.2f} s, {state['count'] / max(seconds, 1e-9):.1f} "
          f"tokens/s{ending}]", file=sys.stderr)


def answer_batch_file(args: argparse.Namespace, model, processor, prompts) -> None:
    from aria.inference import generate_batch, prompt_inputs

    sampling = sampling_settings(args, next(model.parameters()).device)
    out = Path(args.out)
    start, tokens = time.perf_counter(), 0
    with open(out, "w", encoding="utf-8") as f:
        for first in range(0, len(prompts), args.batch_size):
            chunk = prompts[first: first + args.batch_size]
            inputs = [prompt_inputs(processor, sample) for _, sample, _ in chunk]
            for (record, sample, reference), answer in zip(
                    chunk, generate_batch(model, processor, inputs, args.max_new_tokens, decode=args.decode,
                                          **sampling)):
                row: dict[str, Any] = {"where": sample.where}
                if "id" in record:
                    row["id"] = record["id"]
                row.update(answer=answer.text, token_ids=answer.token_ids, stopped=answer.stopped)
                if reference is not None:
                    row["reference"] = reference
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                tokens += len(answer.token_ids)
            f.flush()
            print(f"[{min(first + args.batch_size, len(prompts))}/{len(prompts)} prompts]", file=sys.stderr)
    seconds = time.perf_counter() - start
    print(f"wrote {len(prompts)} answers to {out} ({tokens} tokens in {seconds:.1f} s)", file=sys.stderr)


def run(args: argparse.Namespace) -> None:
    check_args(args)
    if args.batch is not None:
        out = Path(args.out)
        if not out.parent.is_dir():
            raise FileNotFoundError(f"--out {out}: directory {out.parent} does not exist")
        prompts = read_batch_file(args.batch)
    else:
        sample = command_line_sample(args)
    from aria.inference import load_from_args

    model, processor = load_from_args(args)
    if args.batch is not None:
        answer_batch_file(args, model, processor, prompts)
    else:
        answer_one(args, model, processor, sample)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("aria-generate", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
