"""The shapes-world probe: its labels, its classifier, and the command on a model directory."""

from __future__ import annotations

import json

import pytest
import torch

from aria.config import load_model_config
from aria.convert.checkpoint import save_model_dir
from aria.model import build_model
from data_tools.make_shapes import POSITIONS, SHAPES, make_shapes, plan_images
from data_tools.probe_shapes import (ATTENTION, FEATURES, PLACES, attention_summary, cell_labels, fit_probe, main,
                                    token_rows)


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


def test_token_rows_pair_each_token_with_the_cell_under_most_of_it():
    labels = torch.arange(9).view(1, 9) + 10 * torch.arange(2).view(2, 1)  # image i, cell c -> 10 i + c
    tokens = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16 * 3)  # 16 tokens of width 3
    rows, row_labels = token_rows(tokens, labels, 16)
    assert torch.equal(rows, tokens.view(32, 3))
    # a 4 x 4 token grid over a 3 x 3 cell grid: token columns 0 | 1, 2 | 3 lie mostly in cell
    # columns 0 | 1 | 2 (token 1 spans [1/4, 1/2): 2/3 of it in cell column 1), the same for rows
    cell_of_token = [0, 1, 1, 2, 3, 4, 4, 5, 3, 4, 4, 5, 6, 7, 7, 8]
    assert row_labels.flatten().tolist() == cell_of_token + [10 + c for c in cell_of_token]


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
    assert set(results) == set(PLACES) | {ATTENTION}
    attention = results.pop(ATTENTION)
    assert attention["patches"] == 49 and 1 <= attention["patches_read"] <= 49
    assert 0 < attention["entropy"] <= 1 and 1 / 49 <= attention["largest_weight"] <= 1
    assert "projector attention" in printed
    for by_attribute in results.values():
        assert set(by_attribute) == {"shape", "colour"}
        for accuracies in by_attribute.values():
            assert all(0.0 <= v <= 1.0 for v in accuracies.values())
    for place in FEATURES:  # 16 images: a linear map of all their features fits them
        assert all(results[place][a]["train_all"] > 0.9 for a in ("shape", "colour"))


def test_attention_summary_tells_uniform_from_one_patch_per_query():
    N, H, Q, G = 3, 2, 4, 9
    uniform = attention_summary(torch.full((N, H, Q, G), 1 / G))
    assert torch.allclose(uniform["entropy"], torch.ones(N))
    assert torch.allclose(uniform["largest_weight"], torch.full((N,), 1 / G))
    assert uniform["patches_read"].tolist() == [1] * N  # ties: every query's first patch
    chosen = torch.tensor([0, 3, 3, 5, 7, 7, 7, 8]).view(H, Q)  # 5 distinct patches over heads x queries
    one_hot = torch.nn.functional.one_hot(chosen, G).float().expand(N, H, Q, G)
    sharp = attention_summary(one_hot)
    assert torch.allclose(sharp["entropy"], torch.zeros(N), atol=1e-6)
    assert torch.allclose(sharp["largest_weight"], torch.ones(N))
    assert sharp["patches_read"].tolist() == [5] * N


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
