"""Shared test helpers: tiny configs, HF twins of our models, a small shapes world with its
tokenizer, HF exports with a tokenizer, a 2-process gloo harness, and a run directory rewound to an
earlier checkpoint."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import traceback
from multiprocessing import connection as mp_connection
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aria.config import ModelConfig
from aria.convert.checkpoint import write_hf_dir


def make_config(text: dict | None = None, moe: dict | None = None, vision: dict | None = None,
                patch_to_query: dict | None = None, **top) -> ModelConfig:
    base = {
        "text": dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, rope_theta=10000.0, max_position_embeddings=256, pad_token_id=1,
                     initializer_range=0.1),  # images and biases move the logits by O(0.1)
        "moe": dict(num_experts=4, top_k=2, intermediate_size=16, num_shared_experts=2),
        "vision": dict(hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4,
                       patch_size=4, image_size=16, hidden_act="gelu"),
        "projector": {"patch_to_query": patch_to_query or {16: 6, 4: 3}},
    }
    base["text"].update(text or {})
    base["moe"].update(moe or {})
    base["vision"].update(vision or {})
    return ModelConfig.from_dict({**base, **top})


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Norm weights init to ones and biases to zeros, which can hide a swapped or missing norm or
    bias: randomise them all."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + 1.0)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def hf_twin(model, directory: str | None = None, attn_implementation: str = "eager"):
    """transformers' AriaForConditionalGeneration holding our model's weights (via an export)."""
    from transformers import AriaForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        out = directory or tmp
        write_hf_dir(model.state_dict().items(), model.cfg, out)
        hf = AriaForConditionalGeneration.from_pretrained(out, attn_implementation=attn_implementation)
    return hf.eval()


def shapes_world(root: Path, vocab_size: int = 600, **sizes) -> tuple[Path, Path]:
    """(dataset dir, tokenizer dir): a small synthetic shapes dataset (images, videos,
    chat_{train,test}.jsonl) in root/data and a tokenizer trained on its text in root/tokenizer."""
    from data_tools.make_shapes import make_shapes
    from data_tools.train_tokenizer import train

    data = Path(root) / "data"
    sizes = {"train_images": 8, "test_images": 4, "train_videos": 2, "test_videos": 2, **sizes}
    make_shapes(data, seed=0, wds=False, workers=1, **sizes)
    tok_dir = train([str(data / "text_train.jsonl"), str(data / "chat_train.jsonl")],
                    Path(root) / "tokenizer", vocab_size=vocab_size)
    return data, tok_dir


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja")


def export_hf_with_tokenizer(model, tokenizer_dir: Path, out: Path) -> Path:
    """An HF directory of ``model`` with the tokenizer files copied in (what a released model has)."""
    write_hf_dir(model.state_dict().items(), model.cfg, out)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, Path(out) / name)
    return Path(out)


def packed_documents(layout: list[list[tuple[int, int, int]]], T: int, caption_tokens, image_id: int):
    """Packed rows of stage-0 documents: ``layout`` gives per row, per document, (tokens before its
    images, image slots, caption tokens). Returns input_ids, segment_ids, targets (the caption
    positions hold ``caption_tokens(n)``) and per document (row, image positions, caption positions)."""
    from aria.config import IGNORE_INDEX

    B = len(layout)
    input_ids = torch.full((B, T), 5)
    segment_ids = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX)
    docs = []
    for b, row in enumerate(layout):
        t = 0
        for s, (before, images, caption) in enumerate(row, start=1):
            image_pos = list(range(t + before, t + before + images))
            text_pos = list(range(t + before + images, t + before + images + caption))
            input_ids[b, image_pos] = image_id
            targets[b, text_pos] = caption_tokens(caption)
            segment_ids[b, t:t + before + images + caption] = s
            docs.append((b, image_pos, text_pos))
            t += before + images + caption
    return input_ids, segment_ids, targets, docs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, error_dir: str) -> None:
    # The parent's OpenMP pool does not survive fork: a forked child that enters a parallel region
    # can hang. One intra-op thread per rank avoids it (and 2 ranks fill 2 cores anyway).
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, *args)
    except BaseException:
        # A file, not a queue: a rank killed later cannot leave a half-written message or a held
        # lock behind, and a long traceback cannot block on a full pipe.
        Path(error_dir, f"rank{rank}.txt").write_text(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


FAILURE_GRACE_S = 5.0
"""After one rank fails, how long the others get to finish or report before they are killed (they
are often blocked in a collective that the failed rank will never join)."""


def run_distributed(fn, world: int = 2, args: tuple = (), timeout: float = 120) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` forked gloo processes; re-raise any failure.
    ``timeout`` bounds the whole run: ranks still running then are killed and reported as hung."""
    ctx = mp.get_context("fork")
    port = free_port()
    with tempfile.TemporaryDirectory() as error_dir:
        procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, error_dir))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline, why = time.monotonic() + timeout, f"after the {timeout:g} s timeout"
        running = list(procs)
        while running and time.monotonic() < deadline:
            mp_connection.wait([p.sentinel for p in running], timeout=deadline - time.monotonic())
            running = [p for p in running if p.exitcode is None]
            failed = [rank for rank, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed and running and time.monotonic() + FAILURE_GRACE_S < deadline:
                deadline = time.monotonic() + FAILURE_GRACE_S
                why = f"{FAILURE_GRACE_S:g} s after rank {failed[0]} failed"
        hung = [rank for rank, p in enumerate(procs) if p.exitcode is None]
        for p in procs:
            if p.exitcode is None:
                p.kill()
            p.join()
        failures = [Path(error_dir, name).read_text() for name in sorted(os.listdir(error_dir))]
    if hung:
        failures.append(f"rank(s) {hung} still running {why}: killed")
    if failures or any(p.exitcode != 0 for p in procs):
        raise AssertionError("distributed run failed:\n" + "\n".join(failures or
                             [f"exit codes {[p.exitcode for p in procs]}"]))


def rewind(run_dir: Path, to: Path, step: int = 2) -> Path:
    """A copy of ``run_dir`` as if it had died after its step-``step`` checkpoint."""
    shutil.copytree(run_dir, to)
    for ckpt in (to / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    (to / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    return to
