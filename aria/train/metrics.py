"""Training metrics: FLOPs and MFU, expert load, throughput, and the logger (JSONL, wandb, progress).

Design decisions:
- Nothing here touches a tensor except ``expert_load`` and ``log`` on a step it writes; each does one
  host transfer. On the steps in between, ``log`` only moves the progress bar and reads values that
  are already Python numbers, so the training loop may pass tensors every step and still sync only
  every ``log_every`` steps.
- FLOPs come from ``aria.model.flops`` (count multiply-adds as 2, training = 3x forward). A packed
  micro-batch's attention cost depends on its documents' lengths only through the sum of
  n(n+1)/2 query-key pairs, so the loop passes that one integer, not the lengths.
- MFU is per device: ``Throughput`` is given one rank's seconds, tokens and FLOPs and one device's
  peak (dense bf16, SXM figure for H100/H200; ``ARIA_PEAK_TFLOPS`` overrides, e.g. for PCIe cards).
- ``metrics.jsonl`` is the record of a run: one JSON object per written step. JSON has no NaN or
  infinity, so non-finite floats are written as the strings "nan", "inf" and "-inf"
  (``float(value)`` reads them back). On start the file is cut back to the entries with
  ``step <= start_step`` (entries without a step are kept): steps after the checkpoint are redone,
  so a resumed run's file equals an uninterrupted one's. This also holds for start_step 0, a restart
  before the first checkpoint.
- wandb is imported only when enabled; its run id lives in ``run_dir/wandb_id.txt`` so that a
  resumed run continues the same wandb run. The mode comes from the config alone (the ``mode``
  argument wins over ``WANDB_MODE``). Lists and dicts are flattened to ``key/i`` and ``key/sub`` for
  wandb so that each element gets a chart.
- Evaluation entries (any key starting with ``eval_``) are written whatever the step.
- Only rank 0 does any I/O; other ranks get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections import deque
from pathlib import Path
from typing import Any

import torch

from aria.config import LoggingConfig, ModelConfig
from aria.model.flops import count_parameters, vision_flops_per_crop
from aria.rundir import METRICS

# Dense bf16 tensor-core peak per device, matched as whole words in torch.cuda.get_device_name().
# Order matters only for readability: word boundaries keep "A10" from matching "A100" or "A10G".
PEAK_BF16_FLOPS = (
    (r"H100|H200", 989e12),
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"A10", 125e12),
)
PEAK_ENV = "ARIA_PEAK_TFLOPS"
# Metric keys the progress bar shows (the loop's names for them).
BAR_KEYS = {"loss": "loss", "lr": "lr", "tokens_per_s": "tok/s", "mfu": "MFU"}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of one ``device`` for MFU, or None when unknown (CPU, other GPUs)."""
    override = os.environ.get(PEAK_ENV)
    if override:
        try:
            return float(override) * 1e12
        except ValueError:
            raise ValueError(f"environment variable {PEAK_ENV}={override!r} must be a number of "
                             "TFLOP/s, e.g. 989") from None
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, peak in PEAK_BF16_FLOPS:
        if re.search(rf"\b({pattern})\b", name):
            return peak
    return None


def batch_flops(model_cfg: ModelConfig, num_tokens: int, attention_pairs: int,
                crops: dict[int, int], training: bool = True, lm_head: bool = True,
                decoder: bool = True) -> float:
    """FLOPs of one micro-batch of ``num_tokens`` tokens (image tokens included).

    ``attention_pairs``: causal query-key pairs, the sum over packed documents of n(n+1)/2.
    ``crops``: crop side in pixels -> number of crops of that side in the micro-batch.
    ``lm_head``: whether the LM head runs (not in stage 0's towers).
    ``decoder``: whether the decoder runs over the tokens (not in stage 0's caption words, where
    the vision encoder and projector are the whole step).
    """
    t = model_cfg.text
    # Per token: 2 x active decoder parameters + the LM head (counted even when tied, as
    # text_flops_per_token does: the matmul runs either way).
    matmul = 2 * (count_parameters(model_cfg).active_per_text_token + lm_head * t.vocab_size * t.hidden_size)
    attention = 4 * t.num_heads * t.head_dim * t.num_layers * attention_pairs
    text = (3 if training else 1) * (matmul * num_tokens + attention) * decoder
    patch = model_cfg.vision.patch_size
    vision = sum(count * vision_flops_per_crop(model_cfg, (side // patch) ** 2, training)
                 for side, count in crops.items())
    return float(text + vision)


def expert_load(tokens_per_expert_LE: torch.Tensor) -> dict:
    """Max over mean of the tokens each expert got, per layer (1.0 = perfectly balanced).

    L: decoder layers, E: routed experts. A layer that saw no tokens reports 0.0. One host sync:
    call it on the steps that are logged.
    """
    assert tokens_per_expert_LE.dim() == 2, tokens_per_expert_LE.shape
    load_LE = tokens_per_expert_LE.float()
    mean_L = load_LE.mean(dim=1)
    ratio_L = torch.where(mean_L > 0, load_LE.amax(dim=1) / mean_L.clamp_min(1e-30),
                          torch.zeros_like(mean_L))
    per_layer = ratio_L.tolist()
    return {"expert_load_max_over_mean": per_layer,
            "expert_load_max_over_mean_worst": max(per_layer, default=0.0)}


class Throughput:
    """Tokens/s, TFLOP/s and MFU over the last ``window`` steps of one device."""

    def __init__(self, peak: float | None, window: int = 20):
        if window < 1:
            raise ValueError(f"Throughput window = {window} must be at least 1")
        self.peak = peak
        self._steps = deque(maxlen=window)  # (seconds, tokens, flops)

    def update(self, step_seconds: float, tokens: int, flops: float) -> None:
        self._steps.append((step_seconds, tokens, flops))

    def _rate(self, index: int) -> float:
        seconds = sum(s[0] for s in self._steps)
        return sum(s[index] for s in self._steps) / seconds if seconds > 0 else 0.0

    def tokens_per_s(self) -> float:
        return self._rate(1)

    def tflops(self) -> float:
        return self._rate(2) / 1e12

    def mfu(self) -> float | None:
        return self._rate(2) / self.peak if self.peak else None


def _plain(value: Any) -> Any:
    """Tensors to Python numbers/lists, recursively (the one place a logged tensor syncs)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _json_safe(value: Any) -> Any:
    """Non-finite floats to "nan" / "inf" / "-inf" (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _flatten(metrics: dict, prefix: str = "") -> dict:
    """{"a": [1, 2], "b": {"c": 3}} -> {"a/0": 1, "a/1": 2, "b/c": 3}, for wandb charts."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, list):
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the entries with step <= last_step or without a step; drop a torn last line."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if not isinstance(entry, dict) or entry.get("step", last_step) <= last_step:
            kept.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _bar_text(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "mfu":
        return f"{100 * value:.1f}%"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    return f"{value:.3g}" if key == "lr" else f"{value:.4f}"


class MetricsLogger:
    """Writes metrics to ``run_dir/metrics.jsonl`` and wandb, and draws the progress bar (rank 0)."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, run_config: dict, total_steps: int,
                 start_step: int, is_main: bool, world_size: int = 1):
        self.cfg, self.total_steps, self.is_main = cfg, total_steps, is_main
        self._wandb_run = None
        self._progress = None
        self._closed = not is_main
        if not is_main:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS
        if self.path.exists():
            _truncate_jsonl(self.path, start_step)
        self._file = self.path.open("a")

        if cfg.wandb != "disabled":
            import wandb

            id_file = run_dir / "wandb_id.txt"
            if not id_file.exists():
                id_file.write_text(secrets.token_hex(4) + "\n")
            self._wandb_run = wandb.init(
                project=cfg.project, dir=str(run_dir), mode=cfg.wandb, id=id_file.read_text().strip(),
                resume="allow", config={**run_config, "world_size": world_size})

        from rich.console import Console
        self._console = Console()
        if cfg.progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn()]
            columns += [TextColumn(f"{label} {{task.fields[{key}]}}") for key, label in BAR_KEYS.items()]
            self._progress = Progress(*columns, TimeRemainingColumn(), console=self._console,
                                      refresh_per_second=2)
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                                 **{key: "-" for key in BAR_KEYS})
            self._progress.start()

    def log(self, step: int, metrics: dict) -> None:
        """Record ``metrics`` of optimizer step ``step``; written on every ``log_every``-th step, the
        last step and evaluation entries, otherwise only the progress bar moves."""
        if self._closed:
            return
        write = (step % self.cfg.log_every == 0 or step == self.total_steps
                 or any(key.startswith("eval_") for key in metrics))
        if write:
            metrics = _plain(metrics)
            self._file.write(json.dumps(_json_safe({"step": step, **metrics}), allow_nan=False) + "\n")
            self._file.flush()
            if self._wandb_run is not None:
                self._wandb_run.log(_flatten(metrics), step=step)
        if self._progress is not None:
            # Between writes only values that are already Python numbers are shown: no sync.
            fields = {key: _bar_text(key, value) for key, value in metrics.items()
                      if key in BAR_KEYS and (value is None or isinstance(value, (int, float)))}
            self._progress.update(self._task, completed=step, **fields)

    def message(self, text: str) -> None:
        """Print a line (above the progress bar) on rank 0."""
        if not self._closed:
            self._console.print(text)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.stop()
        if self._wandb_run is not None:
            self._wandb_run.finish()
        self._file.close()
