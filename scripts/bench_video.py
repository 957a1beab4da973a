"""Video question answering, ours against transformers' AriaForConditionalGeneration on the same
weights: end-to-end seconds and peak memory for 32 / 64 / 256 frames -> a 64-token greedy answer.

    python scripts/bench_video.py --repeats 1 --warmup 0             # CPU: model=narrow
    python scripts/bench_video.py --device cuda --model aria --frames 256 --json video.json

A prompt holds ``--frames`` crops of ``--frame-size`` px (490 px: 128 <|img|> tokens each for
Aria, as its video recipe samples frames) after the first token, then a question of
``--question-len`` random text tokens; both implementations generate ``--new-tokens`` tokens
greedily without stopping (the prompts of ``bench_generate``). End-to-end = vision encoder over
every frame, prefill, decode. A case that runs out of memory in its fresh process is reported as
such; its timing is then skipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from bench_generate import (add_decode_argument, agreement, check_decode, generate_fn,  # noqa: E402
                            generation_peak, make_prompts)


def prompt_len(cfg, frames: int, frame_size: int, question_len: int) -> int:
    patches = (frame_size // cfg.vision.patch_size) ** 2
    return 1 + frames * cfg.projector.patch_to_query.get(patches, 0) + question_len


def video_prompts(args, cfg, frames: int) -> dict:
    return make_prompts(cfg, 1, prompt_len(cfg, frames, args.frame_size, args.question_len), args.frame_size,
                        args.device, bc.DTYPES[args.dtype], seed=frames, images_per_row=frames)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bc.add_arguments(parser)
    parser.add_argument("--frames", default="32,64,256", help="comma-separated frame counts")
    parser.add_argument("--frame-size", type=int, default=490)
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    add_decode_argument(parser)
    args = parser.parse_args(argv)
    bc.check_arguments(parser, args)
    check_decode(parser, args)

    cfg = bc.model_config(args)
    frame_counts = [int(f) for f in args.frames.split(",")]
    memory = bc.peaks(args, [(video_prompts, frames) for frames in frame_counts], generation_peak)
    models = {impl: m.eval() for impl, m in bc.build_models(args).items()}
    print(f"{bc.machine(args.device)}{bc.describe_hf(models)}; model={args.model} ({cfg.name}), {args.dtype}; frames of "
          f"{args.frame_size} px + a {args.question_len}-token question -> {args.new_tokens} greedy tokens; "
          f"ours decodes {args.decode}; median of {args.repeats} after {args.warmup} warm-up")

    results = []
    for frames in frame_counts:
        prompts = video_prompts(args, cfg, frames)
        runnable = {impl: m for impl, m in models.items() if memory[impl, video_prompts, frames] != bc.OOM}
        calls = {impl: generate_fn(m, impl, prompts, args.new_tokens, args.decode) for impl, m in runnable.items()}
        seconds = bc.interleaved(calls, args.device, args.warmup, args.repeats)
        tokens = {impl: call() for impl, call in calls.items()}
        for impl in models:
            result = dict(impl=impl, frames=frames, prompt_tokens=prompts["ids"].shape[1],
                          seconds=statistics.median(seconds[impl]) if impl in seconds else bc.OOM,
                          peak_bytes=memory[impl, video_prompts, frames])
            if impl != "ours" and impl in tokens and "ours" in tokens:
                result["equal_rows"], result["first_difference"] = agreement(tokens["ours"], tokens[impl])
            results.append(result)
            shown = result["seconds"] if isinstance(result["seconds"], str) else f"{result['seconds']:.2f}"
            bc.progress(f"{impl} {frames} frames: {shown} s, peak {bc.mib(result['peak_bytes'])} MiB")
    report(results, args)
    bc.write_json(args.json, dict(machine=bc.machine(args.device), model=args.model, dtype=args.dtype,
                                  results=results))
    return 0


def report(results: list[dict], args) -> None:
    by_key = {(r["impl"], r["frames"]): r for r in results}
    rows = []
    for r in results:
        if r["impl"] != "ours":
            continue
        seconds = r["seconds"] if isinstance(r["seconds"], str) else f"{r['seconds']:.2f}"
        row = [r["frames"], r["prompt_tokens"], seconds, bc.mib(r["peak_bytes"])]
        hf = by_key.get(("hf", r["frames"]))
        if hf is not None:
            hf_seconds = hf["seconds"] if isinstance(hf["seconds"], str) else f"{hf['seconds']:.2f}"
            same = "-" if "equal_rows" not in hf else ("yes" if hf["first_difference"] is None
                                                       else f"from token {hf['first_difference']}")
            row += [hf_seconds, bc.mib(hf["peak_bytes"]), bc.ratio(r["seconds"], hf["seconds"]),
                    bc.ratio(r["peak_bytes"], hf["peak_bytes"]), same]
        rows.append(row)
    header = ["frames", "prompt tokens", "ours s", "MiB"]
    if "hf" in args.impls:
        header += ["hf s", "hf MiB", "speed-up", "memory hf/ours", "same answer"]
    bc.print_table(header, rows)


if __name__ == "__main__":
    sys.exit(main())
