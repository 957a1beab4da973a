"""A model's answers to the shapes world's test questions, split by the number of shapes in the
scene: how often it is right, and how often its answer names something that is in the picture.

    aria-eval MODEL DATA/chat_test.jsonl --out answers.jsonl
    python -m data_tools.binding_report answers.jsonl DATA [--json OUT]

ANSWERS: what ``aria-eval --out`` writes for ``chat_test.jsonl``; DATA: the ``make_shapes``
directory. It tells seeing from binding: a model that sees the scene but cannot tell which
attribute belongs to which object answers a colour question with *a* colour of the scene and a
position question with *an* occupied place (``present`` near 1) but picks among them at random
(accuracy near ``chance among present``); one that does not see names absent values too.

Design decisions:
- Scenes come from the plan the directory was rendered from (``make_shapes.plans_of``); a record
  is placed by its id (``test_NNNNNN_<qtype>``, as ``make_shapes`` writes them), so the report
  needs no image. Each record's reference answer must fit its scene: answers to another world
  (another ``--seed``) are refused, not reported.
- ``present`` compares the normalised answer (``aria.evaluate.normalize``) with the scene's values
  of the asked attribute (colour, shape or place); count questions get accuracy only.
  ``chance among present`` is the mean of 1 / (distinct values of that attribute in the scene).
- Video questions (direction) are counted and left out: their scenes hold one shape.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from aria.commands import run_report
from aria.evaluate import normalize
from data_tools import make_shapes as ms

ASKED = ("colour", "shape", "position")  # question types whose answer is a field of a Shape
_ID = re.compile(r"test_(\d+)_[a-z]+$")


def binding_report(answers: Path, data: Path) -> dict:
    """{"rows": [{qtype, shapes, questions, accuracy, present, chance_present}], "videos": N}."""
    rows: list[dict] = []
    with open(answers, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{answers}:{number}: not a JSON line ({err.msg})") from None
    wanted = 0
    for number, row in enumerate(rows, 1):
        match = _ID.match(str(row.get("id", "")))
        if not {"id", "qtype", "prediction", "answer", "correct"} <= set(row) or (
                row["qtype"] in ms.IMAGE_QTYPES and match is None):
            raise ValueError(f"{answers}:{number}: expected a record of `aria-eval --out` on a shapes "
                             f"world's chat_test.jsonl (id test_NNNNNN_<qtype>, qtype, prediction, "
                             f"answer, correct), got {sorted(row)} with id {row.get('id')!r}")
        if row["qtype"] in ms.IMAGE_QTYPES:
            wanted = max(wanted, int(match.group(1)) + 1)
    try:
        plan_test = ms.plans_of(data, test_images=wanted)[1] if wanted else []
    except ValueError:
        raise ValueError(f"{answers} asks about test image {wanted - 1}, which {data} does not have: "
                         "answers to another shapes world?") from None
    groups: dict[tuple[str, int], list[tuple[bool, bool | None, float | None]]] = defaultdict(list)
    videos = 0
    for number, row in enumerate(rows, 1):
        if row["qtype"] not in ms.IMAGE_QTYPES:
            videos += 1
            continue
        scene = plan_test[int(_ID.match(row["id"]).group(1))][0]
        values = ({getattr(obj, row["qtype"]) for obj in scene.shapes} if row["qtype"] in ASKED
                  else {str(len(scene.shapes))})
        if normalize(row["answer"]) not in values:
            raise ValueError(f"{answers}:{number}: the reference answer {row['answer']!r} does not fit "
                             f"{data}'s scene {row['id'].rsplit('_', 1)[0]} ({ms.caption(scene)!r}): "
                             "answers to another shapes world?")
        present = chance = None
        if row["qtype"] in ASKED:
            present = normalize(row["prediction"]) in values
            chance = 1 / len(values)
        groups[row["qtype"], len(scene.shapes)].append((bool(row["correct"]), present, chance))
    table = []
    for (qtype, shapes), items in sorted(groups.items()):
        n = len(items)
        has_present = items[0][1] is not None
        table.append({"qtype": qtype, "shapes": shapes, "questions": n,
                      "accuracy": sum(ok for ok, _, _ in items) / n,
                      "present": sum(p for _, p, _ in items) / n if has_present else None,
                      "chance_present": sum(c for _, _, c in items) / n if has_present else None})
    return {"rows": table, "videos": videos}


def report(result: dict) -> str:
    lines = [f"{'qtype':9s} {'shapes':>6s} {'questions':>9s} {'accuracy':>8s} {'present':>8s} "
             f"{'chance among present':>20s}"]
    for row in result["rows"]:
        present = "-" if row["present"] is None else f"{row['present']:.3f}"
        chance = "-" if row["chance_present"] is None else f"{row['chance_present']:.3f}"
        lines.append(f"{row['qtype']:9s} {row['shapes']:6d} {row['questions']:9d} {row['accuracy']:8.3f} "
                     f"{present:>8s} {chance:>20s}")
    lines.append(f"present: the answer names a value the scene has; {result['videos']} video "
                 "questions left out")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.binding_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("answers", type=Path, help="what `aria-eval --out` wrote for DATA/chat_test.jsonl")
    parser.add_argument("data", type=Path, help="the data_tools.make_shapes directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)

    return run_report("binding_report", lambda: binding_report(args.answers, args.data), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
