"""Training checkpoints: written by all ranks together, atomically, resumed exactly on the same
layout or on another one, pruned to the last k.

Layout of a run directory::

    config.yaml                      the resolved config of the run
    metrics.jsonl                    one JSON object per logged step
    checkpoints/
      step_00000100/
        model/                       our weights (``aria.train.weights``): a sharded model directory
                                     (index + one file per writing rank; expert-parallel runs add
                                     layout.json and one experts file per EP rank), the directory
                                     conversion and the next stage read. A LoRA run's holds
                                     adapters.safetensors + lora.json + base.json (the frozen
                                     base's path and fingerprint) and no base weights
                                     (``aria.convert.lora_base``)
        optimizer/                   fp32 master weights and Adam moments by parameter and global
                                     offset, one file per rank, + state.json (step, layout); of the
                                     trained parameters only (a LoRA run: the adapters)
                                     (``aria.parallel.optimizer_state``)
        trainer/rank00000.pt ...     per rank: step, tokens seen, data-loader position, RNG states
        config.yaml                  the resolved config at that step
      latest                         the name of the newest complete checkpoint

Design decisions:
- No pickles: weights and optimizer state are safetensors, the rest JSON or a ``torch.save`` of
  plain tensors, numbers and strings that loads with ``torch.load(weights_only=True)``.
- One copy of the weights: the model directory (DeepSpeed's own checkpoint, which would add a
  second full copy of the weights in a pickle and tie the optimizer state to the layout, is not
  used). The fp32 master weights are optimizer state.
- Every rank writes its own share (its weight shards, its optimizer fragments, its trainer state)
  into ``.tmp-step_N``; ranks meet at barriers of a separate gloo group with a long timeout
  (``aria.parallel.dist.io_barrier``), so a slow filesystem never trips the timeout of the
  training collectives; then rank 0 renames the directory to ``step_N`` and only then moves
  ``latest`` (replaced atomically). A crash at any moment leaves the previous checkpoint complete.
  Saving a step that already has a directory (the stop after a non-finite step) swaps the two by
  renames and deletes the old one after: ``latest`` never names a half-deleted directory.
- Resume is exact: weights, optimizer state, LR schedule, step, tokens, the data position of every
  stream and every rank's RNG. On another layout (world size, expert-parallel size, ZeRO stage)
  each rank reads the parts of the weights and optimizer state it now holds, the data streams are
  dealt to the new ranks and the global batch stays the same (``train.grad_accum`` is adjusted),
  so the losses continue as on the old layout; only randomness inside the model (dropout) differs.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from aria.config import ModelConfig
from aria.convert.checkpoint import read_hf_config, read_model_config
from aria.parallel import optimizer_state
from aria.parallel.dist import DistInfo, io_barrier
from aria.rundir import (CHECKPOINTS, LATEST, MODEL, OPTIMIZER, RUN_CONFIG, TRAINER, resolve_model_dir,
                         step_name)
from aria.train import weights


def source_model_config(path: str | Path, hf: bool) -> ModelConfig:
    return read_hf_config(path) if hf else read_model_config(resolve_model_dir(path))


# ---------------------------------------------------------------------------------------------
# Trainer state: plain values only
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def trainer_file(ckpt: Path, rank: int) -> Path:
    return ckpt / TRAINER / f"rank{rank:05d}.pt"


def read_trainer_states(ckpt: Path) -> list[dict]:
    """Every rank's trainer state of ``ckpt``, in rank order (``torch.load(weights_only=True)``)."""
    files = sorted((ckpt / TRAINER).glob("rank*.pt"))
    meta = read_layout(ckpt)
    if len(files) != meta["world_size"]:
        raise FileNotFoundError(f"{ckpt / TRAINER} holds {len(files)} rank files but the checkpoint was "
                                f"written by {meta['world_size']} processes: it is incomplete")
    return [torch.load(f, map_location="cpu", weights_only=True) for f in files]


def read_layout(ckpt: Path) -> dict:
    """What ``save_checkpoint`` recorded of the run: step, world size, expert-parallel size, global
    batch."""
    return optimizer_state.read_meta(Path(ckpt) / OPTIMIZER)


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def save_checkpoint(engine, model, cfg, trainer_state: dict, info: DistInfo, config_yaml: str,
                    model_cfg: ModelConfig) -> Path:
    """Writes step ``trainer_state['step']`` (every rank calls it); returns its directory once it is
    complete and latest."""
    root = Path(cfg.run_dir) / CHECKPOINTS
    step = trainer_state["step"]
    tmp, final = root / f".tmp-{step_name(step)}", root / step_name(step)
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / TRAINER).mkdir(parents=True)
    io_barrier()
    weights.save_weights(model, model_cfg, tmp / MODEL, info.rank, info.world_size)
    meta = {"step": step, "world_size": info.world_size, "ep_size": cfg.parallel.ep_size,
            "sp_size": cfg.parallel.sp_size,
            "zero_stage": cfg.parallel.zero_stage, "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum": cfg.train.grad_accum}
    optimizer_state.save(engine, model, tmp / OPTIMIZER, info.rank, meta)
    torch.save({**trainer_state, "rng": rng_state()}, trainer_file(tmp, info.rank))
    io_barrier()
    if info.is_main:
        (tmp / RUN_CONFIG).write_text(config_yaml)
        old = root / f".old-{step_name(step)}"
        if final.exists():  # the same step saved again (a stop after a non-finite step): swap by renames
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        pointer = root / LATEST
        (root / f".{LATEST}.tmp").write_text(final.name + "\n")
        os.replace(root / f".{LATEST}.tmp", pointer)
        _prune(root, cfg.checkpoint.keep_last)
    io_barrier()
    return final


def set_schedule_step(scheduler, step: int) -> None:
    """Put a ``LambdaLR`` where ``step`` optimizer steps leave it: its LR is a function of the step
    alone, so this holds for any parameter groups (another layout groups experts differently)."""
    lrs = [base * fn(step) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler.last_epoch, scheduler._last_lr = step, lrs


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".tmp-step_*"), *root.glob(".old-step_*")]:  # left by an interrupted write
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(engine, model, ckpt: Path, info: DistInfo, scheduler) -> dict:
    """Restores optimizer state, LR schedule, DeepSpeed's step counters and this rank's RNG from
    ``ckpt`` (the weights were loaded when the model was built); returns this rank's trainer state
    with ``data`` holding every saved rank's data position."""
    meta = read_layout(ckpt)
    states = read_trainer_states(ckpt)
    step = meta["step"]
    optimizer_state.load(engine, model, ckpt / OPTIMIZER, step)
    set_schedule_step(scheduler, step)
    engine.global_steps = step
    engine.micro_steps = step * engine.gradient_accumulation_steps()
    engine.global_samples = step * engine.train_batch_size()
    same_layout = meta["world_size"] == info.world_size
    if same_layout:
        set_rng_state(states[info.rank]["rng"])
    mine = states[info.rank] if same_layout else states[0]
    return {"step": step, "tokens_seen": mine["tokens_seen"], "data": [s["data"] for s in states],
            "same_layout": same_layout}
