"""One training step, ours against transformers' AriaForConditionalGeneration on the same weights:
forward + backward + AdamW step of one row, tokens/s, model TFLOP/s, MFU and peak memory.

    python scripts/bench_train.py                                    # CPU: model=narrow, 2K/4K/8K
    python scripts/bench_train.py --device cuda --model proxy --seq-lens 8192 --json train.json

Cases (``--cases``), each at every ``--seq-lens`` T:
- ``text``: one document of T tokens;
- ``image``: one ``--image-size`` px image (its <|img|> tokens first) and text, one document;
- ``packed``: documents of ``--doc-len`` tokens packed into the row. Ours attends within each
  document (segment ids, positions restarting); transformers has no packing without attention
  across documents, so its column runs the row as one document (its ``text`` case).

Both take the loss over the same supervised tokens (every next token that is text) and use
``torch.optim.AdamW(fused=True)``; ours adds its router losses, as training does. Where both ran the
same case, the table shows both language-model losses of one forward without gradients before the
case's first step, on the same weights (with ``--weights`` each steps its own copy, so after the
first case the two copies may differ by the steps' lr 1e-6): a check that the two compute the same
model on the device and in the dtype measured. Model FLOPs come from ``aria.model.flops`` (3x
forward, causal attention within documents), the same count for both where they compute the same
thing. Time, memory and peak: see ``bench_common``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

CASES = ("text", "image", "packed")


def make_inputs(cfg, case: str, seq_len: int, doc_len: int, image_size: int, device, dtype,
                seed: int = 0) -> dict:
    """Token ids, our targets / segments / positions, the HF labels, and pixels for one row."""
    from aria.model import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, cfg.text.vocab_size, (1, seq_len), generator=g)
    ids[ids == cfg.image_token_id] = 11
    pixels = mask = None
    if case == "image":
        patches = (image_size // cfg.vision.patch_size) ** 2
        if patches not in cfg.projector.patch_to_query:
            raise ValueError(f"--image-size {image_size}: {patches} patches per crop, but the model's "
                             f"projector maps {sorted(cfg.projector.patch_to_query)}")
        queries = cfg.projector.patch_to_query[patches]
        ids[0, 1:1 + queries] = cfg.image_token_id
        pixels = torch.randn(1, cfg.vision.num_channels, image_size, image_size, generator=g)
        mask = torch.ones(1, image_size, image_size, dtype=torch.bool)
    doc = doc_len if case == "packed" else seq_len
    segments = (torch.arange(seq_len) // doc + 1)[None]
    positions = (torch.arange(seq_len) % doc)[None]
    targets = torch.roll(ids, -1, 1)
    last_of_doc = torch.roll(segments, -1, 1) != segments
    last_of_doc[0, -1] = True
    targets[last_of_doc | (targets == cfg.image_token_id)] = IGNORE_INDEX
    labels = ids.clone()
    labels[ids == cfg.image_token_id] = IGNORE_INDEX  # transformers shifts labels itself
    out = dict(ids=ids, segments=segments, positions=positions, targets=targets, labels=labels,
               pixels=pixels, mask=mask, doc=doc)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in out.items()} | {
        "pixels": None if pixels is None else pixels.to(device, dtype)}


def step_fn(model, impl: str, inputs: dict, optimizer):
    """One fwd + bwd + optimizer step as a closure."""
    if impl == "ours":
        def step():
            out = model(inputs["ids"], inputs["pixels"], inputs["mask"], position_ids=inputs["positions"],
                        segment_ids=inputs["segments"], targets=inputs["targets"])
            (out.loss_sum / out.num_targets + out.router_loss).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        def step():
            out = model(input_ids=inputs["ids"], pixel_values=inputs["pixels"], pixel_mask=inputs["mask"],
                        labels=inputs["labels"])
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def lm_loss(model, impl: str, inputs: dict) -> float:
    """The language-model loss of one forward without gradients (ours without its router losses)."""
    with torch.no_grad():
        if impl == "ours":
            out = model(inputs["ids"], inputs["pixels"], inputs["mask"], position_ids=inputs["positions"],
                        segment_ids=inputs["segments"], targets=inputs["targets"])
            return float(out.loss_sum / out.num_targets)
        return float(model(input_ids=inputs["ids"], pixel_values=inputs["pixels"], pixel_mask=inputs["mask"],
                           labels=inputs["labels"]).loss)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Fused AdamW with its state already allocated (so a measured step holds only its own memory)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                  "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    return optimizer


def model_flops(cfg, case: str, seq_len: int, doc: int, image_size: int) -> float:
    from aria.model.flops import text_flops_per_token, vision_flops_per_crop

    flops = seq_len * text_flops_per_token(cfg, doc)
    if case == "image":
        flops += vision_flops_per_crop(cfg, (image_size // cfg.vision.patch_size) ** 2)
    return flops


def hf_case(case: str) -> str:
    return "text" if case == "packed" else case


def memory_case(args: argparse.Namespace, impl: str, case: str, seq_len: int) -> int:
    """Peak bytes of one step of ``impl`` on ``case``, in this (fresh) process."""
    model = bc.build_models(argparse.Namespace(**{**vars(args), "impls": [impl]}))[impl].train()
    cfg = bc.model_config(args)
    inputs = make_inputs(cfg, case if impl == "ours" else hf_case(case), seq_len, args.doc_len,
                         args.image_size, args.device, bc.DTYPES[args.dtype])
    step = step_fn(model, impl, inputs, adamw(model))
    with bc.PeakMemory(args.device) as peak:
        step()
    return peak.bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bc.add_arguments(parser)
    parser.add_argument("--seq-lens", default="2048,4096,8192", help="comma-separated T")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--doc-len", type=int, default=1024, help="tokens per document in 'packed'")
    parser.add_argument("--image-size", type=int, default=490)
    bc.add_profile_argument(parser)
    args = parser.parse_args(argv)
    bc.check_arguments(parser, args)
    cases = args.cases.split(",")
    if not set(cases) <= set(CASES):
        parser.error(f"--cases takes {', '.join(CASES)}, got {args.cases}")
    seq_lens = [int(t) for t in args.seq_lens.split(",")]

    dtype = bc.DTYPES[args.dtype]
    peak = bc.matmul_peak(args.device, dtype)
    cfg = bc.model_config(args)
    memory = bc.peaks(args, [(case, seq_len) for seq_len in seq_lens for case in cases], memory_case)
    models = {impl: m.train() for impl, m in bc.build_models(args).items()}
    optimizers = {impl: adamw(m) for impl, m in models.items()}
    header = (f"{bc.machine(args.device)}{bc.describe_hf(models)}; model={args.model} ({cfg.name}), {args.dtype}, "
              f"{args.dtype} matmul peak {peak / 1e12:.2f} TFLOP/s; fwd + bwd + fused AdamW of one row; "
              f"median of {args.repeats} after {args.warmup} warm-up; memory: peak above the step's start")
    bc.print_header(header, args.profile)

    results = []
    for seq_len in seq_lens:
        for case in cases:
            calls, flops, losses = {}, {}, {}
            for impl, model in models.items():
                c = case if impl == "ours" else hf_case(case)
                inputs = make_inputs(cfg, c, seq_len, args.doc_len, args.image_size, args.device, dtype)
                calls[impl] = step_fn(model, impl, inputs, optimizers[impl])
                losses[impl] = lm_loss(model, impl, inputs)  # before any step of the case: the same weights
                flops[impl] = model_flops(cfg, c, seq_len, inputs["doc"], args.image_size)
            seconds = bc.interleaved(calls, args.device, args.warmup, args.repeats)
            profiles = {impl: bc.profile_call(calls[impl], args.device, args.profile, f"{impl} {case} T={seq_len}")
                        for impl in models} if args.profile else {}
            for impl in models:
                s, peak_bytes = statistics.median(seconds[impl]), memory[impl, case, seq_len]
                results.append(dict(impl=impl, case=case, ran=hf_case(case) if impl == "hf" else case,
                                    seq_len=seq_len, seconds=s, all_seconds=seconds[impl],
                                    tokens_per_s=seq_len / s, tflops=flops[impl] / s / 1e12,
                                    mfu=flops[impl] / s / peak, peak_bytes=peak_bytes,
                                    loss=losses[impl]) | ({"profile": profiles[impl]} if profiles else {}))
                bc.progress(f"{impl} {case} T={seq_len}: {s:.2f} s, peak {bc.mib(peak_bytes)} MiB")
    report(results, args, peak)
    bc.write_json(args.json, dict(machine=bc.machine(args.device), model=args.model, dtype=args.dtype,
                                  matmul_peak_flops=peak, results=results))
    return 0


def report(results: list[dict], args, peak: float) -> None:
    rows = []
    by_key = {(r["impl"], r["case"], r["seq_len"]): r for r in results}
    for r in results:
        if r["impl"] != "ours":
            continue
        hf = by_key.get(("hf", r["case"], r["seq_len"]))
        row = [r["seq_len"], r["case"], f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.0f}",
               f"{r['tflops']:.3f}", f"{100 * r['mfu']:.1f}%", bc.mib(r["peak_bytes"])]
        if hf is not None:
            row += [f"{hf['seconds']:.2f}", f"{hf['tokens_per_s']:.0f}", f"{100 * hf['mfu']:.1f}%",
                    bc.mib(hf["peak_bytes"]), bc.ratio(r["seconds"], hf["seconds"]),
                    bc.ratio(r["peak_bytes"], hf["peak_bytes"]),
                    "-" if hf["ran"] != r["ran"] else f"{r['loss']:.4f} / {hf['loss']:.4f}"]
        rows.append(row)
    header = ["T", "case", "ours s", "tok/s", "TFLOP/s", "MFU", "MiB"]
    if "hf" in args.impls:
        header += ["hf s", "hf tok/s", "hf MFU", "hf MiB", "speed-up", "memory hf/ours", "LM loss ours / hf"]
    bc.print_table(header, rows)
    if "packed" in {r["case"] for r in results} and "hf" in args.impls:
        print(f"packed: ours attends within documents of {args.doc_len} tokens; transformers runs the "
              "row as one document (it has no packing without cross-document attention)")


if __name__ == "__main__":
    sys.exit(main())
