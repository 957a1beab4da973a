"""Linear probes on a model's image features over the shapes world: how well the shape and the
colour in each grid cell can be read from the patch embedding, the vision encoder's output and the
projector's output (the image tokens the language model reads), all of an image's together and
each token alone for the cell under it.

    python -m data_tools.probe_shapes MODEL DATA [--train-images N] [--test-images N] [--json OUT]

MODEL: anything ``aria-eval`` takes (a run directory, a checkpoint, our or a Hugging Face model
directory); DATA: a ``data_tools.make_shapes`` directory. It tells where the information a question
needs is lost: a feature that a linear map reads at 90% but the model answers at chance points past
that layer; one a probe cannot read points at or before it.

Design decisions:
- Labels come from the scene plan the images were rendered from (``make_shapes.plan_images`` with
  the directory's seed and counts): for each of the 9 cells, empty or one of the 5 shapes / 6
  colours.
- Features are flattened over the crop's patches (or queries) so that a probe may read any of them,
  and standardised with the train split's mean and deviation. The patch embedding is taken before
  the position table is added (what the pixels alone give).
- One multinomial logistic regression per place and attribute, for the 9 cells at once (a
  (features, 9 x classes) weight), full batch, a fixed number of Adam steps with a small L2 penalty;
  fitted on train images, scored on the test images. Reported: accuracy over the occupied cells
  (chance 1/5 for shape, 1/6 for colour) and over all cells (emptiness included).
- "image token, own region" asks what the language model needs to bind (``data_tools.binding_testbed``):
  does each image token hold its own region's object? One probe shared by all the projector's
  tokens maps a single token to the shape / colour of the cell holding most of its region (the
  crop's tokens read as a square grid over the image); a token that mixes the whole image scores
  near chance there however well the flattened tokens score. "patch, own region" is the same probe
  on the patch embeddings, local by construction: its baseline (a 70 px patch shows part of a
  shape, so its shape score is low too).
- The projector's attention is summarised too (test images): how far from uniform a query's
  weights over the patches are (entropy as a fraction of the uniform one's), its largest weight, and
  how many patches are some query's most attended one. A uniform attention gives every image token
  the same mixture of the image; a saturated one reads a single patch per query and head, and
  leaves unread the patches no query picks (both seen in the quickstart:
  ``docs/quickstart_findings.md``).
- Images go through the model at their own size, which must be a crop size of the model's
  projector table (the shapes world renders 490 px).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aria.commands import run_report
from data_tools import make_shapes as ms
from data_tools.binding_testbed import cell_mixing

FEATURES = ("patch embedding", "vision output", "projector output")
PER_TOKEN = {"patch, own region": "patch embedding", "image token, own region": "projector output"}
PLACES = FEATURES + tuple(PER_TOKEN)
ATTENTION = "projector attention"
ATTRIBUTES = {"shape": ms.SHAPES, "colour": tuple(ms.COLOURS)}


def cell_labels(plan, attribute: str) -> torch.Tensor:
    """(images, 9) int64: 0 for an empty cell, else 1 + the index of the cell's shape or colour."""
    values = ATTRIBUTES[attribute]
    labels = torch.zeros(len(plan), len(ms.POSITIONS), dtype=torch.long)
    for i, (scene, _) in enumerate(plan):
        for obj in scene.shapes:
            labels[i, ms.POSITIONS.index(obj.position)] = 1 + values.index(getattr(obj, attribute))
    return labels


def attention_summary(weights_NHQG: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image (N,), of the projector's attention weights (every patch valid): the entropy of a
    query's weights over the patches as a fraction of the uniform one's, and its largest weight,
    both averaged over heads and queries; and how many distinct patches are some (head, query)'s
    most attended one."""
    N, H, Q, G = weights_NHQG.shape
    entropy = -(weights_NHQG * weights_NHQG.clamp_min(1e-30).log()).sum(-1) / math.log(G)
    largest, top_NHQ = weights_NHQG.max(-1)
    read = torch.tensor([float(top.unique().numel()) for top in top_NHQ.flatten(1)])
    return {"entropy": entropy.mean((1, 2)), "largest_weight": largest.mean((1, 2)), "patches_read": read}


@torch.no_grad()
def image_features(model, paths: list[Path], batch_size: int = 64
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """For each place, (images, features) fp32: the model's activations flattened per image; and
    the projector's attention per image (``attention_summary``)."""
    vision, projector = model.vision, model.projector
    out: dict[str, list[torch.Tensor]] = {place: [] for place in FEATURES}
    attention: dict[str, list[torch.Tensor]] = {}
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    for start in range(0, len(paths), batch_size):
        pixels = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB"))
                                            for p in paths[start:start + batch_size]]))
        pixels = pixels.permute(0, 3, 1, 2).contiguous().to(device)
        patches, valid = vision(pixels)
        tokens = projector(patches, valid)
        for place, x in zip(FEATURES, (vision.patch_embed(pixels), patches, tokens)):
            out[place].append(x.flatten(1).float().cpu())
        weights = projector.cross_attn.attention_weights(projector.queries(patches), patches, valid)
        for key, values in attention_summary(weights.float().cpu()).items():
            attention.setdefault(key, []).append(values)
    return ({place: torch.cat(xs) for place, xs in out.items()},
            {key: torch.cat(xs) for key, xs in attention.items()})


def token_rows(tokens_NF: torch.Tensor, labels_NC: torch.Tensor, queries: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened image tokens (images, queries x width) and cell labels (images, 9) -> one row per
    token (images x queries, width) and its label (images x queries, 1): the label of the cell holding
    most of the token's region, the tokens read as a square grid over the image in reading order."""
    region_cell_Q = cell_mixing(round(queries ** 0.5)).argmax(1)
    rows = tokens_NF.view(tokens_NF.shape[0], queries, -1).flatten(0, 1)
    return rows, labels_NC[:, region_cell_Q].reshape(-1, 1)


def fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
              num_classes: int, steps: int = 200, l2: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Logistic regression from (N, F) features to (N, C) cell labels in [0, num_classes); returns the
    test accuracy over occupied cells (label > 0) and over all cells, and the train accuracy."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    cells = y_train.shape[1]
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(x_train.shape[1], cells * num_classes, generator=generator) * 1e-3).requires_grad_()
    bias = torch.zeros(cells * num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)

    def logits(x):
        return (x @ weight + bias).view(-1, cells, num_classes)

    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(logits(x_train).flatten(0, 1), y_train.flatten())
            (loss + l2 * weight.pow(2).sum()).backward()
            optimizer.step()
    with torch.no_grad():
        predicted, fitted = logits(x_test).argmax(-1), logits(x_train).argmax(-1)
    occupied = y_test > 0
    return {"occupied": (predicted[occupied] == y_test[occupied]).float().mean().item(),
            "all": (predicted == y_test).float().mean().item(),
            "train_all": (fitted == y_train).float().mean().item()}


def probe(model_path: str, data: Path, train_images: int | None = None, test_images: int | None = None,
          device: str = "cpu") -> dict:
    """{place: {attribute: accuracies}} for a model on a shapes-world directory, and under
    ``ATTENTION`` the projector's attention on the test images (``attention_summary``, averaged)."""
    from aria.inference import load_model

    plan_train, plan_test = ms.plans_of(data, train_images, test_images)
    model = load_model(model_path, device=device).eval()
    image_size = json.loads((data / "meta.json").read_text())["image_size"]
    patches = (image_size // model.cfg.vision.patch_size) ** 2
    queries = model.projector.num_queries(patches)  # a clear error for a crop size the model has no queries for
    tokens = {"patch embedding": patches, "projector output": queries}
    square = {place: round(n ** 0.5) ** 2 == n for place, n in tokens.items()}
    (train, _), (test, attention) = (image_features(model, [data / "images" / f"{split}_{i:06d}.png"
                                                            for i in range(len(plan))])
                                     for split, plan in (("train", plan_train), ("test", plan_test)))
    features = {"train": train, "test": test}
    results: dict = {}
    for place in [p for p in PLACES if p not in PER_TOKEN or square[PER_TOKEN[p]]]:
        results[place] = {}
        for attribute, values in ATTRIBUTES.items():
            x_train, x_test = features["train"], features["test"]
            y_train, y_test = cell_labels(plan_train, attribute), cell_labels(plan_test, attribute)
            if place in PER_TOKEN:
                source = PER_TOKEN[place]
                (x_train, y_train), (x_test, y_test) = (token_rows(x[source], y, tokens[source])
                                                        for x, y in ((x_train, y_train), (x_test, y_test)))
            else:
                x_train, x_test = x_train[place], x_test[place]
            results[place][attribute] = fit_probe(x_train, y_train, x_test, y_test, num_classes=1 + len(values))
    results[ATTENTION] = {key: values.mean().item() for key, values in attention.items()} | {"patches": patches}
    return results


def report(results: dict) -> str:
    lines = [f"{'features':24s} {'shape (occupied)':>17s} {'shape (all)':>12s} "
             f"{'colour (occupied)':>18s} {'colour (all)':>13s}"]
    for place, by_attribute in results.items():
        if place == ATTENTION:
            continue
        shape, colour = by_attribute["shape"], by_attribute["colour"]
        lines.append(f"{place:24s} {shape['occupied']:17.3f} {shape['all']:12.3f} "
                     f"{colour['occupied']:18.3f} {colour['all']:13.3f}")
    lines.append(f"chance on occupied cells: shape {1 / len(ms.SHAPES):.3f}, colour {1 / len(ms.COLOURS):.3f}")
    a = results[ATTENTION]
    lines.append(f"projector attention (test images): entropy {a['entropy']:.3f} of uniform, largest weight "
                 f"{a['largest_weight']:.3f}; {a['patches_read']:.1f} of {a['patches']} patches are the most "
                 "attended of some query in some head")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.probe_shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="run, checkpoint, or model directory (ours or Hugging Face)")
    parser.add_argument("data", type=Path, help="a data_tools.make_shapes directory")
    parser.add_argument("--train-images", type=int, default=None, help="fit on the first N train images (default all)")
    parser.add_argument("--test-images", type=int, default=None, help="score on the first N test images (default all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the accuracies here")
    args = parser.parse_args(argv)

    return run_report("probe_shapes", lambda: probe(args.model, args.data, args.train_images,
                                                    args.test_images, args.device), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
