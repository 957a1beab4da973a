"""Expert specialisation report (paper §4.2): which routed experts text, image and video tokens use.

    python -m aria.tools.experts MODEL DATA [--out DIR] [--limit N] [--tokenizer DIR]
        [--image-size 490|980] [--batch-size B] [--split test] [--num-frames N] [--device DEV] [--dtype bf16|fp32]

writes to ``--out``: ``experts.csv`` and ``experts.json`` (per layer and routed expert: the text,
image and video tokens routed to it, their shares and the specialisation ratios),
``visual_specialisation.png`` (layer x expert heatmap of the ratio, as the paper's Figure 1) and
``load_histogram.png`` (per-expert load in every layer), and prints a per-layer summary.

Letters: B samples in a batch, T tokens of a row, L decoder layers, M token kinds (pad, text, image,
video), E routed experts, K experts per token (top-k).

Design decisions:
- Routing is observed, not recomputed: a forward hook on each layer's ``Router`` reads the (T, K)
  expert ids it returns, i.e. what the experts really ran (a selection-only balancing bias
  included). Every token counts once per top-k slot. Counts are scatter-added on the device into an
  (L, M, E) tensor that the host reads once, at the end. The model itself is not changed.
- Teacher forcing over whole samples (prompt and answer, or the whole document), read with the
  training data pipeline (``loader.iterate_samples``, ``packing.collate``): one sample per row, rows
  padded to the longest of the batch. Padding (segment 0) is counted in a bin of its own and
  dropped. Only the last position's logits are computed (``logits_to_keep=1``).
- A token's modality: an ``<|img|>`` slot is image or video according to the media item whose block
  it fills; every other token (chat markup, ``<fim_prefix>``/``<fim_suffix>``, timestamps) is text.
  The crop size cannot tell them apart (at ``--image-size 490`` images and frames are both 490 px)
  and one record may mix images and videos, so the report's copy of the processor wraps its image
  and frame processors (``Processor.images`` / ``.frames``) to note which of them made each image
  block, in token order; a count that disagrees with the sample's crops is an internal error.
- Specialisation is the paper's (§4.2, Figure 1): R_m(e) is the fraction of the layer's modality-m
  tokens routed to expert e (over the experts it sums to K); the visual specialisation of e is
  R_v(e) / R_t(e) with visual = image + video tokens, capped at 50. An expert only visual tokens
  reach gets the cap; the ratio is undefined (empty in the CSV, null in the JSON, grey in the plot)
  when the data hold no visual tokens or the expert got no token of either kind. The same ratio is
  reported for image and for video tokens alone.
- Plots use matplotlib's object API (``Figure`` and its Agg canvas), so this module never touches
  pyplot's global backend and needs no display. The heatmap's colours are on a log scale from 1/50
  to 50, diverging at 1: red = visual-specialised, white = as often as text, blue = text-leaning.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from aria.commands import add_model_arguments, run_command
from aria.data.errors import BadInputPolicy
from aria.data.loader import iterate_samples
from aria.data.packing import PackedBatch, Piece, Row, collate, to_device
from aria.data.processor import EncodedSample, Processor
from aria.inference import load_from_args

log = logging.getLogger("aria.tools.experts")

PAD, TEXT, IMAGE, VIDEO = 0, 1, 2, 3
"""Token kinds, each the index of its bin in the router counts."""
MODALITIES = ("text", "image", "video")
"""Names of TEXT, IMAGE and VIDEO, in that order (the rows of ``ExpertCounts.counts_LME``)."""
CAP = 50.0
"""Upper bound of the specialisation ratio (the paper's Figure 1)."""
SPECIALISATIONS = {"visual": "image + video", "image": "image", "video": "video"}
"""Kinds of specialisation ratio -> the tokens they compare with text."""

COLUMNS = {
    "layer": "decoder layer (0-based)",
    "expert": "routed expert (0-based)",
    "text": "text tokens routed to the expert (each token counts once per top-k slot)",
    "image": "image tokens (<|img|> slots of images) routed to the expert",
    "video": "video tokens (<|img|> slots of video frames) routed to the expert",
    "total": "all tokens routed to the expert",
    "text_share": "fraction of the layer's text tokens routed to the expert (R_t; sums to top_k)",
    "image_share": "fraction of the layer's image tokens routed to the expert (sums to top_k)",
    "video_share": "fraction of the layer's video tokens routed to the expert (sums to top_k)",
    "visual_share": "fraction of the layer's image + video tokens routed to the expert (R_v)",
    "load_share": "fraction of the layer's token assignments that went to the expert (sums to 1)",
    "load_over_mean": "the expert's assignments over the mean of the layer's experts (1 = balanced)",
    "visual_specialisation": f"R_v / R_t, capped at {CAP:g} (the paper's Figure 1)",
    "image_specialisation": f"image_share / text_share, capped at {CAP:g}",
    "video_specialisation": f"video_share / text_share, capped at {CAP:g}",
}
"""The columns of ``experts.csv`` (and of the rows in ``experts.json``), with their meaning."""


# ---------------------------------------------------------------------------------------------
# Token modalities
# ---------------------------------------------------------------------------------------------


class _Noting:
    """An image processor that appends ``kind`` to ``log`` for every image block it makes."""

    def __init__(self, inner: Any, kind: int, log: list[int]) -> None:
        self.inner, self.kind, self.log = inner, kind, log

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.log.append(self.kind)
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class BlockKinds:
    """A copy of a processor that notes the media kind (IMAGE or VIDEO) of every image block it
    encodes: ``kinds.processor.encode(sample)``, then ``kinds.take(encoded)``."""

    def __init__(self, processor: Processor) -> None:
        self.log: list[int] = []
        self.processor = copy.copy(processor)
        self.processor.images = _Noting(processor.images, IMAGE, self.log)
        self.processor.frames = _Noting(processor.frames, VIDEO, self.log)

    def take(self, encoded: EncodedSample) -> list[int]:
        """The kinds of the blocks of ``encoded``, the sample encoded last, in token order (a record
        that failed after decoding some of its media left its notes before these)."""
        n = len(encoded.crops)
        kinds = self.log[len(self.log) - n:]
        self.log.clear()
        assert len(kinds) == n, f"{encoded.where}: {n} image blocks but {len(kinds)} were noted"
        return kinds


def token_modalities(encoded: EncodedSample, block_kinds: list[int], image_token_id: int,
                     tokens_per_crop: dict[int, int]) -> torch.Tensor:
    """(T,) kind of every token of ``encoded``: TEXT, or the kind of the image block (one per entry
    of ``encoded.crops``, in token order) whose <|img|> slots it is."""
    assert len(block_kinds) == len(encoded.crops), (len(block_kinds), len(encoded.crops))
    slots = [pv.shape[0] * tokens_per_crop[pv.shape[-1]] for pv, _ in encoded.crops]
    kinds_R = torch.repeat_interleave(torch.tensor(block_kinds, dtype=torch.long),
                                      torch.tensor(slots, dtype=torch.long))
    slot_T = encoded.input_ids == image_token_id
    assert int(slot_T.sum()) == kinds_R.numel(), \
        f"{encoded.where}: {int(slot_T.sum())} <|img|> tokens for {kinds_R.numel()} crop slots"
    kinds_T = torch.full_like(encoded.input_ids, TEXT)
    kinds_T[slot_T] = kinds_R
    return kinds_T


# ---------------------------------------------------------------------------------------------
# Counting routed tokens
# ---------------------------------------------------------------------------------------------


class RoutingCounter:
    """Forward hooks on every layer's router that add up its expert choices per token kind.

    Set ``kinds_T`` (the batch's (B, T) kinds flattened, on the model's device) before each
    forward; ``counts_LME`` (L, 4, E) holds the assignments so far, bin PAD included. A context
    manager: the hooks are removed on exit.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        layers = model.moe_layers
        self.num_experts = layers[0].cfg.num_experts
        self.counts_LME = torch.zeros(len(layers), 4, self.num_experts, dtype=torch.long,
                                      device=layers[0].router.weight.device)
        self.kinds_T: torch.Tensor | None = None
        self.handles = [layer.router.register_forward_hook(partial(self._hook, i))
                        for i, layer in enumerate(layers)]

    def _hook(self, layer: int, module: torch.nn.Module, inputs: tuple, output: tuple) -> None:
        ids_TK = output[2]  # Router.forward returns (logits, combine weights, expert ids)
        assert self.kinds_T is not None and self.kinds_T.numel() == ids_TK.shape[0], \
            "RoutingCounter.kinds_T must give the kind of every token of the batch"
        index_A = (self.kinds_T.unsqueeze(1) * self.num_experts + ids_TK).reshape(-1)
        self.counts_LME[layer].view(-1).scatter_add_(0, index_A, torch.ones_like(index_A))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> "RoutingCounter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class ExpertCounts:
    counts_LME: torch.Tensor
    """(L, 3, E) int64: text, image and video token assignments to each routed expert."""
    tokens_M: torch.Tensor
    """(3,) int64: the non-padding text, image and video tokens (every layer sees all of them)."""
    top_k: int
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Records skipped as bad input, by reason."""

    @property
    def num_layers(self) -> int:
        return self.counts_LME.shape[0]

    @property
    def num_experts(self) -> int:
        return self.counts_LME.shape[2]


def collate_samples(encoded: list[EncodedSample], kinds: list[torch.Tensor], processor: Processor
                    ) -> tuple[PackedBatch, torch.Tensor]:
    """One sample per row, padded to the longest: the model batch and its (B, T) token kinds (PAD
    on the padding)."""
    T = max(len(e) for e in encoded)
    batch = collate([Row([Piece(e, None)], len(e)) for e in encoded], T, processor.tokenizer.pad_id,
                    processor.tokens_per_crop)
    kinds_BT = torch.full((len(encoded), T), PAD, dtype=torch.long)
    for b, kinds_T in enumerate(kinds):
        kinds_BT[b, :kinds_T.numel()] = kinds_T
    return batch, kinds_BT


@torch.no_grad()
def route_batch(model: torch.nn.Module, counter: RoutingCounter, batch: PackedBatch,
                kinds_BT: torch.Tensor) -> None:
    """One teacher-forced forward of ``batch``; ``counter`` adds up its routing."""
    device = counter.counts_LME.device
    counter.kinds_T = kinds_BT.reshape(-1).to(device)
    model(batch.input_ids.to(device), to_device(batch.pixel_values, device), to_device(batch.pixel_mask, device),
          position_ids=batch.position_ids.to(device), segment_ids=batch.segment_ids.to(device),
          image_feature_order=to_device(batch.image_feature_order, device), logits_to_keep=1)
    counter.kinds_T = None


def count_routing(model: torch.nn.Module, processor: Processor, data: str | Path, split: str = "test",
                  limit: int | None = None, batch_size: int = 8, strict: bool = False) -> ExpertCounts:
    """Routed-token counts per layer, expert and modality over the samples of ``data`` (a JSONL
    file, a directory holding ``{split}.jsonl``, or webdataset shards), read once in order.

    ``limit`` caps the samples used (skipped records do not count); ``strict`` raises the first bad
    record instead of skipping it. Raises ``ValueError`` if no sample is usable.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    blocks = BlockKinds(processor)
    policy = BadInputPolicy(strict)
    tokens_M = torch.zeros(4, dtype=torch.long)
    samples, pending, pending_kinds = 0, [], []
    was_training = model.training
    model.eval()
    try:
        with RoutingCounter(model) as counter:
            for _, encoded in iterate_samples(str(data), blocks.processor, split, strict, policy=policy):
                kinds_T = token_modalities(encoded, blocks.take(encoded), processor.tokenizer.image_id,
                                           processor.tokens_per_crop)
                tokens_M += torch.bincount(kinds_T, minlength=4)
                pending.append(encoded)
                pending_kinds.append(kinds_T)
                samples += 1
                if len(pending) == batch_size:
                    route_batch(model, counter, *collate_samples(pending, pending_kinds, processor))
                    pending, pending_kinds = [], []
                    log.info("routed %d samples", samples)
                if limit is not None and samples >= limit:
                    break
            if pending:
                route_batch(model, counter, *collate_samples(pending, pending_kinds, processor))
            counts_LME = counter.counts_LME.cpu()
    finally:
        model.train(was_training)
    if samples == 0:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(policy.counts.items())) or "none"
        raise ValueError(f"dataset {data} gave no usable sample (records skipped: {skipped})")
    return ExpertCounts(counts_LME[:, TEXT:], tokens_M[TEXT:], model.cfg.moe.top_k, samples,
                        dict(policy.counts))


# ---------------------------------------------------------------------------------------------
# Shares and specialisation
# ---------------------------------------------------------------------------------------------


def _tokens_of(counts: ExpertCounts, kind: str) -> tuple[torch.Tensor, int]:
    """(L, E) assignments of the tokens of ``kind`` ('text', 'image', 'video' or 'visual') and
    the number of such tokens."""
    names = ("image", "video") if kind == "visual" else (kind,)
    rows = [MODALITIES.index(n) for n in names]
    return counts.counts_LME[:, rows].sum(1), int(counts.tokens_M[rows].sum())


def share_LE(counts: ExpertCounts, kind: str) -> torch.Tensor:
    """(L, E) float64: fraction of the ``kind`` tokens routed to each expert (NaN without any)."""
    assigned_LE, tokens = _tokens_of(counts, kind)
    if tokens == 0:
        return torch.full(assigned_LE.shape, math.nan, dtype=torch.float64)
    return assigned_LE.double() / tokens


def specialisation_LE(counts: ExpertCounts, kind: str = "visual") -> torch.Tensor:
    """(L, E) float64: share of the ``kind`` tokens over share of the text tokens, per expert,
    capped at ``CAP``; NaN where undefined (see the module docstring)."""
    r_LE, r_text_LE = share_LE(counts, kind), share_LE(counts, "text")
    ratio_LE = torch.where(r_text_LE > 0, r_LE / r_text_LE,
                           torch.where(r_LE > 0, math.inf, math.nan))
    if torch.isnan(r_LE).all() or torch.isnan(r_text_LE).all():  # no tokens of one kind at all
        ratio_LE = torch.full_like(ratio_LE, math.nan)
    return ratio_LE.clamp(max=CAP)


def load_LE(counts: ExpertCounts) -> torch.Tensor:
    """(L, E) float64: every expert's assignments over the mean of its layer's experts."""
    total_LE = counts.counts_LME.sum(1).double()
    return total_LE / total_LE.mean(1, keepdim=True)


def expert_rows(counts: ExpertCounts) -> list[dict[str, Any]]:
    """One row per (layer, expert) with the ``COLUMNS``; NaN where a value is undefined."""
    total_LE = counts.counts_LME.sum(1)
    columns = {
        **{m: counts.counts_LME[:, i] for i, m in enumerate(MODALITIES)},
        "total": total_LE,
        **{f"{m}_share": share_LE(counts, m) for m in (*MODALITIES, "visual")},
        "load_share": total_LE.double() / total_LE.sum(1, keepdim=True).double(),
        "load_over_mean": load_LE(counts),
        **{f"{kind}_specialisation": specialisation_LE(counts, kind) for kind in SPECIALISATIONS},
    }
    assert set(columns) | {"layer", "expert"} == set(COLUMNS)
    rows = []
    for layer in range(counts.num_layers):
        for expert in range(counts.num_experts):
            row: dict[str, Any] = {"layer": layer, "expert": expert}
            for name in COLUMNS:
                if name in columns:
                    row[name] = columns[name][layer, expert].item()
            rows.append(row)
    return rows


def most_specialised(counts: ExpertCounts, n: int = 3) -> list[list[tuple[int, float]]]:
    """Per layer, the ``n`` experts with the highest visual specialisation, (expert, ratio)."""
    ratio_LE = specialisation_LE(counts, "visual")
    top = []
    for ratio_E in ratio_LE:
        defined = [(e, r) for e, r in enumerate(ratio_E.tolist()) if not math.isnan(r)]
        top.append(sorted(defined, key=lambda er: -er[1])[:n])
    return top


def summary(counts: ExpertCounts) -> str:
    """The per-layer table printed by the command."""
    from aria.train.metrics import expert_load

    text, image, video = counts.tokens_M.tolist()
    lines = [f"{counts.samples} samples: {text} text, {image} image, {video} video tokens; "
             f"top-{counts.top_k} of {counts.num_experts} routed experts in {counts.num_layers} layers",
             f"visual specialisation = R_v / R_t (share of the layer's image + video tokens routed to "
             f"the expert over the same for text tokens), capped at {CAP:g}"]
    if image + video == 0:
        lines.append("the data hold no image or video tokens: no visual specialisation")
    imbalance = expert_load(counts.counts_LME.sum(1))["expert_load_max_over_mean"]
    lines.append(f"{'layer':>5}  {'load max/mean':>13}  most visual-specialised experts (R_v / R_t)")
    for layer, (ratio, top) in enumerate(zip(imbalance, most_specialised(counts))):
        experts = "  ".join(f"e{e} {r:.2f}" for e, r in top) if image + video else "-"
        lines.append(f"{layer:>5}  {ratio:>13.2f}  {experts}")
    if counts.skipped:
        lines.append("skipped records: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.skipped.items())))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Files and plots
# ---------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """NaN -> None (JSON null / an empty CSV cell)."""
    return None if isinstance(value, float) and math.isnan(value) else value


def write_tables(counts: ExpertCounts, out: Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    """``experts.csv`` (one row per layer and expert) and ``experts.json`` (the same rows plus the
    token totals, the column meanings and ``meta``)."""
    rows = [{k: _plain(v) for k, v in row.items()} for row in expert_rows(counts)]
    csv_path, json_path = out / "experts.csv", out / "experts.json"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    from aria.train.metrics import expert_load

    imbalance = expert_load(counts.counts_LME.sum(1))["expert_load_max_over_mean"]
    report = {
        **meta,
        "samples": counts.samples,
        "skipped": counts.skipped,
        "num_layers": counts.num_layers,
        "num_experts": counts.num_experts,
        "top_k": counts.top_k,
        "tokens": dict(zip(MODALITIES, counts.tokens_M.tolist())),
        "specialisation_cap": CAP,
        "layers": [{"layer": layer, "load_max_over_mean": ratio,
                    "most_visual_experts": [{"expert": e, "visual_specialisation": r} for e, r in top]}
                   for layer, (ratio, top) in enumerate(zip(imbalance, most_specialised(counts)))],
        "columns": COLUMNS,
        "experts": rows,
    }
    json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return csv_path, json_path


def _integer_ticks(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _heatmap_height(num_layers: int) -> float:
    """Inches for a heatmap with one row per layer (28 layers: 7.6)."""
    return min(1.4 + 0.22 * num_layers, 9.0)


def plot_specialisation(counts: ExpertCounts, path: Path) -> dict[str, torch.Tensor]:
    """Heatmaps layer (rows) x expert (columns) of the specialisation ratios: visual, and image and
    video apart when the data hold both. Returns the (L, E) ratio plotted in each panel."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    _, image, video = counts.tokens_M.tolist()
    kinds = ["visual", "image", "video"] if image and video else ["visual"]
    panels = {kind: specialisation_LE(counts, kind) for kind in kinds}
    L, E = counts.num_layers, counts.num_experts
    fig = Figure(figsize=(min(4.0 + 0.2 * E, 26.0), len(kinds) * _heatmap_height(L)), layout="constrained")
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.75")
    ticks = [1 / CAP, 0.1, 1 / 3, 1.0, 3.0, 10.0, CAP]
    for ax, (kind, ratio_LE) in zip(fig.subplots(len(kinds), 1, squeeze=False)[:, 0], panels.items()):
        shown_LE = np.clip(ratio_LE.numpy(), 1 / CAP, CAP)  # 0 shows as the bottom colour, NaN grey
        im = ax.imshow(np.ma.masked_invalid(shown_LE), cmap=cmap, norm=LogNorm(1 / CAP, CAP),
                       aspect="auto", interpolation="nearest")
        title = f"{SPECIALISATIONS[kind]} tokens: R / R_text per expert (capped at {CAP:g})"
        if torch.isnan(ratio_LE).all():
            title += " - undefined: no such tokens"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("routed expert")
        ax.set_ylabel("layer")
        _integer_ticks(ax)
        bar = fig.colorbar(im, ax=ax, ticks=ticks)
        bar.ax.set_yticklabels([f"{t:.2g}" for t in ticks])
    fig.savefig(path, dpi=100)
    return panels


def plot_load(counts: ExpertCounts, path: Path) -> torch.Tensor:
    """Per layer, the distribution of expert load over its mean (box and points), and the same as
    a layer x expert heatmap. Returns the (L, E) values plotted."""
    from matplotlib.figure import Figure

    rel_LE = load_LE(counts)
    L, E = rel_LE.shape
    fig = Figure(figsize=(max(6.0, min(2.0 + 0.4 * L, 24.0)), 3.5 + _heatmap_height(L)),
                 layout="constrained")
    box, heat = fig.subplots(2, 1, height_ratios=[3.5, _heatmap_height(L)])
    box.boxplot([rel_LE[layer].tolist() for layer in range(L)], positions=list(range(L)), widths=0.6,
                whis=(0, 100))  # whiskers from the least to the most loaded expert
    for layer in range(L):
        box.scatter([layer] * E, rel_LE[layer].tolist(), s=6, alpha=0.5, color="tab:blue")
    box.axhline(1.0, linestyle="--", color="grey", linewidth=1)
    box.set_xlabel("layer")
    box.set_ylabel("expert load / mean load")
    box.set_title(f"per-expert load in each layer ({E} routed experts, top-{counts.top_k}; "
                  "1 = perfectly balanced)", fontsize=10)
    im = heat.imshow(rel_LE.numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
    heat.set_xlabel("routed expert")
    heat.set_ylabel("layer")
    _integer_ticks(heat)
    fig.colorbar(im, ax=heat, label="load / mean")
    box.set_xticks(list(range(L)))
    fig.savefig(path, dpi=100)
    return rel_LE


def write_report(counts: ExpertCounts, out: str | Path, meta: dict[str, Any] | None = None
                 ) -> list[Path]:
    """All the report's files in ``out`` (created if missing); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = list(write_tables(counts, out, meta or {}))
    paths.append(out / "visual_specialisation.png")
    plot_specialisation(counts, paths[-1])
    paths.append(out / "load_histogram.png")
    plot_load(counts, paths[-1])
    return paths


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aria.tools.experts",
                                     description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("data", help="JSONL dataset (file, or directory with {split}.jsonl) or "
                                     "webdataset shards")
    parser.add_argument("--out", default="expert_report", help="output directory (default %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many samples")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward (default 8)")
    parser.add_argument("--split", default="test", help="which {split}.jsonl of a dataset directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def run() -> None:
        model, processor = load_from_args(args)
        counts = count_routing(model, processor, args.data, args.split, args.limit, args.batch_size)
        video = {k: v for k, v in asdict(processor.video).items() if not k.startswith("_")}
        paths = write_report(counts, args.out, {
            "model": str(args.model), "data": str(args.data), "tokenizer": processor.tokenizer.source,
            "image_size": processor.images.max_image_size, "video": video})
        print(summary(counts))
        print("wrote " + ", ".join(str(p) for p in paths))

    return run_command(parser.prog, run)


if __name__ == "__main__":
    raise SystemExit(main())
