"""The binding report: answers placed in their scenes, right / present / absent told apart."""

from __future__ import annotations

import json

import pytest

from data_tools.binding_report import main
from data_tools.make_shapes import ANSWERS, make_shapes, plans_of


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data = tmp_path_factory.mktemp("binding") / "world"
    make_shapes(data, 3, train_images=10, test_images=30, train_videos=1, test_videos=2, workers=1, wds=False)
    return data


def answers_file(data, path, choose):
    """Every test question of ``data`` answered by ``choose(question, scene)``, as aria-eval writes it."""
    records = [json.loads(line) for line in (data / "chat_test.jsonl").read_text().splitlines()]
    _, plan = plans_of(data)
    with open(path, "w") as f:
        for r in records:
            truth = r["messages"][-1]["content"][0]["text"]
            scene = plan[int(r["id"].split("_")[1])][0] if r["qtype"] != "direction" else None
            prediction = choose(r["qtype"], truth, scene)
            f.write(json.dumps({"id": r["id"], "qtype": r["qtype"], "prediction": f" {prediction.upper()}.",
                                "answer": truth, "correct": prediction == truth}) + "\n")
    return path


def test_right_present_and_absent_answers_are_told_apart(world, tmp_path, capsys):
    def wrong_but_present(qtype, truth, scene):
        if qtype == "count" or scene is None:
            return truth
        values = [getattr(obj, qtype) for obj in scene.shapes]
        others = [v for v in values if v != truth]
        return others[0] if others else truth

    def absent(qtype, truth, scene):
        if qtype == "count" or scene is None:
            return "0"
        values = {getattr(obj, qtype) for obj in scene.shapes}
        return next(v for v in ANSWERS[qtype] if v not in values)

    _, plan = plans_of(world)
    for choose, accuracy_of, present_of in (
            (wrong_but_present, lambda distinct: float(distinct == 1), lambda distinct: 1.0),
            (absent, lambda distinct: 0.0, lambda distinct: 0.0)):
        out = tmp_path / f"{choose.__name__}.json"
        assert main([str(answers_file(world, tmp_path / "answers.jsonl", choose)), str(world),
                     "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["videos"] == 2
        for row in result["rows"]:
            scenes = [scene for scene, _ in plan if len(scene.shapes) == row["shapes"]]
            assert row["questions"] == len(scenes)
            if row["qtype"] == "count":
                assert row["present"] is None
                assert row["accuracy"] == (1.0 if choose is wrong_but_present else 0.0)
                continue
            distinct = [len({getattr(obj, row["qtype"]) for obj in s.shapes}) for s in scenes]
            mean = lambda f: pytest.approx(sum(map(f, distinct)) / len(distinct))  # noqa: E731
            assert row["chance_present"] == mean(lambda d: 1 / d)
            assert row["present"] == mean(present_of)
            assert row["accuracy"] == mean(accuracy_of)
        assert {(row["qtype"], row["shapes"]) for row in result["rows"]} == {
            (q, n) for q in ("colour", "shape", "count", "position") for n in {len(s.shapes) for s, _ in plan}}
    assert "chance among present" in capsys.readouterr().out


def record(i: int, qtype: str, answer: str) -> str:
    return json.dumps({"id": f"test_{i:06d}_{qtype}", "qtype": qtype, "prediction": answer,
                       "answer": answer, "correct": True})


@pytest.mark.parametrize("line, message", [
    ("{not json", "answers.jsonl:2: not a JSON line"),
    (record(1, "colour", "red").replace("test_", "train_"), "answers.jsonl:2: expected a record of `aria-eval --out`"),
    (json.dumps({"id": "test_000001_colour", "qtype": "colour"}), "answers.jsonl:2: expected a record"),
    (record(30, "count", "1"), "asks about test image 30, which"),
    (record(0, "count", "4"), "answers.jsonl:2: the reference answer '4' does not fit"),
])
def test_bad_answer_lines_are_named(world, tmp_path, capsys, line, message):
    _, plan = plans_of(world)
    good = record(0, "count", str(len(plan[0][0].shapes)))
    (tmp_path / "answers.jsonl").write_text(good + "\n" + line + "\n")
    assert main([str(tmp_path / "answers.jsonl"), str(world)]) == 1
    assert message in capsys.readouterr().err


def test_a_directory_without_meta_is_named(tmp_path, capsys):
    (tmp_path / "answers.jsonl").write_text(record(0, "count", "1") + "\n")
    assert main([str(tmp_path / "answers.jsonl"), str(tmp_path)]) == 1
    assert "meta.json does not exist" in capsys.readouterr().err
