"""aria-convert on whole directories: a real expert-parallel ZeRO-2 training run exported to a
Hugging Face directory that transformers loads as model and processor (same logits, same inputs as
ours); HF -> ours -> HF bit for bit; the original custom-code layout; and bad input, each error
naming the file and what is missing.

One 2-process training run (EP=2, ZeRO-2, 2 steps, 490 px crops in its data config) is shared by
the module; everything else is built from transformers' own models and processors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from aria.cli.convert import main as convert_main
from aria.config import load_model_config
from aria.convert.checkpoint import load_model_dir
from aria.convert.hf_config import to_hf_config
from aria.convert.store import iter_tensors
from aria.data.processor import CHAT_TEMPLATE, Processor
from aria.data.tokenizer import Tokenizer
from aria.rundir import resolve_model_dir
from aria.train.checkpoint import source_model_config
from aria.train.weights import load_weights
from helpers import perturb
from test_train import overrides, run

TINY = load_model_config("tiny")
MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "Which shape is red? "},
                                         {"type": "image"}, {"type": "text", "text": " left or right"}]}]


def picture(h: int = 300, w: int = 500) -> Image.Image:
    image = Image.new("RGB", (w, h), (250, 250, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 60, 160, 180), fill=(220, 30, 30))
    draw.ellipse((300, 80, 420, 200), fill=(30, 60, 220))
    return image


def convert_ok(*args: str) -> None:
    assert convert_main(list(args)) == 0


def convert_error(capsys, *args: str) -> str:
    capsys.readouterr()
    assert convert_main(list(args)) == 1
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def ep_run(setup, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("export") / "run"
    run(2, overrides(setup, run_dir, "train.micro_batch_size=1", "parallel.ep_size=2", "parallel.zero_stage=2",
                     "train.max_steps=2", "data.image_size=490"))
    return run_dir


@pytest.fixture(scope="module")
def exported(ep_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export_hf") / "hf"
    convert_ok("to-hf", str(ep_run), str(out))  # the run dir: latest checkpoint, its config.yaml's tokenizer
    return out


def ours_and_hf_inputs(tokenizer_dir: Path, hf_dir: Path, image_size: int = 490, **call):
    from transformers import AutoProcessor

    ours = Processor.for_model(Tokenizer.load(tokenizer_dir), TINY, image_size=image_size)(MESSAGES, images=[picture()])
    hf_processor = AutoProcessor.from_pretrained(hf_dir)
    text = hf_processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    ref = hf_processor(text=text, images=[picture()], return_tensors="pt", **call)
    return ours, ref


def assert_same_inputs(ours: dict, ref: dict, side: int) -> None:
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert ref["pixel_values"].shape[-1] == side
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() <= 1e-6
    assert torch.equal(ours["pixel_mask"], ref["pixel_mask"].bool())


# ---------------------------------------------------------------------------------------------
# A real training run -> transformers
# ---------------------------------------------------------------------------------------------


def test_expert_parallel_run_exports_to_transformers_model_and_processor(setup, ep_run, exported):
    from transformers import AriaForConditionalGeneration

    model_dir = resolve_model_dir(ep_run)
    assert json.loads((model_dir / "layout.json").read_text()) == {"ep_size": 2}  # experts in 2 files
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
            "chat_template.jinja"} <= names
    assert (exported / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    tok = Tokenizer.load(setup / "tok")
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == [2, tok.im_end_id]

    hf, info = AriaForConditionalGeneration.from_pretrained(exported, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    # the processor makes the run's 490 px crops with no call-time arguments
    ours_inputs, ref = ours_and_hf_inputs(setup / "tok", exported)
    assert_same_inputs(ours_inputs, ref, 490)
    assert int((ref["input_ids"] == TINY.image_token_id).sum()) == 16

    ours = load_model_dir(model_dir).eval()
    with torch.no_grad():
        ours_logits = ours(ours_inputs["input_ids"], ours_inputs["pixel_values"], ours_inputs["pixel_mask"]).logits
        hf_logits = hf.eval()(**{k: ref[k] for k in ("input_ids", "pixel_values", "pixel_mask")}).logits
    assert (ours_logits - hf_logits).abs().max() <= 1e-5
    # the HF experts are the EP ranks' slices in rank order (read raw: rank r holds experts r*E/P ...),
    # trained, not the initial model the run started from
    exported_tensors = load_file(exported / "model.safetensors")
    slices = [load_file(model_dir / f"experts-ep00{r}-of-002.safetensors") for r in range(2)]
    init = dict(iter_tensors(setup / "init"))
    for layer in range(TINY.text.num_layers):
        for ours_name, hf_name in (("w_fc1", "fc1"), ("w_fc2", "fc2")):
            key = f"decoder.layers.{layer}.moe.experts.{ours_name}"
            whole = exported_tensors[f"language_model.model.layers.{layer}.mlp.experts.{hf_name}.weight"]
            assert torch.equal(whole, torch.cat([s[key] for s in slices]))
            assert not torch.equal(whole, init[key])


def test_export_in_bf16_with_shards_and_call_time_crop_size(setup, ep_run, tmp_path):
    from transformers import AriaForConditionalGeneration

    ckpt = resolve_model_dir(ep_run).parent  # a checkpoint directory, tokenizer given explicitly
    convert_ok("to-hf", str(ckpt), str(tmp_path / "hf"), "--dtype", "bf16", "--max-shard-size", "1MB",
               "--tokenizer", str(setup / "tok"))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf, info = AriaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert hf.dtype == torch.bfloat16 and not info["missing_keys"] and not info["unexpected_keys"]
    ours, ref = ours_and_hf_inputs(setup / "tok", tmp_path / "hf", image_size=980, max_image_size=980)
    assert_same_inputs(ours, ref, 980)


# ---------------------------------------------------------------------------------------------
# HF -> ours -> HF, and the original custom-code layout
# ---------------------------------------------------------------------------------------------


def hf_reference_dir(directory: Path, tokenizer_dir: Path, image_size: int = 490) -> Path:
    """A directory written by transformers itself: model.save_pretrained + processor.save_pretrained.
    The unused vision post-LayerNorm is zero, as in the released checkpoint (we write it so)."""
    from transformers import AriaConfig, AriaForConditionalGeneration, AriaProcessor, AutoTokenizer
    from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil

    torch.manual_seed(0)
    model = AriaForConditionalGeneration(AriaConfig(**to_hf_config(TINY))).eval()
    perturb(model)
    with torch.no_grad():
        for p in model.model.vision_tower.post_layernorm.parameters():
            p.zero_()
    model.save_pretrained(directory)
    AriaProcessor(image_processor=AriaImageProcessorPil(max_image_size=image_size),
                  tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), chat_template=CHAT_TEMPLATE,
                  size_conversion={490: 16, 980: 32}).save_pretrained(directory)
    return directory


def hf_config_dict(directory: Path) -> dict:
    from transformers import AriaConfig

    config = AriaConfig.from_pretrained(directory).to_dict()
    config.pop("transformers_version", None)
    return config


def test_hf_to_ours_to_hf_is_bit_exact_and_loads_for_training(setup, tmp_path):
    from transformers import AriaForConditionalGeneration, AutoProcessor

    original = hf_reference_dir(tmp_path / "hf", setup / "tok")
    convert_ok("from-hf", str(original), str(tmp_path / "ours"))
    # what the trainer does with init.from_checkpoint=ours data.tokenizer=ours
    cfg = source_model_config(tmp_path / "ours", hf=False)
    model = load_model_dir(tmp_path / "ours")  # builds from model_config.json, checks every key
    load_weights(model, tmp_path / "ours")
    assert Tokenizer.load(tmp_path / "ours").image_id == cfg.image_token_id

    convert_ok("to-hf", str(tmp_path / "ours"), str(tmp_path / "back"))  # tokenizer found beside the weights
    a, b = load_file(original / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert hf_config_dict(original) == hf_config_dict(tmp_path / "back")
    assert (original / "tokenizer.json").read_bytes() == (tmp_path / "back" / "tokenizer.json").read_bytes()
    p_a, p_b = AutoProcessor.from_pretrained(original), AutoProcessor.from_pretrained(tmp_path / "back")
    assert p_a.size_conversion == p_b.size_conversion
    assert p_a.image_processor.to_dict() == p_b.image_processor.to_dict()  # 490 px, read from the HF files
    text = p_a.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == p_b.apply_chat_template(MESSAGES, add_generation_prompt=True)
    x, y = (p(text=text, images=[picture()], max_image_size=490, return_tensors="pt") for p in (p_a, p_b))
    assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "pixel_values", "pixel_mask"))
    _, info = AriaForConditionalGeneration.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def official_layout(hf_dir: Path, out: Path) -> Path:
    """The rhymes-ai custom-code checkpoint (hf_format.md 3.4): vision_model/ln_ffn/ffn/ln_kv names, no
    post-LayerNorm, two shards + index, config with aria_moe_lm / aria_vision_model and auto_map,
    processor and tokenizer files pointing at custom code."""
    out.mkdir()
    tensors = load_file(hf_dir / "model.safetensors")
    renamed = {}
    for key, tensor in tensors.items():
        if "post_layernorm" in key:
            continue
        key = (key.replace("vision_tower.", "vision_tower.vision_model.")
               .replace("multi_modal_projector.layer_norm.", "multi_modal_projector.ln_ffn.")
               .replace("feed_forward.", "ffn.").replace("layer_norm_kv", "ln_kv"))
        renamed[key] = tensor
    keys = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: renamed[k] for k in part}, out / name, metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    hf = to_hf_config(TINY)
    text, vision = hf["text_config"], hf["vision_config"]
    text.update(model_type="aria_moe_lm", moe_intermediate_size=text["intermediate_size"],
                intermediate_size=text["intermediate_size"] * 3, architectures=["AriaForCausalLM"])
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
    vision.update(model_type="aria_vision_model", architectures=["AriaVisionModel"])
    del hf["dtype"]
    hf.update(torch_dtype="float32", ignore_index=-100, auto_map={
        "AutoConfig": "modeling_aria.AriaConfig", "AutoModelForCausalLM": "modeling_aria.AriaForConditionalGeneration"})
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    shutil.copyfile(hf_dir / "tokenizer.json", out / "tokenizer.json")
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoProcessor": "processing_aria.AriaProcessor"}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "auto_map": {"AutoProcessor": "processing_aria.AriaProcessor",
                     "AutoImageProcessor": "vision_processor.AriaVisionProcessor"},
        "image_processor_type": "AriaVisionProcessor", "processor_class": "AriaProcessor",
        "max_image_size": 980, "min_image_size": 336, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return out


def test_original_custom_code_checkpoint_imports_and_exports(setup, tmp_path):
    from transformers import AriaForConditionalGeneration, AutoProcessor

    reference = hf_reference_dir(tmp_path / "hf", setup / "tok")
    official = official_layout(reference, tmp_path / "official")
    convert_ok("from-hf", str(official), str(tmp_path / "ours"))
    ours = load_model_dir(tmp_path / "ours").eval()
    hf = AriaForConditionalGeneration.from_pretrained(reference).eval()
    ours_inputs = Processor.for_model(Tokenizer.load(tmp_path / "ours"), TINY, image_size=980)(
        MESSAGES, images=[picture()])
    ids, pixels, mask = ours_inputs["input_ids"], ours_inputs["pixel_values"], ours_inputs["pixel_mask"]
    with torch.no_grad():
        reference_logits = hf(input_ids=ids, pixel_values=pixels, pixel_mask=mask).logits
        assert (ours(ids, pixels, mask).logits - reference_logits).abs().max() <= 1e-5

    convert_ok("to-hf", str(tmp_path / "ours"), str(tmp_path / "back"))
    back, info = AriaForConditionalGeneration.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert (back.eval()(input_ids=ids, pixel_values=pixels, pixel_mask=mask).logits
                - reference_logits).abs().max() <= 1e-5
    assert "auto_map" not in json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    processor = AutoProcessor.from_pretrained(tmp_path / "back")  # no custom code needed
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    ref = processor(text=text, images=[picture()], return_tensors="pt")
    assert_same_inputs(ours_inputs, ref, 980)  # 980 px: the original preprocessor_config's size


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def copy_model_dir(ep_run: Path, to: Path) -> Path:
    shutil.copytree(resolve_model_dir(ep_run), to)
    return to


def test_optimizer_state_or_deepspeed_checkpoint_without_model_dir_is_explained(ep_run, tmp_path, capsys):
    ckpt = resolve_model_dir(ep_run).parent
    err = convert_error(capsys, "to-hf", str(ckpt / "optimizer"), str(tmp_path / "out"))
    assert "optimizer state of a checkpoint" in err and f"give its checkpoint directory {ckpt}" in err
    raw = tmp_path / "raw" / "global_step4"  # what DeepSpeed's own save_checkpoint writes
    raw.mkdir(parents=True)
    (raw / "mp_rank_00_model_states.pt").write_bytes(b"")
    (raw / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    err = convert_error(capsys, "to-hf", str(raw.parent), str(tmp_path / "out"))
    assert f"{raw.parent} is a DeepSpeed checkpoint" in err and "mp_rank_00_model_states.pt" in err
    assert "without our model/ directory" in err
    assert not (tmp_path / "out").exists()


def test_mixed_and_incomplete_expert_parallel_layouts_are_named(ep_run, tmp_path, capsys):
    mixed = copy_model_dir(ep_run, tmp_path / "mixed")
    shutil.copyfile(mixed / "experts-ep000-of-002.safetensors", mixed / "experts-ep000-of-004.safetensors")
    err = convert_error(capsys, "to-hf", str(mixed), str(tmp_path / "out"), "--weights-only")
    assert "mixes expert-parallel layouts: layout.json says ep_size=2" in err
    assert "['experts-ep000-of-004.safetensors'] belong to ep_size [4]" in err

    partial = copy_model_dir(ep_run, tmp_path / "partial")
    (partial / "experts-ep001-of-002.safetensors").unlink()
    err = convert_error(capsys, "to-hf", str(partial), str(tmp_path / "out"), "--weights-only")
    assert "ep_size=2) but lacks ['experts-ep001-of-002.safetensors']" in err

    no_layout = copy_model_dir(ep_run, tmp_path / "no_layout")
    (no_layout / "layout.json").unlink()
    err = convert_error(capsys, "to-hf", str(no_layout), str(tmp_path / "out"), "--weights-only")
    assert "holds expert-parallel files" in err and "but no layout.json" in err
    with pytest.raises(ValueError, match="mixes expert-parallel layouts"):  # training reads the same way
        load_model_dir(mixed)
    assert not (tmp_path / "out").exists()


def test_missing_shard_named_by_the_index(setup, tmp_path, capsys):
    official = official_layout(hf_reference_dir(tmp_path / "hf", setup / "tok"), tmp_path / "official")
    (official / "model-00002-of-00002.safetensors").unlink()
    err = convert_error(capsys, "from-hf", str(official), str(tmp_path / "out"))
    assert "model.safetensors.index.json lists shard(s) missing" in err
    assert "['model-00002-of-00002.safetensors']" in err
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint(ep_run, exported, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    err = convert_error(capsys, "to-hf", str(tmp_path / "notes"), str(tmp_path / "out"))
    assert f"{tmp_path / 'notes'} is not a model directory (model_config.json)" in err
    assert "run directory with checkpoints/latest" in err
    err = convert_error(capsys, "from-hf", str(tmp_path / "notes"), str(tmp_path / "out"))
    assert "config.json is missing" in err
    err = convert_error(capsys, "to-hf", str(exported), str(tmp_path / "out"))
    assert "is a Hugging Face directory" in err and "from-hf" in err
    err = convert_error(capsys, "from-hf", str(resolve_model_dir(ep_run)), str(tmp_path / "out"))
    assert "one of our model directories" in err and "to-hf" in err
    err = convert_error(capsys, "to-hf", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_tokenizer_problems_are_named(setup, ep_run, tmp_path, capsys):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    plain = tmp_path / "plain_tok"  # a working tokenizer without Aria's special tokens
    plain.mkdir()
    HFTokenizer(WordLevel({"<unk>": 0, "</s>": 1, "red": 2}, unk_token="<unk>")).save(str(plain / "tokenizer.json"))
    (plain / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    out = str(tmp_path / "out")
    err = convert_error(capsys, "to-hf", str(ep_run), out, "--tokenizer", str(plain))
    assert f"tokenizer {plain} lacks the Aria special token(s)" in err and "<|img|>" in err
    assert "<|im_start|>" in err and "(tokenizer from --tokenizer)" in err

    from data_tools.train_tokenizer import train as train_tokenizer

    shifted = train_tokenizer([str(setup / "corpus.txt")], tmp_path / "tok10", vocab_size=300, image_token_id=10)
    err = convert_error(capsys, "to-hf", str(ep_run), out, "--tokenizer", str(shifted))
    assert "has <|img|> = id 10, but the model's image_token_id is 9" in err

    model_only = copy_model_dir(ep_run, tmp_path / "model_only")  # no run config, no tokenizer files
    err = convert_error(capsys, "to-hf", str(model_only), out)
    assert "no tokenizer for" in err and "--tokenizer DIR" in err and "--weights-only" in err

    ckpt = tmp_path / "ckpt"  # a checkpoint whose run config names a tokenizer that is gone
    shutil.copytree(resolve_model_dir(ep_run).parent, ckpt, ignore=shutil.ignore_patterns("optimizer"))
    config = (ckpt / "config.yaml").read_text().replace(str(setup / "tok"), str(tmp_path / "gone"))
    (ckpt / "config.yaml").write_text(config)
    err = convert_error(capsys, "to-hf", str(ckpt), out)
    assert f"{ckpt / 'config.yaml'} names data.tokenizer={tmp_path / 'gone'}, which does not exist" in err
    assert not (tmp_path / "out").exists()
    convert_ok("to-hf", str(model_only), out, "--weights-only")
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out" / "tokenizer.json").exists()
