"""The side-by-side benchmarks (scripts/bench_*.py) on the tiny model: they run both
implementations on the same weights, their outputs agree where they must, and their memory
measurement sees what a call allocates."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_common as bc  # noqa: E402


def _allocate(megabytes: int) -> int:
    with bc.PeakMemory("cpu") as peak:
        block = torch.ones(megabytes * 2**20, dtype=torch.uint8)
        del block
    return peak.bytes


def test_peak_memory_sees_what_a_call_allocates_and_frees():
    assert 190 * 2**20 <= _allocate(200) < 260 * 2**20  # pages freed earlier may be reused
    assert _allocate(1) < 50 * 2**20


def test_transformers_twin_holds_our_weights_not_a_copy():
    """Without --weights, transformers' model is made from our tensors in memory: the same storage
    (at model=aria: 51 GB for both, no export through the disk) and the same logits."""
    import argparse

    parser = argparse.ArgumentParser()
    bc.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny", "--dtype", "fp32"])
    args.impls = ["ours", "hf"]
    models = bc.build_models(args)
    ours, hf = models["ours"].eval(), models["hf"].eval()
    ours_storage = {p.data_ptr() for p in ours.parameters()}
    unshared = [name for name, p in hf.named_parameters() if p.data_ptr() not in ours_storage]
    assert unshared == ["model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"]
    ids = torch.randint(10, ours.cfg.text.vocab_size, (2, 9))
    ids[ids == ours.cfg.image_token_id] = 11
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("native, dtype", [(True, "bf16"), (False, "fp32")])
def test_the_default_dtype_on_the_cpu_is_bf16_only_where_the_cpu_multiplies_bf16(monkeypatch, capsys, native, dtype):
    import argparse

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    parser = argparse.ArgumentParser()
    bc.add_arguments(parser)
    for argv, want in (([], dtype), (["--dtype", "bf16"], "bf16"), (["--dtype", "fp32"], "fp32")):
        args = parser.parse_args(["--device", "cpu", *argv])
        bc.check_arguments(parser, args)
        assert args.dtype == want
        warned = "bf16 on a CPU without AVX512-BF16 or AMX" in capsys.readouterr().err
        assert warned == (want == "bf16" and not native)
    assert ("no native bf16" in bc.machine("cpu")) == (not native)


@pytest.mark.slow
def test_a_case_that_runs_out_of_memory_is_reported_not_raised():
    assert bc.in_fresh_process(_allocate, 16384, memory_cap=8) == bc.OOM
    assert bc.in_fresh_process(_allocate, 64, memory_cap=8) >= 64 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_bench_generate_fp32_agrees_with_transformers_token_for_token(tmp_path, decode):
    import bench_generate

    out = tmp_path / "generate.json"
    assert bench_generate.main(["--model", "tiny", "--dtype", "fp32", "--batch-sizes", "1,3", "--prompt-len", "40",
                                "--new-tokens", "6", "--repeats", "1", "--warmup", "0", "--no-memory",
                                "--decode", decode, "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    hf = [r for r in results if r["impl"] == "hf"]
    assert [(r["batch"], r["equal_rows"], r["first_difference"]) for r in hf] == [(1, 1, None), (3, 3, None)]
    assert all(r["logits_max_diff"] < 1e-4 < r["top2_gap_min"] and r["same_argmax"] == r["batch"] for r in hf)
    # decode speed is None only where timing noise exceeds the decode time (one short repeat)
    assert all(r["prefill_ms"] > 0 and (r["decode_tokens_per_s"] or 1) > 0 for r in results)


def test_cuda_graph_decoding_needs_cuda_and_bf16(capsys):
    import bench_generate

    with pytest.raises(SystemExit) as exit_info:
        bench_generate.main(["--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--decode", "cuda_graph"])
    assert exit_info.value.code == 2
    assert "--decode cuda_graph needs --device cuda and --dtype bf16 (got cpu, fp32)" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_train_runs_every_case_and_counts_the_same_flops_for_the_same_work(tmp_path):
    import bench_train

    out = tmp_path / "train.json"
    profile = tmp_path / "train.profile.txt"
    assert bench_train.main(["--model", "tiny", "--seq-lens", "256", "--doc-len", "64", "--repeats", "1",
                             "--warmup", "0", "--dtype", "fp32", "--json", str(out), "--profile", str(profile)]) == 0
    results = {(r["impl"], r["case"]): r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {(i, c) for i in ("ours", "hf") for c in bench_train.CASES}
    # --profile: one table per implementation and case, its ops' time within the call's wall time
    sections = profile.read_text().split("\n== ")[1:]
    assert sorted(s.split(":")[0] for s in sections) == sorted(f"{i} {c} T=256" for i, c in results)
    for r in results.values():
        p = r["profile"]
        assert 0 < p["total_ms"] <= p["wall_ms"] and p["groups_ms"]["GEMM"] > 0
        assert sum(p["groups_ms"].values()) == pytest.approx(p["total_ms"])
    for case in ("text", "image"):  # the same work: the same model FLOPs per second times seconds
        ours, hf = results["ours", case], results["hf", case]
        assert ours["tflops"] * ours["seconds"] == pytest.approx(hf["tflops"] * hf["seconds"])
        # and the same language-model loss (ours without its router losses)
        assert ours["loss"] == pytest.approx(hf["loss"], rel=1e-4)
    # packed: ours attends within 64-token documents, transformers over the whole row
    assert results["ours", "packed"]["tflops"] * results["ours", "packed"]["seconds"] < \
        results["hf", "packed"]["tflops"] * results["hf", "packed"]["seconds"]
    assert all(isinstance(r["peak_bytes"], int) and r["peak_bytes"] > 0 for r in results.values())


def test_a_measured_train_step_trains_every_weight_its_loss_reaches():
    """The timed step back-propagates the language-model loss itself (the LM head and the last norm
    move), not only ours' router losses, for both implementations."""
    import argparse

    from bench_train import adamw, make_inputs, step_fn

    args = argparse.Namespace(device="cpu", dtype="fp32", seed=0, weights=None, model="tiny", impls=["ours", "hf"])
    models = {impl: model.train() for impl, model in bc.build_models(args).items()}
    cfg = bc.model_config(args)
    for impl, model in models.items():
        head, norm = model.lm_head.weight, dict(model.named_parameters())[
            "decoder.norm.weight" if impl == "ours" else "model.language_model.norm.weight"]
        before = head.detach().clone(), norm.detach().clone()
        inputs = make_inputs(cfg, "text", 64, 64, 490, "cpu", torch.float32)
        step_fn(model, impl, inputs, adamw(model))()
        assert not torch.equal(head, before[0]) and not torch.equal(norm, before[1]), impl


def test_train_inputs_supervise_the_same_tokens_on_both_sides():
    """Our shifted targets and transformers' labels (shifted inside its loss) select the same next
    tokens: every text token after the first, never an <|img|> token, never across documents."""
    from aria.config import load_model_config
    from aria.model import IGNORE_INDEX
    from bench_train import make_inputs

    cfg = load_model_config("tiny")
    inputs = make_inputs(cfg, "image", 96, 32, 490, "cpu", torch.float32)
    ours = inputs["targets"][0]
    theirs = torch.cat([inputs["labels"][0, 1:], torch.tensor([IGNORE_INDEX])])
    assert torch.equal(ours, theirs)
    packed = make_inputs(cfg, "packed", 96, 32, 490, "cpu", torch.float32)
    assert (packed["targets"][0, [31, 63, 95]] == IGNORE_INDEX).all()
    assert packed["segments"][0].tolist() == [1] * 32 + [2] * 32 + [3] * 32


@pytest.mark.slow
def test_bench_video_times_and_measures_both_and_they_answer_alike(tmp_path):
    import bench_video

    out = tmp_path / "video.json"
    assert bench_video.main(["--model", "tiny", "--dtype", "fp32", "--frames", "2,3", "--new-tokens", "4",
                             "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["impl"], r["frames"]) for r in results] == [("ours", 2), ("hf", 2), ("ours", 3), ("hf", 3)]
    assert all(isinstance(r["seconds"], float) and r["peak_bytes"] > 0 for r in results)
    assert [r["first_difference"] for r in results if r["impl"] == "hf"] == [None, None]


@pytest.mark.slow
def test_bench_gpu_runs_every_section_and_records_each_exit(tmp_path):
    """The GPU wrapper goes on past a failing section and records it; on this CPU every section
    fails at once with the scripts' own 'no CUDA device' error. An unknown section, or an
    interpreter without the benchmarks' packages, runs nothing."""
    import subprocess

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_gpu.sh"
    env = {**os.environ, "PYTHON": sys.executable, "BENCH_ARGS": "--no-memory", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(["bash", str(script), str(tmp_path / "out"), "train", "attention"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr  # a section failed
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "== train: bench_train.py --device cuda --model proxy" in summary
    assert "--json " + str(tmp_path / "out" / "train.json") + " --no-memory" in summary
    assert "--profile " + str(tmp_path / "out" / "train.profile.txt") in summary
    assert "== attention: bench_attention.py --device cuda" in summary
    assert "--no-memory" not in summary.split("== attention")[1]  # not a side-by-side script
    assert summary.count("   exit 2 after") == 2
    for name in ("train", "attention"):
        assert "--device cuda: no CUDA device is visible to torch" in (tmp_path / "out" / f"{name}.log").read_text()

    run = subprocess.run(["bash", str(script), str(tmp_path / "none"), "train", "decode"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "unknown section 'decode'" in run.stderr
    assert not (tmp_path / "none").exists()
    run = subprocess.run(["bash", str(script), str(tmp_path / "none"), "train"],
                         env={**env, "PYTHON": str(tmp_path / "no-python")}, capture_output=True, text=True)
    assert run.returncode == 2 and "cannot import torch, transformers, hydra" in run.stderr
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("name, group", [  # kernel names from an H200 profile of a decode step, aten ops
    ("_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13Gemm"
     "UniversalINS5_17GroupProblemShapeIN4cute5tupleIJiiiEEEEENS_4gemm10collective", "grouped GEMM"),
    ("void at::cuda::detail::prepare_grouped_gemm_data<cutlass::bfloat16_t, cutlass::bfloat16_t>", "grouped GEMM"),
    ("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT", "GEMM"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", "GEMM"),
    ("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_35_16x128x128", "attention"),
    ("void at::native::radixSortKVInPlace<-2, -1, 16, 2, long, long, unsigned int>", "routing, indexing"),
    ("void at::native::sbtopk::gatherTopK<float, unsigned int, 1, false>", "routing, indexing"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, true>",
     "norms, reductions"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda", "copies, fills"),
    ("Memcpy DtoD (Device -> Device)", "copies, fills"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::rsqrt_kernel_cuda>", "elementwise"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("aten::mm", "GEMM"), ("aten::_grouped_mm", "grouped GEMM"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::mul", "elementwise"),
    ("aten::index_select", "routing, indexing"), ("aten::copy_", "copies, fills"),
])
def test_profile_groups_name_the_kernels_they_hold(name, group):
    assert bc.time_group(name) == group


def test_logits_agreement_measures_the_difference_against_the_closest_tie():
    from bench_generate import logits_agreement

    ours = torch.tensor([[3.0, 2.5, 0.0], [1.0, 0.0, 0.9]])
    theirs = torch.tensor([[3.0, 2.6, 0.0], [0.9, 0.0, 1.0]])
    assert logits_agreement(ours, theirs) == pytest.approx(
        dict(logits_max_diff=0.1, top2_gap_min=0.1, same_argmax=1))
