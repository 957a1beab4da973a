"""aria-convert: training runs and our model directories <-> Hugging Face Aria directories.

    aria-convert to-hf SOURCE OUT_DIR [--tokenizer DIR] [--weights-only] [--merge-lora | --adapters-only]
                       [--dtype bf16|fp32|fp16] [--max-shard-size 5GB]
    aria-convert from-hf HF_DIR OUT_DIR [--dtype bf16|fp32|fp16] [--max-shard-size 5GB]

``to-hf``: SOURCE is a run directory (its latest checkpoint), a checkpoint directory
(``RUN/checkpoints/step_N``) or a model directory; expert-parallel checkpoints are consolidated on
the fly. OUT_DIR gets everything ``AriaForConditionalGeneration.from_pretrained(OUT_DIR)`` and
``AutoProcessor.from_pretrained(OUT_DIR)`` read, with no ``trust_remote_code``: safetensors (sharded
with ``model.safetensors.index.json`` above ``--max-shard-size``), ``config.json``,
``generation_config.json`` (stops at ``<|im_end|>`` too), the tokenizer files, ``processor_config.json``
+ ``preprocessor_config.json`` (crop size, minimum side and splitting as the run trained) and
``chat_template.jinja``. The tokenizer is ``--tokenizer``, else the run's ``data.tokenizer``, else the
one beside the weights; without one it stops and says so (``--weights-only`` skips tokenizer and
processor files). A LoRA run's checkpoint needs ``--merge-lora``: its adapters are merged into the
exported weights (a LoRA source without the flag is refused, never exported as its frozen base); a
LoRA checkpoint holds adapters and a reference to its base, which must be where it was and unchanged
(same fingerprint). ``--adapters-only`` writes the adapters instead, as a PEFT adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained``
applies to the base in the HF format (the released weights, or the base exported with ``to-hf``).

``from-hf``: HF_DIR in any of the four key layouts transformers reads or the original rhymes-ai
custom-code layout. OUT_DIR is our model directory (``model_config.json`` + safetensors) plus the
HF tokenizer and processor files, ready for ``init.from_checkpoint=OUT_DIR data.tokenizer=OUT_DIR``.

Every key and shape is checked before anything is written; errors (not a checkpoint, a raw
DeepSpeed directory without ``model/``, a shard or expert file missing, files of two EP layouts, a
tokenizer without Aria's special tokens, ...) name the file and what is missing, and exit with
status 1. Tensors stream one at a time and are written shard by shard, so memory stays at one
output shard whatever the model size.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aria-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    for name, src_help in (("from-hf", "Hugging Face Aria directory (config.json + safetensors)"),
                           ("to-hf", "run directory, checkpoint directory (step_N) or model directory "
                                     "(model_config.json + safetensors)")):
        p = sub.add_parser(name, help=f"convert a {src_help}")
        p.add_argument("source", help=src_help)
        p.add_argument("output", help="directory to write (created if missing)")
        p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                       help="cast floating tensors (default: keep the source dtype)")
        p.add_argument("--max-shard-size", default="5GB",
                       help="largest safetensors shard, e.g. 5GB or 500MB (default 5GB)")
        if name == "to-hf":
            p.add_argument("--tokenizer", default=None,
                           help="tokenizer directory (default: the run's data.tokenizer, else the "
                                "tokenizer files beside the weights)")
            p.add_argument("--weights-only", action="store_true",
                           help="write weights, config.json and generation_config.json only")
            p.add_argument("--merge-lora", action="store_true",
                           help="merge a LoRA run's adapters (model/adapters.safetensors) into the "
                                "exported weights")
            p.add_argument("--adapters-only", action="store_true",
                           help="write a LoRA run's adapters as a PEFT adapter directory "
                                "(adapter_config.json + adapter_model.safetensors) for "
                                "peft.PeftModel.from_pretrained on the base, instead of weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from aria.commands import run_command
    from aria.convert.export import from_hf, to_hf
    from aria.convert.store import DTYPES, parse_size

    def run() -> None:
        options = dict(dtype=DTYPES[args.dtype] if args.dtype else None,
                       max_shard_bytes=parse_size(args.max_shard_size))
        if args.direction == "to-hf":
            to_hf(args.source, args.output, tokenizer=args.tokenizer, weights_only=args.weights_only,
                  merge_lora=args.merge_lora, adapters_only=args.adapters_only, **options)
        else:
            from_hf(args.source, args.output, **options)

    return run_command("aria-convert", run)


if __name__ == "__main__":
    sys.exit(main())
