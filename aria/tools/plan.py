"""``python -m aria.tools.plan``: the memory and time plan of a training run, per GPU
(``aria.train.plan`` computes it; ``docs/performance.md`` says what it models and how well).

    python -m aria.tools.plan recipe=NAME [key=value ...] [--gpus-per-node 8] [--nodes N]
        [--gpu-memory 80] [--mfu 0.4] [--peak-tflops 989] [--crops N] [--crop-size PX] [--docs N]
        [--ep-imbalance 1.0] [--suggest]

Exit code 0: the run fits; 1: it does not (the cheapest layout that does is printed); 2: bad input.
"""

from __future__ import annotations

import argparse
import sys

from aria.train.plan import (DEFAULT_MFU, GIB, H100_BF16_PEAK, LAYOUT_FIELDS, PlanCache, overrides, plan_run,
                             suggest_layout, with_layout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aria.tools.plan",
        description="Memory (per GPU) and time plan of a training run, from the real model code run on "
                    "fake tensors and DeepSpeed's partitioning. Takes the training command's "
                    "recipe=NAME and key=value overrides; data and weight paths may stay unset.")
    parser.add_argument("overrides", nargs="*", help="recipe=NAME and key=value config overrides")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-memory", type=float, default=None,
                        help="GiB per GPU (default: parallel.gpu_memory_gb, else 80)")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="assumed model FLOPs utilisation")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK / 1e12,
                        help="dense bf16 TFLOP/s of one GPU (H100/H200: 989)")
    parser.add_argument("--crops", type=int, default=None,
                        help="image crops per row (default: 0 for text-only stages, else images filling "
                             "half the row)")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="crop side in px (default: data.image_size; video frames: data.video.image_size)")
    parser.add_argument("--docs", type=int, default=1, help="documents packed into a row")
    parser.add_argument("--ep-imbalance", type=float, default=1.0,
                        help="with expert parallelism: rows a GPU receives as a multiple of what it sends "
                             "(1 = perfectly balanced routing)")
    parser.add_argument("--suggest", action="store_true",
                        help="also search for the cheapest layout that fits")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come after the flags
    bad = [a for a in args.overrides if "=" not in a]
    if bad:
        parser.error(f"expected recipe=NAME or key=value, got {bad}")
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus-per-node must be at least 1")

    from aria.commands import run_command
    from aria.train.compose import compose_run, split_recipe

    def run() -> int:
        recipe, rest = split_recipe(args.overrides)
        cfg = compose_run(recipe, rest, inputs=False)
        gib = args.gpu_memory or cfg.parallel.gpu_memory_gb or 80
        world = args.nodes * args.gpus_per_node
        kwargs = dict(crops=args.crops, docs=args.docs, crop_size=args.crop_size, mfu=args.mfu,
                      peak_flops=args.peak_tflops * 1e12, ep_imbalance=args.ep_imbalance)
        cache = PlanCache()
        plan = plan_run(cfg, world, args.gpus_per_node, int(gib * GIB), _cache=cache, **kwargs)
        print(plan.report())
        if args.suggest or not plan.fits:
            layout = suggest_layout(cfg, world, args.gpus_per_node, int(gib * GIB), _cache=cache, **kwargs)
            if layout is None:
                print(f"\nno layout of {', '.join(LAYOUT_FIELDS)} fits {world} GPUs of {gib:g} GiB")
            else:
                best = plan_run(with_layout(cfg, layout), world, args.gpus_per_node, int(gib * GIB),
                                _cache=cache, **kwargs)
                print(f"\ncheapest layout that fits: {overrides(layout)} -> {best.total / GIB:.1f} GiB per GPU, "
                      f"{best.step_seconds:.2f} s per step")
        return 0 if plan.fits else 1

    return run_command(parser.prog, run, error_code=2)


if __name__ == "__main__":
    sys.exit(main())
