"""python -m aria.tools.plot: series read back from metrics.jsonl as written (repeated steps, torn
last line, eval records, "nan" strings), the moving average, the figure's panels and legend, the
PNG, errors; and the curves of a real 4-step training run (``test_train``'s fixture, seconds).

The hand-written files use the trainer's record format: the keys of ``Trainer.run``'s record
and ``expert_load``, eval entries as records of their own, non-finite floats as strings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from aria.tools import plot
from test_train import losses

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_TITLES = ["loss", "learning rate", "gradient norm", "tokens/s", "router losses",
              "expert load: max / mean (1 = balanced)"]


def train_record(step: int, loss: float, **extra) -> dict:
    """A record as ``Trainer.run`` writes it on CPU (mfu null) for a model with routed experts."""
    return {"step": step, "loss": loss, "aux_loss": 2.0 + step * 0.1, "z_loss": 3e-5 * step,
            "grad_norm": 1.0 + step, "lr": 1e-3 * step, "tokens_seen": 1000 * step,
            "tokens_per_s": 500.0 + step, "tflops": 0.01, "mfu": None, "skipped_samples": {},
            "expert_load_max_over_mean": [1.0 + step, 3.0 + step],
            "expert_load_max_over_mean_worst": 3.0 + step, **extra}


def write_run(directory: Path, records: list[dict], tail: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return directory


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def test_series_equal_the_values_written_with_repeated_steps_keeping_the_last(tmp_path):
    records = [{"note": "no step"}] + [train_record(s, 10.0 - s) for s in range(1, 6)]
    records += [{"step": 5, "eval_loss": 7.5, "eval_loss/chat": 7.5}]  # the final eval, its own record
    records += [train_record(s, 20.0 + s) for s in (4, 5, 6)]  # a resumed run re-did steps 4 and 5
    run = plot.load_run(write_run(tmp_path / "r", records))
    assert run.name == "r" and run.warnings == []
    assert plot.series(run.records, "loss") == ([1, 2, 3, 4, 5, 6], [9.0, 8.0, 7.0, 24.0, 25.0, 26.0])
    assert plot.series(run.records, "eval_loss") == ([5], [7.5])
    assert plot.series(run.records, "lr") == ([1, 2, 3, 4, 5, 6], [1e-3 * s for s in range(1, 7)])
    assert plot.series(run.records, "mfu") == ([], [])  # null on the CPU: no points
    assert plot.series(run.records, "expert_load_max_over_mean", plot.PANELS["expert_load"].lines[1].reduce) \
        == ([1, 2, 3, 4, 5, 6], [2.0 + s for s in range(1, 7)])  # mean of [1 + s, 3 + s]
    assert plot.tokens_at(run.records) == {s: 1000.0 * s for s in range(1, 7)}
    xs, values = plot.to_tokens(*plot.series(run.records, "eval_loss"), plot.tokens_at(run.records))
    assert (xs, values) == ([5000.0], [7.5])


def test_torn_last_line_is_skipped_with_a_warning_and_nan_strings_read_as_floats(tmp_path, capsys):
    records = [train_record(1, 3.0), train_record(2, 2.0, grad_norm="nan"),
               train_record(3, 1.0, grad_norm="inf")]
    run_dir = write_run(tmp_path / "killed", records, tail='{"step": 4, "loss": 0.')
    run = plot.load_run(run_dir)
    assert plot.series(run.records, "loss") == ([1, 2, 3], [3.0, 2.0, 1.0])
    steps, norms = plot.series(run.records, "grad_norm")
    assert steps == [1, 2, 3] and norms[0] == 2.0 and math.isnan(norms[1]) and norms[2] == math.inf
    assert len(run.warnings) == 1 and "line 4" in run.warnings[0] and "cut short" in run.warnings[0]

    assert plot.main([str(run_dir), "--out", str(tmp_path / "c.png")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and str(run_dir / "metrics.jsonl") in err and "line 4" in err


def test_a_damaged_middle_line_is_not_called_the_torn_last_one():
    records, warnings = plot.parse_lines(['{"step": 1, "loss": 2.0}', '{"step": 2, "lo', "[1, 2]",
                                          '{"step": 3, "loss": 1.0}', ""], "m.jsonl")
    assert [r["step"] for r in records] == [1, 3]
    assert warnings == ["m.jsonl: line 2 is not JSON: skipped",
                        "m.jsonl: line 3 is not a JSON object: skipped"]


def test_smooth_is_the_trailing_moving_average():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    for window in (1, 2, 3, 5, 20):
        expected = []
        for i in range(len(values)):
            part = values[max(0, i - window + 1):i + 1]
            expected.append(sum(part) / len(part))
        assert plot.smooth(values, window) == pytest.approx(expected, abs=1e-12), window
    assert plot.smooth(values, 3)[4] == pytest.approx((4.0 + 1.0 + 5.0) / 3)
    assert plot.smooth([], 4) == []
    with pytest.raises(ValueError, match="window = 0"):
        plot.smooth(values, 0)


def test_run_names_fall_back_to_paths_when_directory_names_coincide():
    assert plot.run_names(["runs/a", "runs/b/", "x/c/metrics.jsonl"]) == ["a", "b", "c"]
    assert plot.run_names(["one/run", "two/run"]) == ["one/run", "two/run"]


# ---------------------------------------------------------------------------------------------
# The figure and the command line
# ---------------------------------------------------------------------------------------------


def test_cli_writes_a_png_with_every_panel_and_a_legend_of_runs(tmp_path, monkeypatch, capsys):
    a = write_run(tmp_path / "a", [train_record(s, 5.0 / s) for s in range(1, 9)]
                  + [{"step": 8, "eval_loss": 1.5}])  # the final eval, a record of its own
    b = write_run(tmp_path / "b", [train_record(s, 4.0 / s) for s in range(1, 5)])
    drawn = {}
    monkeypatch.setattr(plot, "draw", lambda *args, _draw=plot.draw: drawn.setdefault("fig", _draw(*args)))
    out = tmp_path / "plots" / "curves.png"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert str(out) in capsys.readouterr().out
    fig = drawn["fig"]
    assert titles(fig) == ALL_TITLES  # mfu: null in both runs, so no panel
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]
    loss_ax = fig.axes[0]
    lines = loss_ax.get_lines()
    assert [line.get_color() for line in lines] == ["C0", "C0", "C1"]  # a: train, eval; b: train
    assert list(lines[0].get_ydata()) == [5.0 / s for s in range(1, 9)]
    assert list(lines[1].get_xdata()) == [8] and list(lines[1].get_ydata()) == [1.5]


def test_metrics_chooses_panels_in_order_and_a_panel_nobody_has_is_omitted(tmp_path):
    text_only = [{k: v for k, v in train_record(s, 2.0).items() if not k.startswith("expert_load")}
                 for s in (1, 2)]
    runs = [plot.load_run(write_run(tmp_path / "moe", [train_record(s, 2.0) for s in (1, 2)])),
            plot.load_run(write_run(tmp_path / "dense", text_only))]
    assert titles(plot.draw(runs, ["router", "loss"])) == ["router losses", "loss"]
    fig = plot.draw(runs, ["expert_load", "mfu", "lr"])
    assert titles(fig) == ["expert load: max / mean (1 = balanced)", "learning rate"]
    assert {line.get_color() for line in fig.axes[0].get_lines()} == {"C0"}  # only the run that has it
    assert plot.parse_metrics("lr, loss,lr") == ["lr", "loss"]
    with pytest.raises(ValueError, match="nothing to plot"):
        plot.draw(runs, ["mfu"])
    with pytest.raises(ValueError, match="unknown panel"):
        plot.parse_metrics("loss,perplexity")


def test_x_tokens_and_smoothing_move_and_average_the_points(tmp_path):
    run = plot.load_run(write_run(tmp_path / "r", [train_record(s, float(s)) for s in range(1, 5)]))
    fig = plot.draw([run], ["loss", "lr"], x="tokens", window=2)
    raw, smoothed = fig.axes[0].get_lines()
    assert list(raw.get_xdata()) == [1000.0, 2000.0, 3000.0, 4000.0]
    assert list(smoothed.get_ydata()) == [1.0, 1.5, 2.5, 3.5]
    assert fig.axes[0].get_xlabel() == "tokens seen"
    assert len(fig.axes[1].get_lines()) == 1  # the learning rate is exact: never smoothed


def test_missing_run_or_metrics_file_exits_nonzero_naming_the_path(tmp_path, capsys):
    good = write_run(tmp_path / "good", [train_record(1, 1.0)])
    for bad, message in ((tmp_path / "nope", "run directory not found"), (tmp_path, "no metrics.jsonl")):
        out = tmp_path / "c.png"
        assert plot.main([str(good), str(bad), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err and str(bad) in err
        assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(good), "--metrics", "loss,bogus"])
    assert exit_info.value.code == 2 and "bogus" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A real run
# ---------------------------------------------------------------------------------------------


def test_curves_of_a_real_training_run(one_process, tmp_path):
    run = plot.load_run(one_process)
    assert run.warnings == []
    steps, loss = plot.series(run.records, "loss")
    assert steps == [1, 2, 3, 4] and loss == losses(one_process)
    written = [json.loads(line) for line in open(one_process / "metrics.jsonl")]
    worst = [record["expert_load_max_over_mean_worst"] for record in written]
    assert plot.series(run.records, "expert_load_max_over_mean_worst") == ([1, 2, 3, 4], worst)
    out = tmp_path / "curves.png"
    assert plot.main([str(one_process), "--out", str(out), "--x", "tokens"]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert titles(plot.draw([run])) == ALL_TITLES  # no MFU on the CPU
