"""aria-eval: answer accuracy of a model on a JSONL dataset, overall and per question type.

    aria-eval MODEL DATA [--metric exact|choice] [--out RESULTS.jsonl] [--limit N] [--batch-size B]
              [--max-new-tokens N] [--split test] [--strict] [--allow-outside-media]
              [--tokenizer DIR] [--image-size 490|980] [--num-frames N] [--device D] [--dtype bf16|fp32]

MODEL is a Hugging Face directory or our model, checkpoint or run directory (tokenizer and media
settings found as for aria-generate). DATA is a ``.jsonl`` file, a directory holding
``{split}.jsonl``, or webdataset shards, of conversations that end with the reference answer.

- ``--metric exact`` (default): greedy answers of at most ``--max-new-tokens``, compared with the
  reference ignoring case, spacing and a final full stop.
- ``--metric choice``: every record carries ``"options": [...]`` (two or more distinct answers,
  one of them the reference); the prediction is the option the model finds most likely as its
  whole answer (summed log-probability of the option and ``<|im_end|>``).

The table (per ``qtype``, or ``category``, then overall) goes to stdout; ``--out`` writes one JSON
line per sample (where, id, qtype, prompt, prediction, answer, correct; options and scores for
``choice``). Bad records are skipped and counted (``--strict`` stops at the first). See
``aria.evaluate`` for the schema and the design decisions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aria.commands import add_model_arguments, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aria-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    add_model_arguments(parser)
    parser.add_argument("data", help="JSONL file, directory with {split}.jsonl, or webdataset shards")
    parser.add_argument("--metric", choices=("exact", "choice"), default="exact")
    parser.add_argument("--out", default=None, metavar="RESULTS.jsonl", help="write per-sample results here")
    parser.add_argument("--limit", type=int, default=None, help="score at most this many samples")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length cap (exact)")
    parser.add_argument("--split", default="test", help="which {split}.jsonl of a dataset directory")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    parser.add_argument("--allow-outside-media", action="store_true",
                        help="allow media paths outside the dataset directory")
    return parser


def run(args: argparse.Namespace) -> None:
    for flag, value, low in (("--limit", args.limit, 0), ("--batch-size", args.batch_size, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.out is not None and not Path(args.out).parent.is_dir():
        raise FileNotFoundError(f"--out {args.out}: directory {Path(args.out).parent} does not exist")
    from aria.data.sources import open_source
    from aria.evaluate import evaluate
    from aria.inference import load_from_args

    open_source(args.data, args.split)  # a missing dataset fails before the model loads
    model, processor = load_from_args(args)
    result = evaluate(model, processor, args.data, args.metric, args.split, args.max_new_tokens,
                      args.batch_size, args.limit, args.strict,
                      allow_outside_media=args.allow_outside_media)
    print(result.table())
    if args.out is not None:
        result.write_jsonl(args.out)
        print(f"wrote {len(result.samples)} per-sample results to {args.out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("aria-eval", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
