"""The language model alone on ideal image tokens: can it learn the shapes world's binding in time?

    python -m data_tools.binding_testbed [--model tiny] [--steps 1000] [--batch 40] [--grid 3|4]
        [--no-place] [--shape-seen P] [--blind] [--lr 1e-3] [--init-std S] [--pool N]
        [--schedule cosine|linear|constant|anneal] [--min-lr-ratio R] [--questions four|every]
        [--tokenizer DIR] [--tokens-from RUN WORLD] [--seed 0] [--seeds 1] [--eval-every 250]
        [--json OUT]

The quickstart's answers name things the scene has but not which colour, shape and place belong
together (``data_tools.binding_report``). This tool takes the vision side out of the question: each
scene becomes image tokens that hold exactly what the questions need, and the model's language
model (its embeddings, MoE decoder and LM head, from its own init) learns to answer from them. If it
learns here and not in the quickstart, the image tokens are what is missing; if not here either, the
language model or the recipe is.

Design decisions:
- **Scenes and questions are the shapes world's**: 1-3 objects on the 3x3 grid, distinct colours,
  one object per cell, shapes drawn freely; per scene a dialog of its four image question types in a
  random order (colour of a shape that occurs once, shape at a place, place of a colour + shape,
  count), as ``dialog_train.jsonl`` asks them; with ``--questions every`` a training dialog asks
  everything the scene answers instead (each object's shape by its place, its place by its colour
  and shape, its colour when its shape is unique, and the count: 4-10 questions, as
  ``dialog_every_train.jsonl`` asks them; the held-out questions stay the four types). Scenes are
  drawn fresh for every step (no memorisation), or with ``--pool N`` from a fixed set of N training
  scenes, as a shapes world's N training images are seen again and again (each visit draws its
  questions anew); held-out scenes come from another seed, and each of their questions is scored
  in a row of its own (in a dialog, earlier turns give part of the later answers away: a blind
  model learns to use that).
- **Ideal tokens**: ``grid x grid`` tokens over the image; token t = sum over the cells c it
  overlaps of area(t, c) / area(t) x (E_colour[c] + E_shape[c] + E_place[c]), three learned tables
  (an empty cell has its own colour and shape rows). ``--grid 3`` is one token per cell; ``--grid 4``
  the 16 tokens of model=tiny's 490 px crop, each a mixture of the cells it overlaps.
  ``--no-place`` leaves E_place out (place is then only the token's position in the sequence, which
  the decoder sees through RoPE); ``--shape-seen P`` shows an object's shape with probability P
  only (else a learned "some shape" row: an encoder that sees where a shape is and its colour, not
  what it is, as the quickstart's probes find); ``--blind`` gives every token the empty scene (a
  control: the answers must then fall to chance).
- **Words are single tokens** with ids of their own (no tokenizer), and a fixed run of template
  tokens stands between a question and its answer, as the chat template does; the loss is on the
  answer and the end token after it, and accuracy is the greedy answer token. ``--tokenizer DIR``
  writes the same dialogs as the quickstart's model reads them instead: the shapes world's sentences
  (``make_shapes.TEMPLATES``), rendered and supervised by the training processor
  (``aria.data.processor``: the chat template, one image block of ``grid x grid`` tokens) with a
  trained tokenizer (``data_tools.train_tokenizer``); an answer is then right when every token of it
  and of its ``<|im_end|>`` is (the greedy answer, exactly). The two differ only in the text, so
  their gap is what the words, the template and multi-token answers cost.
- **A run's own tokens**: ``--tokens-from RUN WORLD`` replaces the ideal tokens with what a trained
  run's vision encoder and projector (frozen) make of a shapes world's images (``make_shapes``
  directory WORLD): the training scenes are the world's training images (``--pool`` is then their
  number), the held-out ones its test images, each question scored as above. A fresh language model
  binding here where the run did not says the run's tokens hold the binding and its language model
  did not learn to read it; not binding here either, the tokens do not hold it.
- Training: AdamW (beta2 0.95, no weight decay, gradients clipped at 1), the router's
  load-balancing loss added as in training; the learning rate follows the trainer's schedule
  (``aria.train.schedule``: 20 warm-up steps, then ``--schedule``, down to ``--min-lr-ratio``).
- **Seeds**: whether a language model this small binds in a short run depends on its seed (the same
  tokens and settings can give 63% on colour with one seed and 94% with another), so one run
  says little. ``--seeds N`` trains N models, seeds ``--seed`` to ``--seed + N - 1`` (each its own
  init and draws), and reports each, the mean and the lowest per type.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aria.commands import run_report
from data_tools.make_shapes import COLOURS, MAX_SHAPES, POSITIONS, SHAPES, TEMPLATES, at

QTYPES = ("colour", "shape", "position", "count")
QUESTIONS = ("four", "every")  # what a training dialog asks (run's ``questions``)
NUM_CELLS = len(POSITIONS)
IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Token ids of the testbed's words (below 100: inside any model's vocabulary)."""

    bos: int = 1
    eos: int = 2
    image: int = 3
    question_mark: int = 4
    template: tuple[int, ...] = (5, 6, 7, 8)  # "<|im_end|> \n <|im_start|>assistant \n"
    question: tuple[int, ...] = (10, 11, 12, 13)  # one per QTYPES entry
    colour: tuple[int, ...] = tuple(range(20, 20 + len(COLOURS)))
    shape: tuple[int, ...] = tuple(range(30, 30 + len(SHAPES)))
    place: tuple[int, ...] = tuple(range(40, 40 + NUM_CELLS))
    count: tuple[int, ...] = tuple(range(60, 60 + MAX_SHAPES))


WORDS = Vocabulary()
NAMES = {  # the testbed's word ids -> the shapes world's words
    **dict(zip(WORDS.colour, COLOURS)), **dict(zip(WORDS.shape, SHAPES)), **dict(zip(WORDS.place, POSITIONS)),
    **{token: str(n) for n, token in enumerate(WORDS.count, start=1)}}


def draw_scene(rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """1-3 objects as (colour, shape, cell) indices: distinct colours, distinct cells."""
    n = int(rng.integers(1, MAX_SHAPES + 1))
    cells = rng.choice(NUM_CELLS, n, replace=False)
    colours = rng.choice(len(COLOURS), n, replace=False)
    shapes = rng.integers(0, len(SHAPES), n)
    return [(int(c), int(s), int(p)) for c, s, p in zip(colours, shapes, cells)]


def draw_questions(scene, rng: np.random.Generator, every: bool = False
                   ) -> list[tuple[str, list[int], int]]:
    """(question type, question tokens, answer token) for each type, in a random order; no colour
    question when every shape of the scene occurs twice (its answer would not be unique). With
    ``every``, the shape, position and (unique shapes only) colour question of every object."""
    shapes = [s for _, s, _ in scene]
    unique = [o for o in scene if shapes.count(o[1]) == 1]
    if every:
        colour_of, shape_of, position_of = unique, scene, scene
    else:
        colour_of = [unique[rng.integers(len(unique))]] if unique else []
        shape_of = [scene[rng.integers(len(scene))]]
        position_of = [scene[rng.integers(len(scene))]]
    questions = [("colour", [WORDS.shape[shape]], WORDS.colour[colour]) for colour, shape, _ in colour_of]
    questions += [("shape", [WORDS.place[cell]], WORDS.shape[shape]) for _, shape, cell in shape_of]
    questions += [("position", [WORDS.colour[colour], WORDS.shape[shape]], WORDS.place[cell])
                  for colour, shape, cell in position_of]
    questions.append(("count", [], WORDS.count[len(scene) - 1]))
    rng.shuffle(questions)
    return [(kind, [WORDS.question[QTYPES.index(kind)], *words, WORDS.question_mark], answer)
            for kind, words, answer in questions]


def spoken(kind: str, words: list[int], answer: int) -> tuple[str, str]:
    """A question of ``draw_questions`` in the shapes world's words: (question, answer)."""
    names = [NAMES[w] for w in words if w in NAMES]
    if kind == "colour":
        question = TEMPLATES[kind].format(shape=names[0])
    elif kind == "shape":
        question = TEMPLATES[kind].format(at_position=at(names[0]))
    elif kind == "position":
        question = TEMPLATES[kind].format(colour=names[0], shape=names[1])
    else:
        question = TEMPLATES[kind]
    return question, NAMES[answer]


class ChatText:
    """Dialogs as the quickstart's model reads them: the world's sentences in the chat template,
    tokenized by a trained tokenizer, supervised as in training (``Processor.encode``)."""

    def __init__(self, tokenizer: str | Path, model_cfg, grid: int) -> None:
        from PIL import Image

        from aria.data.processor import Processor
        from aria.data.tokenizer import Tokenizer

        sides = Processor.crop_table(model_cfg)
        side = next((s for s, q in sides.items() if q == grid * grid), None)
        if side is None:
            raise ValueError(f"--tokenizer: no crop of the model gives grid x grid = {grid * grid} image "
                             f"tokens (crop side in px -> tokens: {sides}); choose --grid to match")
        tokenizer = Tokenizer.load(tokenizer)
        self.processor = Processor.for_model(tokenizer, model_cfg, image_size=side)
        self.image_id, self.pad_id = tokenizer.image_id, tokenizer.pad_id
        self.image = Image.new("RGB", (side, side), "white")  # ideal tokens replace its image tokens

    def encode(self, turns: list[tuple[str, list[int], int]]) -> tuple[list[int], list[int], list]:
        """ids, targets and (start, stop, type) of each answer of one dialog."""
        from aria.data.records import MediaRef, Part, Sample, Turn

        sample_turns, image = [], [Part("image", media=0)]
        for kind, words, answer in turns:
            question, reply = spoken(kind, words, answer)
            sample_turns += [Turn("user", image + [Part("text", question)]),
                             Turn("assistant", [Part("text", reply)])]
            image = []
        encoded = self.processor.encode(Sample("chat", sample_turns, [MediaRef("image", data=self.image)],
                                               "binding testbed"))
        ids, targets = encoded.input_ids.tolist(), encoded.targets.tolist()
        # each assistant turn is one run of supervised targets: its answer, <|im_end|> and the line break
        edges = np.flatnonzero(np.diff(np.r_[0, np.array(targets) != IGNORE, 0]))  # run starts, stops
        assert len(edges) == 2 * len(turns), "one supervised run per answer"
        spans = zip(edges[::2].tolist(), edges[1::2].tolist())
        return ids, targets, [(start, stop, kind) for (start, stop), (kind, _, _) in zip(spans, turns)]


def cell_mixing(grid: int) -> torch.Tensor:
    """(grid^2, 9): the share of image token t's area that lies in cell c (rows sum to 1)."""
    def spans(n):
        return [(i / n, (i + 1) / n) for i in range(n)]

    def overlap(a, b):
        return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))

    mix = torch.zeros(grid * grid, NUM_CELLS)
    for (t, (ty, tx)), (c, (cy, cx)) in itertools.product(
            enumerate(itertools.product(spans(grid), repeat=2)),
            enumerate(itertools.product(spans(3), repeat=2))):
        mix[t, c] = overlap(ty, cy) * overlap(tx, cx)
    return mix / mix.sum(1, keepdim=True)


class Batch(NamedTuple):
    input_ids_BT: torch.Tensor
    targets_BT: torch.Tensor  # target of position t (the token at t + 1), IGNORE elsewhere
    segment_ids_BT: torch.Tensor  # 1 on tokens, 0 on padding
    cells_BC3: torch.Tensor  # (colour, shape, cell) of each of the 9 cells; empty = (6, 5, cell)
    scene_B: torch.Tensor  # the index of each row's scene in the scenes given to make_batch
    answers: list[list[tuple[int, int, str]]]  # per row (start, stop, type): start..stop-1 predict it


def own_words(turns: list[tuple[str, list[int], int]], grid: int) -> tuple[list[int], list[int], list]:
    """ids, targets and (start, stop, type) of each answer of one dialog in the testbed's own words."""
    ids = [WORDS.bos] + [WORDS.image] * grid * grid
    targets = [IGNORE] * len(ids)
    answers = []
    for kind, question, answer in turns:
        prompt = question + list(WORDS.template)
        ids += prompt
        targets += [IGNORE] * (len(prompt) - 1) + [answer]
        answers.append((len(ids) - 1, len(ids), kind))
        ids += [answer, WORDS.eos]
        targets += [WORDS.eos, IGNORE]
    return ids, targets, answers


def make_batch(scenes, rng: np.random.Generator, grid: int, one_question: bool = False,
               every: bool = False, text: ChatText | None = None) -> Batch:
    """One row per scene holding its dialog, or with ``one_question`` one row per question (how the
    held-out questions are scored: in a dialog, earlier turns give away part of later answers).
    ``every``: the dialogs ask every question the scene answers (``draw_questions``); ``text``: the
    dialogs in the chat template's text (else the testbed's own words)."""
    dialogs = [(k, scene, draw_questions(scene, rng, every)) for k, scene in enumerate(scenes)]
    if one_question:
        dialogs = [(k, scene, [turn]) for k, scene, turns in dialogs for turn in turns]
    rows, targets, answers, cells = [], [], [], []
    for _, scene, turns in dialogs:
        ids, tgt, row_answers = text.encode(turns) if text else own_words(turns, grid)
        rows.append(ids), targets.append(tgt), answers.append(row_answers)
        grid_cells = [(len(COLOURS), len(SHAPES), c) for c in range(NUM_CELLS)]
        for colour, shape, cell in scene:
            grid_cells[cell] = (colour, shape, cell)
        cells.append(grid_cells)
    T = max(map(len, rows))
    input_ids = torch.full((len(rows), T), text.pad_id if text else WORDS.eos)
    target_ids = torch.full((len(rows), T), IGNORE)
    segments = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (ids, tgt) in enumerate(zip(rows, targets)):
        input_ids[i, :len(ids)], target_ids[i, :len(tgt)], segments[i, :len(ids)] = \
            torch.tensor(ids), torch.tensor(tgt), 1
    return Batch(input_ids, target_ids, segments, torch.tensor(cells), torch.tensor([k for k, _, _ in dialogs]),
                 answers)


def scored(predicted_BT: torch.Tensor, batch: Batch) -> list[tuple[str, bool]]:
    """(type, right) of each answer: right when every token predicted for it is its target."""
    return [(kind, torch.equal(predicted_BT[i, start:stop], batch.targets_BT[i, start:stop]))
            for i, row in enumerate(batch.answers) for start, stop, kind in row]


class IdealTokens(nn.Module):
    """The image tokens: area-weighted sums of colour, shape and place embeddings (see above)."""

    def __init__(self, dim: int, grid: int, place: bool, blind: bool, shape_seen: float = 1.0) -> None:
        super().__init__()
        self.colour = nn.Parameter(torch.randn(len(COLOURS) + 1, dim))
        # rows: the shapes, empty, and (when shapes may go unseen) "some shape"
        self.shape = nn.Parameter(torch.randn(len(SHAPES) + (1 if shape_seen >= 1 else 2), dim))
        self.place = nn.Parameter(torch.randn(NUM_CELLS, dim)) if place else None
        self.register_buffer("mix_GC", cell_mixing(grid))
        self.blind, self.shape_seen = blind, shape_seen

    def forward(self, cells_BC3: torch.Tensor) -> torch.Tensor:
        if self.blind:
            cells_BC3 = cells_BC3.clone()
            cells_BC3[..., 0], cells_BC3[..., 1] = len(COLOURS), len(SHAPES)
        if self.shape_seen < 1:
            unseen_BC = (cells_BC3[..., 1] < len(SHAPES)) & (torch.rand(cells_BC3.shape[:2]) >= self.shape_seen)
            cells_BC3 = cells_BC3.clone()
            cells_BC3[..., 1] = torch.where(unseen_BC, len(SHAPES) + 1, cells_BC3[..., 1])
        cell_BCD = self.colour[cells_BC3[..., 0]] + self.shape[cells_BC3[..., 1]]
        if self.place is not None:
            cell_BCD = cell_BCD + self.place[cells_BC3[..., 2]]
        return torch.einsum("gc,bcd->bgd", self.mix_GC, cell_BCD)


class WorldTokens:
    """A trained run's image tokens (its vision encoder and projector, frozen) for the images of a
    shapes world, with each image's scene as ``draw_scene`` writes one."""

    def __init__(self, run_dir: str | Path, world: str | Path, grid: int, width: int) -> None:
        from aria.inference import load_model
        from data_tools.make_shapes import plans_of
        from data_tools.probe_shapes import image_features

        world = Path(world)
        plan_train, plan_test = plans_of(world)
        model = load_model(run_dir).eval()
        self.scenes, self.tokens_NGD = {}, {}
        for split, plan in (("train", plan_train), ("test", plan_test)):
            features, _ = image_features(model, [world / "images" / f"{split}_{i:06d}.png" for i in range(len(plan))])
            tokens_NF = features["projector output"]
            per_image = tokens_NF.shape[1] // width
            if per_image * width != tokens_NF.shape[1] or per_image != grid * grid:
                raise ValueError(f"--tokens-from {run_dir}: its image tokens ({tokens_NF.shape[1]} values per "
                                 f"image) are not grid x grid = {grid * grid} tokens of the language model's "
                                 f"width {width}; choose --grid and --model to match the run")
            self.tokens_NGD[split] = tokens_NF.view(len(plan), per_image, width)
            self.scenes[split] = [[(list(COLOURS).index(o.colour), SHAPES.index(o.shape), POSITIONS.index(o.position))
                                   for o in scene.shapes] for scene, _ in plan]


@functools.lru_cache(maxsize=1)
def world_tokens(run_dir: str, world: str, grid: int, width: int) -> WorldTokens:
    """``WorldTokens``, computed once for the runs of several seeds."""
    return WorldTokens(run_dir, world, grid, width)


def run(model_name: str = "tiny", steps: int = 1000, batch_size: int = 40, grid: int = 3,
        place: bool = True, blind: bool = False, lr: float = 1e-3, init_std: float | None = None,
        warmup: int = 20, seed: int = 0, eval_every: int = 250, eval_scenes: int = 600,
        shape_seen: float = 1.0, schedule: str = "cosine", min_lr_ratio: float = 0.0, pool: int = 0,
        questions: str = "four", tokenizer: str | Path | None = None,
        tokens_from: tuple[str | Path, str | Path] | None = None, log=print) -> dict:
    """Trains the model's language model on ideal tokens; returns the accuracy history.
    ``init_std``: the language model's ``initializer_range`` (default: the config's); ``questions``:
    what a training dialog asks, "four" (one of each type) or "every" (``draw_questions``);
    ``tokenizer``: the dialogs in the chat template's text, tokenized by it (``ChatText``);
    ``tokens_from``: (run, world) whose frozen image tokens replace the ideal ones (``WorldTokens``)."""
    if questions not in QUESTIONS:
        raise ValueError(f"questions must be one of {QUESTIONS}, got {questions!r}")
    from aria.config import OptimConfig, load_model_config
    from aria.model.aria import Aria
    from aria.train.schedule import lr_multiplier

    torch.manual_seed(seed)
    cfg = load_model_config(model_name)
    if init_std is not None:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, initializer_range=init_std))
    text = ChatText(tokenizer, cfg, grid) if tokenizer else None
    image_id = text.image_id if text else WORDS.image
    model = Aria(cfg)
    model.init_weights(seed)
    decoder, lm_head = model.decoder, model.lm_head
    world = world_tokens(*map(str, tokens_from), grid, cfg.text.hidden_size) if tokens_from else None
    tokens = IdealTokens(cfg.text.hidden_size, grid, place, blind, shape_seen)
    params = list(decoder.parameters()) + list(lm_head.parameters())
    optimizer = torch.optim.AdamW(params + ([] if world else list(tokens.parameters())), lr=lr,
                                  betas=(0.9, 0.95), weight_decay=0.0)

    def hidden(batch: Batch, image_NGD: torch.Tensor | None = None):
        """``image_NGD``: the world's tokens of the scenes the batch was made from (else ideal ones)."""
        embeds_BTD = decoder.embed(batch.input_ids_BT)
        image_BT = batch.input_ids_BT == image_id
        image_BGD = tokens(batch.cells_BC3) if image_NGD is None else image_NGD[batch.scene_B]
        embeds_BTD = embeds_BTD.masked_scatter(image_BT[..., None], image_BGD.to(embeds_BTD.dtype))
        return decoder(embeds_BTD, None, batch.segment_ids_BT, None, batch.segment_ids_BT > 0)

    @torch.no_grad()
    def accuracy() -> dict[str, float]:
        decoder.eval()
        rng = np.random.default_rng([seed, 1])  # held-out scenes: another stream than training's
        right = {q: [0, 0] for q in QTYPES}
        held_out = len(world.scenes["test"]) if world else eval_scenes
        for start in range(0, held_out, 100):
            stop = min(start + 100, held_out)
            if world:
                scenes, image_NGD = world.scenes["test"][start:stop], world.tokens_NGD["test"][start:stop]
            else:
                scenes, image_NGD = [draw_scene(rng) for _ in range(stop - start)], None
            batch = make_batch(scenes, rng, grid, one_question=True, text=text)
            for kind, correct in scored(lm_head(hidden(batch, image_NGD).hidden_BTD).argmax(-1), batch):
                right[kind][0] += correct
                right[kind][1] += 1
        decoder.train()
        return {q: a / n for q, (a, n) in right.items()}

    lr_at = lr_multiplier(OptimConfig(lr=lr, schedule=schedule, warmup_steps=warmup,
                                      min_lr_ratio=min_lr_ratio), steps)
    rng = np.random.default_rng([seed, 0])
    pool_rng = np.random.default_rng([seed, 2])  # the fixed training scenes, if any
    scenes = [draw_scene(pool_rng) for _ in range(pool)]
    if world:
        scenes, pool = world.scenes["train"], len(world.scenes["train"])
    history, start = [], time.time()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_at(step - 1)
        picked = rng.integers(pool, size=batch_size) if pool else None
        drawn = [scenes[i] for i in picked] if pool else [draw_scene(rng) for _ in range(batch_size)]
        batch = make_batch(drawn, rng, grid, every=questions == "every", text=text)
        out = hidden(batch, world.tokens_NGD["train"][picked] if world else None)
        logits_BTV = lm_head(out.hidden_BTD)
        loss = F.cross_entropy(logits_BTV.flatten(0, 1), batch.targets_BT.flatten(), ignore_index=IGNORE)
        (loss + cfg.moe.aux_loss_coeff * out.aux_loss_L.sum()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % eval_every == 0 or step == steps:
            entry = {"step": step, "loss": loss.item(), "seconds": time.time() - start, **accuracy()}
            history.append(entry)
            log(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()))
    return {"settings": dict(model=model_name, steps=steps, batch_size=batch_size, grid=grid,
                             place=place, shape_seen=shape_seen, blind=blind, lr=lr,
                             init_std=cfg.text.initializer_range, schedule=schedule,
                             min_lr_ratio=min_lr_ratio, pool=pool, questions=questions,
                             tokenizer=str(tokenizer) if tokenizer else None,
                             tokens_from=[str(p) for p in tokens_from] if tokens_from else None, seed=seed),
            "history": history}


def report(result: dict) -> str:
    last = result["history"][-1]
    return (f"after {last['step']} steps of {result['settings']['batch_size']} scenes: "
            + " / ".join(f"{q} {100 * last[q]:.1f}%" for q in QTYPES)
            + f" (chance: colour {100 / len(COLOURS):.0f}, shape {100 / len(SHAPES):.0f}, "
              f"position {100 / NUM_CELLS:.0f}, count {100 / MAX_SHAPES:.0f})")


def seeds_report(result: dict) -> str:
    lines = [f"seed {r['settings']['seed']}: {report(r)}" for r in result["runs"]]
    for name in ("mean", "lowest"):
        lines.append(f"{name} of {len(result['runs'])} seeds: "
                     + " / ".join(f"{q} {100 * result[name][q]:.1f}%" for q in QTYPES))
    return "\n".join(lines)


def over_seeds(train, seeds: list[int]) -> dict:
    """``train(seed)`` for each seed: their results, and the mean and lowest final accuracy per type."""
    runs = [train(seed) for seed in seeds]
    finals = [r["history"][-1] for r in runs]
    return {"runs": runs, "mean": {q: float(np.mean([f[q] for f in finals])) for q in QTYPES},
            "lowest": {q: min(f[q] for f in finals) for q in QTYPES}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.binding_testbed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="model config whose language model learns (name or YAML)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=40, help="scenes (dialogs) per step")
    parser.add_argument("--grid", type=int, default=3, help="image tokens per side (3: one per cell)")
    parser.add_argument("--no-place", action="store_true", help="tokens without the place embedding")
    parser.add_argument("--shape-seen", type=float, default=1.0,
                        help="probability that a token shows an object's shape (else 'some shape')")
    parser.add_argument("--blind", action="store_true", help="control: every token shows an empty scene")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--init-std", type=float, default=None,
                        help="the language model's initializer_range (default: the model config's; "
                             "recipe=quickstart uses 0.1)")
    parser.add_argument("--schedule", default="cosine", choices=("cosine", "linear", "constant", "anneal"),
                        help="the learning-rate schedule after warm-up (aria.train.schedule)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.0,
                        help="where a decaying schedule ends, as a fraction of --lr (the recipes: 0.1)")
    parser.add_argument("--pool", type=int, default=0,
                        help="draw training scenes from a fixed set of this many (a world's training "
                             "images; 0: fresh scenes every step)")
    parser.add_argument("--questions", default="four", choices=QUESTIONS,
                        help="a training dialog's questions: one of each type, or every question "
                             "the scene answers (held-out scoring is the same for both)")
    parser.add_argument("--tokenizer", default=None,
                        help="a trained tokenizer directory: the dialogs in the chat template's text "
                             "(the world's sentences, multi-token answers) instead of the testbed's own words")
    parser.add_argument("--tokens-from", nargs=2, metavar=("RUN", "WORLD"), default=None,
                        help="a trained run's frozen image tokens of a shapes world's images instead "
                             "of ideal ones (its training images are the pool, its test images held out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1,
                        help="train this many models, seeds --seed, --seed + 1, ...: each one's accuracy, "
                             "and the mean and lowest per type")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--json", type=Path, default=None, help="also write the settings and history here")
    args = parser.parse_args(argv)
    if args.grid < 1 or args.steps < 1 or args.batch < 1 or args.seeds < 1:
        parser.error("--grid, --steps, --batch and --seeds must be >= 1")
    if not 0 <= args.shape_seen <= 1:
        parser.error(f"--shape-seen must be in [0, 1], got {args.shape_seen}")
    if args.tokens_from and (args.pool or args.blind or args.no_place or args.shape_seen < 1):
        parser.error("--tokens-from takes the run's tokens of the world's images: no --pool, --blind, "
                     "--no-place or --shape-seen with it")
    if args.pool < 0:
        parser.error(f"--pool must be >= 0, got {args.pool}")
    if not 0 <= args.min_lr_ratio <= 1:
        parser.error(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    def train(seed: int) -> dict:
        return run(args.model, args.steps, args.batch, args.grid, not args.no_place, args.blind, args.lr,
                   args.init_std, seed=seed, eval_every=args.eval_every, shape_seen=args.shape_seen,
                   schedule=args.schedule, min_lr_ratio=args.min_lr_ratio, pool=args.pool,
                   questions=args.questions, tokenizer=args.tokenizer, tokens_from=args.tokens_from)

    if args.seeds == 1:
        return run_report("binding_testbed", lambda: train(args.seed), report, args.json)
    seeds = list(range(args.seed, args.seed + args.seeds))
    return run_report("binding_testbed", lambda: over_seeds(train, seeds), seeds_report, args.json)


if __name__ == "__main__":
    sys.exit(main())
