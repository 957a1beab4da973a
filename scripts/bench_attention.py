"""Attention on packed rows: by document (``aria.model.layers.document_attention``) vs the dense
(B, 1, T, T) segment mask, memory and time of one forward + backward.

    python scripts/bench_attention.py                          # CPU: T = 4K, 8K, 16K, 32K, bf16
    python scripts/bench_attention.py --device cuda --seq-lens 8192,65536 --json attention.json

One row of T tokens holds documents of ``--doc-len`` tokens (positions restarting in each), and
one attention layer of the decoder (``aria.model.decoder.Attention``: projections, RoPE, the core,
the out-projection; MHA, ``--heads`` x ``--head-dim``, Aria's 20 x 128 by default) runs forward and
backward on it, the layout built inside the step as the decoder builds it once per forward:
``TextDecoder.attention_layout`` ("docs") or ``layers.segment_causal_mask`` ("dense").

Each case runs in a fresh process (nothing left over from the case before). Memory is the peak of
allocated bytes during the step above what was allocated before it (inputs and weights): on the
CPU from torch's profiler (``profile_memory=True``: every allocation and free of torch's
allocator, kernels' internal buffers included; see ``check_plan.py``), on CUDA
``torch.cuda.max_memory_allocated``. Time: on the CPU the profiled step itself, after a warm-up
step at ``--doc-len`` tokens (one step: the dense path at 32K takes minutes), on CUDA the median
of ``--repeats`` steps after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # check_plan, and aria where it is not installed
from check_plan import _allocations  # noqa: E402  (the profiler's running total, shared)

from aria.config import TextConfig  # noqa: E402
from aria.model.decoder import Attention, TextDecoder  # noqa: E402
from aria.model.layers import RotaryEmbedding, segment_causal_mask  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PATHS = ("docs", "dense")


def packed_row(seq_len: int, doc_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ids and restarting positions (1, T) of documents of ``doc_len`` tokens (the last one
    shorter when ``doc_len`` does not divide T)."""
    token_T = torch.arange(seq_len, device=device)
    return (token_T // doc_len + 1)[None], (token_T % doc_len)[None]


def build(heads: int, head_dim: int, device, dtype) -> tuple[Attention, RotaryEmbedding]:
    cfg = TextConfig(vocab_size=128, hidden_size=heads * head_dim, num_layers=1, num_heads=heads,
                     num_kv_heads=heads, head_dim=head_dim, rope_theta=5e6, max_position_embeddings=1 << 20)
    torch.manual_seed(0)
    with torch.device(device):
        attn = Attention(cfg, 0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=(heads * head_dim) ** -0.5 if p.dim() == 2 else 0.02)
    return attn.to(dtype), RotaryEmbedding(head_dim, cfg.rope_theta)


def step(attn: Attention, rope: RotaryEmbedding, x_BTD: torch.Tensor, segment_ids_BT: torch.Tensor,
         position_ids_BT: torch.Tensor, path: str) -> None:
    """One forward + backward of the attention layer on a packed row, the layout built inside."""
    B, T, _ = x_BTD.shape
    if path == "docs":
        layout = TextDecoder.attention_layout(B, T, segment_ids_BT, None, x_BTD.device)
    else:
        layout = segment_causal_mask(segment_ids_BT, segment_ids_BT, 0)
    out_BTD = attn(x_BTD, rope(position_ids_BT, x_BTD.dtype), layout, None)
    out_BTD.float().square().mean().backward()


def run_case(seq_len: int, doc_len: int, path: str, device: str = "cpu", dtype: str = "bf16",
             heads: int = 20, head_dim: int = 128, repeats: int = 3) -> dict:
    """Peak bytes above the step's inputs and seconds of one attention fwd + bwd (see the module doc)."""
    from torch.profiler import ProfilerActivity, profile

    dev, dt = torch.device(device), DTYPES[dtype]
    attn, rope = build(heads, head_dim, dev, dt)
    segment_ids_BT, position_ids_BT = packed_row(seq_len, doc_len, dev)
    x_BTD = torch.randn(1, seq_len, heads * head_dim, device=dev, dtype=dt, requires_grad=True)
    if dev.type == "cuda":
        step(attn, rope, x_BTD, segment_ids_BT, position_ids_BT, path)  # warm-up (kernels, allocator)
        times = []
        for _ in range(repeats):
            attn.zero_grad(set_to_none=True)
            x_BTD.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            step(attn, rope, x_BTD, segment_ids_BT, position_ids_BT, path)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated() - base
        seconds = statistics.median(times)
    else:
        warm_ids_BT, warm_pos_BT = packed_row(doc_len, doc_len, dev)
        step(attn, rope, x_BTD[:, :doc_len].detach().requires_grad_(), warm_ids_BT, warm_pos_BT, path)
        attn.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            start = time.perf_counter()
            step(attn, rope, x_BTD, segment_ids_BT, position_ids_BT, path)
            seconds = time.perf_counter() - start
        series, _ = _allocations(prof)
        peak = max((total for _, total in series), default=0)
    return {"seq_len": seq_len, "doc_len": doc_len, "path": path, "peak_bytes": peak, "seconds": seconds,
            "device": device, "dtype": dtype, "heads": heads, "head_dim": head_dim}


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--seq-lens", default="4096,8192,16384,32768", help="comma-separated T")
    parser.add_argument("--doc-len", type=int, default=2048, help="tokens per packed document")
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--paths", default="docs,dense", help="comma-separated: docs, dense")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (CUDA)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    paths = args.paths.split(",")
    if not set(paths) <= set(PATHS):
        parser.error(f"--paths takes {', '.join(PATHS)}, got {args.paths}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")

    def isolated(seq_len: int, path: str) -> dict:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(run_case, seq_len, args.doc_len, path, args.device, args.dtype, args.heads,
                               args.head_dim, args.repeats).result()

    results = []
    print(f"{machine(args.device)}; {args.dtype}, {args.heads} heads x {args.head_dim}, documents of "
          f"{args.doc_len} tokens, one attention layer forward + backward")
    print(f"{'T':>7} | " + " | ".join(f"{p + ' MiB':>11} | {p + ' s':>9}" for p in paths)
          + (" | dense / docs memory" if len(paths) == 2 else ""))
    for seq_len in (int(t) for t in args.seq_lens.split(",")):
        row = {p: isolated(seq_len, p) for p in paths}
        results.extend(row.values())
        cells = " | ".join(f"{row[p]['peak_bytes'] / 2**20:>11.1f} | {row[p]['seconds']:>9.3f}" for p in paths)
        ratio = (f" | {row['dense']['peak_bytes'] / row['docs']['peak_bytes']:.1f}x" if len(paths) == 2 else "")
        print(f"{seq_len:>7} | {cells}{ratio}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(args.device), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
