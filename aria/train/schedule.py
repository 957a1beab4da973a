"""Learning-rate schedules as a multiplier of the peak rate, per optimizer step.

Design decisions:
- Warmup is linear from 1/warmup to 1 (never 0, so step 1 moves the weights).
- 'cosine' and 'linear' decay from the end of warmup to ``min_lr_ratio`` at the last step;
  'constant' holds; 'anneal' holds and then decays linearly over the last ``decay_ratio`` of the run
  (warmup-stable-decay), the shape the paper's post-training "anneals the learning rate" with.
"""

from __future__ import annotations

import math
from typing import Callable

from aria.config import OptimConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """f(step) for ``torch.optim.lr_scheduler.LambdaLR``; step 0 is the first optimizer step."""
    warm = warmup_steps(cfg, total_steps)
    floor = cfg.min_lr_ratio
    decay_start = total_steps - max(1, int(round(cfg.decay_ratio * total_steps)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "anneal":
            if step < decay_start:
                return 1.0
            span = max(1, total_steps - 1 - decay_start)
            return 1.0 - (1.0 - floor) * min(1.0, (step - decay_start) / span)
        progress = min(1.0, (step - warm) / max(1, total_steps - 1 - warm))
        if cfg.schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
