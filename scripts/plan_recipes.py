"""The memory plan of every recipe at full size, as the markdown tables of docs/performance.md.

    python scripts/plan_recipes.py [--model aria] [--gpu-memory 80] [--alternatives]

First table: each recipe's default layout on nodes of 8 GPUs (the number of nodes the recipe needs). With ``--alternatives`` also the table of layouts against each
other (1 node / 2 nodes per cell; about a quarter of an hour on 2 CPU cores: every cell is a trace
of the full model on fake tensors).
"""

from __future__ import annotations

import argparse

from aria.train.compose import compose_run
from aria.train.plan import GIB, plan_run

# recipe -> (nodes its default layout is planned on, image crops per row: None = the plan's default)
RECIPES = {
    "stage1_language": (1, None), "stage2_multimodal": (1, None), "stage4_post_training": (1, None),
    "finetune": (1, None), "finetune_video": (1, 16), "finetune_lora": (1, None),
    "stage3_long_context": (1, None), "finetune_long_context": (1, None),
}
ALTERNATIVES = {  # column -> overrides
    "default": ["parallel=default"],
    "EP8 Z1": ["parallel=default", "parallel.ep_size=8"],
    "EP8 Z1 ckpt": ["parallel=ep8"],
    "EP8 Z2": ["parallel=default", "parallel.ep_size=8", "parallel.zero_stage=2"],
    "EP8 Z2 ckpt": ["parallel=node"],
    "Z3 ckpt": ["parallel=zero3"],
    "EP8 Z2 ckpt SP4": ["parallel=long"],
}
ROWS = [  # recipe, crops per row (None = the plan's default)
    ("stage1_language", None), ("stage2_multimodal", None), ("finetune", None), ("finetune_video", 16),
    ("finetune_lora", None), ("stage3_long_context", 0), ("stage3_long_context", None),
    ("finetune_long_context", 0), ("finetune_long_context", None),
]


def _cell(value: float, memory: float) -> str:
    text = f"{value:.0f}" if abs(value - memory) > 0.5 else f"{value:.1f}"
    return f"**{text}**" if value <= memory else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="aria")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    parser.add_argument("--alternatives", action="store_true")
    args = parser.parse_args(argv)
    memory = args.gpu_memory
    print("| recipe | layout | nodes | planned micro-batch | GiB per GPU | headroom |")
    print("|---|---|---|---|---|---|")
    for recipe, (nodes, crops) in RECIPES.items():
        cfg = compose_run(recipe, [f"model={args.model}"], inputs=False)
        plan = plan_run(cfg, 8 * nodes, 8, int(memory * GIB), crops=crops)
        layout = " ".join(f"{k.split('.')[-1]}={v}" for k, v in plan.layout.items() if k.startswith("parallel."))
        print(f"| {recipe} | {layout} | {nodes} | {plan.workload.describe()} | {plan.total / GIB:.1f} | "
              f"{memory - plan.total / GIB:.1f} |", flush=True)
    if not args.alternatives:
        return 0
    print()
    print("| recipe | crops per row | " + " | ".join(ALTERNATIVES) + " |")
    print("|---|---|" + "---|" * len(ALTERNATIVES))
    for recipe, crops in ROWS:
        cells = []
        for overrides in ALTERNATIVES.values():
            cfg = compose_run(recipe, [f"model={args.model}", *overrides], inputs=False)
            totals = [plan_run(cfg, 8 * nodes, 8, int(memory * GIB), crops=crops).total / GIB for nodes in (1, 2)]
            cells.append(" / ".join(_cell(t, memory) for t in totals))
        print(f"| {recipe} | {'default' if crops is None else crops} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
