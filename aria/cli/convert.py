"""aria-convert: our model directories <-> Hugging Face Aria directories.

    aria-convert from-hf HF_DIR OUT_DIR [--dtype bf16|fp32] [--max-shard-size 5GB]
    aria-convert to-hf MODEL_DIR OUT_DIR [--dtype bf16|fp32] [--max-shard-size 5GB]

``to-hf`` writes weights + config.json + generation_config.json, loadable with
``AriaForConditionalGeneration.from_pretrained(OUT_DIR)``; ``from-hf`` accepts every HF key layout
and the original rhymes-ai checkpoint names.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aria-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    for name, src_help in (("from-hf", "Hugging Face Aria directory (config.json + safetensors)"),
                           ("to-hf", "our model directory (model_config.json + safetensors)")):
        p = sub.add_parser(name, help=f"convert a {src_help}")
        p.add_argument("source", help=src_help)
        p.add_argument("output", help="directory to write (created if missing)")
        p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                       help="cast floating tensors (default: keep the source dtype)")
        p.add_argument("--max-shard-size", default="5GB",
                       help="largest safetensors shard, e.g. 5GB or 500MB (default 5GB)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from aria.convert.checkpoint import DTYPES, convert, parse_size

    try:
        convert(args.source, args.output, args.direction,
                dtype=DTYPES[args.dtype] if args.dtype else None,
                max_shard_bytes=parse_size(args.max_shard_size))
    except (ValueError, FileNotFoundError) as err:
        print(f"aria-convert: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
