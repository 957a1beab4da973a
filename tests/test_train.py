"""Training with DeepSpeed: ZeRO 0-3 and expert parallelism on 2 gloo processes against 1, global
token normalisation, exact resume (also after SIGKILL), atomic checkpoints, the non-finite stop,
recipes, the four-stage pipeline and multi-node torchrun.

The runs train ``model=tiny`` from one saved initial model on text documents whose lengths all lie
in (seq_len / 2, seq_len]: every packed row then holds exactly one document, so one process with
two rows per step sees the same rows as two processes with one row each. Their token counts
differ, which is what the global normalisation must get right. Adam's eps is 1e-3 here: with the
default 1e-8 Adam divides tiny gradients by their own magnitude, and 1e-9 rounding differences
between a one-process and a two-process reduction can flip their sign.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aria.config import load_model_config
from aria.convert.checkpoint import save_model_dir
from aria.convert.store import iter_tensors
from aria.model import build_model
from aria.train.compose import compose_run, recipes
from aria.train.trainer import train
from helpers import free_port, rewind, run_distributed

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 60
WORDS = ["red", "blue", "green", "circle", "square", "left", "right", "top", "bottom", "shape"]


def make_setup(root: Path) -> Path:
    """Tokenizer, a text dataset of one-row documents, and an initial model directory in ``root``
    (the ``setup`` fixture of conftest.py)."""
    from aria.data.tokenizer import Tokenizer
    from data_tools.train_tokenizer import train as train_tokenizer

    corpus = root / "corpus.txt"
    rng = random.Random(0)
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)) + "\n")
    tok_dir = train_tokenizer([str(corpus)], root / "tok", vocab_size=300)
    tok = Tokenizer.load(tok_dir)
    docs = []
    for _ in range(2000):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        if SEQ_LEN // 2 < len(tok.encode(text)) + 1 <= SEQ_LEN:
            docs.append({"kind": "text", "text": text})
        if len(docs) == 40:
            break
    assert len(docs) == 40, "could not make one-row documents"
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    save_model_dir(build_model(cfg).state_dict(), cfg, root / "init")
    return root


def overrides(setup: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.train={setup / 'docs.jsonl'}", f"data.tokenizer={setup / 'tok'}",
            f"init.from_checkpoint={setup / 'init'}", f"train.seq_len={SEQ_LEN}", "train.max_steps=4",
            "checkpoint.every_steps=2", "logging=quiet", "data.num_workers=0", "optim.eps=1e-3",
            "optim.warmup_ratio=0", "model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0", *extra]


def _job(rank: int, world: int, args: list[str], result: dict | None = None) -> None:
    code = train(compose_run("config", args))
    assert code == 0, f"exit code {code}"


def run(world: int, args: list[str]) -> None:
    run_distributed(_job, world, (args,))


TIMING = ("tokens_per_s", "tflops", "mfu")


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in open(run_dir / "metrics.jsonl")]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]


def final_weights(run_dir: Path, step: int = 4) -> dict:
    return dict(iter_tensors(run_dir / "checkpoints" / f"step_{step:08d}" / "model"))


def assert_same_training(a: Path, b: Path, tol: float = 1e-5) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 4
    assert max(abs(x - y) for x, y in zip(la, lb)) <= tol, (la, lb)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= tol


@pytest.mark.parametrize("zero", [1, 2])
def test_expert_parallel_two_processes_equal_one(setup, one_process, tmp_path, zero):
    run_dir = tmp_path / "ep2"
    run(2, overrides(setup, run_dir, "train.micro_batch_size=1", "parallel.ep_size=2",
                     f"parallel.zero_stage={zero}"))
    assert_same_training(one_process, run_dir)
    ckpt = run_dir / "checkpoints" / "step_00000004"
    model_dir = ckpt / "model"
    assert json.loads((model_dir / "layout.json").read_text()) == {"ep_size": 2}
    assert len(list(model_dir.glob("experts-ep*.safetensors"))) == 2
    # both ranks wrote: their expert slices, a share of the other tensors, their optimizer state
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert sorted(p.name for p in (ckpt / "optimizer").glob("rank*")) == ["rank00000-000.safetensors",
                                                                        "rank00001-000.safetensors"]
    # no pickles: the trainer state loads with weights_only, nothing else is a .pt file
    assert sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*.pt")) == [
        "trainer/rank00000.pt", "trainer/rank00001.pt"]
    state = torch.load(ckpt / "trainer" / "rank00001.pt", weights_only=True)
    assert state["step"] == 4 and set(state["data"]["positions"]) == {1}  # rank 1 reads stream 1


def without_init(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith("init.")]


def _init_parts_job(rank: int, world: int, args: list[str]) -> None:
    """Every element this rank holds equals the same element of the whole model initialised in
    one piece with the same seed."""
    from aria.model.aria import Aria
    from aria.parallel.shards import local_parts
    from aria.train.trainer import Trainer

    trainer = Trainer(compose_run("config", args))
    parts = local_parts(trainer.build_model())
    whole = Aria(trainer.model_cfg)
    whole.init_weights(seed=5)
    reference = whole.state_dict()
    tied = {"lm_head.weight"} if whole.cfg.text.tie_word_embeddings else set()
    assert set(parts) == set(reference) - tied
    for name, part in parts.items():
        expected = reference[name].reshape(-1)[part.start:part.end]
        assert torch.equal(part.local, expected.to(part.local.dtype)), name


def _zero3_dtype_job(rank: int, world: int, args: list[str]) -> None:
    from deepspeed.accelerator import get_accelerator

    from aria.train.trainer import Trainer

    accelerator = get_accelerator()
    accelerator.is_fp16_supported = lambda: False  # a CPU without AVX512-FP16 / AMX-FP16
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = Trainer(compose_run("config", [*args, f"parallel.precision={precision}"])).build_model()
        assert {p.dtype for p in model.parameters()} == {dtype}, precision


def test_zero3_builds_the_model_in_the_configured_precision_where_the_accelerator_lacks_fp16(setup, tmp_path):
    """DeepSpeed's zero.Init replaces an explicit fp32 dtype with bf16 on an accelerator without
    fp16 (its CPU accelerator on AVX2 machines): an fp32 ZeRO-3 run would silently train in bf16."""
    run_distributed(_zero3_dtype_job, 1, (without_init(overrides(setup, tmp_path / "z3", "parallel.zero_stage=3")),))


def test_from_scratch_initialisation_does_not_depend_on_the_layout(setup, tmp_path):
    """Expert e of layer l starts as a function of (seed, l, e) only: EP=2, EP=1 and ZeRO-3 (built
    partitioned) start from the same model as one process building it whole, and train alike."""
    from aria.model.aria import Aria

    runs = {}
    for name, layout in {"ep2": ["parallel.ep_size=2", "parallel.zero_stage=2"],
                         "ep1": ["parallel.ep_size=1", "parallel.zero_stage=1"],
                         "zero3": ["parallel.zero_stage=3"]}.items():
        runs[name] = tmp_path / name
        run(2, without_init(overrides(setup, runs[name], "train.micro_batch_size=1", "train.seed=5",
                                      *layout)))
    whole = Aria(load_model_config("tiny"))
    whole.init_weights(seed=5)
    expected = float(sum(t.double().abs().sum() for t in whole.state_dict().values()))
    for name, run_dir in runs.items():
        started = json.loads((run_dir / "init.json").read_text())["fingerprint"]
        assert started == pytest.approx(expected, rel=1e-12), name
    for layout in (["parallel.ep_size=2", "parallel.zero_stage=2"], ["parallel.zero_stage=3"]):
        run_distributed(_init_parts_job, 2, (without_init(overrides(setup, tmp_path / "parts", "train.seed=5",
                                                                    *layout)),))
    l_ep2, l_ep1, l_z3 = (losses(runs[n]) for n in ("ep2", "ep1", "zero3"))
    assert max(abs(a - b) for a, b in zip(l_ep2, l_ep1)) <= 1e-4, (l_ep2, l_ep1)
    assert max(abs(a - b) for a, b in zip(l_z3, l_ep1)) <= 1e-4, (l_z3, l_ep1)


def _build_job(rank: int, world: int, args: list[str], out: Path) -> None:
    from aria.parallel.shards import local_parts
    from aria.train.trainer import Trainer

    trainer = Trainer(compose_run("config", args))
    model = trainer.build_model()
    parts = local_parts(model)
    held = {name: part.end - part.start for name, part in parts.items()}
    whole = {name: math.prod(part.shape) for name, part in parts.items()}
    torch.save({"read": trainer.loaded.bytes_read, "stored": trainer.loaded.bytes_stored, "held": held,
                "whole": whole, "kinds": {n: p.kind for n, p in parts.items()}}, out / f"rank{rank}.pt")


def test_each_rank_reads_and_holds_only_its_part_of_the_weights(setup, tmp_path):
    expert_bytes = sum(t.numel() * t.element_size() for k, t in iter_tensors(setup / "init")
                       if ".moe.experts." in k)
    total = sum(t.numel() * t.element_size() for _, t in iter_tensors(setup / "init"))
    for layout in (["parallel.ep_size=2", "parallel.zero_stage=2"], ["parallel.zero_stage=3"]):
        out = tmp_path / layout[-1].replace("=", "")
        out.mkdir()
        run_distributed(_build_job, 2, (overrides(setup, tmp_path / "unused", *layout), out))
        ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
        assert all(r["stored"] == total for r in ranks)
        if "parallel.ep_size=2" in layout:  # each rank reads half the experts and all the rest
            assert all(r["read"] == total - expert_bytes // 2 for r in ranks), [r["read"] for r in ranks]
            experts = [n for n, k in ranks[0]["kinds"].items() if k == "experts"]
            assert experts and all(r["held"][n] * 2 == r["whole"][n] for r in ranks for n in experts)
        else:  # ZeRO-3: no rank holds or reads any tensor whole (beyond the partition padding)
            assert all(abs(r["read"] - total / 2) <= 4 * len(r["held"]) for r in ranks), [r["read"] for r in ranks]
            assert all(r["held"][n] <= -(-r["whole"][n] // 2) for r in ranks for n in r["held"])
            assert sum(ranks[0]["held"].values()) + sum(ranks[1]["held"].values()) == sum(ranks[0]["whole"].values())


def test_resume_on_another_layout_continues_the_same_losses(setup, tmp_path):
    """Two processes with EP=2 + ZeRO-2 stop at step 2; one process (EP=1, ZeRO-1, grad_accum 2)
    continues; and a one-process run continues on two processes with ZeRO-3: each equals the run
    that was never interrupted, data position, optimizer state and LR schedule included."""
    ep2 = tmp_path / "ep2"
    run(2, overrides(setup, ep2, "train.micro_batch_size=1", "parallel.ep_size=2", "parallel.zero_stage=2"))
    one = rewind(ep2, tmp_path / "one")
    run(1, overrides(setup, one, "train.micro_batch_size=1", "parallel.ep_size=1", "parallel.zero_stage=1"))
    assert_same_training(ep2, one)
    assert yaml_value(one / "checkpoints" / "step_00000004" / "config.yaml", "grad_accum") == 2

    # the other way: one process (two streams, two micro-batches a step) -> two processes, ZeRO-3
    single = tmp_path / "single"
    run(1, overrides(setup, single, "train.micro_batch_size=1", "train.grad_accum=2", "data.streams=2"))
    assert_same_training(ep2, single)  # one process with two streams = two processes
    two = rewind(single, tmp_path / "two")
    run(2, overrides(setup, two, "train.micro_batch_size=1", "train.grad_accum=2", "data.streams=2",
                     "parallel.zero_stage=3"))
    assert_same_training(single, two)
    # a layout that cannot hold the saved steps' rows is refused, naming what to change
    three = rewind(single, tmp_path / "three")
    with pytest.raises(AssertionError, match="train.micro_batch_size=2 do not divide it"):
        run(2, overrides(setup, three, "train.micro_batch_size=2"))


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_bf16_with_fp32_gradients_resumes_exactly_and_on_another_layout(setup, tmp_path, zero):
    """What GPUs run: bf16 weights, gradients accumulated and reduced in fp32 (DeepSpeed's bf16
    optimizer under ZeRO-1, fp32 gradient partitions under ZeRO-2/3). A rerun from the step-2
    checkpoint repeats the run bit for bit; one process with ZeRO-2 continues it within bf16
    rounding."""
    run_dir = tmp_path / "bf16"
    args = overrides(setup, run_dir, "train.micro_batch_size=1", "train.grad_accum=2", "data.streams=2",
                     f"parallel.zero_stage={zero}", "parallel.precision=bf16")
    run(2, args)
    first = records(run_dir)
    again = rewind(run_dir, tmp_path / "again")
    run(2, [a.replace(str(run_dir), str(again)) for a in args])
    assert records(again) == first
    other = rewind(run_dir, tmp_path / "other")
    run(1, overrides(setup, other, "train.micro_batch_size=1", "parallel.zero_stage=2",
                     "parallel.precision=bf16"))
    la, lb = losses(run_dir), losses(other)
    assert la[:2] == lb[:2] and max(abs(a - b) for a, b in zip(la, lb)) <= 2e-3, (la, lb)
    weights = final_weights(other)
    assert weights["decoder.embed.weight"].dtype == torch.bfloat16


def test_a_layout_the_memory_plan_cannot_fit_is_refused_before_any_weight(setup, tmp_path, capfd):
    """The trainer plans the run (``aria.train.plan``) once the process group exists and refuses
    a layout that cannot fit even text rows, with the plan and what to do; a layout that fits
    text rows but not image-heavy ones starts with a warning."""
    from aria.train.plan import GIB, plan_run

    refused = tmp_path / "refused"
    with pytest.raises(AssertionError, match=r"(?s)the run does not fit.*no layout of .* fits.*"
                                             r"parallel.memory_check=false starts anyway"):
        run(1, overrides(setup, refused, "train.micro_batch_size=2", "parallel.gpu_memory_gb=0.5"))
    assert not refused.exists()  # nothing loaded, nothing written

    args = overrides(setup, tmp_path / "warned", "train.micro_batch_size=2", "train.max_steps=1",
                     "train.seq_len=1024")  # room for image crops in the plan's rows
    cfg = compose_run("config", args)
    text, heavy = plan_run(cfg, 1, 1, crops=0), plan_run(cfg, 1, 1)
    assert heavy.total > text.total
    between = (text.total + heavy.total) / 2 / GIB
    run(1, args + [f"parallel.gpu_memory_gb={between}"])
    assert "warning: the memory plan fits text rows" in capfd.readouterr().out


def yaml_value(path: Path, key: str):
    from omegaconf import OmegaConf

    return OmegaConf.load(path).train[key]


def _workers_first_job(rank: int, world: int, args: list[str]) -> None:
    import multiprocessing

    import aria.train.trainer as trainer_module

    real = trainer_module.init_distributed

    def check_then_init():
        assert multiprocessing.active_children(), "the loader workers must be forked before CUDA/NCCL"
        return real()

    trainer_module.init_distributed = check_then_init
    assert train(compose_run("config", args)) == 0


def test_loader_workers_start_before_the_process_group(setup, tmp_path):
    args = overrides(setup, tmp_path / "run", "train.micro_batch_size=2", "data.num_workers=1",
                     "train.max_steps=1")
    run_distributed(_workers_first_job, 1, (args,))


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_stage_trains_normalises_globally_and_resumes_exactly(setup, one_process, tmp_path, zero,
                                                                   monkeypatch):
    from aria.parallel import optimizer_state

    monkeypatch.setattr(optimizer_state, "FILE_BYTES", 64 * 1024)  # many small optimizer files
    run_dir = tmp_path / f"zero{zero}"
    args = overrides(setup, run_dir, "train.micro_batch_size=1", f"parallel.zero_stage={zero}")
    run(2, args)
    assert len(list((run_dir / "checkpoints" / "step_00000004" / "optimizer").glob("rank00000-*"))) > 3
    # two ranks with different token counts = one rank with both rows
    assert_same_training(one_process, run_dir)
    first = records(run_dir)
    # rewind to the step-2 checkpoint, as if the run had died after it, and run the command again
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    (run_dir / "checkpoints" / "latest").write_text("step_00000002\n")
    run(2, args)
    assert records(run_dir) == first


def test_sigkill_then_rerun_writes_the_metrics_of_an_uninterrupted_run(setup, tmp_path):
    """Real processes, a loader with 2 workers, killed with SIGKILL after its step-2 checkpoint."""
    base = [sys.executable, "-m", "aria.train"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = tmp_path / "full"
    args = overrides(setup, full, "train.micro_batch_size=1", "data.num_workers=2", "train.max_steps=6")
    subprocess.run(base + args, check=True, capture_output=True, env=env, timeout=300)
    killed = tmp_path / "killed"
    args = overrides(setup, killed, "train.micro_batch_size=1", "data.num_workers=2", "train.max_steps=6")
    proc = subprocess.Popen(base + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    done = subprocess.run(base + args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout + done.stderr
    assert records(killed) == records(full)


def _sigterm_job(rank: int, world: int, args: list[str]) -> None:
    from aria.train.trainer import EXIT_TERMINATED, Trainer

    real, calls = Trainer._accumulate, [0]

    def accumulate(self, *a, **k):
        calls[0] += 1
        if calls[0] == 3:  # the signal arrives during step 3; the next step boundary stops
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)

    Trainer._accumulate = accumulate
    assert train(compose_run("config", args)) == EXIT_TERMINATED


def test_sigterm_saves_a_checkpoint_that_continues_the_uninterrupted_run(setup, one_process, tmp_path):
    """SIGTERM mid-run: a checkpoint at the next step boundary holding the data position before the
    micro-batches drawn for the step that never ran, exit 143; rerunning equals a run that was never
    stopped."""
    run_dir = tmp_path / "term"
    args = overrides(setup, run_dir, "train.micro_batch_size=2", "checkpoint.every_steps=2")
    run_distributed(_sigterm_job, 1, (args,))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    run(1, args)
    assert records(run_dir) == records(one_process)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(setup, tmp_path, monkeypatch):
    import aria.train.weights as weights

    run_dir = tmp_path / "crash"
    real = weights.save_weights

    def dies_at_step_4(model, cfg, directory, rank, world):
        if "step_00000004" in str(directory):
            raise KeyboardInterrupt("killed while writing")
        real(model, cfg, directory, rank, world)

    monkeypatch.setattr(weights, "save_weights", dies_at_step_4)
    with pytest.raises(AssertionError, match="KeyboardInterrupt"):
        run(1, overrides(setup, run_dir, "train.micro_batch_size=2"))
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert (root / ".tmp-step_00000004").is_dir() and not (root / "step_00000004").exists()
    monkeypatch.setattr(weights, "save_weights", real)
    run(1, overrides(setup, run_dir, "train.micro_batch_size=2"))
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert not (root / ".tmp-step_00000004").exists()
    assert len(losses(run_dir)) == 4


def _nan_job(rank, world, args):
    import aria.model.aria as aria_model

    real, calls = aria_model.chunked_cross_entropy, [0]

    def poisoned(*a, **k):
        calls[0] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls[0] == 3 else loss

    aria_model.chunked_cross_entropy = poisoned
    assert train(compose_run("config", args)) == 3


def test_non_finite_loss_stops_with_a_checkpoint(setup, tmp_path, capfd):
    run_dir = tmp_path / "nan"
    run_distributed(_nan_job, 1, (overrides(setup, run_dir, "train.micro_batch_size=2",
                                            "checkpoint.every_steps=100"),))
    assert "non-finite loss nan at step 3" in capfd.readouterr().out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    state = torch.load(run_dir / "checkpoints" / "step_00000002" / "trainer" / "rank00000.pt", weights_only=True)
    assert state["step"] == 2 and len(losses(run_dir)) == 2


# ---------------------------------------------------------------------------------------------
# Recipes, the pipeline, multi-node
# ---------------------------------------------------------------------------------------------

RECIPE_FACTS = {  # recipe: (stage name, vision trains, seq_len, RoPE base set by the stage)
    "stage0_vision": ("full", True, 4096, None),
    "stage1_language": ("language_pretraining", False, 8192, 1e5),
    "stage2_multimodal": ("multimodal_pretraining", True, 8192, 1e5),
    "stage3_long_context": ("long_context_pretraining", True, 65536, 5e6),
    "stage4_post_training": ("post_training", True, 8192, 5e6),
    "finetune": ("finetune", False, 2048, None),
    "finetune_video": ("finetune", False, 4096, None),
    "finetune_long_context": ("finetune", False, 65536, None),
    "finetune_lora": ("finetune", False, 2048, None),
    "quickstart": ("full", False, 1024, None),  # stage 0's vision encoder and projector, frozen
    "quickstart_vision": ("full", True, 1024, None),
}


def test_every_recipe_composes_with_its_stage_settings():
    assert sorted(RECIPE_FACTS) == recipes()
    for name, (stage, vision, seq_len, rope) in RECIPE_FACTS.items():
        args = ["run_dir=/tmp/x", "data.train=/d", "data.tokenizer=/t", "init.from_checkpoint=/c"]
        if name.startswith("finetune"):
            args = ["run_dir=/tmp/x", "data.train=/d", "init.from_hf=/h"]
        cfg = compose_run(name, args)
        assert (cfg.stage.name, cfg.stage.trainable["vision"], cfg.train.seq_len, cfg.stage.rope_theta) == \
            (stage, vision, seq_len, rope), name
        assert cfg.recipe == name
    ft = compose_run("finetune", ["run_dir=/x", "data.train=/d", "init.from_hf=/h"])
    assert (ft.optim.lr, ft.optim.weight_decay, ft.optim.beta2, ft.model.moe.aux_loss_coeff) == (5e-6, 0.1, 0.95, 1e-4)
    assert ft.data.tokenizer == "/h"  # the released directory holds the tokenizer too
    with pytest.raises(ValueError, match=r"needs \['init.from_checkpoint'\]"):
        compose_run("stage2_multimodal", ["run_dir=/x", "data.train=/d", "data.tokenizer=/t"])


def fingerprint(model_dir: Path) -> float:
    return float(sum(t.double().abs().sum() for _, t in iter_tensors(model_dir)))


@pytest.mark.slow
def test_pipeline_runs_four_stages_each_from_the_previous(tmp_path):
    from data_tools.make_shapes import make_shapes
    from data_tools.train_tokenizer import train as train_tokenizer

    data = tmp_path / "shapes"
    make_shapes(data, seed=0, train_images=16, test_images=4, train_videos=4, test_videos=2, workers=1,
                samples_per_shard=20)
    train_tokenizer([str(data / "text_train.jsonl"), str(data / "chat_train.jsonl")], data / "tokenizer",
                    vocab_size=600)
    out = tmp_path / "runs"
    env = {**os.environ, "DATA": str(data), "LAUNCH": f"{sys.executable} -m aria.train"}
    done = subprocess.run(["bash", str(ROOT / "recipes" / "pipeline.sh"), str(out), "train.max_steps=2",
                           "train.seq_len=256", "logging=quiet", "data.num_workers=0", "data.image_size=490",
                           "data.video.num_frames=2", "checkpoint.every_steps=1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = ["stage1", "stage2", "stage3", "stage4"]
    for previous, stage in zip(stages, stages[1:]):
        start = json.loads((out / stage / "init.json").read_text())
        assert Path(start["source"]).resolve() == (out / previous).resolve()
        final = out / previous / "checkpoints" / "step_00000002" / "model"
        assert start["fingerprint"] == pytest.approx(fingerprint(final), rel=1e-9)
    thetas = [json.loads((out / s / "checkpoints" / "step_00000002" / "model" / "model_config.json")
                         .read_text())["text"]["rope_theta"] for s in stages]
    assert thetas == [1e5, 1e5, 5e6, 5e6]
    # what trains: stage 1 freezes the vision encoder (steps 1 and 2 hold the same vision weights,
    # not the same decoder), stage 2 trains it
    step1 = dict(iter_tensors(out / "stage1" / "checkpoints" / "step_00000001" / "model"))
    step2 = dict(iter_tensors(out / "stage1" / "checkpoints" / "step_00000002" / "model"))
    after = dict(iter_tensors(out / "stage2" / "checkpoints" / "step_00000002" / "model"))
    vision = [k for k in step1 if k.startswith("vision.")]
    assert vision and all(torch.equal(step1[k], step2[k]) for k in vision)
    assert not torch.equal(step1["decoder.embed.weight"], step2["decoder.embed.weight"])
    assert not all(torch.equal(step2[k], after[k]) for k in vision)


def test_two_nodes_through_torchrun_rendezvous_equal_one_process(setup, one_process, tmp_path):
    port = free_port()
    run_dir = tmp_path / "nodes"
    args = overrides(setup, run_dir, "train.micro_batch_size=1")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                               f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                               f"--master_port={port}", "-m", "aria.train", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-2000:] + outputs[1][-2000:]
    assert_same_training(one_process, run_dir)


# ---------------------------------------------------------------------------------------------
# Schedules and stages (pure functions)
# ---------------------------------------------------------------------------------------------


def test_learning_rate_schedules_by_hand():
    import math

    from aria.config import OptimConfig
    from aria.train.schedule import lr_multiplier

    cos = lr_multiplier(OptimConfig(schedule="cosine", warmup_steps=2, min_lr_ratio=0.1), 12)
    assert [cos(0), cos(1)] == [0.5, 1.0]
    assert cos(2) == pytest.approx(1.0) and cos(11) == pytest.approx(0.1)
    assert cos(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    lin = lr_multiplier(OptimConfig(schedule="linear", warmup_steps=0, min_lr_ratio=0.0), 11)
    assert [lin(0), lin(5), lin(10)] == [1.0, 0.5, 0.0]
    anneal = lr_multiplier(OptimConfig(schedule="anneal", warmup_steps=0, min_lr_ratio=0.0, decay_ratio=0.25), 20)
    assert [anneal(0), anneal(14)] == [1.0, 1.0]  # stable until the last 25% (steps 15..19)
    assert anneal(15) == 1.0 and anneal(19) == 0.0 and anneal(17) == pytest.approx(0.5)
    const = lr_multiplier(OptimConfig(schedule="constant", warmup_ratio=0.5), 10)
    assert [const(0), const(4), const(9)] == [0.2, 1.0, 1.0]


def test_stage_freezes_exactly_its_groups():
    from aria.config import StageConfig
    from aria.model.aria import module_groups
    from aria.train.stages import apply_stage

    model = build_model(load_model_config("tiny"), device="meta")
    groups = module_groups(model)
    assert sum(len(p) for p in groups.values()) == len(list(model.parameters()))
    stage = StageConfig(trainable={"vision": False, "projector": True, "language_model": True,
                                   "experts": False, "router": True})
    counts = apply_stage(model, stage)
    for name, params in groups.items():
        assert all(p.requires_grad == stage.trainable[name] for p in params), name
    assert counts["vision"] == counts["experts"] == 0
    assert counts["router"] == sum(p.numel() for p in groups["router"]) > 0
    assert not model.decoder.layers[0].moe.experts.w_fc1.requires_grad
    assert model.decoder.layers[0].attn.q_proj.weight.requires_grad


def test_zero_lr_scale_freezes_its_parameters():
    from aria.config import StageConfig
    from aria.model.aria import module_groups
    from aria.parallel.engine import param_groups
    from aria.train.stages import apply_stage

    model = build_model(load_model_config("tiny"), device="meta")
    stage = StageConfig(trainable=dict.fromkeys(("vision", "projector", "language_model", "experts", "router"), True))
    lr_scale = {"patch_embed": 0.0, "router": 0.0, "vision": 0.5}
    counts = apply_stage(model, stage, lr_scale=lr_scale)
    patch_embed = {id(p) for p in model.vision.patch_embed.parameters()}
    groups = module_groups(model)
    for name, params in groups.items():
        for p in params:
            assert p.requires_grad == (name != "router" and id(p) not in patch_embed), name
    assert counts["router"] == 0
    assert counts["vision"] == sum(p.numel() for p in groups["vision"]) - model.vision.patch_embed.weight.numel() \
        - model.vision.patch_embed.bias.numel()
    optimized = {id(p) for g in param_groups(model, 1e-3, 0.0, lr_scale) for p in g["params"]}
    assert not optimized & patch_embed and not optimized & {id(p) for p in groups["router"]}
    assert model.vision.layers[0].mlp.fc1.weight.requires_grad  # a scale of 0.5 still trains
    # the patch projection's own scale wins over its group's, as in param_groups
    apply_stage(model, stage, lr_scale={"vision": 0.0, "patch_embed": 0.1})
    assert model.vision.patch_embed.weight.requires_grad and not model.vision.layers[0].mlp.fc1.weight.requires_grad


def test_lr_scale_gives_module_groups_their_own_learning_rate():
    from aria.config import OptimConfig
    from aria.parallel.engine import param_groups
    from aria.model.aria import module_groups

    model = build_model(load_model_config("tiny"), device="meta")
    model.projector.query.requires_grad_(False)
    groups = param_groups(model, 2e-3, 0.1, {"vision": 0.1, "router": 3.0, "patch_embed": 0.5})
    assert groups[0]["lr"] == 2e-3  # the base LR comes first: it is the one logged
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    expected = {"vision": 2e-4, "router": 6e-3, "projector": 2e-3, "language_model": 2e-3, "experts": 2e-3}
    for group, params in module_groups(model).items():
        for p in params:
            if p is model.projector.query:
                assert id(p) not in lr_of  # frozen parameters never reach the optimizer
                continue
            if any(p is q for q in model.vision.patch_embed.parameters()):
                assert lr_of[id(p)][0] == pytest.approx(1e-3)  # its own scale, not the vision group's
                continue
            assert lr_of[id(p)] == (pytest.approx(expected[group]), 0.1 if p.ndim >= 2 else 0.0), group
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())) - 1
    with pytest.raises(ValueError, match="optim.lr_scale"):
        OptimConfig(lr_scale={"vit": 0.1})
    with pytest.raises(ValueError, match="optim.lr_scale.vision"):
        OptimConfig(lr_scale={"vision": -1})
