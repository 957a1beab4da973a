"""Conversion ours <-> Hugging Face: configs, key layouts, sharding, round trips and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from aria.cli.convert import main as convert_main
from aria.convert import keymap
from aria.convert.checkpoint import convert, load_hf_dir, load_model_dir, save_model_dir
from aria.convert.hf_config import from_hf_config, to_hf_config
from aria.convert.store import INDEX, iter_tensors
from aria.model import build_model
from helpers import make_config, perturb

CFG = make_config(text=dict(head_dim=12), moe=dict(shared_bias=True, shared_act="gelu"))


def hf_reference_model(cfg, seed=0):
    """A model initialised by transformers itself (not by us), norms perturbed."""
    from transformers import AriaConfig, AriaForConditionalGeneration

    torch.manual_seed(seed)
    hf = AriaForConditionalGeneration(AriaConfig(**to_hf_config(cfg))).eval()
    perturb(hf, seed)
    return hf


def inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, cfg.text.vocab_size, (2, 20), generator=g)
    ids[0, 2:8] = cfg.image_token_id  # one 16 px crop -> 6 queries
    return ids, torch.randn(1, 3, 16, 16, generator=g)


def test_config_round_trip_and_transformers_accepts_it():
    from transformers import AriaConfig

    for cfg in (CFG, make_config(text=dict(tie_word_embeddings=True, attention_bias=True))):
        hf_dict = to_hf_config(cfg)
        assert from_hf_config(json.loads(json.dumps(hf_dict))).to_dict() == {**cfg.to_dict(), "name": "hf"}
        hf = AriaConfig(**hf_dict)
        assert hf.text_config.intermediate_size == cfg.moe.intermediate_size
        assert hf.text_config.head_dim == cfg.text.head_dim
        assert hf.projector_patch_to_query_dict == cfg.projector.patch_to_query
        assert hf.text_config.rope_parameters["rope_theta"] == cfg.text.rope_theta
        assert hf.tie_word_embeddings == cfg.text.tie_word_embeddings


def test_hf_save_pretrained_directory_loads_into_ours(tmp_path):
    hf = hf_reference_model(CFG)
    hf.save_pretrained(tmp_path)
    ours = load_hf_dir(tmp_path).eval()
    ids, pixels = inputs(CFG)
    with torch.no_grad():
        delta = (ours(ids, pixels).logits - hf(input_ids=ids, pixel_values=pixels).logits).abs().max()
    assert delta <= 1e-5


def test_every_hf_key_layout_loads_to_the_same_weights(tmp_path):
    hf = hf_reference_model(CFG)
    hf.save_pretrained(tmp_path / "saved")
    on_disk = load_file(tmp_path / "saved" / "model.safetensors")
    config = (tmp_path / "saved" / "config.json").read_text()

    def relayout(prefix_new: bool, experts_new: bool, official: bool = False) -> dict:
        out = {}
        for key, tensor in on_disk.items():
            if experts_new:
                key = key.replace("experts.fc1.weight", "experts.gate_up_proj")
                key = key.replace("experts.fc2.weight", "experts.down_proj")
            if prefix_new:
                key = (key.replace("language_model.lm_head.", "lm_head.")
                       .replace("language_model.model.", "model.language_model.")
                       .replace("vision_tower.", "model.vision_tower.")
                       .replace("multi_modal_projector.", "model.multi_modal_projector."))
            if official:  # rhymes-ai custom-code names; it had no post-LayerNorm
                if "post_layernorm" in key:
                    continue
                key = (key.replace("vision_tower.", "vision_tower.vision_model.")
                       .replace("multi_modal_projector.layer_norm.", "multi_modal_projector.ln_ffn.")
                       .replace("feed_forward.", "ffn.").replace("layer_norm_kv", "ln_kv"))
            out[key] = tensor
        return out

    reference = load_hf_dir(tmp_path / "saved").state_dict()
    layouts = {"legacy": (False, False), "new": (True, True), "new_prefix_fc": (True, False),
               "legacy_prefix_gate_up": (False, True)}
    for name, (prefix_new, experts_new) in layouts.items():
        d = tmp_path / name
        d.mkdir()
        save_file(relayout(prefix_new, experts_new), d / "model.safetensors")
        (d / "config.json").write_text(config)
        state = load_hf_dir(d).state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference), name
    d = tmp_path / "official"
    d.mkdir()
    save_file(relayout(False, False, official=True), d / "model.safetensors")
    (d / "config.json").write_text(config)
    state = load_hf_dir(d).state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_new_prefix_layout_is_what_transformers_holds_in_memory():
    """Our normalisation covers every in-memory transformers name (the 'new' layout)."""
    hf = hf_reference_model(CFG)
    ours = {keymap.hf_to_ours(k) for k in hf.state_dict()} - {None}
    assert ours == set(build_model(CFG, device="meta").state_dict())


@pytest.mark.parametrize("shard", ["1GB", "20KB"], ids=["single_file", "sharded"])
def test_ours_to_hf_to_ours_is_bit_exact(tmp_path, shard):
    torch.manual_seed(1)
    model = build_model(CFG)
    perturb(model)
    save_model_dir(model.state_dict(), CFG, tmp_path / "ours")
    assert convert_main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf"), "--weights-only",
                         "--max-shard-size", shard]) == 0
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back"),
                         "--max-shard-size", shard]) == 0
    hf_files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert (len(hf_files) > 1) == (shard == "20KB")
    assert (tmp_path / "hf" / INDEX).is_file() == (shard == "20KB")
    original = dict(iter_tensors(tmp_path / "ours"))
    back = dict(iter_tensors(tmp_path / "back"))
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) and original[k].dtype == back[k].dtype for k in original)
    # the HF directory holds exactly the on-disk layout save_pretrained writes
    hf_keys = set(dict(iter_tensors(tmp_path / "hf")))
    from transformers import AriaConfig, AriaForConditionalGeneration
    with torch.device("meta"):
        hf_model = AriaForConditionalGeneration(AriaConfig(**to_hf_config(CFG)))
    written_by_hf = {keymap.normalize_hf_key(k) for k in hf_model.state_dict()}
    assert hf_keys == written_by_hf
    reloaded = load_model_dir(tmp_path / "back").eval()
    ids, pixels = inputs(CFG)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, pixels).logits, model.eval()(ids, pixels).logits)


def test_bf16_export_loads_in_transformers(tmp_path):
    from transformers import AriaForConditionalGeneration

    model = build_model(CFG)
    save_model_dir(model.state_dict(), CFG, tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "hf", "to-hf", dtype=torch.bfloat16, log=lambda _: None)
    hf = AriaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------
# Bad input: every error names the file or the keys
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def hf_dir(tmp_path):
    hf = hf_reference_model(CFG)
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def rewrite_weights(directory: Path, edit) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_missing_and_unexpected_keys_are_named(hf_dir, tmp_path):
    def edit(t):
        del t["language_model.model.layers.1.mlp.router.weight"]
        t["language_model.model.layers.0.mlp.extra.weight"] = torch.zeros(2)

    rewrite_weights(hf_dir, edit)
    with pytest.raises(ValueError, match=r"not part of Aria.*layers\.0\.mlp\.extra\.weight"):
        load_hf_dir(hf_dir)
    with pytest.raises(ValueError, match="not part of Aria"):
        convert(hf_dir, tmp_path / "out", "from-hf")
    assert not (tmp_path / "out").exists()  # nothing written on a bad checkpoint

    rewrite_weights(hf_dir, lambda t: t.pop("language_model.model.layers.0.mlp.extra.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): \['decoder\.layers\.1\.moe\.router\.weight'\]"):
        load_hf_dir(hf_dir)


def test_shape_mismatch_is_named(hf_dir):
    rewrite_weights(hf_dir, lambda t: t.update({"multi_modal_projector.query": torch.zeros(5, 24)}))
    with pytest.raises(ValueError, match=r"'projector\.query' has shape \(5, 24\) but .* \(6, 24\)"):
        load_hf_dir(hf_dir)


def test_missing_shard_and_not_a_checkpoint_are_named(tmp_path):
    model = build_model(CFG)
    save_model_dir(model.state_dict(), CFG, tmp_path / "ours", max_shard_bytes=20_000)
    shard = sorted((tmp_path / "ours").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model_dir(tmp_path / "ours")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_config.json is missing"):
        load_model_dir(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_hf_dir(tmp_path / "empty")
    assert convert_main(["to-hf", str(tmp_path / "empty"), str(tmp_path / "x")]) == 1


def test_router_bias_cannot_be_exported_silently(tmp_path):
    cfg = make_config(moe=dict(bias_balancing=True))
    save_model_dir(build_model(cfg).state_dict(), cfg, tmp_path / "ours")
    with pytest.raises(ValueError, match="expert_bias' has no Hugging Face equivalent"):
        convert(tmp_path / "ours", tmp_path / "hf", "to-hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_console_script_runs(tmp_path):
    model = build_model(CFG)
    save_model_dir(model.state_dict(), CFG, tmp_path / "ours")
    exe = Path(sys.executable).parent / "aria-convert"
    done = subprocess.run([str(exe), "to-hf", str(tmp_path / "ours"), str(tmp_path / "hf"), "--weights-only"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
    assert (tmp_path / "hf" / "generation_config.json").is_file()


def test_model_without_shared_experts_round_trips_through_transformers(tmp_path):
    cfg = make_config(moe=dict(num_shared_experts=0))
    hf = hf_reference_model(cfg)
    hf.save_pretrained(tmp_path / "hf")  # holds zero-size shared-expert tensors
    ours = load_hf_dir(tmp_path / "hf").eval()
    ids, pixels = inputs(cfg)
    with torch.no_grad():
        assert (ours(ids, pixels).logits - hf(input_ids=ids, pixel_values=pixels).logits).abs().max() <= 1e-5
    save_model_dir(ours.state_dict(), cfg, tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "back", "to-hf", log=lambda _: None)
    from transformers import AriaForConditionalGeneration

    _, info = AriaForConditionalGeneration.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_original_custom_code_config_is_read():
    """rhymes-ai's own config.json: model_type aria_moe_lm keeps the expert width elsewhere."""
    hf = to_hf_config(CFG)
    hf["text_config"].update(model_type="aria_moe_lm", intermediate_size=13568,
                             moe_intermediate_size=CFG.moe.intermediate_size)
    hf["text_config"]["rope_theta"] = hf["text_config"].pop("rope_parameters")["rope_theta"]
    cfg = from_hf_config(hf)
    assert cfg.moe.intermediate_size == CFG.moe.intermediate_size
    assert cfg.text.rope_theta == CFG.text.rope_theta


def test_transform_step_runs_between_reading_and_writing_and_is_checked(tmp_path):
    """``convert(transform=...)`` maps the (our name, tensor) stream, e.g. to merge adapters; what it
    yields is checked like any source, and a failure leaves no weights behind."""
    from transformers import AriaForConditionalGeneration

    torch.manual_seed(2)
    model = build_model(CFG)
    save_model_dir(model.state_dict(), CFG, tmp_path / "ours")

    def negate_routers(tensors):
        for key, tensor in tensors:
            yield key, -tensor if key.endswith("moe.router.weight") else tensor

    convert(tmp_path / "ours", tmp_path / "hf", "to-hf", transform=negate_routers, log=lambda _: None)
    hf = AriaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    router = hf.model.language_model.layers[1].mlp.router.weight
    assert torch.equal(router, -model.decoder.layers[1].moe.router.weight)

    def adds_a_tensor(tensors):
        yield from tensors
        yield "decoder.layers.0.moe.adapter.weight", torch.zeros(2)

    def drops_a_tensor(tensors):
        return ((k, t) for k, t in tensors if k != "decoder.norm.weight")

    for transform, message in ((adds_a_tensor, r"after adds_a_tensor: tensor 'decoder\.layers\.0\.moe\.adapter"
                                                r"\.weight' is not a parameter"),
                               (drops_a_tensor, r"missing 1 tensor\(s\): \['decoder\.norm\.weight'\]")):
        out = tmp_path / transform.__name__
        with pytest.raises(ValueError, match=message):
            convert(tmp_path / "ours", out, "to-hf", transform=transform, max_shard_bytes=20_000,
                    log=lambda _: None)
        assert not out.exists() or not list(out.iterdir())  # temporary shards removed, nothing else written


def test_cli_errors_name_the_file(tmp_path, capsys):
    save_model_dir(build_model(CFG).state_dict(), CFG, tmp_path / "ours", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "ours" / INDEX).read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "ours" / shard).unlink()
    assert convert_main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf"), "--weights-only"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ours' / INDEX} lists shard(s) missing" in err and shard in err
    assert convert_main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf"), "--max-shard-size", "lots"]) == 1
    assert "size 'lots' is not understood" in capsys.readouterr().err
    (tmp_path / "ours" / "model_config.json").write_text("{not json")
    assert convert_main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf"), "--weights-only"]) == 1
    assert "model_config.json is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
