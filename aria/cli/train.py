"""aria-train / python -m aria.train: compose a recipe with overrides and train.

    python -m aria.train recipe=NAME run_dir=DIR [key=value ...]
    torchrun --nproc_per_node=8 -m aria.train recipe=NAME run_dir=DIR [key=value ...]

Re-running a command whose run_dir holds checkpoints resumes from the latest one. Exit codes: 0 done,
2 bad config, 3 stopped on a non-finite loss or gradient, 143 stopped by SIGTERM after saving.
"""

from __future__ import annotations

import os
import sys


def usage() -> str:
    from aria.train.compose import recipes

    return (__doc__ + "\nrecipes: " + ", ".join(recipes()) + "\nconfig groups (configs/): model, "
            "data, optim, parallel, stage, logging; every field of aria.config.RunConfig can be set.\n")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    from aria.train.compose import compose_run, split_recipe

    try:
        recipe, overrides = split_recipe(args)
        cfg = compose_run(recipe, overrides)
    except Exception as err:  # Hydra raises its own types for bad overrides
        print(f"aria-train: config error: {err}", file=sys.stderr)
        return 2
    from aria.train.trainer import check_model_overrides, train

    try:
        check_model_overrides(cfg, overrides)
    except (FileNotFoundError, ValueError) as err:  # also a source that holds no model
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one line per node
            print(f"aria-train: config error: {err}", file=sys.stderr)
        return 2
    return train(cfg)


if __name__ == "__main__":
    sys.exit(main())
