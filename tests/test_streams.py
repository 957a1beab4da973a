"""Data streams: the global sequence of micro-batches is the same for any number of processes and
loader workers, resumes exactly on another layout from the merged positions of all ranks, refuses
layouts that cannot share the streams; workers start before the caller goes on; batches can be
pinned.

Every test reads one mixture: image questions of the shapes world (JSONL, with two bad lines) and
text documents of varied lengths (webdataset shards), several documents to a row and the longest
split across rows; the sequence tests run without and with a shuffle buffer on the shards. Ranks
are simulated: one ``TrainLoader`` per rank, in this process. The shuffle buffer is also tested on
its own: it shuffles inside a shard, by seed, with a small state that resumes it exactly.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import multiprocessing
import random
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

import aria.data.loader as loader_module
from aria.config import DataConfig
from aria.data.errors import DataError
from aria.data.loader import StreamSpec, TrainLoader, build_train_loader, merge_states
from aria.data.packing import PackedBatch
from aria.data.processor import Processor
from aria.data.sources import ShardSource
from aria.data.tokenizer import Tokenizer
from helpers import shapes_world

STREAMS, SEQ_LEN, ROWS = 4, 96, 2
TABLE = {490: 16, 980: 32}  # model=tiny's crop table
WORDS = ["red", "green", "blue", "square", "circle", "diamond", "left", "right", "top", "bottom"]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> dict:
    """The mixture's two datasets and the processor."""
    from data_tools.jsonl_to_wds import convert

    root = tmp_path_factory.mktemp("streams")
    data, tok_dir = shapes_world(root)
    images = [line for line in (data / "chat_train.jsonl").read_text().splitlines() if '"images"' in line]
    missing = json.loads(images[0]) | {"images": ["images/missing.png"]}
    images[5:5] = ['{"messages": [', json.dumps(missing)]  # a bad_json and a missing_file line
    (data / "images.jsonl").write_text("\n".join(images) + "\n")
    rng = random.Random(0)
    docs = [{"kind": "text", "text": " ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 10, 25, 60, 130])))}
            for _ in range(40)]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    convert(root / "docs.jsonl", root / "shards", "docs", samples_per_shard=7, log=lambda _: None)
    return {"datasets": [(str(data / "images.jsonl"), 1.0), (str(root / "shards"), 2.0)],
            "processor": Processor(Tokenizer.load(tok_dir), TABLE, image_size=490), "root": root}


@pytest.fixture(scope="module", params=[0, 6], ids=["in_order", "shuffle_buffer_6"])
def world(mixture, request) -> dict:
    """The mixture, its shards read in order or through a shuffle buffer of 6 (each stream reads
    one or two shards of 7 documents an epoch)."""
    return {**mixture, "shuffle_buffer": request.param}


def make_loader(world: dict, rank: int, processes: int, workers: int, **kw) -> TrainLoader:
    spec = StreamSpec(world["datasets"], world["processor"], SEQ_LEN, ROWS, rank, processes, seed=5,
                      shuffle_buffer=world["shuffle_buffer"])
    return TrainLoader(spec, workers, streams=kw.pop("streams", STREAMS), **kw)


def fingerprint(batch: PackedBatch) -> tuple:
    pixels = batch.pixel_values
    pixel_sum = None if pixels is None else round(float(pixels.double().sum()), 2)
    return (batch.input_ids.tolist(), batch.targets.tolist(), batch.segment_ids.tolist(), batch.where,
            pixel_sum)


def run(world: dict, processes: int, workers: int, per_rank: int, state: dict | None = None
        ) -> tuple[dict[int, tuple], dict, Counter]:
    """``per_rank`` micro-batches on each of ``processes`` simulated ranks, from ``state``: {global
    index: fingerprint}, the merged position after them, and the skips summed over the ranks."""
    got, states, skipped = {}, [], Counter()
    for rank in range(processes):
        loader = make_loader(world, rank, processes, workers)
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint would carry it
        first = loader.next_index
        loader.start()
        it = iter(loader)
        for k in range(per_rank):
            batch = next(it)
            assert batch.state["stream"] % processes == (first + rank) % processes  # its own streams only
            got[first + rank + k * processes] = fingerprint(batch)
        it.close()
        states.append(loader.state_dict())
        skipped += loader.skipped()
    merged = merge_states(states)
    assert merged["next"] == first + per_rank * processes
    return got, merged, skipped


@pytest.fixture(scope="module")
def reference(world) -> tuple[dict[int, tuple], dict[int, Counter]]:
    """28 global micro-batches read by one process without workers, and the skips after each."""
    loader = make_loader(world, 0, 1, 0)
    it = iter(loader)
    batches, skipped = {}, {}
    for j in range(28):
        batches[j] = fingerprint(next(it))
        skipped[j + 1] = loader.skipped()
    it.close()
    assert sum(skipped[28].values()) > 0, "the bad lines should have been read"
    assert any("[tokens" in w for b in batches.values() for w in b[3]), "a document should be split"
    assert max(sum("docs" in w for w in b[3]) for b in batches.values()) > ROWS, "a row holds several documents"
    return batches, skipped


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("processes,workers", [(1, 2), (2, 0), (2, 1), (2, 2), (4, 0), (4, 2)])
def test_global_sequence_is_the_same_for_any_processes_and_workers(world, reference, processes, workers, caplog):
    with caplog.at_level(logging.WARNING, logger="aria.data"):
        got, _, _ = run(world, processes, workers, 16 // processes)
    assert got == {j: reference[0][j] for j in range(16)}
    lowered = [r for r in caplog.records if "cannot share evenly" in r.getMessage()]
    # 4 processes share 4 streams: one a rank, so one worker each (said once per rank)
    assert len(lowered) == (processes if processes == 4 and workers == 2 else 0)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_on_other_layouts_continues_the_uninterrupted_sequence(world, reference):
    """2 processes x 2 workers -> 4 x 1 -> 1 x 2 -> 2 x 0, each resumed from the merged positions of
    the previous layout's ranks, saved at a step boundary (every rank read as many micro-batches)."""
    batches, skipped = reference
    state = None
    for processes, workers, per_rank in [(2, 2, 4), (4, 1, 2), (1, 2, 6), (2, 0, 3)]:
        got, state, total_skipped = run(world, processes, workers, per_rank, state)
        assert got == {j: batches[j] for j in got}
        assert total_skipped == skipped[state["next"]]  # every stream's skips, on whichever rank
    assert state["next"] == 28


def test_layouts_that_cannot_share_the_streams_are_refused(world):
    with pytest.raises(ValueError, match=r"'data.streams': the config gives 3 data streams, which 2 processes"):
        make_loader(world, 0, 2, 0, streams=3)
    loaders = [make_loader(world, rank, 2, 0) for rank in range(2)]
    for loader in loaders:
        it = iter(loader)
        next(it)
        it.close()
    states = [loader.state_dict() for loader in loaders]
    merged = merge_states(states)
    with pytest.raises(ValueError, match=r"checkpoint's data position has 4 data streams, which 3 processes"):
        make_loader(world, 0, 3, 0, streams=None).load_state_dict(merged)  # the saved number counts
    with pytest.raises(ValueError, match=r"'data.streams' is 8 but the checkpoint's data position has 4"):
        make_loader(world, 0, 1, 0, streams=8).load_state_dict(merged)
    with pytest.raises(ValueError, match=r"no entry for data stream\(s\) \[1\].*merge_states"):
        make_loader(world, 0, 1, 0).load_state_dict(states[0])  # one old rank's position alone
    with pytest.raises(ValueError, match="disagree on 'next'"):
        merge_states([states[0], {**states[1], "next": 4}])
    with pytest.raises(ValueError, match="written by the loader before data streams"):
        make_loader(world, 0, 1, 0).load_state_dict({"num_slots": 2, "next_worker": 0, "positions": {}})
    started = make_loader(world, 0, 1, 0)
    started.start()
    with pytest.raises(RuntimeError, match="after start"):
        started.load_state_dict(merged)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_workers_are_forked_by_start_and_read_afterwards(world, reference, monkeypatch):
    """The loader asks nothing of CUDA before its workers exist; what the caller does after
    ``start()`` (there: initialise CUDA; here: break the collation in this process) does not reach
    them, and iterating forks no new ones."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: asked.append(len(multiprocessing.active_children())))
    before = set(multiprocessing.active_children())
    loader = make_loader(world, 0, 1, 2)
    loader.start()
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2 and not asked

    def broken(*args, **kwargs):
        raise AssertionError("collated in a process forked after start()")

    monkeypatch.setattr(loader_module, "collate", broken)
    it = iter(loader)
    assert [fingerprint(next(it)) for _ in range(6)] == [reference[0][j] for j in range(6)]
    assert set(multiprocessing.active_children()) - before == workers
    assert asked and asked[0] >= 2  # whether to pin: asked once the workers were there
    it.close()


def fake_pin(calls: list):
    """A stand-in for ``Tensor.pin_memory`` (it needs CUDA): a marked copy, recording the thread."""
    def pin_memory(self):
        calls.append(threading.current_thread().name)
        copy = self.clone()
        copy.pinned = True
        return copy

    return pin_memory


def test_packed_batch_pins_every_model_input(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin(calls))
    ids = torch.arange(6).view(1, 6)
    batch = PackedBatch(ids, ids + 1, ids + 2, ids + 3, pixel_values=[torch.ones(1, 3, 4, 4), torch.ones(2, 3, 8, 8)],
                        pixel_mask=[torch.ones(1, 4, 4, dtype=torch.bool), torch.ones(2, 8, 8, dtype=torch.bool)],
                        image_feature_order=torch.arange(5), num_targets=3, where=["a:1"], state={"stream": 1})
    pinned = batch.pin_memory()
    assert isinstance(pinned, PackedBatch) and len(calls) == 9
    for name, value in pinned.model_inputs().items():
        if name == "image_blocks":  # cache keys and counts (None here), no tensor
            assert value is None
            continue
        for tensor in value if isinstance(value, list) else [value]:
            assert getattr(tensor, "pinned", False), name
    assert (pinned.num_targets, pinned.where, pinned.state) == (3, ["a:1"], {"stream": 1})
    assert not any(hasattr(t, "pinned") for t in (batch.input_ids, *batch.pixel_values))
    text_only = PackedBatch(ids, ids, ids, ids).pin_memory()
    assert text_only.pixel_values is None and getattr(text_only.input_ids, "pinned", False)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_loader_hands_over_batches_pinned_by_a_thread_of_its_own(world, reference, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin(calls))
    loader = make_loader(world, 0, 1, 2, pin_memory=True)
    it = iter(loader)
    batches = [next(it) for _ in range(6)]
    assert [fingerprint(b) for b in batches] == [reference[0][j] for j in range(6)]
    assert all(getattr(b.input_ids, "pinned", False) for b in batches)
    assert set(calls) == {"aria-pin-memory"}
    it.close()
    assert not any(t.name == "aria-pin-memory" for t in threading.enumerate())
    assert loader.state_dict()["next"] == 6  # consumed batches, not the ones pinned ahead
    (tmp_path / "bad.jsonl").write_text("{oops\n" * 2)  # a worker's error crosses the thread whole
    spec = StreamSpec([(str(tmp_path / "bad.jsonl"), 1.0)], world["processor"], SEQ_LEN, 1, strict=True)
    with pytest.raises(DataError, match=r"bad\.jsonl:[12]: malformed JSON") as err:
        for _ in TrainLoader(spec, 1, streams=1, pin_memory=True):
            pass
    assert err.value.kind == "bad_json"


# ---------------------------------------------------------------------------------------------
# The shuffle buffer of shard sources
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ordered_shards(mixture) -> Path:
    """60 documents "doc 0" ... "doc 59" in write order, 20 to a shard (3 shards)."""
    from data_tools.jsonl_to_wds import convert

    root = mixture["root"]
    (root / "ordered.jsonl").write_text("".join(json.dumps({"kind": "text", "text": f"doc {i}"}) + "\n"
                                                for i in range(60)))
    convert(root / "ordered.jsonl", root / "ordered", "ordered", samples_per_shard=20, log=lambda _: None)
    return root / "ordered"


def draws(shards: Path, size: int, n: int, seed: int = 0, stream: int = 0, streams: int = 1,
          position: dict | None = None) -> list:
    """The first ``n`` reads of a stream of ``shards`` through a buffer of ``size``."""
    source = ShardSource(shards, shuffle_buffer=size)
    return list(itertools.islice(source.iterate(stream, streams, seed, position), n))


def numbers(reads: list) -> list[int]:
    return [int(r.raw.record["text"].split()[1]) for r in reads]


def test_shuffle_buffer_shuffles_inside_a_shard_by_seed(mixture, ordered_shards):
    in_order = numbers(draws(ordered_shards, 0, 60))
    # without a buffer a shard's samples come in write order: three rising runs of 20
    assert all(b == a + 1 for i, (a, b) in enumerate(zip(in_order, in_order[1:])) if (i + 1) % 20)
    shuffled = numbers(draws(ordered_shards, 16, 60))
    falls = sum(b < a for a, b in zip(shuffled, shuffled[1:]))
    assert falls >= 15, shuffled  # about half the neighbours out of order; none without the buffer
    assert shuffled == numbers(draws(ordered_shards, 16, 60))  # seeded
    assert shuffled != numbers(draws(ordered_shards, 16, 60, seed=1))
    assert len(set(numbers(draws(ordered_shards, 16, 44)))) == 44  # no sample twice before the epoch ends
    assert DataConfig().shuffle_buffer > 1  # on by default
    data = DataConfig(train=str(ordered_shards), num_workers=0)
    loader = build_train_loader(data, mixture["processor"], 64, 1)
    assert loader.spec.sources[0].shuffle_buffer == data.shuffle_buffer  # and reaches the sources


@pytest.mark.parametrize("cut", [0, 1, 7, 33, 61])
def test_shuffle_buffer_state_is_small_and_resumes_exactly_across_epochs(ordered_shards, cut):
    """Stream 1 of 2 reads one shard (20 documents) an epoch through a buffer of 12, so epochs
    interleave."""
    reference = draws(ordered_shards, 12, 90, stream=1, streams=2)
    assert len({r.epoch for r in reference[10:30]}) == 2  # records of two epochs interleave
    position = None if cut == 0 else json.loads(json.dumps(reference[cut - 1].position))
    if position is not None:
        assert set(position) == {"tail", "read", "held", "rng"} and len(position["held"]) == 11
        assert "doc" not in json.dumps(position)  # positions, not records
    resumed = draws(ordered_shards, 12, 90 - cut, stream=1, streams=2, position=position)
    assert [(r.raw.where, r.epoch, r.closed) for r in resumed] == \
        [(r.raw.where, r.epoch, r.closed) for r in reference[cut:]]
    # an epoch is said whole once, after its last record
    for t, read in enumerate(reference):
        for epoch in read.closed:
            assert all(r.epoch != epoch for r in reference[t + 1:])
            assert sum(r.epoch == epoch for r in reference[: t + 1]) == 20
    assert sorted(e for r in reference for e in r.closed) == [0, 1, 2]


def write_shard(path: Path, records: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, text in enumerate(records):
            data = text.encode()
            info = tarfile.TarInfo(f"{i:06d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shuffle_buffer_keeps_the_no_usable_sample_check_exact(mixture, tmp_path):
    """A shard dataset whose stream gets no usable sample in a whole epoch is an error through the
    buffer too; one usable sample an epoch is enough, however the buffer mixes the epochs."""
    good = json.dumps({"kind": "text", "text": "red square"})
    (tmp_path / "bad").mkdir()
    write_shard(tmp_path / "bad" / "a.tar", ["{oops"] * 5)
    (tmp_path / "one_good").mkdir()
    write_shard(tmp_path / "one_good" / "a.tar", ["{oops"] * 4 + [good])
    for name, fails in (("bad", True), ("one_good", False)):
        spec = StreamSpec([(str(tmp_path / name), 1.0)], mixture["processor"], 16, 1, shuffle_buffer=12)
        it = iter(TrainLoader(spec, 0, streams=1))
        if fails:
            with pytest.raises(RuntimeError, match="no usable sample in a whole epoch"):
                next(it)
        else:
            assert len([next(it) for _ in range(20)]) == 20  # 20 epochs, each with its one good sample
        it.close()
