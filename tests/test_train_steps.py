"""What happens around a training step, each on a real (tiny) run: gradient accumulation against
one big micro-batch, the stop on a non-finite gradient norm, pruning to the last k checkpoints,
evaluation during training, auxiliary-loss-free balancing with global-batch statistics, a missing
dataset refused before any work, and kept image tokens against the image path.

The runs use ``test_train``'s one-row text documents and initial model (see its docstring), but the
last, which reads a small shapes world.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from aria.train.compose import compose_run
from aria.train.trainer import train
from helpers import run_distributed
from test_train import assert_same_training, final_weights, losses, overrides, records, run


def test_gradient_accumulation_equals_one_big_micro_batch(setup, one_process, tmp_path):
    """Two micro-batches of one row a step = one micro-batch of both rows: the loss is normalised
    by the step's supervised tokens, not per micro-batch (the rows hold different token counts, so
    a per-micro-batch mean would weigh their tokens differently and move the weights elsewhere)."""
    run_dir = tmp_path / "accum"
    run(1, overrides(setup, run_dir, "train.micro_batch_size=1", "train.grad_accum=2"))
    assert_same_training(one_process, run_dir)
    assert [r["tokens_seen"] for r in records(run_dir)] == [r["tokens_seen"] for r in records(one_process)]


def _inf_gradient_job(rank: int, world: int, args: list[str], at_step: int) -> None:
    """Trains with a hook that makes one gradient infinite in the backward of step ``at_step``:
    the loss stays finite, the gradient norm does not."""
    from aria.train.trainer import EXIT_NONFINITE, Trainer

    real, backwards = Trainer.build_model, [0]

    def poison(grad):
        backwards[0] += 1
        return torch.full_like(grad, float("inf")) if backwards[0] == at_step else grad

    def build_model(self):
        model = real(self)
        model.lm_head.weight.register_hook(poison)
        return model

    Trainer.build_model = build_model
    assert train(compose_run("config", args)) == EXIT_NONFINITE


@pytest.mark.parametrize("zero", [0, 1])
def test_non_finite_gradient_norm_stops_with_the_weights_before_the_step(setup, one_process, tmp_path, capfd,
                                                                         zero):
    """An infinite gradient at step 3 (finite loss): exit 3 with nothing of step 3 applied (without
    ZeRO our norm decides before the optimizer step, under ZeRO DeepSpeed skips the update), the
    step-2 weights saved again with the data position after step 3: the rerun continues on new
    rows instead of failing on the same ones."""
    run_dir = tmp_path / "inf"
    args = overrides(setup, run_dir, "train.micro_batch_size=2", f"parallel.zero_stage={zero}")
    run_distributed(_inf_gradient_job, 1, (args, 3))
    out = capfd.readouterr().out.replace("\n", "")  # the console wraps long lines
    assert "non-finite gradient norm inf at step 3: the update was not applied" in out
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    state = torch.load(root / "step_00000002" / "trainer" / "rank00000.pt", weights_only=True)
    assert state["step"] == 2
    assert losses(run_dir) == pytest.approx(losses(one_process)[:2], abs=1e-6)
    saved, reference = final_weights(run_dir, 2), final_weights(one_process, 2)
    assert max((saved[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6
    run(1, args)  # no hook now
    rerun = losses(run_dir)
    assert len(rerun) == 4 and all(map(math.isfinite, rerun))
    # step 3 of the rerun starts from the step-2 weights, like the reference's step 3: on the same
    # rows its loss would be the same
    assert abs(rerun[2] - losses(one_process)[2]) > 1e-3, (rerun, losses(one_process))



def test_keep_last_prunes_to_the_newest_checkpoints_and_the_newest_resumes(setup, tmp_path):
    """keep_last=2 with a checkpoint every step: after steps 1-3 only steps 2 and 3 remain; a
    rerun to step 5 resumes from step 3 (the newest) and equals a run that went to step 5 at once
    (a constant LR: the schedule does not depend on train.max_steps)."""
    def args(run_dir, steps):
        return overrides(setup, run_dir, "train.micro_batch_size=2", "checkpoint.every_steps=1",
                         "checkpoint.keep_last=2", "optim.schedule=constant", f"train.max_steps={steps}")

    def kept(run_dir):
        return sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    run_dir = tmp_path / "keep"
    run(1, args(run_dir, 3))
    assert kept(run_dir) == ["latest", "step_00000002", "step_00000003"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    run(1, args(run_dir, 5))
    assert kept(run_dir) == ["latest", "step_00000004", "step_00000005"]
    straight = tmp_path / "straight"
    run(1, args(straight, 5))
    assert records(run_dir) == records(straight)
    a, b = final_weights(run_dir, 5), final_weights(straight, 5)
    assert all(torch.equal(a[k], b[k]) for k in b)


def held_out_loss(setup, model_dir, path) -> float:
    """Token-mean cross-entropy of the model in ``model_dir`` over the records of ``path``, one
    record per forward, from the logits (not the trainer's evaluation nor the model's loss)."""
    from aria.config import DataConfig
    from aria.convert.checkpoint import read_model_config
    from aria.convert.store import iter_tensors
    from aria.data.loader import iterate_samples
    from aria.data.processor import Processor
    from aria.model import build_model

    cfg = read_model_config(model_dir)
    model = build_model(cfg, init=False)
    model.load_state_dict(dict(iter_tensors(model_dir)), strict=True)
    processor = Processor.from_config(DataConfig(tokenizer=str(setup / "tok")), cfg)
    total, count = 0.0, 0
    with torch.no_grad():
        for _, encoded in iterate_samples(str(path), processor, strict=True):
            logits = model.eval()(encoded.input_ids[None]).logits[0]
            total += torch.nn.functional.cross_entropy(logits.double(), encoded.targets, ignore_index=-100,
                                                       reduction="sum").item()
            count += int((encoded.targets != -100).sum())
    return total / count


def test_evaluation_during_training_logs_the_loss_of_the_weights_of_its_step(setup, tmp_path):
    """train.eval_every=3 over 4 steps: the held-out loss at step 3 (in that step's record) and at
    the end (step 4, a record of its own), each the loss of the weights saved at that step."""
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join((setup / "docs.jsonl").read_text().splitlines(keepends=True)[-7:]))
    run_dir = tmp_path / "eval"
    run(1, overrides(setup, run_dir, "train.micro_batch_size=2", f"data.eval={held_out}", "train.eval_every=3",
                     "checkpoint.every_steps=3"))
    logged = [r for r in records(run_dir) if "eval_loss" in r]
    assert [r["step"] for r in logged] == [3, 4]
    assert "loss" in logged[0] and "loss" not in logged[1]  # step 3's training record holds it
    for r in logged:
        expected = held_out_loss(setup, run_dir / "checkpoints" / f"step_{r['step']:08d}" / "model", held_out)
        assert r["eval_loss"] == pytest.approx(expected, rel=1e-5)
        assert r["eval_loss/held_out"] == r["eval_loss"]
    assert logged[0]["eval_loss"] != pytest.approx(logged[1]["eval_loss"], rel=1e-4)  # the weights moved


def test_bias_balancing_with_global_batch_statistics_moves_the_bias_and_balances_the_experts(setup, tmp_path):
    """Two processes, the balance statistics over the global batch, 8 steps: with auxiliary-loss-free
    balancing every router bias is a whole number of update steps (bias += rate * sign(...), so
    |bias| / rate <= 8) and some are not zero; the worst layer's max/mean expert load over the last
    4 steps is well below that of the same run without it (about 2.4 against 3.5 here)."""
    rate = 0.05
    runs = {}
    for name, extra in {"plain": [], "biased": ["model.moe.bias_balancing=true",
                                                f"model.moe.bias_update_rate={rate}"]}.items():
        runs[name] = tmp_path / name
        run(2, overrides(setup, runs[name], "train.micro_batch_size=1", "train.max_steps=8",
                         "checkpoint.every_steps=0", "model.moe.balance_scope=global_batch",
                         "model.moe.aux_loss_coeff=1e-3", *extra))
    biases = {k: v for k, v in final_weights(runs["biased"], 8).items() if k.endswith("router.expert_bias")}
    assert len(biases) == 2 and not any(k.endswith("expert_bias") for k in final_weights(runs["plain"], 8))
    for name, bias in biases.items():
        steps = bias.double() / rate
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 8, (name, steps)
        assert steps.abs().max() >= 1, name

    def late_imbalance(run_dir):
        worst = [r["expert_load_max_over_mean_worst"] for r in records(run_dir)]
        assert len(worst) == 8
        return sum(worst[4:]) / 4

    plain, biased = late_imbalance(runs["plain"]), late_imbalance(runs["biased"])
    assert biased < 0.8 * plain, (biased, plain)


def _missing_data_job(rank: int, world: int, args: list[str]) -> None:
    from aria.train.trainer import EXIT_CONFIG

    assert train(compose_run("config", args)) == EXIT_CONFIG


def test_a_missing_dataset_is_one_line_naming_its_config_field(setup, tmp_path, capfd):
    """Two processes: one line (from the node's first process) naming data.train and the path, no
    traceback, nothing written; the CLI exits 2 with the same line. data.eval entries and shard
    patterns are checked the same way."""
    from aria.config import DataConfig
    from aria.data.sources import check_datasets

    missing = tmp_path / "nowhere" / "train.jsonl"
    run_dir = tmp_path / "run"
    args = [a for a in overrides(setup, run_dir) if not a.startswith("data.train=")] + [f"data.train={missing}"]
    expected = f"aria-train: config field 'data.train': dataset not found: {missing}"
    run_distributed(_missing_data_job, 2, (args,))
    out, err = capfd.readouterr()
    assert [line for line in (out + err).splitlines() if "nowhere" in line] == [expected]
    assert "Traceback" not in out + err and not run_dir.exists()

    done = subprocess.run([sys.executable, "-m", "aria.train", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    assert [line for line in done.stderr.splitlines() if "nowhere" in line] == [expected]

    docs = str(setup / "docs.jsonl")
    (tmp_path / "shard-000.tar").touch()
    check_datasets(DataConfig(train=str(tmp_path / "shard-*.tar"), eval=docs))
    with pytest.raises(FileNotFoundError, match=r"config field 'data.eval\[1\]': dataset not found: .*nowhere"):
        check_datasets(DataConfig(train=docs, eval=[docs, str(missing)]))
    with pytest.raises(FileNotFoundError, match=r"'data.train': .*\*\.tar \(the pattern matches no file\)"):
        check_datasets(DataConfig(train=str(tmp_path / "nowhere" / "*.tar")))
    for field in ("data.tokenizer", "init.from_checkpoint"):
        cfg = compose_run("config", [a for a in overrides(setup, run_dir) if not a.startswith(field + "=")]
                          + [f"{field}={tmp_path / 'nowhere'}"])
        assert train(cfg) == 2 and not run_dir.exists()
        assert f"aria-train: config field '{field}': not found: {tmp_path / 'nowhere'}" in capfd.readouterr().err


def _recipe_job(rank: int, world: int, recipe: str, args: list[str]) -> None:
    assert train(compose_run(recipe, args)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("recipe, data, blocks, extra", [
    ("quickstart", "chat_train.jsonl", 6 + 2 * 8, []),  # every image and video frame, each once
    # the encoder's layers in chunks of 4 crops, each recomputed in backward
    ("quickstart_vision", "image_caption_train.jsonl", 6, ["model.vision.crop_chunk=4"]),
])
def test_kept_image_tokens_train_as_without_them(tmp_path, recipe, data, blocks, extra):
    """Kept image tokens (``stage.image_token_cache_gb``, the recipes' own setting): recipe=quickstart
    (vision encoder and projector frozen: tokens kept) on image questions and videos, and
    recipe=quickstart_vision (stage 0: the encoder trains from its frozen patch projection, whose
    patch embeddings are kept) on image captions, each without the cache, with it, and with it on 2
    processes (a cache each): the same losses and weights, and the runs with the cache read most
    image blocks from it (a step is 2 rows of 256 tokens, one of each of 2 data streams; the world
    has 6 images and 2 videos)."""
    from helpers import shapes_world

    root, tok = shapes_world(tmp_path, train_images=6, test_images=1, train_videos=2, test_videos=1)
    common = [f"data.train={root / data}", f"data.tokenizer={tok}", "logging=quiet",
              "train.max_steps=6", "train.seq_len=256", "checkpoint.every_steps=0", "optim.eps=1e-3",
              "data.streams=2", "train.micro_batch_size=1", *extra]
    plain, kept, two = tmp_path / "plain", tmp_path / "kept", tmp_path / "two"
    one = ["train.grad_accum=2", *common]  # the two streams' rows in turn, as the two processes read them
    for run_dir, world, cache, args in ((plain, 1, 0, one), (kept, 1, 0.01, one), (two, 2, 0.01, common)):
        run_distributed(_recipe_job, world, (recipe, [f"run_dir={run_dir}", f"stage.image_token_cache_gb={cache}",
                                                      *args]), timeout=300)
    wa = final_weights(plain, 6)
    for run_dir in (kept, two):
        a, b = losses(plain), losses(run_dir)
        assert len(a) == 6 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (run_dir, a, b)
        wb = final_weights(run_dir, 6)
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    assert "image_cache_reads" not in records(plain)[-1]
    last = records(kept)[-1]
    assert last["image_cache_blocks"] == blocks
    assert last["image_cache_reads"] > 2 * last["image_cache_passes"], last
    assert records(two)[-1]["image_cache_reads"] > 0  # rank 0's own cache
