"""Config dataclasses and the Hydra model group: values, validation messages, YAML <-> dataclass."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from aria.config import CONFIG_DIR, ModelConfig, load_model_config
from helpers import make_config


def test_released_aria_sizes():
    c = load_model_config("aria")
    t, m, v = c.text, c.moe, c.vision
    assert (t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim) == (28, 2560, 20, 20, 128)
    assert (m.num_experts, m.intermediate_size, m.top_k, m.num_shared_experts) == (64, 1664, 6, 2)
    assert (t.vocab_size, t.rope_theta, t.max_position_embeddings) == (100352, 5e6, 65536)
    assert (v.num_layers, v.hidden_size, v.num_heads, v.intermediate_size) == (27, 1152, 16, 4304)
    assert (v.patch_size, v.image_size) == (14, 980)
    assert c.projector.patch_to_query == {1225: 128, 4900: 256}
    assert c.image_token_id == 9
    assert (m.aux_loss_coeff, m.z_loss_coeff) == (1e-3, 1e-5)


def test_proxy_is_aria_with_four_decoder_layers():
    aria, proxy = load_model_config("aria").to_dict(), load_model_config("proxy").to_dict()
    assert proxy["text"].pop("num_layers") == 4
    aria["text"].pop("num_layers")
    assert {**proxy, "name": None} == {**aria, "name": None}


def test_tiny_crops_are_the_sizes_the_hf_image_processor_makes():
    c = load_model_config("tiny")
    for side in (490, 980):  # the only max_image_size values AriaImageProcessor accepts
        assert (side // c.vision.patch_size) ** 2 in c.projector.patch_to_query
        assert side % c.vision.patch_size == 0


def test_every_yaml_field_is_a_dataclass_field():
    fields = {node: {f.name for f in dataclasses.fields(cls) if f.name != "_path"}
              for node, cls in (("text", "TextConfig"), ("moe", "MoEConfig"),
                                ("vision", "VisionConfig"), ("projector", "ProjectorConfig"))
              for cls in [getattr(__import__("aria.config", fromlist=[cls]), cls)]}
    for path in (CONFIG_DIR / "model").glob("*.yaml"):
        raw = OmegaConf.to_container(OmegaConf.load(path))
        raw.pop("defaults", None)
        for node, values in raw.items():
            if isinstance(values, dict):
                assert set(values) <= fields[node], (path.name, set(values) - fields[node])


def test_overrides_compose_like_the_command_line():
    c = load_model_config("tiny", ["text.num_layers=3", "moe.top_k=1"])
    assert (c.text.num_layers, c.moe.top_k) == (3, 1)


@pytest.mark.parametrize("override, message", [
    ("text.num_heads=3", r"'model\.text\.num_kv_heads' = 2 is invalid: expected a divisor of num_heads=3"),
    ("text.head_dim=7", r"'model\.text\.head_dim' = 7 is invalid: expected an even number"),
    ("moe.top_k=9", r"'model\.moe\.top_k' = 9 is invalid: expected at most num_experts=8"),
    ("moe.intermediate_size=60", r"'model\.moe\.intermediate_size' = 60 .* multiple of 8"),
    ("moe.balance_scope=world", r"'model\.moe\.balance_scope' = 'world' is invalid"),
    ("vision.hidden_act=relu", r"'model\.vision\.hidden_act' = 'relu' is invalid"),
    ("vision.image_size=1000", r"'model\.vision\.image_size' = 1000 .* multiple of patch_size=70"),
    ("text.pad_token_id=5000", r"'model\.text\.pad_token_id' = 5000 .* \[0, vocab_size=1024\)"),
    ("image_token_id=-1", r"'model\.image_token_id' = -1 is invalid"),
    ("text.num_layers=0", r"'model\.text\.num_layers' = 0 is invalid: expected a positive integer"),
])
def test_bad_values_name_the_field_and_the_value(override, message):
    with pytest.raises(ValueError, match=message):
        load_model_config("tiny", [override])


def test_unknown_and_missing_fields_are_named():
    good = load_model_config("tiny").to_dict()
    with pytest.raises(ValueError, match=r"square patch counts .* 50 is not"):
        ModelConfig.from_dict({**good, "projector": {"patch_to_query": {50: 8}}})
    with pytest.raises(ValueError, match=r"'model\.moe' has unknown field\(s\) \['num_expert'\]"):
        ModelConfig.from_dict({**good, "moe": {**good["moe"], "num_expert": 3}})
    text = dict(good["text"])
    del text["hidden_size"]
    with pytest.raises(ValueError, match=r"'model\.text' is missing required field\(s\) \['hidden_size'\]"):
        ModelConfig.from_dict({**good, "text": text})
    with pytest.raises(FileNotFoundError, match="available: .*tiny"):
        load_model_config("tinyy")


def test_to_dict_round_trips():
    cfg = make_config(moe=dict(bias_balancing=True))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_every_activation_name_has_an_implementation():
    from aria.config import ACTIVATIONS
    from aria.model.layers import ACT_FNS

    assert set(ACTIVATIONS) == set(ACT_FNS)


def _differences(yaml_value, default, path: str) -> list[str]:
    if dataclasses.is_dataclass(default):
        return [d for f in dataclasses.fields(default) if f.compare
                for d in _differences(getattr(yaml_value, f.name), getattr(default, f.name), f"{path}.{f.name}")]
    return [] if yaml_value == default else [f"{path}: YAML {yaml_value!r}, dataclass {default!r}"]


def test_the_default_groups_and_the_dataclass_defaults_agree():
    """One source of truth: what a run gets from ``configs/`` when it overrides nothing is what the
    dataclasses give a config built in code (required paths: unset in both)."""
    from aria.config import RUN_NODES, _from_mapping
    from aria.train.compose import compose_dict

    tree = compose_dict("config", [], inputs=False)
    assert tree["data"]["train"] is None and tree["data"]["tokenizer"] is None  # ??? in the YAML
    differences = [d for name, cls in RUN_NODES.items()
                   for d in _differences(_from_mapping(cls, tree[name] or {}, name), cls(), name)]
    assert not differences, differences


def test_required_fields_are_named_when_a_run_is_composed():
    from aria.train.compose import compose_dict

    with pytest.raises(ValueError, match=r"required config field\(s\) \['data.tokenizer', 'data.train', 'run_dir'\]"):
        compose_dict("config", [])


@pytest.mark.parametrize("recipe, overrides, message", [
    ("quickstart", ["stage.trainable.vision=true"], r"the patch projection training .*: kept tokens or patch "
     r"embeddings would go stale .* set stage\.image_token_cache_gb=0"),
    ("quickstart_vision", ["optim.lr_scale.patch_embed=0.1"], r"the patch projection training"),
    ("quickstart_vision", ["data.image_size=980"],
     r"kept patch embeddings .* and data\.image_size=980 but data\.video\.image_size=490: .* one crop size"),
    ("quickstart", ["data.num_workers=2"], r"data\.num_workers=2: .* set data\.num_workers=0"),
    ("quickstart", ["parallel.zero_stage=3"], r"parallel\.zero_stage=3: .* use zero_stage 0-2"),
])
def test_the_image_token_cache_is_refused_where_kept_tokens_could_be_wrong(recipe, overrides, message):
    from aria.train.compose import compose_run

    args = ["stage.image_token_cache_gb=0.5", "parallel.ep_size=1"]
    assert compose_run(recipe, args, inputs=False).stage.image_token_cache_gb == 0.5
    with pytest.raises(ValueError, match=r"'stage\.image_token_cache_gb' = 0\.5 with " + message):
        compose_run(recipe, [*args, *overrides], inputs=False)


@pytest.mark.parametrize("recipe, overrides, level", [
    ("quickstart", [], "tokens"),
    ("quickstart", ["stage.trainable.vision=true", "+optim.lr_scale.vision=0"], "tokens"),
    ("quickstart", ["stage.trainable.projector=true"], "patches"),  # the encoder frozen, its outputs not
    ("quickstart", ["stage.trainable.vision=true", "+optim.lr_scale.vision=0", "+optim.lr_scale.projector=1",
                    "stage.trainable.projector=true"], "patches"),
    ("quickstart", ["stage.trainable.vision=true", "+optim.lr_scale.vision=0", "+optim.lr_scale.patch_embed=1"],
     None),  # the patch projection trains though the rest of the encoder does not
    ("quickstart_vision", [], "patches"),
    ("stage0_vision", [], None),
])
def test_what_the_image_token_cache_keeps_follows_what_is_frozen(recipe, overrides, level):
    """The level the config picks, and the parameters the run trains: "tokens" only where no vision
    or projector parameter takes a gradient, "patches" only where the patch projection takes none."""
    from aria.config import image_cache_level
    from aria.model.aria import build_model
    from aria.train.compose import compose_run
    from aria.train.stages import apply_stage

    args = ["parallel.ep_size=1", "stage.image_token_cache_gb=0", *overrides]  # composes where no level fits
    cfg = compose_run(recipe, args, inputs=False)
    assert image_cache_level(cfg) == level
    model = build_model(cfg.model, device="meta")
    apply_stage(model, cfg.stage, cfg.lora, cfg.optim.lr_scale)
    patches = not any(p.requires_grad for p in model.vision.patch_embed.parameters())
    image_path = not any(p.requires_grad for m in (model.vision, model.projector) for p in m.parameters())
    assert (level is not None) == patches and (level == "tokens") == image_path


# The layers of the package, top to bottom (docs/DESIGN: lower parts never import higher ones).
LAYERS = [{"config", "rundir", "commands"}, {"data"}, {"model"}, {"parallel"}, {"convert"}, {"train"},
          {"inference", "evaluate"}, {"tools"}, {"cli"}]


def _imports(path) -> set[str]:
    """The ``aria.X`` parts a module imports (at any depth of the file: lazy imports count)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found |= {n.split(".")[1] for n in names if n.startswith("aria.")}
    return found


def test_lower_parts_never_import_higher_ones():
    """data knows no model, the model no trainer or file format, parallel no loop, the library no CLI
    (``python -m aria.train``'s ``__main__`` is a command line itself)."""
    from pathlib import Path

    import aria

    level = {part: i for i, layer in enumerate(LAYERS) for part in layer}
    root = Path(aria.__file__).parent
    files = [p for p in root.rglob("*.py") if p.name != "__main__.py"]
    assert len(files) > 40
    wrong = []
    for path in files:
        part = path.relative_to(root).parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        assert part in level, f"{path}: add its part to LAYERS"
        wrong += [f"{path.relative_to(root)} imports aria.{imported}" for imported in _imports(path)
                  if level[imported] > level[part]]
    assert not wrong, wrong


def test_model_settings_a_starting_checkpoint_would_drop_are_refused(tmp_path, capsys):
    """With init.from_checkpoint / init.from_hf the architecture comes from the weights: a
    model.FIELD whose value the source does not have, or model=NAME of other parameter shapes, is
    one config error naming each such field with the asked and the source's value. Training
    options, the source's own values, model=NAME of the source's shapes and runs without a source
    pass."""
    import json

    from aria.cli.train import main
    from aria.convert.checkpoint import save_model_dir
    from aria.convert.hf_config import to_hf_config
    from aria.model import build_model
    from aria.train.compose import compose_run
    from aria.train.trainer import check_model_overrides, resolve_model_config

    tiny = load_model_config("tiny")
    ours, hf = tmp_path / "ours", tmp_path / "hf"
    save_model_dir(build_model(tiny, device="meta").to_empty(device="cpu").state_dict(), tiny, ours)
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(to_hf_config(tiny)))
    run = ["run_dir=/r", "data.train=/d", "data.tokenizer=/t"]

    def check(*overrides: str) -> None:
        check_model_overrides(compose_run("config", [*run, *overrides]), list(overrides))

    with pytest.raises(ValueError, match=rf"comes from init.from_checkpoint={ours}, .*: "
                                         r"model.vision.feature_layer 0 -> -1\. Drop them"):
        check(f"init.from_checkpoint={ours}", "model.vision.feature_layer=0")
    with pytest.raises(ValueError, match=r"comes from init.from_hf=.*: model.text.rope_theta 10000.0 -> "
                                         r"100000.0; model.vision.num_heads 2 -> 4\. Drop"):
        check(f"init.from_hf={hf}", "model.text.rope_theta=1e4", "model.vision.num_heads=2",
              "model.moe.token_chunk=64")
    with pytest.raises(ValueError, match=r"model.text.hidden_size 512 -> 128;"):
        check(f"init.from_checkpoint={ours}", "model=narrow")
    check(f"init.from_checkpoint={ours}", "model.moe.token_chunk=256", "model.vision.crop_chunk=2",
          "model.moe.aux_loss_coeff=0", "model.text.initializer_range=0.3")  # training options
    check(f"init.from_checkpoint={ours}", "model=tiny", "model.vision.feature_layer=-1")  # the source's values
    check(f"init.from_hf={hf}", "model=tiny", "stage=long_context")  # the stage sets the RoPE base
    long = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, rope_theta=5e6))  # a stage-3 checkpoint
    save_model_dir(build_model(long, device="meta").to_empty(device="cpu").state_dict(), long, tmp_path / "long")
    check(f"init.from_checkpoint={tmp_path / 'long'}", "model=tiny")  # a pipeline's model=NAME for every stage
    check("model.vision.feature_layer=0")  # no source
    check(f"init.from_checkpoint={tmp_path / 'nowhere'}", "model.vision.feature_layer=0")  # reported later

    assert main([*run, f"init.from_checkpoint={ours}", "model.vision.feature_layer=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aria-train: config error: the model's architecture comes from") and err.count("\n") == 1
    assert main([*run, f"init.from_checkpoint={tmp_path}", "model.vision.feature_layer=0"]) == 2  # no model there
    err = capsys.readouterr().err
    assert err.startswith(f"aria-train: config error: {tmp_path} is not a model directory") and err.count("\n") == 1

    # the training options the run sets win over the source's; the rest is the source's
    resolved = resolve_model_config(compose_run("config", [
        *run, f"init.from_checkpoint={ours}", "model=narrow", "model.text.initializer_range=0.3",
        "model.vision.crop_chunk=2"]))
    assert (resolved.text.initializer_range, resolved.vision.crop_chunk) == (0.3, 2)
    assert (resolved.text.hidden_size, resolved.vision.num_heads) == (tiny.text.hidden_size, tiny.vision.num_heads)
