"""Training curves of one or more runs, from their ``metrics.jsonl``, in one figure.

    python -m aria.tools.plot RUN [RUN ...] [--out curves.png] [--x step|tokens] [--smooth N]
        [--metrics loss,lr,...]

RUN is a run directory (or a ``metrics.jsonl`` itself). Panels (``--metrics`` picks some, in its
order): ``loss`` (train, and eval where logged), ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu``,
``router`` (load-balancing and z losses as logged: summed over layers, before their coefficients;
log scale when positive) and ``expert_load`` (max over mean expert load: the worst layer and the
mean over layers). One colour per run; the legend names the runs.

Exit code 0: the figure was written; 1: a run is missing or unreadable, or nothing is left to draw;
2: bad arguments.

Design decisions:
- Reading is pure functions on lines and records (``parse_lines``, ``series``, ``tokens_at``,
  ``smooth``); ``draw`` is the one function that touches matplotlib and returns the ``Figure``.
  matplotlib's object API (``Figure``, Agg canvas) keeps pyplot's global backend out: no display.
- The record format is ``aria.train.metrics``'s: one JSON object per written step; non-finite
  floats are the strings "nan", "inf", "-inf"; an eval entry may be a record of its own at the step
  of a train record; entries without a step are notes. So repeated steps are resolved per metric:
  for each key the last value written at a step wins. A resumed run's re-done steps replace the
  first try's, and a train record and the eval record at the same step both count.
- A line that is not JSON is skipped with a warning (stderr): the last line is the torn write of a
  killed run, anything else is damage, and the message says which.
- A panel shows the runs that log its metrics; a panel no run has is left out (e.g. ``mfu``, null
  on the CPU; ``expert_load``, absent without routed experts); ``--metrics`` naming only such
  panels is an error.
- ``--smooth N`` is the trailing moving average (the value and the N - 1 before it; fewer at the
  start) over logged points, drawn over the raw curve in a pale shade. Eval points (sparse) and the
  learning rate (exact) are never smoothed.
- ``--x tokens`` puts each point at the run's ``tokens_seen`` of its step; points of a step with no
  token count (a file from before the trainer logged it) are dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from aria.commands import run_command
from aria.rundir import METRICS

PROG = "python -m aria.tools.plot"


@dataclass(frozen=True)
class Line:
    """One metric drawn in a panel."""

    key: str
    """Record key in metrics.jsonl."""
    label: str
    """Name in the panel's legend (shown when the panel draws more than one kind of line)."""
    style: str = "-"
    """matplotlib line style."""
    reduce: Callable[[list[float]], float] | None = None
    """For a key whose value is a list (one per layer): how to make one number of it."""
    sparse: bool = False
    """Logged on few steps (eval): drawn with markers."""
    smoothed: bool = True
    """Drawn as a moving average under ``--smooth`` (not: eval points, the exact LR)."""


@dataclass(frozen=True)
class Panel:
    """One axes of the figure."""

    title: str
    """Axes title (what the tests and a reader look for)."""
    lines: tuple[Line, ...]
    """The metrics it draws, each in its own line style."""
    log_y: bool = False
    """Log y axis when every value drawn is positive (metrics that span decades)."""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


PANELS = {
    "loss": Panel("loss", (Line("loss", "train"),
                           Line("eval_loss", "eval", "--", sparse=True, smoothed=False))),
    "lr": Panel("learning rate", (Line("lr", "lr", smoothed=False),)),
    "grad_norm": Panel("gradient norm", (Line("grad_norm", "grad norm"),)),
    "tokens_per_s": Panel("tokens/s", (Line("tokens_per_s", "tokens/s"),)),
    "mfu": Panel("MFU", (Line("mfu", "MFU"),)),
    "router": Panel("router losses", (Line("aux_loss", "load balancing"), Line("z_loss", "z-loss", ":")),
                    log_y=True),
    "expert_load": Panel("expert load: max / mean (1 = balanced)",
                         (Line("expert_load_max_over_mean_worst", "worst layer"),
                          Line("expert_load_max_over_mean", "mean over layers", "--", reduce=_mean))),
}
"""Panel name (``--metrics``) -> what it draws, in the figure's default order."""

X_LABELS = {"step": "step", "tokens": "tokens seen"}


@dataclass
class Run:
    """The records of one run's metrics.jsonl."""

    name: str
    """Shown in the legend."""
    path: Path
    """The metrics.jsonl read."""
    records: list[dict]
    warnings: list[str] = field(default_factory=list)
    """Lines skipped, one message each."""


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def parse_lines(lines: Iterable[str], where: str = "metrics.jsonl") -> tuple[list[dict], list[str]]:
    """The JSON objects of ``lines`` and a warning for every line skipped (blank lines are not)."""
    lines = list(lines)
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records, warnings = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            why = "cut short (a run killed while writing?)" if i == last else "not JSON"
            warnings.append(f"{where}: line {i + 1} is {why}: skipped")
            continue
        if isinstance(entry, dict):
            records.append(entry)
        else:
            warnings.append(f"{where}: line {i + 1} is not a JSON object: skipped")
    return records, warnings


def metrics_path(run: str | Path) -> Path:
    """``run``'s metrics.jsonl (``run`` may be the file itself); FileNotFoundError naming the path."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.exists():
        raise FileNotFoundError(f"run directory not found: {run}")
    path = run / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run} (not a run directory, or the run has not "
                                "logged a step yet)")
    return path


def load_run(run: str | Path, name: str | None = None) -> Run:
    """Read ``run`` (a run directory or its metrics.jsonl); its name defaults to the directory's."""
    path = metrics_path(run)
    records, warnings = parse_lines(path.read_text(encoding="utf-8").splitlines(), str(path))
    return Run(name or path.parent.name, path, records, warnings)


def run_names(paths: list[str]) -> list[str]:
    """Legend names: each run directory's name, or the paths as given where two names coincide."""
    names = [Path(p).parent.name if Path(p).name == METRICS else Path(p).name for p in paths]
    names = [n or str(p) for n, p in zip(names, paths)]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _number(value: Any, reduce: Callable[[list[float]], float] | None) -> float | None:
    """A logged value as a float ("nan"/"inf" strings included); None when it is not a number."""
    if isinstance(value, list) and reduce is not None:
        numbers = [_number(v, None) for v in value]
        return None if any(v is None for v in numbers) else reduce(numbers)
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def series(records: list[dict], key: str, reduce: Callable[[list[float]], float] | None = None
           ) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, ascending by step, one value per step: the last one written.

    Records without an integer step, or whose value of ``key`` is missing or null, are left out.
    """
    by_step: dict[int, float] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        value = _number(record.get(key), reduce)
        if value is not None:
            by_step[step] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def tokens_at(records: list[dict]) -> dict[int, float]:
    """Step -> tokens seen by the end of it (the last value logged for the step)."""
    return dict(zip(*series(records, "tokens_seen")))


def to_tokens(steps: list[int], values: list[float], tokens: dict[int, float]
              ) -> tuple[list[float], list[float]]:
    """The points of ``steps`` moved to their token counts; steps with none are dropped."""
    kept = [(tokens[s], v) for s, v in zip(steps, values) if s in tokens]
    return [x for x, _ in kept], [v for _, v in kept]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: point i is the mean of values[max(0, i - window + 1) : i + 1]."""
    if window < 1:
        raise ValueError(f"smoothing window = {window} must be at least 1")
    if window == 1 or not values:
        return list(values)
    v = np.asarray(values, dtype=np.float64)
    w = min(window, len(v))
    sums = np.convolve(v, np.ones(w))[:len(v)]  # sums[i] = v[i - w + 1] + ... + v[i]
    counts = np.minimum(np.arange(1, len(v) + 1), w)
    return (sums / counts).tolist()


def panel_lines(runs: list[Run], name: str, x: str = "step"
                ) -> list[tuple[Run, Line, list[float], list[float]]]:
    """(run, line, xs, values) of every line panel ``name`` draws; empty when no run has its metrics."""
    if x not in X_LABELS:
        raise ValueError(f"x axis {x!r} must be one of {sorted(X_LABELS)}")
    out = []
    for run in runs:
        tokens = tokens_at(run.records) if x == "tokens" else None
        for line in PANELS[name].lines:
            steps, values = series(run.records, line.key, line.reduce)
            xs, values = to_tokens(steps, values, tokens) if tokens is not None else (steps, values)
            if values:
                out.append((run, line, xs, values))
    return out


def parse_metrics(text: str | None) -> list[str]:
    """``--metrics a,b`` -> panel names in that order (None: all); ValueError naming unknown ones."""
    if text is None:
        return list(PANELS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PANELS]
    if unknown or not names:
        raise ValueError(f"unknown panel(s) {unknown or [text]}: choose from {','.join(PANELS)}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def draw(runs: list[Run], panels: list[str] | None = None, x: str = "step", window: int = 1):
    """One figure, a panel per entry of ``panels`` that some run has (default: all of PANELS);
    ValueError when none has any. Returns the matplotlib ``Figure`` (not saved)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    drawn = {}
    for name in panels or list(PANELS):
        lines = panel_lines(runs, name, x)
        if lines:
            drawn[name] = lines
    if not drawn:
        raise ValueError(f"nothing to plot: no run logs any of the metrics of {', '.join(panels or PANELS)}")

    colours = {id(run): f"C{i % 10}" for i, run in enumerate(runs)}
    cols = 1 if len(drawn) == 1 else 2
    rows = math.ceil(len(drawn) / cols)
    fig = Figure(figsize=(6.0 * cols, 3.2 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(drawn):]:
        ax.remove()
    for ax, (name, lines) in zip(axes, drawn.items()):
        panel = PANELS[name]
        for run, line, xs, values in lines:
            ys = np.asarray(values, dtype=np.float64)
            ys[~np.isfinite(ys)] = np.nan  # a gap, not an axis stretched to infinity
            colour = colours[id(run)]
            if line.sparse:
                ax.plot(xs, ys, line.style, color=colour, marker="o", markersize=3)
            elif window > 1 and line.smoothed:
                ax.plot(xs, ys, line.style, color=colour, alpha=0.25, linewidth=0.8)
                ax.plot(xs, smooth(ys.tolist(), window), line.style, color=colour)
            else:
                ax.plot(xs, ys, line.style, color=colour)
        finite = [v for *_, values in lines for v in values if math.isfinite(v)]
        if panel.log_y and finite and min(finite) > 0:
            ax.set_yscale("log")
        kinds = list(dict.fromkeys(line for _, line, _, _ in lines))
        if len(kinds) > 1:
            ax.legend([Line2D([], [], linestyle=k.style, color="0.3") for k in kinds],
                      [k.label for k in kinds], fontsize=8)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(X_LABELS[x])
        ax.grid(alpha=0.3)
    shown = [run for run in runs if any(run is r for lines in drawn.values() for r, *_ in lines)]
    fig.legend([Line2D([], [], color=colours[id(run)]) for run in shown], [run.name for run in shown],
               loc="outside upper center", ncols=min(len(shown), 4),
               title=f"moving average of {window} logged points (raw: pale)" if window > 1 else None)
    return fig


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory (or its metrics.jsonl)")
    parser.add_argument("--out", default="curves.png", help="image to write (default %(default)s)")
    parser.add_argument("--x", choices=sorted(X_LABELS), default="step", help="x axis (default step)")
    parser.add_argument("--smooth", type=int, default=1, metavar="N",
                        help="trailing moving average over N logged points (default 1: off)")
    parser.add_argument("--metrics", default=None, metavar="A,B",
                        help=f"panels to draw, in order (default all: {','.join(PANELS)})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth {args.smooth} must be at least 1")
    try:
        panels = parse_metrics(args.metrics)
    except ValueError as err:
        parser.error(f"--metrics: {err}")

    def plot() -> None:
        runs = [load_run(path, name) for path, name in zip(args.runs, run_names(args.runs))]
        for run in runs:
            for warning in run.warnings:
                print(f"{PROG}: warning: {warning}", file=sys.stderr)
        fig = draw(runs, panels, args.x, args.smooth)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        print(f"wrote {out}: " + ", ".join(ax.get_title() for ax in fig.axes))

    return run_command(PROG, plot)


if __name__ == "__main__":
    raise SystemExit(main())
