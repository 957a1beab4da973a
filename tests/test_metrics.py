"""FLOPs, MFU, expert load, throughput and the metrics logger (JSONL, wandb offline, progress bar)."""

import json
import math
import sys

import pytest
import torch
from helpers import make_config

from aria.config import LoggingConfig
from aria.model.flops import text_flops_per_token
from aria.train.metrics import MetricsLogger, Throughput, batch_flops, expert_load, peak_flops


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_logger(run_dir, total_steps=10, start_step=0, is_main=True, **logging):
    cfg = LoggingConfig(**{"wandb": "disabled", "progress": False, **logging})
    return MetricsLogger(run_dir, cfg, {"lr": 1e-3}, total_steps, start_step, is_main)


# ---------------------------------------------------------------------------- peak FLOPs, FLOPs


def test_peak_flops_cpu_and_env_override(monkeypatch):
    monkeypatch.delenv("ARIA_PEAK_TFLOPS", raising=False)
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setenv("ARIA_PEAK_TFLOPS", "123.5")
    assert peak_flops(torch.device("cpu")) == pytest.approx(123.5e12)
    monkeypatch.setenv("ARIA_PEAK_TFLOPS", "fast")
    with pytest.raises(ValueError, match="ARIA_PEAK_TFLOPS"):
        peak_flops(torch.device("cpu"))


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
                                        ("NVIDIA A10", 125e12), ("NVIDIA A10G", None),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_by_device_name(monkeypatch, name, peak):
    monkeypatch.delenv("ARIA_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == peak


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's grouped GEMM, which FlopCounterMode does not know: its groups split one dimension of
    an ordinary product, so it costs what the whole product does, 2 x rows x inner x columns (the
    forward (M, K) @ (E, K, N) and the backward's (M, N) @ (E, N, K) and (K, M) @ (M, N) alike)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


def test_batch_flops_against_torchs_count_of_a_real_training_step():
    """torch's FlopCounterMode counts the matmul FLOPs of a real forward + backward (two packed
    documents, one of them with an image). ``batch_flops`` counts the useful work; what the kernels
    run on top of it is added here by hand, term by term."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from aria.model import build_model
    from aria.model.moe import GROUP_ALIGN

    cfg = make_config()  # D=32, L=2, H=4, d=8, V=99, E=4, k=2, I=16; vision: patch 4, width 24
    t, m, v = cfg.text, cfg.moe, cfg.vision
    D, L, k = t.hidden_size, t.num_layers, m.top_k
    torch.manual_seed(0)
    model = build_model(cfg)
    docs = [18, 14]  # the first: 2 text tokens, 6 image tokens (one 16 px crop), 10 text tokens
    ids = torch.tensor([[5, 17] + [cfg.image_token_id] * 6 + list(range(20, 30)) + list(range(40, 54))])
    segments = torch.tensor([[i + 1 for i, n in enumerate(docs) for _ in range(n)]])
    positions = torch.cat([torch.arange(n) for n in docs])[None]
    targets = torch.randint(10, 90, ids.shape, generator=torch.Generator().manual_seed(0))
    pixels, mask = torch.randn(1, 3, 16, 16), torch.ones(1, 16, 16, dtype=torch.bool)
    T, pairs, patches = sum(docs), sum(n * (n + 1) // 2 for n in docs), (16 // v.patch_size) ** 2

    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops})
    # The math kernel: attention as plain matmuls, which the counter sees (the CPU flash kernel it
    # does not count at all).
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = model(ids, pixels, mask, position_ids=positions, segment_ids=segments, targets=targets)
        (out.loss_sum + out.router_loss).backward()
    counted = counter.get_total_flops()

    # Work the kernels do that batch_flops deliberately leaves out (x 3: forward + both gradients):
    # - the math kernel scores every key of a document, the masked (future) half too;
    dense_attention = 3 * 4 * t.num_heads * t.head_dim * L * sum(n * n - n * (n + 1) // 2 for n in docs)
    # - each token's k expert outputs are summed with their router weights, a (1 x k) @ (k x D) bmm;
    combine = 3 * L * 2 * T * k * D
    # - for the backward, each expert's rows are padded to a multiple of GROUP_ALIGN, at least
    #   GROUP_ALIGN: the grouped GEMMs run M = align * (ceil(T k / align) + E) rows, not T k;
    rows = GROUP_ALIGN * (-(-T * k // GROUP_ALIGN) + m.num_experts)
    padding = 3 * L * 2 * (rows - T * k) * 3 * D * m.intermediate_size
    # - and less: pixels need no gradient, so the patch embedding's backward is its weight's only.
    no_pixel_grad = 2 * patches * v.num_channels * v.patch_size ** 2 * v.hidden_size
    expected = batch_flops(cfg, T, pairs, {16: 1}) + dense_attention + combine + padding - no_pixel_grad
    assert counted == expected, (counted, expected)
    # the adjustments are small beside what batch_flops itself has to get right
    assert batch_flops(cfg, T, pairs, {16: 1}) > 2 * (dense_attention + combine + padding)


def test_batch_flops_matches_per_token_count():
    cfg = make_config()
    n = 37  # one document: its tokens x text_flops_per_token(n)
    assert batch_flops(cfg, n, n * (n + 1) // 2, {}) == pytest.approx(n * text_flops_per_token(cfg, n))
    # stage 0's caption words run no decoder: the vision encoder alone is counted
    crops = {cfg.vision.image_size: 3}
    vision = batch_flops(cfg, n, n * (n + 1) // 2, crops, decoder=False)
    assert vision == batch_flops(cfg, 0, 0, crops) > 0
    assert batch_flops(cfg, n, n * (n + 1) // 2, crops) == pytest.approx(vision + n * text_flops_per_token(cfg, n))


# ---------------------------------------------------------------------------- expert load, throughput


def test_expert_load_by_hand_with_empty_layer():
    tokens_LE = torch.tensor([[2, 2, 2, 2], [8, 0, 0, 0], [0, 0, 0, 0], [1, 3, 2, 2]])
    out = expert_load(tokens_LE)
    assert out["expert_load_max_over_mean"] == pytest.approx([1.0, 4.0, 0.0, 1.5])
    assert out["expert_load_max_over_mean_worst"] == pytest.approx(4.0)
    assert all(isinstance(x, float) for x in out["expert_load_max_over_mean"])


def test_throughput_window():
    tp = Throughput(peak=100e12, window=2)
    assert tp.tokens_per_s() == 0.0 and tp.mfu() == 0.0
    tp.update(1.0, 1000, 10e12)  # dropped from the window by the two below
    tp.update(2.0, 300, 40e12)
    tp.update(1.0, 600, 20e12)
    assert tp.tokens_per_s() == pytest.approx(900 / 3)
    assert tp.tflops() == pytest.approx(60 / 3)
    assert tp.mfu() == pytest.approx(0.2)
    assert Throughput(peak=None).mfu() is None
    with pytest.raises(ValueError, match="window"):
        Throughput(peak=None, window=0)


# ---------------------------------------------------------------------------- logger


def test_jsonl_log_every_eval_last_step_and_nan(tmp_path):
    logger = make_logger(tmp_path, total_steps=7, log_every=3)
    for step in range(1, 8):
        logger.log(step, {"loss": torch.tensor(float(step)), "lr": 0.1, "grad_norm": float("nan"),
                          "load": torch.tensor([1.0, float("inf")]), "aux": {"z": -math.inf}})
    logger.log(5, {"eval_loss": 2.5})
    logger.close()
    logger.close()  # idempotent
    entries = read_jsonl(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in entries] == [3, 6, 7, 5]
    assert entries[0] == {"step": 3, "loss": 3.0, "lr": 0.1, "grad_norm": "nan", "load": [1.0, "inf"],
                          "aux": {"z": "-inf"}}
    assert entries[-1] == {"step": 5, "eval_loss": 2.5}
    assert float(entries[0]["grad_norm"]) != float(entries[0]["grad_norm"])  # reads back as NaN


def test_resume_truncates_to_start_step(tmp_path):
    logger = make_logger(tmp_path)
    for step in range(1, 7):  # crashed after step 6; the last checkpoint is step 4
        logger.log(step, {"loss": 1.0})
    logger.log(4, {"eval_loss": 0.5})
    logger.close()
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"note": "header"}\n' + path.read_text() + '{"step": 7, "lo')  # torn last line

    resumed = make_logger(tmp_path, start_step=4)
    for step in range(5, 11):
        resumed.log(step, {"loss": 2.0})
    resumed.close()
    entries = read_jsonl(path)
    assert entries[0] == {"note": "header"}
    assert [e["step"] for e in entries[1:]] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]
    assert [e["loss"] for e in entries[1:] if e["step"] > 4] == [2.0] * 6


def test_non_main_rank_writes_nothing(tmp_path, capsys):
    logger = make_logger(tmp_path / "run", is_main=False, wandb="offline", progress=True)
    logger.log(1, {"loss": 1.0, "eval_loss": 1.0})
    logger.message("saved checkpoint step 1")
    logger.close()
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr() == ("", "")


@pytest.mark.slow
def test_wandb_offline_reuses_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = make_logger(tmp_path, wandb="offline")
    logger.log(1, {"loss": 1.0, "load": [1.0, 2.0]})
    logger.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert run_id and len(runs) == 1 and runs[0].name.endswith(f"-{run_id}")

    resumed = make_logger(tmp_path, wandb="offline", start_step=1)
    assert resumed._wandb_run.id == run_id
    resumed.log(2, {"loss": 0.5})
    resumed.close()
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))  # a run started in the same second
    assert len(runs) == 2 and all(f"-{run_id}" in run.name for run in runs)  # gets a "-1" suffix


def test_wandb_disabled_creates_no_wandb_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # "import wandb" now fails: it must not run
    logger = make_logger(tmp_path, wandb="disabled")
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_progress_bar_off_prints_nothing_and_on_prints(tmp_path, capsys):
    logger = make_logger(tmp_path / "off", progress=False)
    for step in range(1, 4):
        logger.log(step, {"loss": 1.0, "lr": 1e-3, "tokens_per_s": 1000.0, "mfu": None})
    logger.close()
    assert capsys.readouterr() == ("", "")

    logger = make_logger(tmp_path / "on", total_steps=10, start_step=2, progress=True)
    logger.log(3, {"loss": torch.tensor(1.25), "lr": 1e-3, "tokens_per_s": 1234.0, "mfu": 0.42})
    logger.message("saved checkpoint step 3")
    logger.close()
    out = capsys.readouterr().out
    assert "saved checkpoint step 3" in out
    assert "step 3/10" in out and "loss 1.2500" in out and "MFU 42.0%" in out and "1,234" in out


def test_bar_does_not_read_tensors_between_writes(tmp_path, monkeypatch):
    logger = make_logger(tmp_path, log_every=5, progress=True)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("synced on a quiet step"))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("synced on a quiet step"))
    logger.log(1, {"loss": torch.tensor(1.0), "load": torch.tensor([1.0, 2.0])})
    monkeypatch.undo()
    logger.close()
