"""Console scripts are installed, answer --help and report bad input in one line (no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_aria_generate_help_and_errors(tmp_path):
    done = run("aria-generate", "--help")
    assert done.returncode == 0
    for flag in ("--image", "--video", "--num-frames", "--greedy", "--temperature", "--top-p", "--seed",
                 "--batch", "--out", "--tokenizer", "--image-size", "--system", "--max-new-tokens"):
        assert flag in done.stdout
    done = run("aria-generate", str(tmp_path), "--prompt", "hi")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"aria-generate: error: {tmp_path} is not a model directory")
    assert done.stderr.endswith("nor is it a Hugging Face directory (config.json)\n")
    assert done.stderr.count("\n") == 1
    done = run("aria-generate", str(tmp_path), "--greedy", "--temperature", "0.5", "--prompt", "hi")
    assert done.returncode == 2 and "not allowed with argument" in done.stderr


@pytest.mark.slow
def test_aria_eval_help_and_errors(tmp_path):
    done = run("aria-eval", "--help")
    assert done.returncode == 0
    assert "--metric" in done.stdout and "choice" in done.stdout and "--limit" in done.stdout
    done = run("aria-eval", str(tmp_path / "absent"), str(tmp_path / "data.jsonl"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr == f"aria-eval: error: JSONL dataset file not found: {tmp_path / 'data.jsonl'}\n"


@pytest.mark.slow
def test_aria_train_help_and_config_errors():
    done = run("aria-train", "--help")
    assert done.returncode == 0 and "finetune" in done.stdout and "stage1_language" in done.stdout
    done = run("aria-train", "recipe=no_such_recipe", "run_dir=/tmp/x")
    assert done.returncode == 2 and "unknown recipe 'no_such_recipe'" in done.stderr
    done = run("aria-train", "recipe=finetune", "run_dir=/tmp/x", "data.train=/d")
    assert done.returncode == 2 and "needs ['init.from_hf']" in done.stderr
    done = run("aria-train", "run_dir=/tmp/x", "data.train=/d", "data.tokenizer=/t", "train.max_steps=0")
    assert done.returncode == 2 and "'train.max_steps' = 0 is invalid" in done.stderr


def test_aria_convert_help_lists_both_directions():
    done = run("aria-convert", "--help")
    assert done.returncode == 0
    assert "from-hf" in done.stdout and "to-hf" in done.stdout
