"""What the side-by-side benchmarks share (``bench_train.py``, ``bench_generate.py``,
``bench_video.py``): the two implementations on the same weights, the device's measured matmul
peak, interleaved timing, peak memory of one case in a fresh process, tables and JSON.

- **Same weights.** Ours is built from scratch (``--seed``) or loaded from ``--weights`` (a Hugging
  Face Aria directory, e.g. the released model). Transformers' ``AriaForConditionalGeneration``
  loads ``--weights``, or else is built in memory from our tensors under their HF names
  (``aria.convert.checkpoint.ours_to_hf_tensors``, the export's renaming, then ``from_pretrained``
  with that ``state_dict``): it holds the very same storage as ours, so at ``model=aria`` the two
  take 51 GB of a GPU together instead of 102, and no 51 GB export goes through the disk (in
  ``bench_train.py`` both optimizers then step the same tensors, at lr 1e-6: it times the steps,
  compares no weights, and takes both losses it shows from forwards before a case's first step).
  Both run in ``--dtype`` on ``--device``; transformers uses its SDPA attention.
- **Time**: the cases of both implementations alternate in one process (``interleaved``), so a
  machine's slow minute hits both; ``--warmup`` rounds are dropped, the median of ``--repeats``
  rounds is reported. CUDA is synchronised around every timed call.
- **Memory**: each (implementation, case) runs once in a fresh process (``in_fresh_process``):
  on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the measured call;
  on the CPU the process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs``)
  above its resident set before the call. A case that runs out of memory is reported as such
  (CPU: the child's address space is capped at ``--memory-cap`` GiB so that an allocation fails
  cleanly instead of the kernel killing the machine's processes).
- **Peak**: a square ``--dtype`` matmul measured on the device (2048 on the CPU, 8192 on CUDA);
  MFU = model FLOPs per second / that peak.
- **Where the time goes** (``--profile FILE``, ``bench_train.py`` and ``bench_generate.py``): after
  the timed rounds, one more call of each case under ``torch.profiler``, and a table per call in
  FILE: on CUDA the kernels' own device time (CUDA graph replays included), grouped (GEMMs,
  grouped GEMMs, attention, routing, norms, copies, elementwise, optimizer) and the largest
  kernels, against the call's wall time; on the CPU the same for aten ops' own CPU time.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # aria, where it is not installed
    sys.path.insert(0, str(HERE.parent))

from aria.model.layers import cpu_native_bf16, slow_bf16_warning  # noqa: E402 (after the path)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ("ours", "hf")
OOM = "out of memory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    parser.add_argument("--model", default=None,
                        help="a config name (configs/model) or YAML; default: narrow on the CPU, proxy on CUDA")
    parser.add_argument("--weights", type=Path, default=None,
                        help="a Hugging Face Aria directory both implementations load (default: from scratch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: bf16 on CUDA and on a CPU with AVX512-BF16 or AMX, else fp32 (a CPU "
                             "without them runs bf16 matmuls ~50-100x slower than fp32)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--impls", default="ours,hf", help="ours,hf or ours (without transformers)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the fresh-process memory runs")
    parser.add_argument("--memory-cap", type=float, default=None,
                        help="CPU: GiB of address space a memory run may take (default: 90%% of RAM)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    args.impls = args.impls.split(",")
    if args.impls[0] != "ours" or not set(args.impls) <= set(IMPLS):
        parser.error(f"--impls takes ours or ours,hf (the tables compare with ours), got {','.join(args.impls)}")
    if args.model is None:
        args.model = "proxy" if args.device == "cuda" else "narrow"
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" or cpu_native_bf16() else "fp32"
    slow = slow_bf16_warning(args.device, DTYPES[args.dtype], "--dtype fp32 measures what such a CPU runs")
    if slow:
        print(slow, file=sys.stderr)
    if args.weights is not None and not (args.weights / "config.json").is_file():
        parser.error(f"--weights {args.weights}: not a Hugging Face model directory (no config.json)")


def model_config(args):
    from aria.config import load_model_config
    from aria.convert.checkpoint import read_hf_config

    return read_hf_config(args.weights) if args.weights else load_model_config(args.model)


def build_ours(args) -> torch.nn.Module:
    """Our model in ``args.dtype`` on ``args.device``: from ``--weights``, or from scratch (built
    on the meta device and initialised in place on the target device: no fp32 host copy)."""
    from aria.convert.checkpoint import load_hf_dir
    from aria.model import build_model

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.weights is not None:
        return load_hf_dir(args.weights, device=device, dtype=dtype)
    model = build_model(model_config(args), device="meta").to(dtype).to_empty(device=device)
    for buffer in model.buffers():
        buffer.zero_()
    model.init_weights(seed=args.seed)
    return model


def build_hf(args, ours: torch.nn.Module | None = None) -> torch.nn.Module:
    """transformers' model on the same weights: ``--weights``, or ``ours``'s own tensors (shared
    storage, see the module docstring)."""
    from transformers import AriaConfig, AriaForConditionalGeneration

    from aria.convert.checkpoint import ours_to_hf_tensors
    from aria.convert.hf_config import to_hf_config

    def load(directory) -> torch.nn.Module:
        model = AriaForConditionalGeneration.from_pretrained(
            directory, torch_dtype=DTYPES[args.dtype], attn_implementation="sdpa").to(args.device)
        if torch.device(args.device).type == "cpu":
            # transformers leaves CPU weights as views of the memory-mapped safetensors file: pages
            # the load did not touch would become resident (and an optimizer's in-place writes copy
            # them) inside a measured call. Weights in ordinary memory, as ours are.
            copies: dict[int, torch.Tensor] = {}
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = copies.setdefault(tensor.data_ptr(), tensor.data.clone())
        return model

    if args.weights is not None:
        return load(args.weights)
    if ours is None:
        ours = build_ours(args)
    dtype = DTYPES[args.dtype]
    config = AriaConfig.from_dict(to_hf_config(ours.cfg, str(dtype).removeprefix("torch.")))
    tensors = dict(ours_to_hf_tensors(((k, v.detach()) for k, v in ours.state_dict().items()), ours.cfg))
    hf = AriaForConditionalGeneration.from_pretrained(None, config=config, state_dict=tensors,
                                                      torch_dtype=dtype, attn_implementation="sdpa")
    return hf.to(args.device)


def build(args, impl: str, ours: torch.nn.Module | None = None) -> torch.nn.Module:
    if impl == "ours":
        return ours if ours is not None else build_ours(args)
    return build_hf(args, ours)


def build_models(args) -> dict[str, torch.nn.Module]:
    """The implementations of ``--impls`` on the same weights (ours is built even when only
    transformers runs: its tensors become transformers' weights)."""
    torch.manual_seed(args.seed)
    ours = build_ours(args)
    return {impl: build(args, impl, ours) for impl in args.impls}


def peaks(args, cases: list[tuple], measure: Callable) -> dict[tuple, object]:
    """``measure(args, impl, *case)`` in a fresh process for every implementation and case, before
    the parent holds any model (on a GPU the children need all of it); {(impl, *case): bytes or
    ``OOM``}, or None everywhere without ``--memory``."""
    result = {}
    for case in cases:
        for impl in args.impls:
            result[(impl, *case)] = (in_fresh_process(measure, args, impl, *case, device=args.device,
                                                      memory_cap=args.memory_cap) if args.memory else None)
    return result


def describe_hf(models: dict) -> str:
    """transformers' version and the attention and experts kernels its model runs."""
    if "hf" not in models:
        return ""
    import transformers

    text = models["hf"].config.text_config
    return (f"; transformers {transformers.__version__} (attention {text._attn_implementation}, experts "
            f"{getattr(text, '_experts_implementation', 'eager')})")


def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="profile one more call of each case and write where its time went to FILE")


def print_header(header: str, profile: Path | None) -> None:
    """The run's first line, also the first line of the ``--profile`` file (which it starts)."""
    print(header, flush=True)
    if profile is not None:
        profile.write_text(header + "\n\n")


# (group, pattern in a lower-cased kernel or op name): the first that matches names the group
TIME_GROUPS = (
    ("attention", r"flash|fmha|sdpa|attention"),
    ("grouped GEMM", r"group"),
    ("GEMM", r"gemm|gemv|nvjet|cutlass|cublas|xmma|dot_kernel|aten::(mm|addmm|bmm|mv|dot)$"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("routing, indexing", r"sort|topk|scan|index|gather|scatter|nonzero|cumsum|bincount|histc"),
    ("norms, reductions", r"norm|reduce|mean|sum|softmax|logsumexp|max"),
    ("copies, fills", r"copy|memcpy|memset|fill|cat|clone|zero|empty"),
    ("elementwise", r"elementwise|aten::"),
)


def time_group(name: str) -> str:
    lowered = name.lower()
    return next((group for group, pattern in TIME_GROUPS if re.search(pattern, lowered)), "other")


def profile_call(call: Callable[[], object], device: str, path: Path, label: str, top: int = 25) -> dict:
    """Runs ``call`` once under ``torch.profiler`` and appends to ``path`` where its time went (see
    the module docstring); returns the groups' milliseconds, the total and the wall time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        call()
        synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    rows = []  # (ms, calls, name)
    for event in prof.key_averages():
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            us = event.self_device_time_total
        elif not cuda and event.key.startswith("aten::"):
            us = event.self_cpu_time_total
        else:
            continue
        if us > 0:
            rows.append((us / 1e3, event.count, event.key))
    rows.sort(key=lambda row: -row[0])
    total = sum(ms for ms, _, _ in rows)
    groups: dict[str, list] = {}
    for ms, count, name in rows:
        entry = groups.setdefault(time_group(name), [0.0, 0])
        entry[0] += ms
        entry[1] += count
    what = "kernels (device time)" if cuda else "aten ops (own CPU time)"
    lines = [f"== {label}: wall {wall_ms:.2f} ms; {what} {total:.2f} ms "
             f"({100 * total / wall_ms:.0f}% of the wall), {sum(c for _, c, _ in rows)} calls"]
    lines += [f"{'group':>20} | {'ms':>9} | share | calls"]
    for group, (ms, count) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{group:>20} | {ms:9.3f} | {100 * ms / total:4.1f}% | {count}")
    lines += [f"largest {min(top, len(rows))}:", f"{'ms':>9} | {'calls':>6} | name"]
    lines += [f"{ms:9.3f} | {count:6d} | {name[:140]}" for ms, count, name in rows[:top]]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n\n")
    return dict(wall_ms=wall_ms, total_ms=total, groups_ms={g: v[0] for g, v in groups.items()})


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, repeats: int = 10) -> float:
    """FLOP/s of a square matmul in ``dtype`` on ``device`` (median of ``repeats``)."""
    n = 8192 if torch.device(device).type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def interleaved(calls: dict[str, Callable[[], object]], device: str, warmup: int, repeats: int
                ) -> dict[str, list[float]]:
    """Seconds of every call in each of ``repeats`` rounds (after ``warmup`` rounds), the calls of a
    round one after the other."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class PeakMemory:
    """Peak bytes above the current use while the block runs (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.bytes = 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if not self.cuda:  # give the C heap's free pages back, so the baseline holds only live memory
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.bytes = _status_kib("VmHWM") * 1024 - self.base


def is_oom(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in
                                                ("out of memory", "DefaultCPUAllocator: can't allocate")))


def _cap_address_space(gib: float | None) -> None:
    limit = int((gib if gib is not None else 0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
                * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def in_fresh_process(func: Callable, *args, device: str = "cpu", memory_cap: float | None = None):
    """``func(*args)`` in a new process (spawned: nothing of this one is inherited); returns its
    result, or ``OOM`` when it ran out of memory (an allocation failed, or the child was killed)."""
    context = multiprocessing.get_context("spawn")
    initializer = None if torch.device(device).type == "cuda" else _cap_address_space
    with ProcessPoolExecutor(1, mp_context=context, initializer=initializer,
                             initargs=() if initializer is None else (memory_cap,)) as pool:
        try:
            return pool.submit(_guarded, func, *args).result()
        except Exception as error:  # BrokenProcessPool: the child died without a Python error
            if type(error).__name__ == "BrokenProcessPool":
                progress(f"a memory run died without a Python error ({error}): taken as the kernel's "
                         "out-of-memory kill")
                return OOM
            raise


def _guarded(func: Callable, *args):
    try:
        return func(*args)
    except Exception as error:
        if is_oom(error):
            return OOM
        raise


def machine(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    try:
        model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    bf16 = "native bf16" if cpu_native_bf16() else "no native bf16"
    return (f"{model} ({torch.backends.cpu.get_cpu_capability()}, {bf16}), {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def ratio(ours, theirs) -> str:
    """``theirs / ours`` as '2.10x' (how many times better ours is for times and memory), or '-'."""
    if not isinstance(ours, (int, float)) or not isinstance(theirs, (int, float)) or ours <= 0:
        return "-"
    return f"{theirs / ours:.2f}x"


def print_table(header: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in row] for row in [header] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print(" | ".join(c.rjust(w) for c, w in zip(row, widths)), flush=True)
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def mib(value) -> object:
    return f"{value / 2**20:.0f}" if isinstance(value, (int, float)) else value


def progress(message: str) -> None:
    """One line per finished case on stderr (the table comes at the end, on stdout)."""
    print(message, file=sys.stderr, flush=True)


def write_json(path: Path | None, payload: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(payload, indent=1, default=str))
