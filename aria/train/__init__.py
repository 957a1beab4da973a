"""Training: config composition, stages, the loop, checkpoints, metrics."""
