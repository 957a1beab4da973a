"""Dataset formats beyond Aria's JSONL: LLaVA / ShareGPT records (JSONL and ``.json`` lists) and
local Hugging Face datasets (parquet with embedded images, ``save_to_disk``, relative paths, a
column mapping). Every format gives the tokens, targets and pixels of the equivalent Aria record
through the processor (which other tests hold to transformers' AriaProcessor); bad records are
skipped and counted with their location or raised in strict mode; training resumes exactly;
``data_tools.validate`` reads them all.

The datasets are written here from one list of Aria-schema records on the shapes world's media:
single images, several images placed inside the text, system prompts, several turns, text only,
video, image + video.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import aria.data.sources as sources_module
from aria.config import DataConfig, DatasetEntry, parse_mixture
from aria.data.errors import BadInputPolicy, DataError
from aria.data.loader import StreamSpec, TrainLoader, build_train_loader, iterate_samples, merge_states
from aria.data.processor import Processor
from aria.data.records import MediaResolver, parse_record
from aria.data.sources import HFSource, JsonListSource, JsonlSource, open_source
from aria.data.tokenizer import Tokenizer
from helpers import shapes_world

TABLE = {490: 16, 980: 32}  # model=tiny's crop table
IMAGE, VIDEO = {"type": "image"}, {"type": "video"}
LLAVA_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def T(text: str) -> dict:
    return {"type": "text", "text": text}


def handmade(images: list[str], video: str) -> list[dict]:
    """Aria records that exercise every LLaVA rule."""
    a, b = images[:2]
    return [
        {"messages": [{"role": "user", "content": [T("Compare "), IMAGE, T(" with "), IMAGE, T(".")]},
                      {"role": "assistant", "content": "They differ."}], "images": [a, b]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [IMAGE, T("Colour?")]},
                      {"role": "assistant", "content": "red"},
                      {"role": "user", "content": "And the shape? Ünïcode ✓"},
                      {"role": "assistant", "content": [T("a star")]}], "images": [a]},
        {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": [T("Look:\n"), IMAGE]}, {"role": "assistant", "content": "ok"}],
         "images": [b]},
        {"messages": [{"role": "user", "content": [VIDEO, T("Then "), IMAGE, T("?")]},
                      {"role": "assistant", "content": "up"}], "images": [a], "video": {"path": video}},
    ]


def llava_twin(record: dict) -> dict:
    """The LLaVA form of an Aria record: ``<image>\\n`` / ``<video>\\n`` where the media items are."""
    turns = []
    for m in record["messages"]:
        content = m["content"]
        value = content if isinstance(content, str) else "".join(
            it["text"] if it["type"] == "text" else f"<{it['type']}>\n" for it in content)
        turns.append({"from": LLAVA_ROLE[m["role"]], "value": value})
    twin = {"id": record.get("id", "x"), "conversations": turns}
    images = record.get("images") or []
    if images:
        twin["image"] = images[0] if len(images) == 1 else images
    if record.get("video"):
        twin["video"] = record["video"]["path"]
    return twin


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The Aria records (shapes questions, dialogs and the handmade ones), their LLaVA twins, the
    processor, and the reference encodings of the Aria records."""
    import datasets

    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("formats")
    cache = root / "hf_cache"
    patch = pytest.MonkeyPatch()
    patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)  # parquet's arrow copy goes here
    data, tok_dir = shapes_world(root)
    chat = [json.loads(line) for line in (data / "chat_train.jsonl").read_text().splitlines()]
    videos = [r for r in chat if "video" in r]
    dialogs = [json.loads(line) for line in (data / "dialog_train.jsonl").read_text().splitlines()]
    images = sorted(str(p.relative_to(data)) for p in (data / "images").glob("train_*.png"))
    aria = chat[:6] + videos[:1] + dialogs[:2] + handmade(images, videos[0]["video"]["path"])
    for r in aria:  # the LLaVA twin gives a path only: the default frame count
        if "video" in r:
            r["video"] = {"path": r["video"]["path"]}
    (data / "aria.jsonl").write_text("".join(json.dumps(r) + "\n" for r in aria))
    proc = Processor(Tokenizer.load(tok_dir), TABLE, image_size=490)
    reference = [proc.encode(parse_record(r, "aria", MediaResolver(data))) for r in aria]
    yield {"data": data, "tok_dir": tok_dir, "aria": aria, "llava": [llava_twin(r) for r in aria],
           "processor": proc, "reference": reference, "cache": cache}
    patch.undo()


def encodings(path, world, split: str = "train", columns=None, policy=None) -> list:
    return [e for _, e in iterate_samples(str(path), world["processor"], split, policy=policy, columns=columns)]


def assert_same_encodings(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert torch.equal(g.input_ids, e.input_ids) and torch.equal(g.targets, e.targets)
        assert len(g.crops) == len(e.crops)
        assert all(torch.equal(gp, ep) and torch.equal(gm, em) for (gp, gm), (ep, em) in zip(g.crops, e.crops))


# ---------------------------------------------------------------------------------------------
# LLaVA / ShareGPT records
# ---------------------------------------------------------------------------------------------


def write_json_list(path: Path, records: list, indent: int | None) -> None:
    path.write_text(json.dumps(records, indent=indent, ensure_ascii=False))


@pytest.mark.parametrize("container", ["jsonl", "json_pretty", "json_minified", "json_small_chunks"])
def test_llava_records_encode_as_their_aria_twins(world, container, monkeypatch):
    data = world["data"]
    path = data / f"llava_{container}.{'jsonl' if container == 'jsonl' else 'json'}"
    if container == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in world["llava"]))
    else:
        write_json_list(path, world["llava"], 2 if container == "json_pretty" else None)
    if container == "json_small_chunks":  # elements and multi-byte characters cut by chunk ends
        monkeypatch.setattr(sources_module, "_CHUNK", 7)
    assert type(open_source(path)) is (JsonlSource if container == "jsonl" else JsonListSource)
    assert_same_encodings(encodings(path, world), world["reference"])


@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_llava_records_become_shards_that_encode_as_their_aria_twins(world, container, tmp_path):
    """jsonl_to_wds on LLaVA records (one image, several, a video, image + video): the shards hold
    the media as members and encode exactly as the Aria twins."""
    from data_tools.jsonl_to_wds import convert

    path = world["data"] / f"llava_for_shards.{container}"
    if container == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in world["llava"]))
    else:
        write_json_list(path, world["llava"], indent=None)
    done = convert(path, tmp_path / "shards", samples_per_shard=4, log=lambda _: None)
    assert done["samples"] == len(world["llava"]) and not done["skipped"] and len(done["shards"]) > 1
    assert_same_encodings(encodings(tmp_path / "shards", world), world["reference"])


def test_json_list_is_indexed_by_byte_ranges_and_lines(world, tmp_path):
    records = [{"kind": "text", "text": t} for t in ("é ✓ first", "second", "3")]
    path = tmp_path / "list.json"
    path.write_text('  [\n' + ',\n\n'.join(json.dumps(r, ensure_ascii=False, indent=1) for r in records) + '\n]\n')
    source = JsonListSource(path)
    raw = path.read_bytes()
    assert [json.loads(raw[s:e]) for s, e in zip(source.starts, source.ends)] == records
    assert [r.where for r in source.iterate_once()] == [f"{path}:2 (element 0)", f"{path}:7 (element 1)",
                                                        f"{path}:12 (element 2)"]
    assert [r.record for r in source.iterate_once(1, 2)] == [records[1]]  # one evaluation rank's share
    assert source.starts.dtype == source.ends.dtype == source.lines.dtype == np.int64
    lines = tmp_path / "lines.json"  # JSON lines under a .json name
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert type(open_source(lines)) is JsonlSource
    empty = tmp_path / "empty.json"
    empty.write_text(" [ ] ")
    with pytest.raises(ValueError, match="is empty"):
        open_source(empty)


@pytest.mark.parametrize("text,message", [
    ('[{"kind": "text", "text": "a"},\n {"kind": "text", "text": "b"\n, {}]', r"broken\.json:3: malformed JSON"),
    ('[{"kind": "text", "text": "a"},\n {"kind": "text"', r"broken\.json:2: malformed JSON"),
    ('[{"kind": "text", "text": "a"}\n {"kind": "text"}]', r"broken\.json:2: malformed JSON \(expected ','"),
    ('[{"kind": "text", "text": "a"}] []', r"broken\.json:1: data after the end"),
    ('[{"kind": "text", "text": "a"}, ', r"broken\.json: the file ends inside its JSON list"),
    ('{"not": "a list"}', None),  # one JSON object: read as JSON lines
])
def test_a_broken_json_list_is_refused_with_its_line(tmp_path, text, message, monkeypatch):
    monkeypatch.setattr(sources_module, "_CHUNK", 5)
    path = tmp_path / "broken.json"
    path.write_text(text)
    if message is None:
        assert len(open_source(path)) == 1
        return
    with pytest.raises(ValueError, match=message):
        open_source(path)


def llava(conversations: list, **media) -> dict:
    return {"conversations": conversations, **media}


def human(value: str) -> dict:
    return {"from": "human", "value": value}


def gpt(value: str = "ok") -> dict:
    return {"from": "gpt", "value": value}


def test_llava_placement_rules(world):
    """Placeholders keep their place; one line break beside a placeholder is its separator; without
    any placeholder the media open the first user turn; roles have their aliases."""
    data, proc = world["data"], world["processor"]
    a, b = "images/train_000000.png", "images/train_000001.png"
    video = world["aria"][6]["video"]["path"]
    pairs = [
        (llava([human("Compare <image> and\n<image>.\nWhich?"), gpt()], image=[a, b]),
         {"messages": [{"role": "user", "content": [T("Compare "), IMAGE, T(" and"), IMAGE, T(".\nWhich?")]},
                       {"role": "assistant", "content": "ok"}], "images": [a, b]}),
        (llava([human("What is it?"), gpt()], image=a),  # no placeholder: the image goes first
         {"messages": [{"role": "user", "content": [IMAGE, T("What is it?")]}, {"role": "assistant", "content": "ok"}],
          "images": [a]}),
        (llava([{"from": "system", "value": "Be kind."}, {"from": "user", "value": "Describe.\n\n<video>"},
                {"from": "assistant", "value": "A move."}], video=video),
         {"messages": [{"role": "system", "content": "Be kind."},
                       {"role": "user", "content": [T("Describe.\n"), VIDEO]},
                       {"role": "assistant", "content": "A move."}], "video": {"path": video}}),
        (llava([human("Hi"), gpt("Yo")], system="Top-level system prompt."),  # ShareGPT's system field
         {"messages": [{"role": "system", "content": "Top-level system prompt."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Yo"}]}),
        (llava([human("<image><image>\nBoth?"), gpt()], images=[a, b]),
         {"messages": [{"role": "user", "content": [IMAGE, IMAGE, T("Both?")]}, {"role": "assistant", "content": "ok"}],
          "images": [a, b]}),
    ]
    for twin, aria in pairs:
        got = proc.encode(parse_record(twin, "x", MediaResolver(data)))
        expected = proc.encode(parse_record(aria, "x", MediaResolver(data)))
        assert_same_encodings([got], [expected])


LLAVA_BAD = [  # (name, record, kind, message)
    ("more_placeholders_than_images", llava([human("<image> <image>"), gpt()], image="images/train_000000.png"),
     "image_count_mismatch", r"2 '<image>' placeholder\(s\) in 'conversations' but 1 path\(s\) in 'image'"),
    ("video_without_placeholder", llava([human("<image>"), gpt()], image="images/train_000000.png",
                                        video="videos/train_000000.mp4"),
     "video_count_mismatch", r"0 '<video>' placeholder\(s\) in 'conversations' but 1 video\(s\) in 'video'"),
    ("unknown_speaker", llava([human("hi"), {"from": "bot", "value": "x"}]), "unknown_role",
     r"'conversations\[1\]\.from' is 'bot'"),
    ("value_not_text", llava([human("hi"), {"from": "gpt", "value": 5}]), "invalid_record",
     r"'conversations\[1\]\.value' must be a string"),
    ("unknown_turn_key", llava([human("hi"), {"from": "gpt", "value": "x", "weight": 0}]), "invalid_record",
     r"'conversations\[1\]' has unknown key\(s\) \['weight'\]"),
    ("no_gpt_turn", llava([human("hi")]), "no_assistant", "no 'gpt' turn"),
    ("missing_image", llava([human("<image>"), gpt()], image=["images/nope.png"]), "missing_file",
     r"nope\.png"),
    ("image_path_escapes", llava([human("<image>"), gpt()], image="../outside.png"), "path_escape",
     r"'image' path '\.\./outside\.png' resolves outside"),
    ("special_token_in_value", llava([human("hi"), gpt("a <|im_end|> b")]), "special_token_in_text",
     r"'conversations\[1\]\.value' contains the special token"),
    ("both_schemas", {**llava([human("hi"), gpt()]), "messages": []}, "invalid_record",
     r"both 'conversations' \(LLaVA / ShareGPT\) and \['messages'\]"),
    ("image_and_images", llava([human("<image>"), gpt()], image="a.png", images=["b.png"]), "invalid_record",
     "both 'image' and 'images'"),
]


def write_bad_llava(world) -> Path:
    """A LLaVA list: a good record, every record of ``LLAVA_BAD``, a good record."""
    good = world["llava"][0]
    path = world["data"] / "bad_llava.json"
    write_json_list(path, [good] + [r for _, r, _, _ in LLAVA_BAD] + [good], indent=1)
    return path


def test_bad_llava_records_are_skipped_with_location_or_raised(world):
    path = write_bad_llava(world)
    starts = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line.startswith(" {")]
    policy = BadInputPolicy(keep=True)
    assert len(encodings(path, world, policy=policy)) == 2
    assert [e.kind for e in policy.errors] == [kind for _, _, kind, _ in LLAVA_BAD]
    for i, (err, (_, _, _, message)) in enumerate(zip(policy.errors, LLAVA_BAD), start=1):
        assert err.where == f"{path}:{starts[i]} (element {i})"
        assert re.search(message, str(err)), str(err)
    with pytest.raises(DataError, match=LLAVA_BAD[0][3]) as err:
        encodings(path, world, policy=BadInputPolicy(strict=True))
    assert err.value.where == f"{path}:{starts[1]} (element 1)"


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------------

COLUMNS = {"conversations": "dialog", "image": "picture", "video": "clip"}


def media_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def llava_rows(world, records: list[dict]):
    """LLaVA records as a ``datasets.Dataset`` with other column names, images and videos embedded."""
    from datasets import Dataset, Features, Image, List, Value, Video

    data = world["data"]

    def embedded(path):
        return {"bytes": (data / path).read_bytes(), "path": Path(path).name}

    features = Features({"dialog": List({"from": Value("string"), "value": Value("string")}),
                         "picture": List(Image()), "clip": Video(), "id": Value("string")})
    rows = [{"dialog": r["conversations"], "picture": [embedded(p) for p in media_list(r.get("image"))],
             "clip": embedded(r["video"]) if r.get("video") else None, "id": r["id"]} for r in records]
    return Dataset.from_list(rows, features=features)


def aria_rows(world, records: list[dict]):
    """Aria records as a ``datasets.Dataset`` (content always a list of items; image paths, which
    ``save_to_disk`` embeds; videos embedded)."""
    from datasets import Dataset, Features, Image, List, Value, Video

    data = world["data"]
    item = {"type": Value("string"), "text": Value("string")}
    features = Features({"messages": List({"role": Value("string"), "content": List(item)}),
                         "images": List(Image()), "video": Video()})
    rows = []
    for r in records:
        messages = [{"role": m["role"], "content": [T(m["content"])] if isinstance(m["content"], str) else
                     [{"type": it["type"], "text": it.get("text")} for it in m["content"]]} for m in r["messages"]]
        video = r.get("video")
        rows.append({"messages": messages, "images": [str(data / p) for p in r.get("images", [])],
                     "video": {"bytes": (data / video["path"]).read_bytes(), "path": "clip.mp4"} if video else None})
    return Dataset.from_list(rows, features=features)


@pytest.fixture(scope="module")
def hf_sets(world) -> dict[str, tuple[Path, dict | None]]:
    """{name: (path, column mapping)}: the records of ``world`` in three Hugging Face layouts."""
    from datasets import Dataset, DatasetDict, Features, List, Value

    data, llava = world["data"], world["llava"]
    parquet_dir = data / "hf_llava" / "data"
    parquet_dir.mkdir(parents=True)
    llava_rows(world, llava).to_parquet(str(parquet_dir / "train-00000-of-00001.parquet"))
    llava_rows(world, llava[:3]).to_parquet(str(parquet_dir / "test-00000-of-00001.parquet"))
    DatasetDict({"train": aria_rows(world, world["aria"]), "test": aria_rows(world, world["aria"][-2:])}
                ).save_to_disk(str(data / "hf_aria"))
    features = Features({"conversations": List({"from": Value("string"), "value": Value("string")}),
                         "image": List(Value("string")), "video": Value("string")})
    Dataset.from_list([{"conversations": r["conversations"], "image": media_list(r.get("image")),
                        "video": r.get("video")} for r in llava], features=features
                      ).to_parquet(str(data / "llava_paths.parquet"))  # paths relative to its directory
    return {"parquet_embedded_with_columns": (data / "hf_llava", COLUMNS),
            "save_to_disk_aria_schema": (data / "hf_aria", None),
            "parquet_file_with_paths": (data / "llava_paths.parquet", None)}


@pytest.mark.parametrize("name", ["parquet_embedded_with_columns", "save_to_disk_aria_schema",
                                  "parquet_file_with_paths"])
def test_hugging_face_datasets_encode_as_the_aria_records(world, hf_sets, name):
    path, columns = hf_sets[name]
    source = open_source(path, "train", columns=columns)
    assert isinstance(source, HFSource) and len(source) == len(world["aria"])
    assert_same_encodings(encodings(path, world, columns=columns), world["reference"])
    tests = {"parquet_embedded_with_columns": world["reference"][:3],
             "save_to_disk_aria_schema": world["reference"][-2:]}
    if name in tests:  # the test split of a directory
        assert_same_encodings(encodings(path, world, "test", columns=columns), tests[name])
    if name == "parquet_embedded_with_columns":  # the images travel as bytes, not as paths
        sample = parse_record(source.read(0, None).record, "r", source.read(0, None).resolver)
        assert sample.media[0].path is None and isinstance(sample.media[0].data, bytes)


def test_hugging_face_dataset_errors(world, hf_sets, tmp_path):
    import pyarrow.parquet as pq
    from datasets import Dataset, Features, Image, List, Value

    path, columns = hf_sets["parquet_embedded_with_columns"]
    with pytest.raises(ValueError, match=r"names column\(s\) \['pictures'\], which it does not have"):
        open_source(path, columns={**COLUMNS, "image": "pictures"})
    with pytest.raises(FileNotFoundError, match="has no 'validation' split"):
        open_source(hf_sets["save_to_disk_aria_schema"][0], "validation")
    with pytest.raises(FileNotFoundError, match="no 'validation' .parquet files"):
        open_source(path, "validation", columns=COLUMNS)
    with pytest.raises(ValueError, match=r"'data.train\[0\].columns' .* \(unknown: \['conversation'\]\)"):
        parse_mixture([{"path": "x", "columns": {"conversation": "dialog"}}])
    with pytest.raises(ValueError, match="a different column for each field"):
        parse_mixture([{"path": "x", "columns": {"image": "pic", "images": "pic"}}])
    # bad rows: skipped with their row, or raised
    features = Features({"conversations": List({"from": Value("string"), "value": Value("string")}),
                         "image": List(Image())})
    png = (world["data"] / "images/train_000000.png").read_bytes()
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    rows = [{"conversations": turns, "image": [{"bytes": png, "path": "a.png"}]},
            {"conversations": turns, "image": [{"bytes": b"not an image", "path": "b.png"}]},
            {"conversations": turns, "image": []},
            {"conversations": [turns[0], {"from": "robot", "value": "x"}], "image": [{"bytes": png, "path": None}]},
            {"conversations": turns, "image": [{"bytes": None, "path": "missing.png"}]}]
    # written by pyarrow: datasets' writer would look for missing.png
    pq.write_table(Dataset.from_list(rows, features=features).data.table, str(tmp_path / "bad.parquet"))
    policy = BadInputPolicy(keep=True)
    assert len(encodings(tmp_path / "bad.parquet", world, policy=policy)) == 1
    where = f"{tmp_path / 'bad.parquet'}:row"
    assert [(e.kind, e.where) for e in policy.errors] == [
        ("bad_image", f"{where} 1"), ("image_count_mismatch", f"{where} 2"), ("unknown_role", f"{where} 3"),
        ("missing_file", f"{where} 4")]
    assert "'image[0]:b.png'" in str(policy.errors[0]) and "'conversations[1].from'" in str(policy.errors[2])
    with pytest.raises(DataError, match="bad.parquet:row 1") as err:
        encodings(tmp_path / "bad.parquet", world, policy=BadInputPolicy(strict=True))
    assert err.value.kind == "bad_image"


# ---------------------------------------------------------------------------------------------
# Training: the config's entries, exact resume
# ---------------------------------------------------------------------------------------------


def fingerprint(batch) -> tuple:
    pixels = batch.pixel_values
    pixel_sum = None if pixels is None else round(float(sum(p.double().sum() for p in pixels)
                                                       if isinstance(pixels, list) else pixels.double().sum()), 3)
    return batch.input_ids.tolist(), batch.targets.tolist(), batch.where, pixel_sum


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_training_reads_the_formats_from_the_config_and_resumes_exactly(world, hf_sets):
    """A mixture of a LLaVA JSON list and a parquet dataset with a column mapping, as the config
    gives it; 2 ranks x 2 workers, stopped and resumed twice."""
    llava_json = world["data"] / "llava_train.json"
    write_json_list(llava_json, world["llava"], indent=None)
    path, columns = hf_sets["parquet_embedded_with_columns"]
    data = DataConfig(train=[{"path": str(llava_json), "weight": 1.0},
                             {"path": str(path), "weight": 2.0, "columns": columns}], num_workers=2)
    entries = parse_mixture(data.train)
    assert entries[1] == DatasetEntry(str(path), 2.0, COLUMNS)
    loader = build_train_loader(data, world["processor"], 256, 1, rank=0, world_size=1)
    it = iter(loader)
    batches = [next(it) for _ in range(4)]
    it.close()
    assert any("llava_train.json" in w for b in batches for w in b.where)
    assert any("hf_llava:row" in w for b in batches for w in b.where)

    def run(state: dict | None, per_rank: int) -> tuple[dict[int, tuple], dict]:
        """``per_rank`` micro-batches on each of 2 simulated ranks: {global index: fingerprint} and
        the merged position after them."""
        got, states = {}, []
        for rank in range(2):
            loader = TrainLoader(StreamSpec(entries, world["processor"], 256, 1, rank, 2, seed=4), 2, streams=4)
            if state is not None:
                loader.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint carries it
            first, it = loader.next_index, iter(loader)
            for k in range(per_rank):
                got[first + rank + 2 * k] = fingerprint(next(it))
            it.close()
            states.append(loader.state_dict())
        return got, merge_states(states)

    reference, _ = run(None, 9)
    head, state1 = run(None, 3)
    middle, state2 = run(state1, 4)
    tail, _ = run(state2, 2)
    assert {**head, **middle, **tail} == reference and len(reference) == 18
    epochs = [[p and p["epoch"] for pos in s["positions"].values() for p in pos["mixture"]["positions"]]
              for s in (state1, state2)]
    assert epochs[0] != epochs[1], "the cut points should lie in different epochs"


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------


def test_validate_reads_llava_and_hugging_face_datasets(world, hf_sets, capsys):
    from data_tools.validate import main

    tok = str(world["tok_dir"])
    code = main([str(write_bad_llava(world)), "--tokenizer", tok, "--image-size", "490"])
    out = capsys.readouterr().out
    assert code == 1 and f"{len(LLAVA_BAD)} bad record(s)" in out
    assert "bad_llava.json:" in out and "(element 1): 2 '<image>' placeholder(s)" in out
    path, _ = hf_sets["parquet_embedded_with_columns"]
    code = main([str(path), "--tokenizer", tok, "--image-size", "490", "--columns",
                 *[f"{f}={c}" for f, c in COLUMNS.items()]])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line[:1].isalpha()}
    assert rows["total"][0] == str(len(world["aria"])) and "chat:image+video" in rows
    assert main([str(path), "--tokenizer", tok, "--columns", "image=pictures"]) == 2  # no such column
    assert "which it does not have" in capsys.readouterr().err
    broken = world["data"] / "broken.json"
    broken.write_text('[{"kind": "text", "text": "a"},\n oops]')
    assert main([str(broken), "--tokenizer", tok]) == 2
    assert "broken.json:2: malformed JSON" in capsys.readouterr().err
