"""The shapes-world generator: determinism, schema, balance, unambiguous questions, pixels, videos, splits."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.make_shapes import (ANSWERS, COLOURS, POSITIONS, SHAPES, TEMPLATES, Scene, at, caption, main,
                                    make_shapes, plan_images, plan_videos, plans_of, position_of, render_image,
                                    render_video)

SMALL = dict(train_images=24, test_images=12, train_videos=10, test_videos=6)
PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (C, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same seed twice (inline and with a worker pool) and another seed."""
    out = {}
    for name, seed, workers in (("a", 0, 1), ("b", 0, 2), ("other", 1, 1)):
        out[name] = tmp_path_factory.mktemp(name)
        make_shapes(out[name], seed, **SMALL, workers=workers)
    return out


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Files


def test_same_seed_same_bytes_other_seed_differs(runs):
    a, b, other = (_files(runs[k]) for k in ("a", "b", "other"))
    assert a.keys() == b.keys() == other.keys()
    assert len([k for k in a if k.endswith(".png")]) == 36 and len([k for k in a if k.endswith(".mp4")]) == 16
    assert [k for k in a if a[k] != b[k]] == []
    assert a["chat_train.jsonl"] != other["chat_train.jsonl"]
    assert a["images/train_000000.png"] != other["images/train_000000.png"]


def test_first_items_do_not_depend_on_counts(tmp_path):
    make_shapes(tmp_path, 0, train_images=4, test_images=2, train_videos=2, test_videos=1, workers=1)
    big, small = plan_images(0, "train", 24, 490), plan_images(0, "train", 4, 490)
    assert big[:4] == small


def test_caption_images_add_captions_and_change_nothing_else(runs, tmp_path):
    """``caption_images`` renders the next training images and captions them, without questions or
    text: every other file of the world is the one made without them, and the test split's plan
    (``plans_of``) is the one rendered."""
    make_shapes(tmp_path, 0, **SMALL, workers=1, caption_images=7)
    plain, more = _files(runs["a"]), _files(tmp_path)
    n = SMALL["train_images"]
    added = [f"images/train_{i:06d}.png" for i in range(n, n + 7)]
    assert sorted(set(more) - set(plain)) == added
    changed = sorted(k for k in plain if plain[k] != more[k])
    assert changed == ["caption_train.jsonl", "image_caption_train.jsonl", "meta.json",
                       "wds/caption_train-000000.tar"]
    captions = _lines(tmp_path / "image_caption_train.jsonl")
    assert captions[:n] == _lines(runs["a"] / "image_caption_train.jsonl")
    assert [c["images"] for c in captions[n:]] == [[a] for a in added]
    scenes = plan_images(0, "train", n + 7, 490)[n:]
    assert [c["text"] for c in captions[n:]] == [caption(s) for s, _ in scenes]
    for (scene, _), path in zip(scenes[:2], added):
        assert np.array_equal(np.asarray(Image.open(tmp_path / path)), np.asarray(render_image(scene, 490)))
    meta = json.loads((tmp_path / "meta.json").read_text())["counts"]
    assert (meta["train"]["caption_images"], meta["train"]["images"], meta["test"]["caption_images"]) == (7, n, 0)
    plan_train, plan_test = plans_of(tmp_path)
    assert len(plan_train) == n and len(plan_test) == SMALL["test_images"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "images/test_000000.png")),
                          np.asarray(render_image(plan_test[0][0], 490)))


def test_test_split_excludes_the_caption_only_scenes(tmp_path, monkeypatch):
    """A test scene equal to a caption-only training scene is drawn again, as for a questioned one;
    ``plans_of`` excludes the same scenes."""
    import data_tools.make_shapes as ms

    excluded = {}
    real = ms.plan_images

    def recording(seed, split, n, image_size, exclude=frozenset()):
        if split == "test":
            excluded[len(excluded)] = exclude
        return real(seed, split, n, image_size, exclude)

    monkeypatch.setattr(ms, "plan_images", recording)
    make_shapes(tmp_path, 0, train_images=3, test_images=2, train_videos=1, test_videos=1, workers=1,
                wds=False, caption_images=4)
    ms.plans_of(tmp_path)
    everything = frozenset(scene for scene, _ in real(0, "train", 7, 490))
    assert excluded == {0: everything, 1: everything}


def test_records_follow_the_schema(runs):
    root = runs["a"]
    for split in ("train", "test"):
        chat = _lines(root / f"chat_{split}.jsonl")
        for r in chat:
            media = "images" if "images" in r else "video"
            assert list(r) == ["id", "qtype", "messages", media]
            user, assistant = r["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            items = user["content"]
            assert [i["type"] for i in items] == ["image" if media == "images" else "video", "text"]
            assert items[1]["text"] and assistant["content"][0]["text"] in ANSWERS[r["qtype"]]
            if media == "images":
                assert len(r["images"]) == sum(i["type"] == "image" for i in items) == 1
                paths = r["images"]
            else:
                assert set(r["video"]) == {"path", "num_frames"} and r["video"]["num_frames"] == 8
                paths = [r["video"]["path"]]
            for p in paths:
                assert not Path(p).is_absolute() and ".." not in Path(p).parts and (root / p).is_file()
        docs = _lines(root / f"caption_{split}.jsonl") + _lines(root / f"text_{split}.jsonl")
        for d in docs:
            assert list(d) in (["id", "kind", "images", "text"], ["id", "kind", "video", "text"],
                               ["id", "kind", "text"])
            assert d["text"].endswith(".")
            for p in d.get("images", []) + ([d["video"]["path"]] if "video" in d else []):
                assert not Path(p).is_absolute() and (root / p).is_file()
        n_img, n_vid = SMALL[f"{split}_images"], SMALL[f"{split}_videos"]
        assert len(chat) == 4 * n_img + n_vid and len(docs) == 2 * (n_img + n_vid)
        assert Counter(d["kind"] for d in docs) == {"caption": n_img, "video": n_vid, "text": n_img + n_vid}
        images_only = _lines(root / f"image_caption_{split}.jsonl")
        assert images_only == [d for d in _lines(root / f"caption_{split}.jsonl") if d["kind"] == "caption"]
        assert len(images_only) == n_img
        assert len({r["id"] for r in chat}) == len(chat)


def test_dialogs_ask_each_media_items_questions_once(runs):
    root = runs["a"]
    for split in ("train", "test"):
        chat, dialogs = _lines(root / f"chat_{split}.jsonl"), _lines(root / f"dialog_{split}.jsonl")
        media = lambda r: tuple(r["images"]) if "images" in r else (r["video"]["path"],)  # noqa: E731
        expected = {}
        for r in chat:
            user, assistant = r["messages"]
            expected.setdefault(media(r), []).append((user["content"][-1]["text"], assistant["content"][0]["text"]))
        assert len(dialogs) == len(expected) == SMALL[f"{split}_images"] + SMALL[f"{split}_videos"]
        orders = set()
        for d in dialogs:
            users, assistants = d["messages"][0::2], d["messages"][1::2]
            assert [m["role"] for m in users] == ["user"] * len(users) == ["user"] * len(assistants)
            assert [m["role"] for m in assistants] == ["assistant"] * len(assistants)
            kind = "image" if "images" in d else "video"
            assert [i["type"] for i in users[0]["content"]] == [kind, "text"]
            assert all([i["type"] for i in u["content"]] == ["text"] for u in users[1:])
            asked = [(u["content"][-1]["text"], a["content"][0]["text"]) for u, a in zip(users, assistants)]
            assert sorted(asked) == sorted(expected[media(d)])
            orders.add(tuple(q.split()[0] + q.split()[1] for q, _ in asked))
        assert len(orders) > 2  # the question order varies between dialogs


def test_every_question_dialogs_ask_all_an_image_answers(runs):
    """dialog_every: per image, the colour of each shape that occurs once, the shape in each occupied
    cell, the count and each shape's place, read here from the image's caption; the planned single-
    turn questions among them; videos' dialogs as in dialog_{split}.jsonl."""
    root = runs["a"]
    obj = re.compile(rf"an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) (?:at the|on the|in the) "
                     rf"({'|'.join(sorted(POSITIONS, key=len, reverse=True))})")
    for split in ("train", "test"):
        captions = {c["images"][0]: c["text"] for c in _lines(root / f"image_caption_{split}.jsonl")}
        chat = _lines(root / f"chat_{split}.jsonl")
        every = _lines(root / f"dialog_every_{split}.jsonl")
        assert [d for d in every if "video" in d] == [d for d in _lines(root / f"dialog_{split}.jsonl") if "video" in d]
        images = [d for d in every if "images" in d]
        assert sorted(d["images"][0] for d in images) == sorted(captions)
        for d in images:
            objects = obj.findall(captions[d["images"][0]].lower())
            kinds = [shape for _, shape, _ in objects]
            expected = {(f"What colour is the {shape}?", colour) for colour, shape, _ in objects
                        if kinds.count(shape) == 1}
            expected |= {(f"What shape is {at(place)}?", shape) for _, shape, place in objects}
            expected |= {(f"Where is the {colour} {shape}?", place) for colour, shape, place in objects}
            expected.add(("How many shapes are there?", str(len(objects))))
            users, assistants = d["messages"][0::2], d["messages"][1::2]
            assert users[0]["content"][0] == {"type": "image"}
            asked = [(u["content"][-1]["text"], a["content"][0]["text"]) for u, a in zip(users, assistants)]
            assert sorted(asked) == sorted(expected), captions[d["images"][0]]
            planned = {(r["messages"][0]["content"][-1]["text"], r["messages"][1]["content"][0]["text"])
                       for r in chat if r.get("images") == d["images"]}
            assert len(planned) == 4 and planned <= expected
        assert min(len(d["messages"]) // 2 for d in images) == 4 < max(len(d["messages"]) // 2 for d in images)


def test_once_dialogs_ask_each_shape_once_in_every_questions_order(runs):
    """dialog_once: of an image's dialog_every turns, in their order, the first that names each shape
    of the caption, and the count; so no shape is named twice. Videos' dialogs as in dialog_every."""
    root = runs["a"]
    obj = re.compile(rf"an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) (?:at the|on the|in the) "
                     rf"({'|'.join(sorted(POSITIONS, key=len, reverse=True))})")
    for split in ("train", "test"):
        captions = {c["images"][0]: c["text"] for c in _lines(root / f"image_caption_{split}.jsonl")}
        every, once = (_lines(root / f"dialog_{kind}_{split}.jsonl") for kind in ("every", "once"))
        assert [d for d in once if "video" in d] == [d for d in every if "video" in d]
        assert [d.get("images") for d in once] == [d.get("images") for d in every]
        turns = {}
        for d in every + once:
            if "images" in d:
                users, assistants = d["messages"][0::2], d["messages"][1::2]
                assert users[0]["content"][0] == {"type": "image"}
                turns[d["id"]] = [(u["content"][-1]["text"], a["content"][0]["text"])
                                  for u, a in zip(users, assistants)]
        for d in (d for d in every if "images" in d):
            objects = obj.findall(captions[d["images"][0]].lower())

            def subject(question: str) -> int | None:  # the caption's object a question names
                names = [(f"What colour is the {shape}?", f"What shape is {at(place)}?",
                          f"Where is the {colour} {shape}?") for colour, shape, place in objects]
                hits = [k for k, n in enumerate(names) if question in n]
                assert len(hits) == 1 or question == TEMPLATES["count"], (question, objects)
                return hits[0] if hits else None

            expected, named = [], set()
            for question, answer in turns[d["id"]]:
                if (k := subject(question)) is None or k not in named:
                    expected.append((question, answer))
                    named.add(k)
            kept = turns[d["id"].replace("_every", "_once")]
            assert kept == expected
            subjects = [subject(q) for q, _ in kept]  # each shape once, and the count
            assert subjects.count(None) == 1
            assert sorted(k for k in subjects if k is not None) == list(range(len(objects)))
        assert any(len(turns[d["id"]]) > len(turns[d["id"].replace("_every", "_once")]) for d in every if "images" in d)


def test_type_dialogs_ask_every_question_first_of_its_kind(runs):
    """dialog_type: an image's dialog_every turns split by question type (read from the question's
    template), one dialog each, the types in the order they first come, each in dialog_every's
    order, the image in each dialog's first turn; each video's dialog once."""
    root = runs["a"]
    kind_of = {template.split("{")[0].split()[0] + " " + template.split("{")[0].split()[1]: q
               for q, template in TEMPLATES.items()}
    for split in ("train", "test"):
        every, typed = (_lines(root / f"dialog_{kind}_{split}.jsonl") for kind in ("every", "type"))
        videos = [d["messages"] for d in every if "video" in d]
        assert [d["messages"] for d in typed if "video" in d] == videos
        assert len({d["id"] for d in typed}) == len(typed)
        dialogs = {}
        for d in (d for d in typed if "images" in d):
            dialogs.setdefault(d["images"][0], []).append(d)
        assert sorted(dialogs) == sorted(d["images"][0] for d in every if "images" in d)
        for d in (d for d in every if "images" in d):
            turns = [(u["content"][-1]["text"], a["content"][0]["text"])
                     for u, a in zip(d["messages"][0::2], d["messages"][1::2])]
            expected = {}
            for question, answer in turns:
                expected.setdefault(kind_of[" ".join(question.split()[:2])], []).append((question, answer))
            got = {}
            for t in dialogs[d["images"][0]]:
                users, assistants = t["messages"][0::2], t["messages"][1::2]
                assert users[0]["content"][0] == {"type": "image"}
                assert all({"type": "image"} not in u["content"] for u in users[1:])
                asked = [(u["content"][-1]["text"], a["content"][0]["text"]) for u, a in zip(users, assistants)]
                kinds = {kind_of[" ".join(q.split()[:2])] for q, _ in asked}
                assert len(kinds) == 1 and t["id"].endswith(f"_{kinds.pop()}")
                got[kind_of[" ".join(asked[0][0].split()[:2])]] = asked
            assert list(got.items()) == list(expected.items())  # the types in first-come order
    meta = json.loads((root / "meta.json").read_text())
    assert meta["counts"]["train"]["dialog_type"] == len(_lines(root / "dialog_type_train.jsonl"))


def test_meta_counts_match_files(runs):
    meta = json.loads((runs["a"] / "meta.json").read_text())
    assert meta["answers"] == {q: list(v) for q, v in ANSWERS.items()}
    for split in ("train", "test"):
        chat = _lines(runs["a"] / f"chat_{split}.jsonl")
        c = meta["counts"][split]
        assert c["chat"] == len(chat)
        assert c["qtype"] == {q: sum(r["qtype"] == q for r in chat) for q in TEMPLATES}
        for q, per_answer in c["answers"].items():  # balanced within one, on every split
            assert max(per_answer.values()) - min(per_answer.values()) <= 1, (split, q, per_answer)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="video_size"):
        make_shapes(tmp_path, 0, video_size=161)
    with pytest.raises(ValueError, match="train_images"):
        make_shapes(tmp_path, 0, train_images=-1)
    with pytest.raises(ValueError, match="caption_images"):
        make_shapes(tmp_path, 0, caption_images=-1)


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--seed", "3", "--train-images", "2", "--test-images", "1",
          "--train-videos", "1", "--test-videos", "1", "--image-size", "98", "--video-frames", "4", "--workers", "1",
          "--caption-images", "3"])
    assert "train: 2 images, 1 videos, 9 questions, 3 images with a caption only; test" in capsys.readouterr().out
    assert len(_lines(tmp_path / "image_caption_train.jsonl")) == 5
    assert len(_lines(tmp_path / "chat_test.jsonl")) == 4 + 1
    assert json.loads((tmp_path / "meta.json").read_text())["video_frames"] == 4


# ---------------------------------------------------------------------------------------------
# Questions


_PLACE = {at(p): p for p in POSITIONS}


def _resolve(scene: Scene, qtype: str, text: str) -> str:
    """Answer a question from the scene record alone, insisting that it names exactly one object."""
    objs = scene.shapes
    if qtype == "count":
        assert text == TEMPLATES["count"]
        return str(len(objs))
    if qtype == "colour":
        (shape,) = re.fullmatch(r"What colour is the (\w+)\?", text).groups()
        (hit,) = [o for o in objs if o.shape == shape]
        return hit.colour
    if qtype == "shape":
        (place,) = re.fullmatch(r"What shape is (.+)\?", text).groups()
        (hit,) = [o for o in objs if o.position == _PLACE[place]]
        return hit.shape
    if qtype == "position":
        colour, shape = re.fullmatch(r"Where is the (\w+) (\w+)\?", text).groups()
        (hit,) = [o for o in objs if (o.colour, o.shape) == (colour, shape)]
        return hit.position
    raise AssertionError(qtype)


def test_questions_are_unambiguous_and_scenes_valid():
    cell = 490 / 3
    for scene, questions in plan_images(0, "train", 400, 490):
        assert 1 <= len(scene.shapes) <= 3
        assert len({o.colour for o in scene.shapes}) == len({o.position for o in scene.shapes}) == len(scene.shapes)
        for o in scene.shapes:  # the shape's box lies inside its cell, so shapes never overlap
            row, col = divmod(POSITIONS.index(o.position), 3)
            assert col * cell < o.cx - o.r and o.cx + o.r < (col + 1) * cell
            assert row * cell < o.cy - o.r and o.cy + o.r < (row + 1) * cell
        assert [q.qtype for q in questions] == ["colour", "shape", "count", "position"]
        for q in questions:
            assert _resolve(scene, q.qtype, q.text) == q.answer, (scene, q)
    for scene, q in plan_videos(0, "train", 100, 490, 8):
        assert q.text == TEMPLATES["direction"].format(colour=scene.colour, shape=scene.shape)
        assert q.answer == scene.direction


def test_answers_balanced_and_text_alone_scores_chance():
    """Answers are uniform per type, and a lookup from question text to its most frequent answer,
    fitted on one half, scores chance on the other half."""
    half = 1500
    by_type: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for _, questions in plan_images(7, "train", 2 * half, 490):
        for q in questions:
            by_type[q.qtype].append((q.text, q.answer))
    by_type["direction"] = [(q.text, q.answer) for _, q in plan_videos(7, "train", 2 * half, 490, 8)]
    for qtype, pairs in by_type.items():
        vocab = ANSWERS[qtype]
        counts = Counter(a for _, a in pairs)
        assert set(counts) == set(vocab) and max(counts.values()) - min(counts.values()) <= 1, (qtype, counts)
        fit: dict[str, Counter] = defaultdict(Counter)
        for text, answer in pairs[:half]:
            fit[text][answer] += 1
        guess = {text: c.most_common(1)[0][0] for text, c in fit.items()}
        acc = np.mean([guess.get(text, vocab[0]) == answer for text, answer in pairs[half:]])
        assert acc < 1 / len(vocab) + 0.04, (qtype, acc)


def test_captions_name_every_shape():
    scene, _ = plan_images(0, "train", 3, 490)[2]
    text = caption(scene)
    assert text.count(" and ") == (len(scene.shapes) > 1)
    for o in scene.shapes:
        assert f"{o.colour} {o.shape} {at(o.position)}" in text


# ---------------------------------------------------------------------------------------------
# Pixels


def _nearest(pixels_N3: np.ndarray, background) -> np.ndarray:
    """Index of the nearest palette colour per pixel; len(COLOURS) for the background."""
    ref = np.concatenate([PALETTE, np.array([background], np.float32)])
    # |p - r|^2 = |p|^2 - 2 p.r + |r|^2, and |p|^2 is the same for every r (exact: integers < 2^24)
    return np.argmin((ref ** 2).sum(-1) - 2 * pixels_N3.astype(np.float32) @ ref.T, axis=1)


def test_palette_is_clearly_separable():
    dist = np.sqrt(((PALETTE[:, None] - PALETTE[None]) ** 2).sum(-1)) + 1e9 * np.eye(len(PALETTE))
    assert dist.min() > 80, dist.min()
    assert (PALETTE.min(axis=1) < 150).all()  # every background channel is >= 232


def test_rendered_shapes_have_their_colour_and_cell():
    seen = set()
    for scene, _ in plan_images(2, "test", 40, 490):
        pixels = np.asarray(render_image(scene, 490))
        assert pixels.shape == (490, 490, 3) and tuple(pixels[0, 0]) == scene.background
        for o in scene.shapes:
            assert tuple(pixels[o.cy, o.cx]) == COLOURS[o.colour], o
            ys, xs = np.nonzero((pixels == COLOURS[o.colour]).all(-1))
            assert position_of(xs.mean(), ys.mean(), 490) == o.position
            assert xs.min() >= o.cx - o.r and xs.max() <= o.cx + o.r  # inside its box, hence its cell
            assert (xs.max() - xs.min()) > 0.6 * 490 / 3  # about a cell wide: several 70 px patches
            seen.add(o.shape)
    assert seen == set(SHAPES)


def test_videos_decode_and_the_shape_moves_the_stated_way(runs):
    decord = pytest.importorskip("decord")
    root = runs["a"]
    size = json.loads((root / "meta.json").read_text())["video_size"]
    assert size == 490  # a crop's size: read without a resize
    directions = set()
    for split in ("train", "test"):
        for r in [r for r in _lines(root / f"chat_{split}.jsonl") if r["qtype"] == "direction"]:
            question, answer = r["messages"][0]["content"][1]["text"], r["messages"][1]["content"][0]["text"]
            colour, shape = re.fullmatch(r"Which way does the (\w+) (\w+) move\?", question).groups()
            reader = decord.VideoReader(str(root / r["video"]["path"]))
            assert len(reader) == r["video"]["num_frames"] == 8
            frames = reader.get_batch(list(range(8))).asnumpy()
            assert frames.shape == (8, size, size, 3)
            background = np.median(frames[0].reshape(-1, 3), axis=0)
            want = list(COLOURS).index(colour)
            centres = []
            for f in frames:
                labels = _nearest(f.reshape(-1, 3), background).reshape(size, size)
                shape_px = Counter(labels[labels < len(COLOURS)].tolist())
                assert shape_px.most_common(1)[0][0] == want and shape_px[want] > 0.8 * sum(shape_px.values())
                ys, xs = np.nonzero(labels == want)
                centres.append((xs.mean(), ys.mean()))
            dx, dy = np.diff(np.array(centres), axis=0).T  # (F-1,) steps
            along, across = {"left": (-dx, dy), "right": (dx, dy), "up": (-dy, dx), "down": (dy, dx)}[answer]
            assert (along > 1).all() and along.sum() > 0.3 * size and np.abs(across).max() < 2, (r["id"], centres)
            directions.add(answer)
    assert directions == set(ANSWERS["direction"])


def test_render_video_matches_its_path():
    scene, _ = plan_videos(0, "test", 1, 64, 5)[0]
    frames = render_video(scene, 64)
    assert frames.shape == (5, 64, 64, 3)
    for (cx, cy), f in zip(scene.path, frames):
        assert tuple(f[cy, cx]) == COLOURS[scene.colour]


# ---------------------------------------------------------------------------------------------
# Splits


def test_test_split_shares_no_scene_with_train(runs):
    train = plan_images(0, "train", 600, 490)
    test = plan_images(0, "test", 200, 490, exclude=frozenset(s for s, _ in train))
    assert not {s for s, _ in train} & {s for s, _ in test}
    videos = plan_videos(0, "train", 300, 490, 8)
    assert not {s for s, _ in videos} & {s for s, _ in plan_videos(0, "test", 100, 490, 8)}
    # A test scene equal to a train scene is drawn again.
    first_test = plan_images(0, "test", 1, 490)
    redrawn = plan_images(0, "test", 1, 490, exclude=frozenset([first_test[0][0]]))
    assert redrawn[0][0] != first_test[0][0] and redrawn[0][1][2] == first_test[0][1][2]  # same count target
    # On disk: no image is byte-identical across the splits.
    files = _files(runs["a"])
    train_png = {v for k, v in files.items() if k.startswith("images/train_")}
    assert not train_png & {v for k, v in files.items() if k.startswith("images/test_")}
