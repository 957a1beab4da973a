"""LoRA checkpoints that hold adapters and a reference to their base, the PEFT export of adapters,
and the projector's packed in-projection as a LoRA target.

- A LoRA run's checkpoint holds no base tensor (model/ = adapters + base.json; optimizer/ = the
  adapters' state), resumes to the same losses and adapters as the uninterrupted run, and exports /
  generates the model it trained: transformers' logits of the merged export and our generation
  model's logits equal the adapted model built from the base by hand (LoRALinear etc., no merge).
- A base rewritten with other values, or gone, is refused by every reader (resume, export,
  generation), naming the base path and both fingerprints.
- ``aria-convert to-hf --adapters-only``: ``peft.PeftModel.from_pretrained`` on transformers'
  ``AriaForConditionalGeneration`` holding the frozen base gives our adapted logits (fp32, 1e-5) for
  every target, experts and LM head included.
- ``projector_in_proj``: its update is B @ A on the packed (3 Dv, Dv) weight, checked against a
  model whose in-projection was replaced by W + (alpha / r) B A computed here, and its merge.

The training runs reuse the text dataset, initial model and launcher of ``test_train``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aria.config import LoRAConfig, load_model_config
from aria.convert.checkpoint import load_model_dir, read_model_config, save_model_dir, write_hf_dir
from aria.convert.lora_base import BASE_JSON, fingerprint, read_base
from aria.model import build_model
from aria.model.lora import (ADAPTERS_FILE, LORA_JSON, adapter_parameters, add_adapters, init_adapters,
                             is_adapter, lora_json, merge_lora, read_adapters)
from aria.train.weights import load_adapters
from helpers import run_distributed
from test_lora import image_inputs
from test_train import overrides, records, run

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "experts", "shared_experts", "vision", "projector",
               "projector_in_proj", "lm_head"]
RUN_LORA = ["lora=default", "lora.dropout=0", "lora.targets=[q_proj,k_proj,v_proj,o_proj,experts,"
            "shared_experts,lm_head]", "optim.lr=1e-2"]


def trained_looking(model, targets, seed: int = 0):
    """``model`` with adapters on ``targets``, A as initialised and B random (not zero)."""
    lora = LoRAConfig(enabled=True, targets=targets)
    add_adapters(model, lora)
    init_adapters(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            if name.endswith("B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return lora


def adapted_from(base_dir: Path, adapters: dict, lora: LoRAConfig):
    """The adapted model built by hand: the base loaded, adapter modules added, adapters copied in
    (nothing merged)."""
    model = load_model_dir(base_dir).eval()
    add_adapters(model, lora)
    load_adapters(model, adapters, "test")
    return model


def hf_logits(hf_model, inputs):
    ids, pixels, mask = inputs
    return hf_model(input_ids=ids, pixel_values=pixels, pixel_mask=mask).logits


# ---------------------------------------------------------------------------------------------
# PEFT export
# ---------------------------------------------------------------------------------------------


def lora_model_dir(tmp_path: Path, targets: list[str], drop: str | None = None
                   ) -> tuple[Path, torch.Tensor, object]:
    """A model directory with base weights + adapters (as a LoRA run on random weights writes),
    the adapted model's logits on an image prompt, and the config. ``drop``: a module whose adapter
    is zeroed and left out of the files."""
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    lora = trained_looking(model, targets)
    if drop is not None:
        with torch.no_grad():
            model.get_submodule(drop).lora_B.zero_()
    inputs = image_inputs(cfg)
    with torch.no_grad():
        logits = model(*inputs).logits
    state = model.state_dict()
    directory = tmp_path / "lora_model"
    save_model_dir({k: v for k, v in state.items() if not is_adapter(k)}, cfg, directory)
    save_file({k: v.contiguous() for k, v in state.items()
               if is_adapter(k) and not (drop and k.startswith(drop + "."))}, directory / ADAPTERS_FILE)
    (directory / LORA_JSON).write_text(lora_json(lora))
    return directory, logits, cfg


PEFT_TARGETS = [t for t in ALL_TARGETS if t != "projector"]  # all PEFT can express (module docstring)


@pytest.mark.parametrize("targets,drop", [
    (PEFT_TARGETS, None), (["experts"], None), (["projector_in_proj"], None), (["q_proj", "v_proj"], None),
    # the projector's other Linears (q/k/v, linear, FFN), its attention's out_proj left out
    (["projector", "projector_in_proj"], "projector.cross_attn.out_proj")])
@pytest.mark.slow
def test_peft_applies_the_exported_adapters_to_the_hf_base_as_we_do(tmp_path, targets, drop):
    from peft import PeftModel
    from transformers import AriaForConditionalGeneration

    from aria.cli.convert import main
    from aria.convert.store import iter_tensors

    directory, logits, cfg = lora_model_dir(tmp_path, targets, drop)
    base_hf = tmp_path / "base_hf"  # the frozen base in the HF format
    write_hf_dir(iter_tensors(directory), cfg, base_hf)
    assert main(["to-hf", str(directory), str(tmp_path / "peft"), "--adapters-only"]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 32.0, False)

    base = AriaForConditionalGeneration.from_pretrained(base_hf).eval()
    with torch.no_grad():
        plain = hf_logits(base, image_inputs(cfg))
    assert (plain - logits).abs().max() > 1e-3  # the adapters matter
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    # every tensor of the file found its LoRA parameter, and every LoRA parameter got a tensor
    written = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    lora_params = {k.replace(".default", ""): p for k, p in peft_model.named_parameters() if "lora_" in k}
    assert set(written) == set(lora_params)
    assert all(torch.equal(written[k], lora_params[k]) for k in written)
    with torch.no_grad():
        got = hf_logits(peft_model, image_inputs(cfg))
    assert (got - logits).abs().max() <= 1e-5


def test_adapters_only_refuses_what_peft_cannot_express_and_other_flags(tmp_path):
    from aria.convert.export import to_hf

    directory, _, cfg = lora_model_dir(tmp_path, ["projector"])
    with pytest.raises(ValueError, match=r"out_proj .*applies that update twice .*--merge-lora"):
        to_hf(directory, tmp_path / "peft", adapters_only=True, log=lambda _: None)
    assert not (tmp_path / "peft").exists()
    with pytest.raises(ValueError, match="drop --merge-lora"):
        to_hf(directory, tmp_path / "x", adapters_only=True, merge_lora=True, log=lambda _: None)
    plain = tmp_path / "plain"
    save_model_dir(build_model(cfg).state_dict(), cfg, plain)
    with pytest.raises(FileNotFoundError, match="holds no LoRA adapters"):
        to_hf(plain, tmp_path / "y", adapters_only=True, log=lambda _: None)


# ---------------------------------------------------------------------------------------------
# The projector's packed in-projection
# ---------------------------------------------------------------------------------------------


def test_the_projector_in_projection_adapter_is_b_a_on_the_packed_weight_and_merges(tmp_path):
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lora = trained_looking(model, ["projector_in_proj"])
    adapters = {k: v for k, v in model.state_dict().items() if is_adapter(k)}
    assert {k: tuple(v.shape) for k, v in adapters.items()} == {
        "projector.cross_attn.lora_in_proj_A": (8, cfg.vision.hidden_size),
        "projector.cross_attn.lora_in_proj_B": (3 * cfg.vision.hidden_size, 8)}
    inputs = image_inputs(cfg)
    with torch.no_grad():
        adapted = model(*inputs).logits
        # independent: W + (alpha / r) * B @ A written into a plain model's packed weight
        by_hand = build_model(cfg).eval()
        expected = dict(base_state)
        a, b = (adapters[f"projector.cross_attn.lora_in_proj_{x}"] for x in "AB")
        scale = 32.0 / 8  # alpha / rank
        key = "projector.cross_attn.in_proj_weight"
        expected[key] = base_state[key] + scale * b @ a
        by_hand.load_state_dict(expected)
        assert (by_hand(*inputs).logits - adapted).abs().max() <= 1e-5
        plain = build_model(cfg).eval()
        plain.load_state_dict(base_state)
        assert (plain(*inputs).logits - adapted).abs().max() > 1e-3
        merged = build_model(cfg).eval()
        merged.load_state_dict(dict(merge_lora(iter(base_state.items()), adapters, lora)))
        assert (merged(*inputs).logits - adapted).abs().max() <= 1e-5
    # gradients reach the adapter (it trains) through all three slices
    model.train()
    model.projector.cross_attn.lora_dropout = 0.0
    model(*inputs).logits.square().mean().backward()
    grad_B = model.projector.cross_attn.lora_in_proj_B.grad
    assert all(chunk.abs().sum() > 0 for chunk in grad_B.chunk(3))

    # the merged export: transformers gives the adapted logits
    from transformers import AriaForConditionalGeneration

    from aria.convert.export import to_hf

    directory = tmp_path / "lora_model"
    save_model_dir(base_state, cfg, directory)
    save_file({k: v.contiguous() for k, v in adapters.items()}, directory / ADAPTERS_FILE)
    (directory / LORA_JSON).write_text(lora_json(lora))
    to_hf(directory, tmp_path / "hf", merge_lora=True, weights_only=True, log=lambda _: None)
    hf = AriaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (hf_logits(hf, inputs) - adapted).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# Adapter-only checkpoints of a LoRA run
# ---------------------------------------------------------------------------------------------


def model_dir(run_dir: Path, step: int = 4) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}" / "model"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def lora_run(setup, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(run dir, its base, the command's overrides): 4 LoRA steps from a private copy of the base
    (tests may break it), checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("adapters")
    base = shutil.copytree(setup / "init", root / "base")
    args = overrides(setup, root / "run", "train.micro_batch_size=2", *RUN_LORA)
    args = [a for a in args if not a.startswith("init.")] + [f"init.from_checkpoint={base}"]
    run(1, args)
    return root / "run", base, args


@pytest.mark.slow
def test_a_lora_checkpoint_holds_its_adapters_and_the_reference_to_its_base(lora_run):
    run_dir, base, _ = lora_run
    directory = model_dir(run_dir)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [ADAPTERS_FILE, LORA_JSON, BASE_JSON, "model_config.json"])
    ref = read_base(directory)
    assert (ref.path, ref.hf) == (str(base.resolve()), False)
    assert ref.fingerprint == fingerprint(base) and ref.fingerprint.startswith("v2:")
    # no base tensor anywhere in the checkpoint: model/ and optimizer/ name adapters only
    adapters = read_adapters(directory)[0]
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapters.values())
    ckpt = directory.parent
    for f in ckpt.rglob("*.safetensors"):
        with safe_open(f, framework="pt") as handle:
            names = list(handle.keys())
        assert names and all(".lora_" in name for name in names), (f, names[:5])
    # model/ is the adapters (+ small JSON); the whole checkpoint adds their fp32 Adam state
    assert dir_bytes(directory) <= adapter_bytes + 64 * 1024
    assert dir_bytes(ckpt) <= 4 * adapter_bytes + 256 * 1024
    assert dir_bytes(ckpt) < dir_bytes(base)  # (tiny: the adapters are a large share of the model)


@pytest.mark.slow
def test_resuming_an_adapter_checkpoint_continues_as_the_uninterrupted_run(lora_run, tmp_path):
    run_dir, _, args = lora_run
    again = shutil.copytree(run_dir, tmp_path / "run")
    shutil.rmtree(again / "checkpoints" / "step_00000004")
    (again / "checkpoints" / "latest").write_text("step_00000002\n")
    run(1, [a for a in args if not a.startswith("run_dir=")] + [f"run_dir={again}"])
    first, resumed = records(run_dir), records(again)
    assert len(first) == 4 and resumed == first  # losses, gradient norms, LR of steps 1-4
    expected, got = read_adapters(model_dir(run_dir))[0], read_adapters(model_dir(again))[0]
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert read_base(model_dir(again)) == read_base(model_dir(run_dir))


def test_export_and_generation_of_an_adapter_checkpoint_give_the_adapted_model(lora_run, tmp_path):
    from transformers import AriaForConditionalGeneration

    from aria.convert.export import to_hf
    from aria.inference import load_inference

    run_dir, base, _ = lora_run
    adapters, lora = read_adapters(model_dir(run_dir))
    cfg = read_model_config(model_dir(run_dir))
    inputs = image_inputs(cfg)
    with torch.no_grad():
        expected = adapted_from(base, adapters, lora)(*inputs).logits
        assert (load_model_dir(base).eval()(*inputs).logits - expected).abs().max() > 1e-3
        to_hf(run_dir, tmp_path / "hf", merge_lora=True, log=lambda _: None)
        hf = AriaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
        assert (hf_logits(hf, inputs) - expected).abs().max() <= 1e-5
        model, _ = load_inference(run_dir, device="cpu")  # what aria-generate / aria-eval load
        assert (model(*inputs).logits - expected).abs().max() <= 1e-5


def test_loading_for_inference_in_bf16_on_a_cpu_without_native_bf16_warns(lora_run, monkeypatch, capsys):
    from aria.inference import load_inference

    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        for dtype in (torch.bfloat16, torch.float32):
            model, _ = load_inference(lora_run[0], device="cpu", dtype=dtype)
            assert next(model.parameters()).dtype == dtype
            err = capsys.readouterr().err
            slow = dtype == torch.bfloat16 and not native
            assert ("bf16 on a CPU without AVX512-BF16 or AMX" in err) == slow
            assert ("--dtype fp32" in err) == slow  # names what to pass instead


def _lora_base_of_build(rank, world, args, out):
    from aria.train.compose import compose_run
    from aria.train.trainer import Trainer

    model = Trainer(compose_run("config", args)).build_model()
    Path(out).write_text(json.dumps(model.lora_base.__dict__))


def test_a_run_continuing_the_adapters_of_a_checkpoint_refers_to_the_same_base(lora_run, tmp_path):
    run_dir, base, args = lora_run
    args = [a for a in args if not a.startswith(("init.", "run_dir="))]
    args += [f"run_dir={tmp_path / 'next'}", f"init.from_checkpoint={run_dir}"]
    run_distributed(_lora_base_of_build, 1, (args, tmp_path / "ref.json"))
    assert json.loads((tmp_path / "ref.json").read_text()) == read_base(model_dir(run_dir)).__dict__


def test_the_fingerprint_follows_the_weights_not_the_files(tmp_path):
    """The same weights in one file, in shards and as an HF directory: one fingerprint; one value
    changed by 1e-3 in the middle of a tensor: another."""
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    save_model_dir(state, cfg, tmp_path / "one")
    save_model_dir(state, cfg, tmp_path / "shards", max_shard_bytes=200_000)
    write_hf_dir(state.items(), cfg, tmp_path / "hf")
    assert len(list((tmp_path / "shards").glob("model-*.safetensors"))) > 2
    same = fingerprint(tmp_path / "one")
    assert fingerprint(tmp_path / "shards") == same == fingerprint(tmp_path / "hf", hf=True)
    key = "decoder.layers.0.attn.q_proj.weight"
    state[key].view(-1)[state[key].numel() // 2] += 1e-3
    save_model_dir(state, cfg, tmp_path / "changed")
    assert fingerprint(tmp_path / "changed") != same


def test_a_lora_run_from_random_weights_keeps_its_base_in_every_checkpoint(setup, tmp_path):
    """No base on disk: every checkpoint holds its own base weights beside the adapters, also after
    a resume and when keep_last has pruned the checkpoint it resumed from (a resumed run must not
    take its own checkpoint for the base)."""
    from aria.inference import load_inference

    run_dir = tmp_path / "scratch"
    args = [a for a in overrides(setup, run_dir, "lora=default", "checkpoint.every_steps=1",
                                 "checkpoint.keep_last=1") if not a.startswith("init.")]
    run(1, args)
    run(1, [a for a in args if not a.startswith("train.max_steps=")] + ["train.max_steps=6"])  # resumes at 4
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000006"]
    directory = model_dir(run_dir, 6)
    assert read_base(directory) is None and (directory / ADAPTERS_FILE).is_file()
    assert any(directory.glob("model*.safetensors"))  # its own base weights
    load_inference(run_dir, device="cpu")


def test_a_changed_or_missing_base_is_refused_by_resume_export_and_generation(lora_run, tmp_path, capfd):
    from aria.convert.export import to_hf
    from aria.inference import load_inference
    from aria.train.compose import compose_run
    from aria.train.trainer import train
    from aria.train.weights import load_weights

    run_dir, base, args = lora_run
    directory = model_dir(run_dir)
    ref = read_base(directory)
    _, lora = read_adapters(directory)

    def readers():  # what resuming, aria-convert to-hf --merge-lora and aria-generate do
        model = build_model(read_model_config(directory), device="meta")
        add_adapters(model, lora)
        yield lambda: load_weights(model.to_empty(device="cpu"), directory)
        yield lambda: to_hf(run_dir, tmp_path / "hf", merge_lora=True, log=lambda _: None)
        yield lambda: load_inference(run_dir, device="cpu")

    weights = base / "model.safetensors"
    backup = shutil.copy(weights, tmp_path / "backup.safetensors")
    try:
        state = load_file(weights)  # the same names and shapes, other values
        state["decoder.layers.0.attn.q_proj.weight"] += 1e-3
        save_file(state, weights, metadata={"format": "pt"})
        assert weights.stat().st_size == Path(backup).stat().st_size
        changed = fingerprint(base)
        assert changed != ref.fingerprint
        for read in readers():
            with pytest.raises(ValueError) as err:
                read()
            message = str(err.value)
            assert str(base.resolve()) in message and ref.fingerprint in message and changed in message
        # resuming the run through aria.train: one line naming both, before any rank starts
        more = [a for a in args if not a.startswith("train.max_steps=")] + ["train.max_steps=6"]
        assert train(compose_run("config", more)) == 2
        line = capfd.readouterr().err.strip().splitlines()
        assert len(line) == 1 and line[0].startswith("aria-train: ")
        assert changed in line[0] and ref.fingerprint in line[0]
        moved = shutil.move(str(base), str(tmp_path / "moved"))
        for read in readers():
            with pytest.raises(FileNotFoundError, match="which is missing") as err:
                read()
            assert str(base.resolve()) in str(err.value) and ref.fingerprint in str(err.value)
        shutil.move(moved, str(base))
    finally:
        shutil.copy(backup, weights)
    assert fingerprint(base) == ref.fingerprint
    assert not (tmp_path / "hf").exists()
