"""The binding testbed: its token mixing, its questions' answers, and that the language model learns
from ideal tokens and not without them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from aria.config import load_model_config
from aria.convert.checkpoint import save_model_dir
from aria.data.tokenizer import Tokenizer
from aria.model.aria import Aria
from data_tools import binding_testbed as bt
from data_tools.make_shapes import COLOURS, POSITIONS, SHAPES, make_shapes
from data_tools.train_tokenizer import train as train_tokenizer


def test_cell_mixing_is_the_area_share_of_each_cell():
    assert torch.equal(bt.cell_mixing(3), torch.eye(9))
    mix = bt.cell_mixing(4)
    assert mix.shape == (16, 9) and torch.allclose(mix.sum(1), torch.ones(16))
    # token 0 covers [0, 1/4)^2: inside cell 0 (the top left, [0, 1/3)^2)
    assert torch.allclose(mix[0], torch.eye(9)[0])
    # token 1 covers x in [1/4, 1/2): 1/12 of its 1/4 width in cell 0, 2/12 in cell 1
    assert torch.allclose(mix[1, :2], torch.tensor([1 / 3, 2 / 3])) and mix[1, 2:].sum() == 0
    # token 5 covers [1/4, 1/2)^2: the same split on both axes over cells 0, 1, 3, 4
    assert torch.allclose(mix[5, [0, 1, 3, 4]], torch.tensor([1 / 9, 2 / 9, 2 / 9, 4 / 9]))


def _answer_from_scene(scene, question):
    """The answer derived from the scene and the question's words, independently of draw_questions."""
    w = bt.WORDS
    kind = bt.QTYPES[w.question.index(question[0])]
    words = question[1:-1]
    if kind == "count":
        return w.count[len(scene) - 1]
    if kind == "colour":
        (colour,) = [c for c, s, _ in scene if s == w.shape.index(words[0])]  # a unique shape
        return w.colour[colour]
    if kind == "shape":
        (shape,) = [s for _, s, p in scene if p == w.place.index(words[0])]
        return w.shape[shape]
    (cell,) = [p for c, s, p in scene if c == w.colour.index(words[0]) and s == w.shape.index(words[1])]
    return w.place[cell]


@pytest.mark.parametrize("grid, every", [(3, False), (4, False), (4, True)])
def test_every_target_is_the_answer_the_scene_gives(grid, every):
    rng = np.random.default_rng(0)
    scenes = [bt.draw_scene(rng) for _ in range(50)]
    batch = bt.make_batch(scenes, rng, grid, every=every)
    ids, targets = batch.input_ids_BT, batch.targets_BT
    kinds = set()
    for i, (scene, row) in enumerate(zip(scenes, batch.answers)):
        assert (ids[i, 1:1 + grid * grid] == bt.WORDS.image).all()
        # every supervised position is an answer or the end token after one
        supervised = (targets[i] != bt.IGNORE).nonzero().flatten().tolist()
        assert supervised == sorted([p for p, _, _ in row] + [p + 1 for p, _, _ in row])
        for position, stop, kind in row:
            assert stop == position + 1  # one answer token
            kinds.add(kind)
            start = max(j for j in range(position) if ids[i, j].item() in bt.WORDS.question)
            question = ids[i, start:position + 1 - len(bt.WORDS.template)].tolist()
            assert targets[i, position] == ids[i, position + 1] == _answer_from_scene(scene, question)
            assert targets[i, position + 1] == bt.WORDS.eos
        # the cells: empty ones are (no colour, no shape, their cell)
        occupied = {p: (c, s) for c, s, p in scene}
        for cell, (c, s, p) in enumerate(batch.cells_BC3[i].tolist()):
            assert p == cell and (c, s) == occupied.get(cell, (len(COLOURS), len(SHAPES)))
    assert kinds == set(bt.QTYPES)


def test_every_question_dialogs_ask_each_objects_questions_once():
    """--questions every: per object its shape (by place), its place (by colour and shape) and, when
    its shape is unique in the scene, its colour (by shape); one count; in a random order."""
    w = bt.WORDS
    rng = np.random.default_rng(3)
    orders = set()
    for _ in range(200):
        scene = bt.draw_scene(rng)
        shapes = [s for _, s, _ in scene]
        expected = [("count", (w.question[3], w.question_mark))]
        for colour, shape, cell in scene:
            expected += [("shape", (w.question[1], w.place[cell], w.question_mark)),
                         ("position", (w.question[2], w.colour[colour], w.shape[shape], w.question_mark))]
            if shapes.count(shape) == 1:
                expected.append(("colour", (w.question[0], w.shape[shape], w.question_mark)))
        asked = bt.draw_questions(scene, rng, every=True)
        assert sorted((kind, tuple(words)) for kind, words, _ in asked) == sorted(expected)
        assert 4 <= len(asked) <= 10
        orders.add(tuple(kind for kind, _, _ in asked))
    assert len(orders) > 20  # shuffled, not a fixed order


def test_every_question_dialogs_train_and_the_four_types_are_scored(monkeypatch):
    """run(questions="every") asks every question in the training dialogs only: the held-out rows
    stay one of each type, as the quickstart's test split asks them."""
    calls = []
    make_batch = bt.make_batch

    def recording(scenes, rng, grid, one_question=False, every=False, text=None):
        calls.append((one_question, every))
        return make_batch(scenes, rng, grid, one_question, every, text)

    monkeypatch.setattr(bt, "make_batch", recording)
    result = bt.run(steps=3, batch_size=4, questions="every", eval_every=3, eval_scenes=10, log=lambda _: None)
    assert sorted(set(calls)) == [(False, True), (True, False)]
    assert result["settings"]["questions"] == "every"
    with pytest.raises(ValueError, match="questions"):
        bt.run(steps=1, questions="all")


def test_one_question_rows_hold_the_dialogs_turns_one_by_one():
    scenes = [bt.draw_scene(np.random.default_rng(1)) for _ in range(20)]
    dialogs = bt.make_batch(scenes, np.random.default_rng(2), 3)
    single = bt.make_batch(scenes, np.random.default_rng(2), 3, one_question=True)

    def turns(batch, i):  # (type, question word ids through the answer) of row i's turns
        ids = batch.input_ids_BT[i].tolist()
        starts = [max(j for j in range(p) if ids[j] in bt.WORDS.question) for p, _, _ in batch.answers[i]]
        return [(kind, ids[start:p + 2]) for start, (p, _, kind) in zip(starts, batch.answers[i])]

    expected = [turn for i in range(len(scenes)) for turn in turns(dialogs, i)]
    got = [turns(single, i) for i in range(len(single.answers))]
    assert all(len(row) == 1 for row in got) and [row[0] for row in got] == expected
    # each row's image shows its own scene
    rows_per_scene = [len(row) for row in dialogs.answers]
    assert torch.equal(single.cells_BC3, dialogs.cells_BC3.repeat_interleave(torch.tensor(rows_per_scene), 0))
    assert torch.equal(dialogs.scene_B, torch.arange(len(scenes)))
    assert torch.equal(single.scene_B, torch.arange(len(scenes)).repeat_interleave(torch.tensor(rows_per_scene)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = tmp_path_factory.mktemp("world")
    make_shapes(world, seed=0, train_images=40, test_images=2, train_videos=2, test_videos=1, wds=False,
                workers=1)
    return world


@pytest.fixture(scope="module")
def tokenizer_dir(world, tmp_path_factory):
    return train_tokenizer([str(world / "chat_train.jsonl"), str(world / "text_train.jsonl")],
                           tmp_path_factory.mktemp("tokenizer"), vocab_size=600)


def _answer_from_question(scene, question: str) -> str:
    """The scene's answer to a question in the shapes world's words, read from the sentence."""
    objects = [(list(COLOURS)[c], SHAPES[s], POSITIONS[p]) for c, s, p in scene]
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        (colour,) = [c for c, s, _ in objects if s == m[1]]  # asked only when the shape is unique
        return colour
    if m := re.fullmatch(r"What shape is (?:at|on|in) the ([\w ]+)\?", question):
        (shape,) = [s for _, s, p in objects if p == m[1]]
        return shape
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        (place,) = [p for c, s, p in objects if (c, s) == (m[1], m[2])]
        return place
    assert question == "How many shapes are there?", question
    return str(len(objects))


@pytest.mark.parametrize("one_question", [False, True])
def test_chat_text_rows_are_the_worlds_questions_and_the_scenes_answers(tokenizer_dir, one_question):
    """--tokenizer: a row is the chat template's text of the world's questions about its scene, after
    one image block of grid x grid tokens; each answer's scored targets are the scene's answer and
    the end of its turn."""
    tok = Tokenizer.load(tokenizer_dir)
    text = bt.ChatText(tokenizer_dir, load_model_config("tiny"), grid=4)
    rng = np.random.default_rng(0)
    scenes = [bt.draw_scene(rng) for _ in range(40)]
    batch = bt.make_batch(scenes, rng, 4, one_question=one_question, every=True, text=text)
    answers, kinds = 0, set()
    for i, row in enumerate(batch.answers):
        scene = [(c, s, p) for c, s, p in batch.cells_BC3[i].tolist() if c < len(COLOURS)]  # its objects
        ids = batch.input_ids_BT[i][batch.segment_ids_BT[i] > 0].tolist()
        assert ids.count(tok.image_id) == 16
        rendered = tok.decode(ids)
        assert rendered.startswith("<|im_start|>user\n<fim_prefix>" + "<|img|>" * 16 + "<fim_suffix>")
        questions = re.findall(r"<\|im_start\|>user\n(?:<fim_prefix>(?:<\|img\|>)+<fim_suffix>)?(.*?)<\|im_end\|>",
                               rendered)
        assert len(questions) == len(row) and (len(row) == 1 or not one_question)
        for question, (start, stop, kind) in zip(questions, row):
            expected = _answer_from_question(scene, question)
            assert tok.decode(batch.targets_BT[i, start:stop].tolist()) == f"{expected}<|im_end|>\n"
            answers, kinds = answers + 1, kinds | {kind}
        supervised = (batch.targets_BT[i] != bt.IGNORE).sum().item()
        assert supervised == sum(stop - start for start, stop, _ in row)  # nothing else is learnt
    assert kinds == set(bt.QTYPES) and answers > 150


def test_an_answer_is_right_only_when_all_its_tokens_are(tokenizer_dir):
    text = bt.ChatText(tokenizer_dir, load_model_config("tiny"), grid=4)
    rng = np.random.default_rng(1)
    batch = bt.make_batch([bt.draw_scene(rng) for _ in range(8)], rng, 4, text=text)
    perfect_BT = torch.where(batch.targets_BT == bt.IGNORE, 0, batch.targets_BT)
    assert all(right for _, right in bt.scored(perfect_BT, batch))
    # "top left" and its end of turn are several tokens: one wrong token makes the answer wrong
    start, stop, kind = next(a for a in batch.answers[0] if a[1] - a[0] > 2)
    wrong_BT = perfect_BT.clone()
    wrong_BT[0, stop - 2] += 1  # the <|im_end|> after the answer
    scored = bt.scored(wrong_BT, batch)
    assert sum(not right for _, right in scored) == 1 and (kind, False) in scored


def test_a_run_in_chat_text_trains_and_scores_the_four_types(tokenizer_dir):
    result = bt.run(steps=2, batch_size=4, grid=4, tokenizer=tokenizer_dir, eval_every=2, eval_scenes=20,
                    log=lambda _: None)
    last = result["history"][-1]
    assert result["settings"]["tokenizer"] == str(tokenizer_dir) and np.isfinite(last["loss"])
    assert all(0 <= last[q] <= 1 for q in bt.QTYPES)
    with pytest.raises(ValueError, match="--grid"):  # tiny's crops give 16 or 32 tokens, not 9
        bt.ChatText(tokenizer_dir, load_model_config("tiny"), grid=3)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A model=tiny model directory, as a trained run's vision encoder and projector would be read."""
    cfg = load_model_config("tiny")
    model = Aria(cfg)
    model.init_weights(3)
    directory = tmp_path_factory.mktemp("run")
    save_model_dir(model.state_dict(), cfg, directory)
    return directory, model.eval()


def test_world_tokens_are_the_runs_image_tokens_of_each_image_and_its_scene(world, run_dir):
    directory, model = run_dir
    width = model.cfg.text.hidden_size
    tokens = bt.WorldTokens(directory, world, grid=4, width=width)
    for split in ("train", "test"):
        n = len(list((world / "images").glob(f"{split}_*.png")))
        assert tokens.tokens_NGD[split].shape == (n, 16, width) and len(tokens.scenes[split]) == n
    caption = json.loads((world / "image_caption_train.jsonl").read_text().splitlines()[5])
    assert caption["images"] == ["images/train_000005.png"]
    pixels = torch.from_numpy(np.asarray(Image.open(world / caption["images"][0]).convert("RGB")))
    with torch.no_grad():
        expected = model.projector(*model.vision(pixels.permute(2, 0, 1)[None].contiguous()))[0]
    torch.testing.assert_close(tokens.tokens_NGD["train"][5], expected)
    # the scene, read back from the caption's words ("A red circle at the top left and ...")
    scene = tokens.scenes["train"][5]
    places = "|".join(sorted(POSITIONS, key=len, reverse=True))  # "top left" before "top"
    said = re.findall(rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) (?:at|on|in) the ({places})\b", caption["text"])
    assert sorted(said) == sorted((list(COLOURS)[c], SHAPES[s], POSITIONS[p]) for c, s, p in scene)
    with pytest.raises(ValueError, match="--grid"):
        bt.WorldTokens(directory, world, grid=3, width=width)


def test_a_run_on_a_runs_tokens_trains_on_its_images_and_scores_its_test_images(world, run_dir, tokenizer_dir):
    result = bt.run(steps=2, batch_size=4, grid=4, tokenizer=tokenizer_dir, tokens_from=(run_dir[0], world),
                    eval_every=2, log=lambda _: None)
    last = result["history"][-1]
    assert result["settings"]["pool"] == 40 and np.isfinite(last["loss"])
    assert all(0 <= last[q] <= 1 for q in bt.QTYPES)


@pytest.mark.slow
def test_the_language_model_learns_from_ideal_tokens_and_not_blind():
    common = dict(steps=250, batch_size=32, init_std=0.1, eval_every=250, eval_scenes=300, log=lambda _: None)
    seeing = bt.run(**common)["history"][-1]
    blind = bt.run(blind=True, **common)["history"][-1]
    # chance: colour 1/6, count 1/3; with the tokens the counts are read at once and colours bind;
    # blind, the held-out questions (one per row) are at chance
    assert seeing["count"] > 0.9 and seeing["colour"] > 0.45, seeing
    assert blind["count"] < 0.45 and blind["colour"] < 0.25, blind


def test_unseen_shapes_leave_colour_and_place():
    """--shape-seen 0: two scenes that differ only in a shape give the same tokens, which still
    differ from an empty scene's; --shape-seen 1: the two differ."""
    one, other = [(0, 0, 4)], [(0, 1, 4)]
    cells = bt.make_batch([one, other], np.random.default_rng(0), grid=3).cells_BC3
    empty = torch.tensor([[(len(COLOURS), len(SHAPES), c) for c in range(bt.NUM_CELLS)]])
    for seen, same in ((0.0, True), (1.0, False)):
        torch.manual_seed(0)
        tokens = bt.IdealTokens(8, grid=3, place=True, blind=False, shape_seen=seen)
        tokens_BGD = tokens(torch.cat([cells, empty]))
        assert torch.equal(tokens_BGD[0], tokens_BGD[1]) == same
        assert not torch.equal(tokens_BGD[0, 4], tokens_BGD[2, 4])  # the object shows where it is


def test_a_pool_gives_the_same_few_training_scenes(monkeypatch):
    """--pool N: every training batch draws its scenes from one fixed set of N; without it, fresh
    scenes every step. Held-out scenes (one question per row) are not from the pool."""
    seen = {"train": [], "held_out": []}
    make_batch = bt.make_batch

    def recording(scenes, rng, grid, one_question=False, every=False, text=None):
        seen["held_out" if one_question else "train"].extend(map(tuple, scenes))
        return make_batch(scenes, rng, grid, one_question, every, text)

    monkeypatch.setattr(bt, "make_batch", recording)
    for pool in (3, 0):
        seen = {"train": [], "held_out": []}
        bt.run(steps=4, batch_size=8, pool=pool, eval_every=4, eval_scenes=50, log=lambda _: None)
        distinct = set(seen["train"])
        assert len(seen["train"]) == 32
        assert (len(distinct) == 3) if pool else (len(distinct) > 20), distinct
        if pool:
            assert not distinct & set(seen["held_out"])


def test_the_learning_rate_follows_the_trainers_anneal_schedule(monkeypatch):
    """--schedule anneal --min-lr-ratio 0.1 over 30 steps (20 warm-up): a linear ramp from lr/20,
    the peak held, then a linear decay over the last 6 steps to 0.1 lr."""
    rates = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    bt.run(steps=30, batch_size=2, lr=1e-3, schedule="anneal", min_lr_ratio=0.1, eval_every=30,
           eval_scenes=10, log=lambda _: None)
    expected = [1e-3 * (i + 1) / 20 for i in range(20)] + [1e-3] * 4 + \
        [1e-3 * (1 - 0.9 * k / 5) for k in range(6)]
    assert rates == pytest.approx(expected)


def test_seeds_train_one_model_each_and_report_their_mean_and_lowest(tmp_path, capsys):
    """--seed 3 --seeds 2: the runs of seeds 3 and 4, each what --seed alone gives, and the mean and
    lowest of their final accuracies per type."""
    common = ["--steps", "3", "--batch", "4", "--eval-every", "3"]
    assert bt.main(common + ["--seed", "3", "--seeds", "2", "--json", str(tmp_path / "both.json")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "both.json").read_text())
    assert [r["settings"]["seed"] for r in result["runs"]] == [3, 4]
    for seed, run in zip((3, 4), result["runs"]):
        assert bt.main(common + ["--seed", str(seed), "--json", str(tmp_path / "one.json")]) == 0
        alone = json.loads((tmp_path / "one.json").read_text())["history"][-1]
        assert {k: v for k, v in run["history"][-1].items() if k != "seconds"} == \
            {k: v for k, v in alone.items() if k != "seconds"}
    finals = [r["history"][-1] for r in result["runs"]]
    for q in bt.QTYPES:
        assert result["mean"][q] == pytest.approx((finals[0][q] + finals[1][q]) / 2)
        assert result["lowest"][q] == min(finals[0][q], finals[1][q])
    assert "seed 3: after 3 steps" in printed and "seed 4: after 3 steps" in printed
    assert "mean of 2 seeds: colour" in printed and "lowest of 2 seeds: colour" in printed


@pytest.mark.parametrize("argv, flag", [(["--grid", "0"], "--grid"), (["--shape-seen", "1.5"], "--shape-seen"),
                                        (["--min-lr-ratio", "2"], "--min-lr-ratio"), (["--pool", "-1"], "--pool"),
                                        (["--questions", "all"], "--questions"), (["--seeds", "0"], "--seeds"),
                                        (["--tokens-from", "RUN", "WORLD", "--pool", "5"], "--tokens-from")])
def test_bad_arguments_are_one_line(capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        bt.main(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err
