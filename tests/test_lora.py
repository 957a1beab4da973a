"""LoRA: config and its errors, per-expert adapters in the grouped GEMM against the loop reference,
the start equal to the base model, merged weights equal to the adapted model (with an image), and
training runs: only adapters change, ZeRO-2 / ZeRO-3 / EP=2 on 2 gloo processes save the same
(non-empty, consolidated) adapters as one process and resume exactly, and a LoRA checkpoint as the
start of another run.

The training runs reuse the text dataset, initial model and launcher of ``test_train``; dropout is 0
there so that one process and two can be compared number for number.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from aria.config import LoRAConfig, StageConfig, load_model_config
from aria.convert.lora_base import merge_transform
from aria.convert.store import iter_tensors
from aria.model import build_model
from aria.model.lora import (ADAPTERS_FILE, LORA_JSON, LoRAMerger, adapter_parameters, add_adapters,
                             init_adapters, is_adapter, merge_lora, read_adapters)
from aria.model.moe import ExpertAdapters, experts_grouped, experts_loop
from aria.train.compose import compose_run
from helpers import make_config, run_distributed
from test_train import overrides, records, run

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "experts", "shared_experts", "vision", "projector",
               "lm_head"]
# what the training runs adapt: the official targets (attention, experts, shared experts, LM head)
RUN_LORA = ["lora=default", "lora.dropout=0", "lora.targets=[q_proj,k_proj,v_proj,o_proj,experts,"
            "shared_experts,lm_head]", "optim.lr=1e-2"]


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_defaults_are_the_official_recipe_and_bad_values_name_their_field():
    cfg = LoRAConfig()
    assert (cfg.enabled, cfg.rank, cfg.alpha, cfg.dropout, cfg.scale) == (False, 8, 32.0, 0.05, 4.0)
    assert cfg.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "experts", "shared_experts"]
    bad = [(dict(rank=0), r"'lora.rank' = 0"), (dict(rank=4), r"'lora.rank' = 4 .*multiple of 8"),
           (dict(alpha=0), r"'lora.alpha' = 0"), (dict(dropout=1.0), r"'lora.dropout' = 1.0"),
           (dict(targets=["q_proj", "mlp"]), r"'lora.targets' .*\['mlp'\] unknown"),
           (dict(targets=[]), r"'lora.targets' = \[\]"), (dict(targets="q_proj"), r"'lora.targets'"),
           (dict(targets=["v_proj", "v_proj"]), "at most once"), (dict(enabled="yes"), r"'lora.enabled'")]
    for values, message in bad:
        with pytest.raises(ValueError, match=message):
            LoRAConfig(**values)
    assert LoRAConfig(rank=4, targets=["q_proj", "v_proj"]).scale == 8.0  # experts not adapted: any rank

    args = ["run_dir=/x", "data.train=/d", "init.from_hf=/h"]
    ft = compose_run("finetune_lora", args)
    assert ft.lora == LoRAConfig(enabled=True) and ft.optim.lr == 5e-5 and ft.stage.name == "finetune"
    assert compose_run("finetune", args + ["lora=default"]).lora.enabled
    assert not compose_run("finetune", args).lora.enabled
    with pytest.raises(ValueError, match=r"'lora.targets' .*\['vision'\].*stage.trainable.vision=false"):
        compose_run("finetune_lora", args + ["lora.targets=[q_proj,vision]"])
    with pytest.raises(ValueError, match=r"'lora.rank' = 12"):
        compose_run("finetune_lora", args + ["lora.rank=12"])
    with pytest.raises(ValueError, match=r"'lora.enabled' and 'model.moe.bias_balancing' are both true"):
        compose_run("finetune_lora", args + ["model.moe.bias_balancing=true"])  # a checkpoint would drop the bias
    # the stage check only applies when LoRA is on
    assert compose_run("finetune", args + ["lora.targets=[vision]"]).lora.targets == ["vision"]


def test_targets_the_model_lacks_are_refused():
    with pytest.raises(ValueError, match=r"'lora.targets' names 'shared_experts'.*num_shared_experts = 0"):
        add_adapters(build_model(make_config(moe={"num_shared_experts": 0}), device="meta"),
                     LoRAConfig(enabled=True, targets=["shared_experts"]))
    with pytest.raises(ValueError, match=r"'lora.targets' names 'lm_head'.*tie_word_embeddings"):
        add_adapters(build_model(make_config(text={"tie_word_embeddings": True}), device="meta"),
                     LoRAConfig(enabled=True, targets=["lm_head"]))


def test_stage_with_lora_trains_only_the_adapters_of_its_groups():
    from aria.model.aria import module_groups
    from aria.train.stages import apply_stage

    model = build_model(load_model_config("tiny"), device="meta")
    lora = LoRAConfig(enabled=True, targets=["q_proj", "experts", "projector"])
    add_adapters(model, lora)
    stage = StageConfig(trainable={"vision": False, "projector": True, "language_model": True,
                                   "experts": True, "router": True})
    counts = apply_stage(model, stage, lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model))
    layers = range(model.cfg.text.num_layers)
    projector = {f"projector.{n}" for n, m in model.projector.named_modules()
                 if isinstance(m, torch.nn.Linear)}
    assert len(projector) == 7  # cross-attention q, k, v, out, linear; FFN in, out
    assert {n.rsplit(".", 1)[0] for n in trainable} == ({f"decoder.layers.{i}.attn.q_proj" for i in layers}
                                                         | {f"decoder.layers.{i}.moe.experts" for i in layers}
                                                         | projector)
    assert counts["router"] == counts["vision"] == 0 and counts["experts"] > 0
    assert sum(len(p) for p in module_groups(model).values()) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------
# The expert adapters: grouped GEMM, loop reference, orientation
# ---------------------------------------------------------------------------------------------


def test_grouped_expert_adapters_equal_the_loop_and_the_merged_weights():
    torch.manual_seed(0)
    E, D, I, R = 5, 16, 8, 8
    counts = torch.tensor([3, 0, 6, 2, 0])  # two experts without rows
    x = torch.randn(int(counts.sum()), D, requires_grad=True)
    w1, w2 = (torch.randn(E, D, 2 * I) * 0.3).requires_grad_(), (torch.randn(E, I, D) * 0.3).requires_grad_()
    lora = [(torch.randn(shape) * 0.3).requires_grad_() for shape in ((E, D, R), (E, R, 2 * I), (E, I, R),
                                                                      (E, R, D))]
    adapters = ExpertAdapters(*lora, scale=2.5, dropout=0.0)
    grad_out = torch.randn(int(counts.sum()), D)
    inputs = (x, w1, w2, *lora)

    fast = experts_grouped(x, w1, w2, counts, adapters)
    grads_fast = torch.autograd.grad(fast, inputs, grad_out)
    slow = experts_loop(x, w1, w2, counts, adapters)
    grads_slow = torch.autograd.grad(slow, inputs, grad_out)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for grad in grads_fast[3:]:  # an expert without rows gets no adapter gradient
        assert grad[1].abs().sum() == 0 and grad[4].abs().sum() == 0 and grad[0].abs().sum() > 0
    # per expert e: w + scale * A_e @ B_e, (E, in, out) layout
    merged = experts_grouped(x, w1 + 2.5 * lora[0] @ lora[1], w2 + 2.5 * lora[2] @ lora[3], counts)
    torch.testing.assert_close(fast, merged, atol=1e-5, rtol=1e-5)
    assert (fast - experts_grouped(x, w1, w2, counts)).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------
# The whole model: the start, the merge
# ---------------------------------------------------------------------------------------------


def image_inputs(cfg):
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[5, 17] + [cfg.image_token_id] * 16 + [42, 7, 8, 300, 11]])
    pixels = torch.randn(1, 3, 490, 490, generator=g)
    mask = torch.zeros(1, 490, 490, dtype=torch.bool)
    mask[:, :420, :350] = True  # a padded, non-square image
    return ids, pixels, mask


def test_fresh_adapters_leave_the_logits_of_the_base_model_unchanged():
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = image_inputs(cfg)
    base = model(*inputs).logits
    add_adapters(model, LoRAConfig(enabled=True, targets=ALL_TARGETS))
    init_adapters(model, seed=0)
    assert all(p.abs().sum() > 0 for n, p in adapter_parameters(model).items() if n.endswith("A"))
    assert torch.equal(model(*inputs).logits, base)


def test_a_rank_merges_only_the_part_it_keeps():
    """Any flat range of a merged tensor (an expert slice, a ZeRO-3 partition) equals the same
    range of the whole merged tensor: experts (stacked) and Linear / LM-head layouts."""
    import random

    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    lora = LoRAConfig(enabled=True, targets=ALL_TARGETS)
    add_adapters(model, lora)
    init_adapters(model, seed=0)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            if name.endswith("B"):
                p.normal_(std=0.05)
    state = model.state_dict()
    merger = LoRAMerger({k: v for k, v in state.items() if is_adapter(k)}, lora)
    rng = random.Random(0)
    keys = [k for k in state if merger.adapts(k)]
    assert any(".experts.w_fc" in k for k in keys) and any("lm_head" in k for k in keys)
    for key in keys:
        whole = merger(key, state[key]).reshape(-1)
        for _ in range(5):
            start = rng.randrange(whole.numel())
            end = rng.randrange(start, whole.numel()) + 1
            part = merger.merge_range(key, state[key].reshape(-1)[start:end], tuple(state[key].shape), start, end)
            torch.testing.assert_close(part, whole[start:end], rtol=0, atol=1e-6, msg=key)  # matmul rounding
        assert not torch.equal(whole, state[key].reshape(-1))  # the update is really there
    merger.check_complete()


def test_merged_weights_give_the_adapted_logits(tmp_path):
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    lora = LoRAConfig(enabled=True, targets=ALL_TARGETS)
    add_adapters(model, lora)
    init_adapters(model, seed=0)
    with torch.no_grad():  # trained-looking adapters
        for name, p in adapter_parameters(model).items():
            if name.endswith("B"):
                p.normal_(std=0.05)
    inputs = image_inputs(cfg)
    adapted = model(*inputs).logits
    state = model.state_dict()
    adapters = {k: v for k, v in state.items() if is_adapter(k)}
    base = [(k, v) for k, v in state.items() if not is_adapter(k)]
    merged = build_model(cfg).eval()
    merged.load_state_dict(dict(merge_lora(iter(base), adapters, lora)))
    assert (merged(*inputs).logits - adapted).abs().max() <= 1e-5
    plain = build_model(cfg).eval()
    plain.load_state_dict(dict(base))
    assert (plain(*inputs).logits - adapted).abs().max() > 1e-2  # the adapters do matter

    with pytest.raises(ValueError, match=r"found no base tensor.*decoder.layers.0.attn.q_proj.weight"):
        list(merge_lora(((k, v) for k, v in base if "q_proj" not in k), adapters, lora))
    with pytest.raises(ValueError, match="rank 8 but its lora.json says rank 16"):
        list(merge_lora(iter(base), adapters, LoRAConfig(enabled=True, rank=16)))


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------


def model_dir(run_dir: Path, step: int = 4) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}" / "model"


def assert_same_lora_training(a: Path, b: Path, tol: float = 1e-5) -> None:
    la = [r["loss"] for r in records(a)]
    lb = [r["loss"] for r in records(b)]
    assert len(la) == len(lb) == 4 and max(abs(x - y) for x, y in zip(la, lb)) <= tol, (la, lb)
    (ada, cfg_a), (adb, cfg_b) = read_adapters(model_dir(a)), read_adapters(model_dir(b))
    assert cfg_a == cfg_b and ada.keys() == adb.keys()
    for key in ada:
        assert ada[key].shape == adb[key].shape and ada[key].numel() > 0, key
        assert (ada[key] - adb[key]).abs().max() <= tol, key


def assert_resumes_exactly(run_dir: Path, args: list[str]) -> None:
    """Rewind to the step-2 checkpoint, as if the run had died after it, and run the command again."""
    first, adapters = records(run_dir), read_adapters(model_dir(run_dir))[0]
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    (run_dir / "checkpoints" / "latest").write_text("step_00000002\n")
    run(2, args)
    assert records(run_dir) == first
    again = read_adapters(model_dir(run_dir))[0]
    assert all(torch.equal(adapters[k], again[k]) for k in adapters)


@pytest.fixture(scope="module")
def lora_one(setup, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora_one") / "run"
    run(1, overrides(setup, run_dir, "train.micro_batch_size=2", *RUN_LORA))
    return run_dir


def test_training_changes_only_the_adapters(setup, lora_one):
    base, trained = dict(iter_tensors(setup / "init")), dict(iter_tensors(model_dir(lora_one)))
    assert base.keys() == trained.keys()
    assert all(torch.equal(base[k], trained[k]) for k in base)  # every base weight, bit for bit
    adapters, lora = read_adapters(model_dir(lora_one))
    assert json.loads((model_dir(lora_one) / LORA_JSON).read_text())["rank"] == 8
    assert lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "experts", "shared_experts", "lm_head"]
    cfg = load_model_config("tiny")
    E, D, I, L = cfg.moe.num_experts, cfg.text.hidden_size, cfg.moe.intermediate_size, cfg.text.num_layers
    assert adapters["decoder.layers.1.moe.experts.lora_fc1_B"].shape == (E, 8, 2 * I)
    assert adapters["decoder.layers.1.moe.experts.lora_fc1_A"].shape == (E, D, 8)
    assert adapters["decoder.layers.1.moe.experts.lora_fc2_B"].shape == (E, 8, D)
    assert adapters["lm_head.lora_B"].shape == (cfg.text.vocab_size, 8)
    assert len(adapters) == 2 * (L * (4 + 2 + 3) + 1)
    assert all(t.abs().sum() > 0 for k, t in adapters.items() if k.endswith("B")), "B never left zero"
    fresh = build_model(cfg, device="meta")
    add_adapters(fresh, lora)
    fresh = fresh.to_empty(device="cpu")
    init_adapters(fresh, seed=0)
    moved = [k for k, p in adapter_parameters(fresh).items()
             if k.endswith("A") and not torch.equal(p, adapters[k])]
    assert len(moved) == L * (4 + 2 + 3) + 1  # every A trained too (after B left zero)
    losses = [r["loss"] for r in records(lora_one)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_two_processes_save_the_adapters_of_one_and_resume_exactly(setup, lora_one, tmp_path,
                                                                        zero):
    run_dir = tmp_path / f"zero{zero}"
    args = overrides(setup, run_dir, "train.micro_batch_size=1", f"parallel.zero_stage={zero}", *RUN_LORA)
    run(2, args)
    assert_same_lora_training(lora_one, run_dir)
    assert_resumes_exactly(run_dir, args)


def test_expert_parallel_adapters_consolidate_and_resume(setup, lora_one, tmp_path):
    run_dir = tmp_path / "ep2"
    args = overrides(setup, run_dir, "train.micro_batch_size=1", "parallel.ep_size=2", "parallel.zero_stage=2",
                     *RUN_LORA)
    run(2, args)
    assert_same_lora_training(lora_one, run_dir)
    assert not list(model_dir(run_dir).glob("experts-ep*.safetensors"))  # adapters only: no base weights
    assert not list(model_dir(run_dir).glob("adapters-*"))  # one file, all experts
    assert_resumes_exactly(run_dir, args)  # rank 1 reloads its own expert adapters, not rank 0's


def test_a_lora_checkpoint_merges_into_the_model_it_trained(lora_one, tmp_path):
    from aria.convert.checkpoint import read_model_config
    from aria.train.weights import load_weights

    directory = model_dir(lora_one)
    cfg = read_model_config(directory)
    adapted = build_model(cfg, device="meta")
    add_adapters(adapted, read_adapters(directory)[1])
    adapted = adapted.to_empty(device="cpu").eval()
    assert load_weights(adapted, directory).adapters  # base weights + adapters
    merged = build_model(cfg).eval()
    merged.load_state_dict(dict(merge_transform(directory)(iter_tensors(directory))))
    inputs = image_inputs(cfg)
    logits = adapted(*inputs).logits
    assert (merged(*inputs).logits - logits).abs().max() <= 1e-5
    base = build_model(cfg).eval()
    base.load_state_dict(dict(iter_tensors(directory)))
    assert (base(*inputs).logits - logits).abs().max() > 1e-3
    with pytest.raises(FileNotFoundError, match="holds no LoRA adapters"):
        merge_transform(tmp_path)

    # what users run: evaluation loads the adapted model; export needs --merge-lora and merges
    from transformers import AriaForConditionalGeneration

    from aria.convert.checkpoint import load_model_dir
    from aria.convert.export import to_hf

    assert (load_model_dir(directory).eval()(*inputs).logits - logits).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="pass --merge-lora"):
        to_hf(lora_one, tmp_path / "hf_base", log=lambda _: None)
    to_hf(lora_one, tmp_path / "hf", merge_lora=True, log=lambda _: None)
    hf = AriaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids, pixels, mask = inputs
    hf_logits = hf(input_ids=ids, pixel_values=pixels, pixel_mask=mask).logits
    assert (hf_logits - logits).abs().max() <= 1e-5


def _build_from(rank, world, args, out):
    from aria.train.trainer import Trainer

    model = Trainer(compose_run("config", args)).build_model()
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)


def test_a_lora_checkpoint_starts_another_run(setup, lora_one, tmp_path):
    saved, lora = read_adapters(model_dir(lora_one))
    # the same adapters keep training: they are loaded
    args = overrides(setup, tmp_path / "again", *RUN_LORA)
    args = [a for a in args if not a.startswith("init.")] + [f"init.from_checkpoint={lora_one}"]
    run_distributed(_build_from, 1, (args, tmp_path / "again.pt"))
    state = torch.load(tmp_path / "again.pt")
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    # no LoRA: the run starts from plain weights that compute what the adapted model computed. The
    # reference runs the adapters themselves (LoRALinear, the experts' low-rank GEMMs), not a merge.
    plain = [a for a in args if not a.startswith("lora")]
    run_distributed(_build_from, 1, (plain, tmp_path / "plain.pt"))
    state = torch.load(tmp_path / "plain.pt")
    cfg = load_model_config("tiny")
    started = build_model(cfg).eval()
    started.load_state_dict(state)  # strict: every weight, no adapter left
    adapted = build_model(cfg).eval()
    add_adapters(adapted, lora)
    base_weights = dict(iter_tensors(setup / "init"))  # what LoRA trained on, unchanged
    adapted.load_state_dict({**base_weights, **saved})
    base = build_model(cfg).eval()
    base.load_state_dict(base_weights)
    inputs = image_inputs(cfg)
    with torch.no_grad():
        logits = adapted(*inputs).logits
        delta = (started(*inputs).logits - logits).abs().max().item()
        moved = (base(*inputs).logits - logits).abs().max().item()
    assert delta <= 1e-5 < 1e-3 < moved, (delta, moved)  # the same model, which the adapters moved
    # other adapter settings: refused, naming the field
    with pytest.raises(AssertionError, match=r"config field 'lora.rank' = 16 differs .*rank = 8"):
        run_distributed(_build_from, 1, (args + ["lora.rank=16"], tmp_path / "bad.pt"))
    assert (model_dir(lora_one) / ADAPTERS_FILE).is_file()
