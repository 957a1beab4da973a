"""Check the memory plan (``aria.train.plan``) against the measured peak of real DeepSpeed steps.

    python scripts/check_plan.py [--quick] [--cases NAME,...] [--json OUT]

For every case of the matrix (a narrow-but-not-tiny Aria; ZeRO 0-3; expert parallelism 1 and 2;
sequence parallelism 1 and 2; with and without activation checkpointing; two sequence lengths;
fp32 and bf16; text rows and rows with images; gradient accumulation) it runs two optimizer steps
exactly as the trainer does them (``Trainer.build_model``, ``engine.build_engine``,
``Trainer._accumulate``, ``engine.step``) in 1 or 2 forked gloo processes, measures the peak of
each process, and prints it beside the plan of the same config computed with ``device="cpu"`` (the
dtype and AdamW kernels the CPU uses; everything else is the GPU plan's code).

How the peak is measured (independently of the plan): torch's profiler with ``profile_memory=True``
records every allocation and free of torch's CPU allocator with the running total of allocated
bytes; the profiler starts before the model is built, so that total is every tensor byte of the
process (model, DeepSpeed's buffers, optimizer state, activations, batches). The measured peak is
the largest total during the two training steps -- what ``torch.cuda.max_memory_allocated`` reports
on a GPU. The profiler sees frees only on the thread it profiles, and gloo's worker threads hold a
collective's tensors until they move on: a tensor whose last reference such a thread drops would be
freed unseen (a leak in the record, and a peak that varies from run to run). So every collective
runs on numpy-owned copies of its tensors (``_stage_collectives``): the measured tensors are
freed by the code that uses them, and the copies stay outside the measurement. An allocation at an
address the record still holds (a free missed all the same) counts as that block's free; the table
shows how many there were. Each case runs in fresh processes (one thread each). The process's
resident memory is not used: DeepSpeed's modules and the profiler's own records add hundreds of MB
to it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A narrow Aria whose tensors dominate the process: 15M parameters, 4 MoE layers of 8 experts
# (top-2) plus a shared expert, a 2-layer ViT on 490 px crops of 70 px patches (16 tokens per crop).
MODEL = ["model=tiny", "model.text.vocab_size=8192", "model.text.hidden_size=256", "model.text.num_layers=4",
         "model.text.num_heads=4", "model.text.num_kv_heads=4", "model.text.head_dim=64",
         "model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.intermediate_size=256",
         "model.moe.num_shared_experts=1", "model.vision.hidden_size=128", "model.vision.intermediate_size=256",
         "model.vision.num_heads=4", "data.image_size=490", "parallel.bucket_size=2000000",
         "logging=quiet", "data.num_workers=0"]
STEPS = 2


@dataclass(frozen=True)
class Case:
    name: str
    world: int
    overrides: tuple[str, ...]
    crops: int = 0
    docs: int = 3

    def all_overrides(self) -> list[str]:
        return [*MODEL, *self.overrides]


def _case(name, world, *overrides, crops=0, docs=3) -> Case:
    return Case(name, world, tuple(overrides), crops, docs)


CASES = [
    _case("z0-fp32-T512", 2, "parallel.zero_stage=0", "train.seq_len=512"),
    _case("z0-fp32-T2048-ckpt", 2, "parallel.zero_stage=0", "train.seq_len=2048",
          "parallel.checkpoint_decoder=true"),
    _case("z1-fp32-T512", 2, "parallel.zero_stage=1", "train.seq_len=512"),
    _case("z1-fp32-T2048", 2, "parallel.zero_stage=1", "train.seq_len=2048"),
    _case("z1-bf16-T2048", 2, "parallel.zero_stage=1", "parallel.precision=bf16", "train.seq_len=2048"),
    _case("z1-bf16-T2048-img-G2", 2, "parallel.zero_stage=1", "parallel.precision=bf16", "train.seq_len=2048",
          "train.grad_accum=2", crops=8),
    _case("z1-fp32-ep2-T2048", 2, "parallel.zero_stage=1", "parallel.ep_size=2", "train.seq_len=2048"),
    _case("z1-bf16-ep2-T2048-ckpt", 2, "parallel.zero_stage=1", "parallel.ep_size=2", "parallel.precision=bf16",
          "train.seq_len=2048", "parallel.checkpoint_decoder=true"),
    _case("z2-fp32-T512", 2, "parallel.zero_stage=2", "train.seq_len=512"),
    _case("z2-fp32-T2048-img", 2, "parallel.zero_stage=2", "train.seq_len=2048", crops=8),
    _case("z2-bf16-T2048-ckpt", 2, "parallel.zero_stage=2", "parallel.precision=bf16", "train.seq_len=2048",
          "parallel.checkpoint_decoder=true", "parallel.checkpoint_vision=true", crops=8),
    _case("z2-bf16-ep2-T2048", 2, "parallel.zero_stage=2", "parallel.ep_size=2", "parallel.precision=bf16",
          "train.seq_len=2048"),
    _case("z2-fp32-ep2-T512-G2", 2, "parallel.zero_stage=2", "parallel.ep_size=2", "train.seq_len=512",
          "train.micro_batch_size=2", "train.grad_accum=2"),
    _case("z3-fp32-T512", 2, "parallel.zero_stage=3", "train.seq_len=512"),
    _case("z3-fp32-T2048-ckpt", 2, "parallel.zero_stage=3", "train.seq_len=2048",
          "parallel.checkpoint_decoder=true"),
    _case("z3-bf16-T2048", 2, "parallel.zero_stage=3", "parallel.precision=bf16", "train.seq_len=2048"),
    _case("z2-fp32-sp2-T2048", 2, "parallel.zero_stage=2", "parallel.sp_size=2", "train.seq_len=2048"),
    _case("z2-bf16-sp2-T2048-img", 2, "parallel.zero_stage=2", "parallel.sp_size=2", "parallel.precision=bf16",
          "train.seq_len=2048", crops=8),
    _case("z2-bf16-sp2-ep2-T2048-ckpt-chunk", 2, "parallel.zero_stage=2", "parallel.sp_size=2", "parallel.ep_size=2",
          "parallel.precision=bf16", "train.seq_len=2048", "parallel.checkpoint_decoder=true",
          "model.moe.token_chunk=256"),
    _case("z2-bf16-T512", 2, "parallel.zero_stage=2", "parallel.precision=bf16", "train.seq_len=512"),
    _case("z1-fp32-1proc-T2048", 1, "parallel.zero_stage=1", "train.seq_len=2048"),
    _case("z1-bf16-lora-T2048", 2, "parallel.zero_stage=1", "parallel.precision=bf16", "train.seq_len=2048",
          "lora=default", "stage=finetune", crops=8),
]
QUICK = ["z0-fp32-T512", "z2-fp32-T2048-img", "z1-bf16-ep2-T2048-ckpt", "z3-fp32-T512"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allocations(prof) -> tuple[list[tuple[int, int]], int]:
    """(time ns, bytes allocated) after every allocation and free the profiler recorded, and the
    number of frees it missed.

    The profiler records frees only on the profiled (main) thread; a tensor whose last reference a
    gloo worker thread drops (one a collective still held) is freed unseen, and its address can be
    handed out again. An allocation at an address that is still allocated in the record proves that
    block was freed before: it is taken as freed at that moment (the latest it can have been)."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
    events.sort(key=lambda e: e[0])
    live: dict[int, int] = {}
    total, missed, out = 0, 0, []
    for t, ptr, size in events:
        if size > 0:
            if ptr in live:
                total -= live.pop(ptr)
                missed += 1
            live[ptr] = size
            total += size
        else:
            total -= live.pop(ptr, 0)
        out.append((t, total))
    return out, missed


def _ranges(prof, prefix: str) -> list[tuple[int, int]]:
    """(start, end) ns of the ``record_function`` ranges whose name starts with ``prefix``."""
    from torch._C._profiler import _EventType

    spans, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.TorchOp and node.name.startswith(prefix):
            spans.append((node.start_time_ns, node.end_time_ns))
    return sorted(spans)


def _staged(t):
    """A buffer like ``t`` whose memory numpy owns (outside torch's allocator, so outside the
    measurement), holding a copy of ``t``."""
    import numpy as np
    import torch

    if t.numel() == 0:
        return t
    raw = torch.from_numpy(np.empty(t.numel() * t.element_size(), dtype=np.uint8))
    return raw.view(t.dtype).view(t.shape).copy_(t)


class _Done:
    """The handle of a collective that already completed."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _stage_collectives() -> None:
    """Run every collective on numpy-owned copies of its tensors, to completion, copying results
    back on the calling thread. gloo's worker threads hold a collective's tensors until they move
    on, and a tensor whose last reference such a thread drops is freed where the profiler cannot
    see it (it records frees on the profiled thread only); staged, every measured tensor is freed
    by the thread that uses it, when the code under test drops it, and the copies (exact) are not
    part of the measurement."""
    import torch.distributed as dist

    def run(real, tensors, outputs, args, kwargs):
        wanted = kwargs.pop("async_op", False)
        staged = {id(t): _staged(t) for t in tensors}
        swap = lambda x: staged.get(id(x), x) if not isinstance(x, list) else [staged.get(id(v), v) for v in x]
        work = real(*[swap(a) for a in args], **{k: swap(v) for k, v in kwargs.items()}, async_op=True)
        if work is not None:
            work.wait()
        for t in outputs:
            t.copy_(staged[id(t)])
        return _Done() if wanted else None

    def wrap(name, outs):
        real = getattr(dist, name, None)
        if real is None:
            return

        def staged_call(*args, **kwargs):
            tensors = [v for a in (*args, *kwargs.values()) for v in (a if isinstance(a, list) else [a])
                       if hasattr(v, "untyped_storage")]
            outputs = outs(args, kwargs, tensors)
            return run(real, tensors, outputs, list(args), dict(kwargs))

        setattr(dist, name, staged_call)

    first = lambda args, kwargs, tensors: tensors[:1]
    first_list = lambda args, kwargs, tensors: list(args[0]) if args and isinstance(args[0], list) else tensors[:1]
    for name in ("all_reduce", "broadcast", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor",
                 "_all_gather_base", "_reduce_scatter_base", "all_to_all_single"):
        wrap(name, first)
    for name in ("all_gather", "all_reduce_coalesced", "all_to_all"):
        wrap(name, first_list)


def _marked(method, label: str):
    from torch.profiler import record_function

    def run(*args, **kwargs):
        with record_function(label):
            return method(*args, **kwargs)

    return run


def _rank(rank: int, world: int, port: int, case: Case, queue) -> None:
    import torch

    torch.set_num_threads(1)  # a forked OpenMP pool can hang; 2 ranks fill 2 cores anyway
    quiet = os.open(os.devnull, os.O_WRONLY)  # DeepSpeed's and the profiler's chatter; errors
    os.dup2(quiet, 1)                          # come back through the queue
    os.dup2(quiet, 2)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        _stage_collectives()
        queue.put((rank, _measure(case, rank, world)))
    except BaseException:
        queue.put((rank, {"error": traceback.format_exc()}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _measure(case: Case, rank: int, world: int) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    from aria.data.packing import PackedBatch
    from aria.parallel.engine import build_engine
    from aria.train.compose import compose_run
    from aria.train.plan import synthetic_batch, workload
    from aria.train.schedule import lr_multiplier
    from aria.train.trainer import Trainer, gradient_norm

    cfg = compose_run("config", case.all_overrides(), inputs=False)
    work = workload(cfg, case.crops, case.docs)

    class SyntheticDataTrainer(Trainer):
        def build_data(self, *args, **kwargs):
            return None  # the steps below feed synthetic batches

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    prof.start()
    with record_function("check::build"):
        trainer = SyntheticDataTrainer(cfg)
        model = trainer.build_model()
        engine, _, _ = build_engine(model, cfg, lr_multiplier(cfg.optim, cfg.train.max_steps),
                                    trainer.ep_group_name)
    for name in ("forward", "backward", "step"):  # mark the phases in the profile
        setattr(engine, name, _marked(getattr(engine, name), f"check::phase::{name}"))
    started = time.perf_counter()
    for step in range(STEPS):
        with record_function(f"check::step{step}"):
            micro = []
            for i in range(work.grad_accum):
                inputs = synthetic_batch(cfg.model, work.rows, work.seq_len, work.crops, work.crop_size,
                                         work.docs, seed=1000 * step + 10 * i + rank)
                num_targets = int((inputs["targets"] != -100).sum())
                micro.append(PackedBatch(**inputs, num_targets=num_targets, num_tokens=work.rows * work.seq_len))
            n_global = float(sum(b.num_targets for b in micro) * world)
            trainer._accumulate(engine, micro, n_global, world, work.grad_accum)
            if cfg.parallel.zero_stage == 0:
                gradient_norm(model)
            engine.step()
            del micro
    seconds = (time.perf_counter() - started) / STEPS
    prof.stop()
    allocs, missed = _allocations(prof)
    steps = _ranges(prof, "check::step")
    start, end = steps[0][0], steps[-1][1]
    before = [total for t, total in allocs if t < start]
    last = steps[-1][0]
    phases = {}
    for name in ("forward", "backward", "step"):
        spans = [(a, b) for a, b in _ranges(prof, f"check::phase::{name}") if a >= last]
        phases[name] = max((total for t, total in allocs if any(a <= t <= b for a, b in spans)), default=0)
    return {"phases": phases, "missed_frees": missed, "peak": max(total for t, total in allocs if start <= t <= end),
            "init_peak": max(before, default=0), "after_init": before[-1] if before else 0,
            "step_seconds": seconds}


def measure(case: Case, timeout: float = 600) -> list[dict]:
    """Per-rank measurements of ``case`` in fresh forked processes."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, case.world, port, case, queue)) for r in range(case.world)]
    for proc in procs:
        proc.start()
    results = {}
    deadline = time.time() + timeout
    while len(results) < case.world and time.time() < deadline:
        if not queue.empty():
            rank, result = queue.get()
            results[rank] = result
        else:
            time.sleep(0.05)
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors or len(results) < case.world:
        raise RuntimeError(f"case {case.name} failed:\n" + "\n".join(errors or ["timed out"]))
    return [results[r] for r in range(case.world)]


def plan_of(case: Case):
    from aria.train.plan import plan_run
    from aria.train.compose import compose_run

    cfg = compose_run("config", case.all_overrides(), inputs=False)
    return plan_run(cfg, case.world, case.world, None, crops=case.crops, docs=case.docs, device="cpu")


def check(case: Case) -> dict:
    """Plan and measurement of one case, as one row of the table."""
    plan = plan_of(case)
    ranks = measure(case)
    measured = max(r["peak"] for r in ranks)
    return {"case": case.name, "world": case.world, "plan": plan.peak, "measured": measured,
            "error": plan.peak / measured - 1, "peak_phase": plan.peak_phase.name,
            "missed_frees": max(r["missed_frees"] for r in ranks),
            "step_seconds": max(r["step_seconds"] for r in ranks),
            "ranks": ranks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    names = QUICK if args.quick else [c.name for c in CASES]
    if args.cases:
        names = args.cases.split(",")
    unknown = sorted(set(names) - {c.name for c in CASES})
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {[c.name for c in CASES]}")
    mib = 2 ** 20
    print(f"{'case':28} {'ranks':>5} {'plan MiB':>9} {'measured':>9} {'error':>7} {'missed':>6} "
          f"{'s/step':>7}  plan's peak phase")
    rows = []
    for case in (c for c in CASES if c.name in names):
        row = check(case)
        rows.append(row)
        print(f"{row['case']:28} {row['world']:>5} {row['plan'] / mib:9.1f} {row['measured'] / mib:9.1f} "
              f"{100 * row['error']:+6.1f}% {row['missed_frees']:6d} {row['step_seconds']:7.2f}  "
              f"{row['peak_phase']}", flush=True)
    worst = max(abs(r["error"]) for r in rows)
    print(f"largest |error|: {100 * worst:.1f}% over {len(rows)} cases")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
