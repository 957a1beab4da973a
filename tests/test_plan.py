"""The memory and time plan (``aria.train.plan``; CLI ``aria.tools.plan``): its peak against the
measured peak of real DeepSpeed steps (a representative subset of ``scripts/check_plan.py``'s
matrix), full-size Aria on fake tensors, its response to the layout, the refusal with a layout that
fits, and the CLI.

Expected values come from the configs (parameter arithmetic written out here) or from measurement,
never from the plan's own code."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from aria.config import load_model_config
from aria.train.plan import GIB, _allreduce_copy, _Group, check_fits, plan_run, synthetic_batch
from aria.train.compose import compose_run, recipes

ROOT = Path(__file__).resolve().parents[1]


def _check_plan_script():
    spec = importlib.util.spec_from_file_location("check_plan", ROOT / "scripts" / "check_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_plan"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


CHECK = _check_plan_script()


@pytest.mark.slow
@pytest.mark.parametrize("name", CHECK.QUICK)
def test_plan_within_15_percent_of_a_measured_deepspeed_step(name):
    """Two real optimizer steps on 2 gloo processes (ZeRO-0, ZeRO-2 with images, ZeRO-1 bf16 with
    expert parallelism and checkpointing, ZeRO-3), peak measured by torch's profiler."""
    case = next(c for c in CHECK.CASES if c.name == name)
    row = CHECK.check(case)
    assert abs(row["error"]) <= 0.15, (name, row["plan"] / 2 ** 20, row["measured"] / 2 ** 20)


def aria(*overrides: str, recipe: str = "stage2_multimodal"):
    """The recipe at full size, from the one-process layout (parallel=default) plus ``overrides``."""
    return compose_run(recipe, ["model=aria", "parallel=default", *overrides], inputs=False)


@pytest.mark.slow
def test_full_size_aria_plans_on_fake_tensors_with_the_true_parameter_counts():
    cfg = aria("parallel.zero_stage=3")
    plan = plan_run(cfg, 8, 8, 80 * GIB)
    m = cfg.model
    t, e, v = m.text, m.moe, m.vision
    D, I = t.hidden_size, e.intermediate_size
    layer = 4 * D * t.num_heads * t.head_dim + e.num_experts * D + 3 * D * I * (e.num_experts + e.num_shared_experts) + 2 * D
    text = t.num_layers * layer + 2 * t.vocab_size * D + D
    assert 24.8e9 < text < 24.9e9  # the paper's 24.9B MoE decoder
    total = plan.parameters["trainable"] + plan.parameters["frozen"]
    from aria.model.flops import count_parameters

    assert total == count_parameters(m).total
    assert total - text == count_parameters(m).vision_encoder + count_parameters(m).projector
    # ZeRO-3: this GPU holds an eighth of every partitioned parameter, padded per parameter
    assert plan.persistent["parameters (shards)"] == pytest.approx(2 * total / 8, rel=1e-4)
    assert plan.trace_seconds < 60


# recipe -> (nodes of 8 x 80 GB its default layout is planned on, image crops per row)
RECIPE_LAYOUTS = {
    # stage 0 is planned as a language-model step: its towers hold no LM-head chunk, which bounds
    # its extra image x caption similarities (aria.train.contrastive) at these sizes
    "stage0_vision": (1, None),
    "stage1_language": (1, 0), "stage2_multimodal": (1, None), "stage4_post_training": (1, None),
    "finetune": (1, None), "finetune_video": (1, 16), "finetune_lora": (1, None),
    # 64K rows (sequence parallelism, token and crop chunks)
    "stage3_long_context": (1, None), "finetune_long_context": (1, None),
}


@pytest.mark.slow
def test_every_recipe_default_layout_fits_aria_with_headroom():
    """What docs/performance.md promises: each recipe as it composes, at model=aria, fits 80 GiB per
    GPU with at least 4 GiB to spare (images filling half of each row where the stage sees them;
    16 frames of 490 px per row for video)."""
    assert sorted(RECIPE_LAYOUTS) == sorted(r for r in recipes() if not r.startswith("quickstart"))
    for recipe, (nodes, crops) in RECIPE_LAYOUTS.items():
        cfg = compose_run(recipe, ["model=aria"], inputs=False)
        plan = plan_run(cfg, 8 * nodes, 8, 80 * GIB, crops=crops)
        assert plan.fits and plan.total <= 76 * GIB, (recipe, plan.total / GIB)
        assert plan.layout["parallel.ep_size"] in (1, 8), recipe  # 'node' resolved on 8-GPU nodes
        assert plan.layout["parallel.sp_size"] == (4 if cfg.train.seq_len == 65536 else 1), recipe


@pytest.mark.slow
def test_plan_follows_the_layout():
    base = ["model.text.num_layers=4", "parallel.checkpoint_decoder=false", "parallel.checkpoint_vision=false"]
    m = aria(*base).model
    D, I, E, L = m.text.hidden_size, m.moe.intermediate_size, m.moe.num_experts, m.text.num_layers
    experts = L * E * 3 * D * I

    def plan(*extra, crops=0, **kw):
        return plan_run(aria(*base, *extra), 8, 8, None, crops=crops, **kw)

    zero1, ep8 = plan("parallel.zero_stage=1"), plan("parallel.zero_stage=1", "parallel.ep_size=8")
    total = zero1.parameters["trainable"] + zero1.parameters["frozen"]
    # expert parallelism keeps an eighth of the routed experts
    assert total - (ep8.parameters["trainable"] + ep8.parameters["frozen"]) == experts * 7 // 8
    assert ep8.persistent["parameters"] == 2 * (total - experts * 7 // 8)
    # ZeRO-3 shards the bf16 parameters over the 8 GPUs
    zero3 = plan("parallel.zero_stage=3")
    assert zero3.persistent["parameters (shards)"] < 1.01 * 2 * total / 8
    # ZeRO-1 (bf16, fp32 gradient accumulation) keeps full-size fp32 gradients; ZeRO-2 partitions them
    zero2 = plan("parallel.zero_stage=2")
    assert zero1.persistent["gradients (fp32, whole groups)"] >= 4 * total
    assert zero2.peak < zero1.peak
    # checkpointing lowers the forward/backward phase; a longer row raises it
    ckpt = plan("parallel.zero_stage=2", "parallel.checkpoint_decoder=true")
    assert ckpt.phases[0].total < zero2.phases[0].total
    long = plan("parallel.zero_stage=2", "parallel.checkpoint_decoder=true", "train.seq_len=65536")
    assert long.phases[0].total > 2 * ckpt.phases[0].total
    # images add the vision encoder's activations; the step's FLOPs grow with tokens and crops
    images = plan("parallel.zero_stage=2", crops=8)
    assert images.phases[0].total > zero2.phases[0].total
    assert long.step_flops > 8 * ckpt.step_flops and images.step_flops > zero2.step_flops


@pytest.mark.slow
def test_check_fits_names_the_fields_and_a_layout_that_fits():
    overrides = ["model=proxy", "train.seq_len=2048", "parallel.zero_stage=1", "parallel.ep_size=1"]
    cfg = compose_run("stage1_language", overrides, inputs=False)
    with pytest.raises(ValueError) as err:
        check_fits(cfg, 8, 8, 30 * GIB)
    message = str(err.value)
    for field in ("parallel.zero_stage=1", "parallel.ep_size=1", "parallel.gpu_memory_gb", "a layout that fits"):
        assert field in message, message[:600]
    suggestion = message.split("a layout that fits: ")[1].split("\n")[0].split()
    fixed = compose_run("stage1_language", overrides + suggestion, inputs=False)
    assert check_fits(fixed, 8, 8, 30 * GIB).fits


def test_partition_arithmetic_by_hand():
    # flat 60 elements over 2 ranks (aligned to 4): partitions [0, 30) and [30, 60)
    group = _Group((1, 2, 3), (10, 20, 30), 2, False)
    assert (group.flat, group.partition) == (60, 30)
    assert (group.in_partition(0), group.in_partition(1)) == (30, 30)
    straddling = _Group((1, 2), (25, 35), 2, False)  # the second parameter crosses into rank 1
    assert (straddling.in_partition(0), straddling.in_partition(1)) == (60, 35)
    assert _Group((1,), (7,), 4, True).flat == 8
    # all-reduce buckets of 100 elements: [60, 50] is copied flat, [120] alone is not, nor is [70]
    assert _allreduce_copy([60, 50, 120, 70], 100) == 110
    assert _allreduce_copy([120], 100) == 0


def test_synthetic_batch_is_a_packed_micro_batch():
    cfg = load_model_config("tiny")
    batch = synthetic_batch(cfg, rows=2, seq_len=100, crops=2, crop_size=490, docs=3)
    Q = cfg.projector.patch_to_query[49]
    assert (batch["input_ids"] == cfg.image_token_id).sum().item() == 2 * 2 * Q
    assert batch["pixel_values"].shape == (4, 3, 490, 490) and batch["pixel_values"].dtype.is_floating_point is False
    assert batch["segment_ids"][0].unique().tolist() == [1, 2, 3]
    assert batch["position_ids"][0, 0].item() == 0 and batch["position_ids"][0, 33].item() == 0  # documents of 33, 34, 33 tokens
    with pytest.raises(ValueError, match="do not fit a row"):
        synthetic_batch(cfg, rows=1, seq_len=20, crops=2, crop_size=490, docs=1)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aria.tools.plan", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_cli_prints_the_plan_and_refuses_bad_input():
    out = run_cli("recipe=stage1_language", "model=proxy", "train.seq_len=1024", "--gpu-memory", "80")
    assert out.returncode == 0, out.stderr[-2000:]
    for text in ("optimizer state", "forward/backward", "peak allocated", "GPU memory: fits", "s at 40% MFU"):
        assert text in out.stdout, out.stdout
    bad = run_cli("recipe=stage1_language", "parallel.zero_stage=5")
    assert bad.returncode == 2 and "parallel.zero_stage" in bad.stderr
    assert run_cli("--help").returncode == 0
