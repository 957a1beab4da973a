"""The shapes-world probe: its labels, its classifier, and the command on a model directory."""

from __future__ import annotations

import json

import pytest
import torch

from aria.config import load_model_config
from aria.convert.checkpoint import save_model_dir
from aria.model import build_model
from data_tools.make_shapes import POSITIONS, SHAPES, make_shapes, plan_images
from data_tools.probe_shapes import PLACES, cell_labels, fit_probe, main


def test_cell_labels_name_each_shape_in_its_cell():
    plan = plan_images(0, "train", 30, 490)
    labels = cell_labels(plan, "shape")
    for (scene, _), row in zip(plan, labels):
        assert int((row > 0).sum()) == len(scene.shapes)
        for obj in scene.shapes:
            assert SHAPES[int(row[POSITIONS.index(obj.position)]) - 1] == obj.shape


def test_the_probe_reads_features_that_hold_the_labels_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (600, 9), generator=g)
    encoded = torch.nn.functional.one_hot(labels, 6).flatten(1).float()
    mixed = encoded @ torch.randn(54, 80, generator=g) + 0.3 * torch.randn(600, 80, generator=g)
    readable = fit_probe(mixed[:400], labels[:400], mixed[400:], labels[400:], num_classes=6)
    assert readable["occupied"] > 0.95 and readable["all"] > 0.95
    noise = torch.randn(600, 80, generator=g)
    blind = fit_probe(noise[:400], labels[:400], noise[400:], labels[400:], num_classes=6)
    assert blind["occupied"] < 0.4  # chance: 1/6 per cell


def test_command_probes_a_model_directory(tmp_path, capsys):
    data = tmp_path / "world"
    make_shapes(data, 0, train_images=24, test_images=8, train_videos=0, test_videos=0, workers=1, wds=False)
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    save_model_dir(build_model(cfg).state_dict(), cfg, tmp_path / "model")
    out = tmp_path / "probe.json"
    assert main([str(tmp_path / "model"), str(data), "--train-images", "16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(place in printed for place in PLACES)
    results = json.loads(out.read_text())
    assert set(results) == set(PLACES)
    for by_attribute in results.values():
        assert set(by_attribute) == {"shape", "colour"}
        for accuracies in by_attribute.values():
            assert all(0.0 <= v <= 1.0 for v in accuracies.values())
            assert accuracies["train_all"] > 0.9  # 16 images: a linear map fits them


@pytest.mark.parametrize("args, message", [
    (["--train-images", "0"], "--train-images 0"),
    ([], "meta.json"),
])
def test_bad_inputs_are_one_line(tmp_path, capsys, args, message):
    data = tmp_path / "world"
    if args:
        make_shapes(data, 0, train_images=4, test_images=2, train_videos=0, test_videos=0, workers=1, wds=False)
    else:
        data.mkdir()
    assert main([str(tmp_path / "model"), str(data), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("probe_shapes: error:") and message in err and "\n" not in err
