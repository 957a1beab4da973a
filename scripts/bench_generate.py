"""Greedy generation, ours against transformers' AriaForConditionalGeneration on the same weights:
prefill milliseconds and decode tokens/s at batch sizes 1 and 8, and whether the outputs agree.

    python scripts/bench_generate.py                                 # CPU: model=narrow
    python scripts/bench_generate.py --device cuda --model aria --batch-sizes 1 --json generate.json

Each prompt is ``--prompt-len`` tokens holding one ``--image-size`` px image (its <|img|> tokens
after the first token) and random text; every row of a batch has its own image and text, all
of the same length (no padding). Both generate ``--new-tokens`` tokens greedily without stopping
at an end token (ours: ``aria.model.generate``; transformers: ``generate(do_sample=False)``).
Prefill = the time to the first new token (a generation of one token); decode tokens/s = the
batch's further tokens over the rest of the time. Outputs: the number of rows whose tokens are
all equal, the first position where a row differs, and the largest difference between the two
implementations' next-token logits after the prompts beside the smallest gap between a row's two
largest logits: bf16 rounding can flip a near-tie argmax between two correct implementations
where twice that difference reaches the gap (random weights make such ties common); fp32 should
agree everywhere. Memory: peak of a whole generation in a fresh process above the loaded model (see
``bench_common``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def make_prompts(cfg, batch: int, prompt_len: int, image_size: int, device, dtype, seed: int = 0,
                 images_per_row: int = 1) -> dict:
    """``batch`` rows of ``prompt_len`` tokens, each with ``images_per_row`` crops of
    ``image_size`` px whose <|img|> tokens follow the first token."""
    g = torch.Generator().manual_seed(seed)
    patches = (image_size // cfg.vision.patch_size) ** 2
    if patches not in cfg.projector.patch_to_query:
        raise ValueError(f"--image-size {image_size}: {patches} patches per crop, but the model's "
                         f"projector maps {sorted(cfg.projector.patch_to_query)}")
    slots = images_per_row * cfg.projector.patch_to_query[patches]
    if slots + 2 > prompt_len:
        raise ValueError(f"a prompt of {prompt_len} tokens cannot hold {slots} image tokens and text")
    ids = torch.randint(10, cfg.text.vocab_size, (batch, prompt_len), generator=g)
    ids[ids == cfg.image_token_id] = 11
    ids[:, 1:1 + slots] = cfg.image_token_id
    pixels = torch.randn(batch * images_per_row, cfg.vision.num_channels, image_size, image_size, generator=g)
    mask = torch.ones(batch * images_per_row, image_size, image_size, dtype=torch.bool)
    return dict(ids=ids.to(device), pixels=pixels.to(device, dtype), mask=mask.to(device))


def add_decode_argument(parser: argparse.ArgumentParser) -> None:
    from aria.config import DECODE_MODES

    parser.add_argument("--decode", choices=DECODE_MODES, default="dynamic",
                        help="how our decode steps run (aria.model.generate): 'cuda_graph' replays one "
                             "captured step per token (CUDA, bf16)")


def generate_fn(model, impl: str, prompts: dict, new_tokens: int, decode: str = "dynamic"):
    """A closure generating ``new_tokens`` greedy tokens; returns them (B, new_tokens). ``decode``
    applies to ours."""
    if impl == "ours":
        from aria.model import generate

        def run():
            return generate(model, prompts["ids"], prompts["pixels"], prompts["mask"],
                            max_new_tokens=new_tokens, eos_token_ids=[], decode=decode)
    else:
        def run():
            with torch.no_grad():
                out = model.generate(input_ids=prompts["ids"], pixel_values=prompts["pixels"],
                                     pixel_mask=prompts["mask"], max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                     pad_token_id=model.config.text_config.pad_token_id)
            return out[:, prompts["ids"].shape[1]:]
    return run


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[int, int | None]:
    """(rows whose tokens are all equal, the earliest position where some row differs or None)."""
    n = min(ours.shape[1], theirs.shape[1])
    differ = (ours[:, :n] != theirs[:, :n].to(ours.device)).cpu()
    equal_rows = int((~differ.any(1)).sum()) if ours.shape[1] == theirs.shape[1] else 0
    first = differ.any(0).nonzero()
    return equal_rows, int(first[0]) if len(first) else None


def prompt_logits(model, prompts: dict) -> torch.Tensor:
    """The next-token logits after each prompt, (B, V) in fp32 (both take the same keywords)."""
    with torch.no_grad():
        return model(input_ids=prompts["ids"], pixel_values=prompts["pixels"], pixel_mask=prompts["mask"],
                     logits_to_keep=1).logits[:, -1].float()


def logits_agreement(ours_BV: torch.Tensor, theirs_BV: torch.Tensor) -> dict:
    """How far transformers' prompt logits are from ours, against how close ours come to a tie:
    rounding can change a row's argmax where twice the largest difference reaches the gap between
    its two largest logits."""
    top2 = ours_BV.topk(2, dim=-1).values
    return dict(logits_max_diff=(ours_BV - theirs_BV).abs().max().item(),
                top2_gap_min=(top2[:, 0] - top2[:, 1]).min().item(),
                same_argmax=int((ours_BV.argmax(-1) == theirs_BV.argmax(-1)).sum()))


def batch_prompts(args: argparse.Namespace, cfg, batch: int) -> dict:
    return make_prompts(cfg, batch, args.prompt_len, args.image_size, args.device, bc.DTYPES[args.dtype],
                        seed=batch)


def generation_peak(args: argparse.Namespace, impl: str, prompts_of, key: int) -> int:
    """Peak bytes of one whole generation of ``impl`` on ``prompts_of(args, cfg, key)``, in this
    (fresh) process."""
    model = bc.build_models(argparse.Namespace(**{**vars(args), "impls": [impl]}))[impl].eval()
    run = generate_fn(model, impl, prompts_of(args, bc.model_config(args), key), args.new_tokens, args.decode)
    with bc.PeakMemory(args.device) as peak:
        run()
    return peak.bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bc.add_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=490)
    add_decode_argument(parser)
    bc.add_profile_argument(parser)
    args = parser.parse_args(argv)
    bc.check_arguments(parser, args)
    check_decode(parser, args)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed needs tokens after the first)")

    cfg = bc.model_config(args)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    memory = bc.peaks(args, [(batch_prompts, batch) for batch in batches], generation_peak)
    models = {impl: m.eval() for impl, m in bc.build_models(args).items()}
    header = (f"{bc.machine(args.device)}{bc.describe_hf(models)}; model={args.model} ({cfg.name}), {args.dtype}; prompts of "
              f"{args.prompt_len} tokens with one {args.image_size} px image, {args.new_tokens} new tokens, "
              f"greedy; ours decodes {args.decode}; median of {args.repeats} after {args.warmup} warm-up")
    bc.print_header(header, args.profile)

    results = []
    for batch in batches:
        prompts = batch_prompts(args, cfg, batch)
        calls = {}
        for impl, model in models.items():
            calls[f"{impl} prefill"] = generate_fn(model, impl, prompts, 1)
            calls[impl] = generate_fn(model, impl, prompts, args.new_tokens, args.decode)
        seconds = bc.interleaved(calls, args.device, args.warmup, args.repeats)
        tokens = {impl: calls[impl]() for impl in models}
        profiles = {impl: bc.profile_call(calls[impl], args.device, args.profile,
                                          f"{impl} batch {batch}, prefill + {args.new_tokens - 1} decode steps")
                    for impl in models} if args.profile else {}
        logits = {impl: prompt_logits(model, prompts) for impl, model in models.items()}
        for impl in models:
            prefill, total = statistics.median(seconds[f"{impl} prefill"]), statistics.median(seconds[impl])
            peak_bytes = memory[impl, batch_prompts, batch]
            result = dict(impl=impl, batch=batch, prefill_ms=1e3 * prefill, seconds=total,
                          # None: the timings are too noisy to tell (more --warmup / --repeats)
                          decode_tokens_per_s=(batch * (args.new_tokens - 1) / (total - prefill)
                                               if total > prefill else None),
                          peak_bytes=peak_bytes)
            if impl in profiles:
                result["profile"] = profiles[impl]
            if impl != "ours" and "ours" in tokens:
                result["equal_rows"], result["first_difference"] = agreement(tokens["ours"], tokens[impl])
                result |= logits_agreement(logits["ours"], logits[impl])
            results.append(result)
            bc.progress(f"{impl} batch {batch}: prefill {result['prefill_ms']:.0f} ms, decode "
                        f"{fixed(result['decode_tokens_per_s'])} tokens/s, peak {bc.mib(peak_bytes)} MiB")
    report(results, args)
    bc.write_json(args.json, dict(machine=bc.machine(args.device), model=args.model, dtype=args.dtype,
                                  results=results))
    return 0


def check_decode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.decode == "cuda_graph" and (args.device != "cuda" or args.dtype != "bf16"):
        parser.error(f"--decode cuda_graph needs --device cuda and --dtype bf16 (got {args.device}, {args.dtype})")


def fixed(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(results: list[dict], args) -> None:
    by_key = {(r["impl"], r["batch"]): r for r in results}
    rows = []
    for r in results:
        if r["impl"] != "ours":
            continue
        row = [r["batch"], f"{r['prefill_ms']:.0f}", fixed(r["decode_tokens_per_s"]), bc.mib(r["peak_bytes"])]
        hf = by_key.get(("hf", r["batch"]))
        if hf is not None:
            same = f"{hf['equal_rows']}/{r['batch']}" + (
                "" if hf["first_difference"] is None else f" (from token {hf['first_difference']})")
            row += [f"{hf['prefill_ms']:.0f}", fixed(hf["decode_tokens_per_s"]), bc.mib(hf["peak_bytes"]),
                    bc.ratio(r["prefill_ms"], hf["prefill_ms"]),
                    bc.ratio(hf["decode_tokens_per_s"], r["decode_tokens_per_s"]), same,
                    f"{hf['logits_max_diff']:.2g} / {hf['top2_gap_min']:.2g}"]
        rows.append(row)
    header = ["batch", "prefill ms", "decode tok/s", "MiB"]
    if "hf" in args.impls:
        header += ["hf prefill ms", "hf decode tok/s", "hf MiB", "prefill speed-up", "decode speed-up",
                   "equal rows", "logits diff / top-2 gap"]
    bc.print_table(header, rows)


if __name__ == "__main__":
    sys.exit(main())
