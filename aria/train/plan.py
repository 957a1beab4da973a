"""Memory and time plan of a training run, per GPU, before any weight is loaded (the library
behind ``python -m aria.tools.plan`` and the trainer's memory check).

For one GPU of the run: parameters, gradients, fp32 master weights and optimizer state as ZeRO /
expert parallelism shard them; the forward/backward peak (activations and the largest transient
buffers) and the optimizer-step peak; the total against the GPU's memory; and the step's FLOPs and
time at an assumed MFU. The same composition as training (recipe + groups + overrides), without
the data and weight paths a run needs.

Letters: N parameters (elements), P an optimizer partition (elements), W processes, B rows per
micro-batch, T tokens per row, G micro-batches per step.

Design decisions:
- Activations come from the real model code, not a formula: the model is built and run forward +
  backward for one micro-batch of the run's shape inside ``FakeTensorMode`` (tensors with shapes
  and dtypes but no memory) with the run's trainable groups, LoRA adapters, activation
  checkpointing and (``aria.parallel.expert.simulate_expert_parallel``) this rank's share of the
  experts and its token-exchange buffers. A ``TorchDispatchMode`` above the fake mode sees every
  new storage of every op, and a weak reference on the storage sees it die, so the trace records
  the bytes alive after each allocation. Parameter gradients are dropped by a hook the moment
  autograd has accumulated them (ZeRO moves them into its buckets) and their bytes are recorded,
  so one trace gives both "activations + transients" and "activations + gradients kept so far".
  A 25B model at 64K tokens traces in seconds and allocates nothing.
- The trace runs on the CPU (fake CUDA tensors cannot hold modules in this torch). Attention runs
  by document (``aria.model.layers.document_attention``): on fake tensors a row counts as one
  document (the worst case) and the per-document causal SDPA (flash on both devices, no T x T
  buffer) stands in for the GPU's varlen kernel, whose memory is the same. Whatever the attention
  code does, the plan follows.
  What a fake kernel does not show is added by hand (``_hidden_temporary``: logsumexp's temporary
  of its input's size), and fp32 ``grouped_mm``, whose meta kernel applies CUDA's bf16-only rule,
  is shaped in bf16 (CPU validation runs are fp32; on a GPU the model takes that path in bf16).
  Where the model code takes another path on the CPU, the trace takes the planned device's
  (``aria.model.layers.FAKE_DEVICE``).
- DeepSpeed's own memory is modelled from what DeepSpeed 0.19.8 allocates for the JSON
  ``aria.parallel.engine.deepspeed_config`` gives it, with the exact parameter groups of
  ``engine.param_groups`` (and DeepSpeed's MoE group split) and its partitioning arithmetic
  (alignment, which parameters fall in a rank's partition, ZeRO-3 persistence threshold and
  sub-groups). Four wrappers are modelled: the client AdamW alone (ZeRO-0, fp32; bf16 without ZeRO
  is refused by ``deepspeed_config``), BF16_Optimizer (ZeRO-1, bf16 + fp32 gradient accumulation: full-size fp32
  gradients), the ZeRO-1/2 optimizer (flat bit16 groups, fp32 partitions, gradient buckets doubled
  by overlap_comm, gradient partitions) and the ZeRO-3 optimizer (partitioned parameters, persistent
  small parameters, gathered parameters with each MoE block gathered whole as a ZeRO-3 leaf). What
  DeepSpeed holds during backward follows the trace's own gradient order (``_ZeroBuckets``), so
  buckets and kept gradients are counted where they coexist with the activations.
- The peak is the maximum over the phases of a step, not a sum: forward/backward (persistent state
  + the trace's activation peak + buckets, gathered parameters and gradients held at that time),
  gradient reduction, and the optimizer step (persistent state + gradients + the flat fp32 copy of
  the largest partition + AdamW's temporaries, themselves traced on fake tensors with the device's
  foreach setting). The steady state is planned: optimizer states exist, as from the second step.
  The engine's construction (flattening copies, weight loading) and checkpoint writes are not.
- Checked against measured peaks of real DeepSpeed steps on the CPU (``scripts/check_plan.py``,
  ``docs/performance.md``): within 6.5% over ZeRO 0-3, expert and sequence parallelism,
  checkpointing, fp32/bf16, text and image rows.
- On top of the allocator's peak the GPU needs its CUDA context, NCCL buffers and allocator
  fragmentation: ``RUNTIME_RESERVE`` + ``FRAGMENTATION`` of the peak. A layout fits when that total
  is at most the GPU's memory. Memory is in GiB throughout (an "80 GB" H100 has 79.2 GiB).
- The micro-batch is synthetic and shape-true: B rows of T tokens, ``docs`` documents per row
  (positions restart, segment ids differ), ``crops`` image crops per row of the run's crop size as
  uint8 pixels with a pixel mask, their <|img|> slots at the start of the row. Default crops:
  0 for text-only stages, else images filling half the row (``default_crops``).
- Time: FLOPs from ``aria.train.metrics.batch_flops`` (the trainer's MFU count) for the G
  micro-batches of one GPU, at an assumed MFU of a dense bf16 peak (H100/H200: 989 TFLOP/s).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import weakref
from dataclasses import dataclass

GIB = 2 ** 30
RUNTIME_RESERVE = int(1.5 * GIB)
"""CUDA context, cuBLAS workspaces and NCCL communicator buffers, per GPU."""
FRAGMENTATION = 0.05
"""Allocator slack on top of the peak of allocated bytes (reserved vs allocated)."""
DEFAULT_MFU = 0.4
H100_BF16_PEAK = 989e12
"""Dense bf16 FLOP/s of an H100 / H200 SXM (as aria.train.metrics.PEAK_BF16_FLOPS)."""
TEXT_ONLY_STAGES = ("language_pretraining",)
"""Stage names whose data hold no images: the plan's default micro-batch has no crops."""

# DeepSpeed 0.19.8 constants the plan depends on (read from its source, not configurable by us).
DS_ALLREDUCE_ELEMENTS = 500_000_000
"""engine.MEMORY_OPT_ALLREDUCE_SIZE: bucket of the engine's all-reduce (ZeRO-0, BF16_Optimizer)."""
DS_Z3_PERSISTENCE_THRESHOLD = 100_000
"""ZeRO-3 stage3_param_persistence_threshold: parameters this small stay whole on every rank."""
DS_Z3_SUB_GROUP_ELEMENTS = 1_000_000_000
"""ZeRO-3 sub_group_size: elements of one flat optimizer sub-group."""


# ---------------------------------------------------------------------------------------------
# The micro-batch
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One GPU's share of a step: G micro-batches of B rows of T tokens."""

    rows: int
    seq_len: int
    grad_accum: int
    crops: int
    """Image crops per row."""
    crop_size: int
    """Crop side in pixels."""
    docs: int
    """Documents packed into a row."""

    def describe(self) -> str:
        images = f", {self.crops} crops of {self.crop_size} px per row" if self.crops else ", text only"
        return (f"{self.grad_accum} x {self.rows} rows x {self.seq_len} tokens ({self.docs} "
                f"document{'s' if self.docs > 1 else ''} per row{images})")


def crop_queries(model_cfg, crop_size: int) -> int:
    """<|img|> tokens of one crop of ``crop_size`` px."""
    patches = (crop_size // model_cfg.vision.patch_size) ** 2
    if crop_size % model_cfg.vision.patch_size or patches not in model_cfg.projector.patch_to_query:
        sizes = sorted(round(k ** 0.5) * model_cfg.vision.patch_size for k in model_cfg.projector.patch_to_query)
        raise ValueError(f"crops of {crop_size} px do not fit the model: model.projector.patch_to_query "
                         f"has crop sizes {sizes} px")
    return model_cfg.projector.patch_to_query[patches]


def default_crop_size(cfg) -> int:
    """The run's image crop size (data.image_size), or the model's largest crop if it has no such size."""
    model = cfg.model
    try:
        crop_queries(model, cfg.data.image_size)
        return cfg.data.image_size
    except ValueError:
        return max(round(k ** 0.5) * model.vision.patch_size for k in model.projector.patch_to_query)


def default_crops(cfg, crop_size: int) -> int:
    """Worst-case-ish image load of a row: none for text-only stages, else crops whose <|img|> tokens
    fill half the row (caption and interleaved data pack several images into a row)."""
    if cfg.stage.name in TEXT_ONLY_STAGES:
        return 0
    return (cfg.train.seq_len // 2) // crop_queries(cfg.model, crop_size)


def synthetic_batch(model_cfg, rows: int, seq_len: int, crops: int, crop_size: int, docs: int,
                    seed: int = 0) -> dict:
    """Model inputs of one packed micro-batch (``PackedBatch.model_inputs()`` keys), on the current
    default device: ``crops`` crops per row with their <|img|> slots first, ``docs`` documents per
    row. Works inside ``FakeTensorMode`` (shapes only) and for real runs."""
    import torch

    from aria.config import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    text = model_cfg.text
    special = {model_cfg.image_token_id, text.pad_token_id}
    low = max(special) + 1
    Q = crop_queries(model_cfg, crop_size) if crops else 0
    slots = crops * Q
    if slots >= seq_len:
        raise ValueError(f"{crops} crops of {Q} tokens do not fit a row of {seq_len} tokens "
                         "(train.seq_len); plan fewer crops per row (--crops)")
    if not 1 <= docs <= seq_len - slots:
        raise ValueError(f"--docs {docs} must be in [1, {seq_len - slots}]")
    ids = torch.randint(low, text.vocab_size, (rows, seq_len), generator=g)
    ids[:, :slots] = model_cfg.image_token_id
    bounds = [round(i * seq_len / docs) for i in range(docs + 1)]
    position = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])
    segment = torch.cat([torch.full((b - a,), i + 1) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    targets = ids.roll(-1, 1)
    targets[:, :slots] = IGNORE_INDEX
    for end in bounds[1:]:
        targets[:, end - 1] = IGNORE_INDEX  # a document never predicts the next one's first token
    inputs = {"input_ids": ids, "targets": targets, "position_ids": position.expand(rows, -1).clone(),
              "segment_ids": segment.expand(rows, -1).clone(), "pixel_values": None, "pixel_mask": None,
              "image_feature_order": None}
    if crops:
        n = rows * crops
        inputs["pixel_values"] = torch.randint(0, 256, (n, model_cfg.vision.num_channels, crop_size, crop_size),
                                               dtype=torch.uint8, generator=g)
        inputs["pixel_mask"] = torch.ones(n, crop_size, crop_size, dtype=torch.bool)
    return inputs


def micro_batch_flops(model_cfg, work: Workload) -> float:
    """Training FLOPs of one micro-batch, counted as the trainer counts them."""
    from aria.train.metrics import batch_flops

    bounds = [round(i * work.seq_len / work.docs) for i in range(work.docs + 1)]
    pairs = sum((b - a) * (b - a + 1) // 2 for a, b in zip(bounds, bounds[1:])) * work.rows
    crops = {work.crop_size: work.rows * work.crops} if work.crops else {}
    return batch_flops(model_cfg, work.rows * work.seq_len, pairs, crops)


# ---------------------------------------------------------------------------------------------
# Tracing on fake tensors
# ---------------------------------------------------------------------------------------------


def _hidden_temporary(func, args) -> int:
    """Bytes a native kernel allocates and frees inside one op, which its fake (meta) kernel does not
    show: logsumexp computes (x - max).exp_() into a temporary of the input's size, on CPU and CUDA."""
    import torch

    if func in (torch.ops.aten.logsumexp.default,):
        return args[0].numel() * args[0].element_size()
    return 0


ALLOC, FREE, SPIKE, HOOK = range(4)


def _storage_tracker(existing=()):
    """A dispatch mode that logs the birth and death of every storage created while it is active:
    ``(ALLOC, key, bytes, label)``, ``(FREE, key)``, and ``(SPIKE, bytes)`` for a kernel's hidden
    temporary; the caller adds ``HOOK`` events. Storages of ``existing`` tensors (the model's
    parameters and buffers) are never counted, so views of them are not new memory. (Built here, not
    at import, so that ``python -m aria.tools.plan --help`` does not import torch.)"""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    class StorageTracker(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = WeakIdKeyDictionary()
            self.refs = set()
            self.log: list[tuple] = []
            for t in existing:
                self.seen[t.untyped_storage()] = -1

        def _died(self, key, ref):
            self.log.append((FREE, key))
            self.refs.discard(ref)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._grouped_mm.default and args[0].dtype == torch.float32:
                # the meta kernel applies CUDA's bf16-only rule; the CPU kernel runs fp32 with the
                # same shapes: compute them in bf16 and hand back an fp32 result
                low = [a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                       for a in args]
                out = func(*low, **(kwargs or {})).to(torch.float32)
            else:
                out = func(*args, **(kwargs or {}))
            hidden = _hidden_temporary(func, args)
            if hidden:
                self.log.append((SPIKE, hidden))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if st not in self.seen:
                        key = len(self.log)
                        self.seen[st] = key
                        self.refs.add(weakref.ref(st, lambda r, k=key: self._died(k, r)))
                        self.log.append((ALLOC, key, st.nbytes(), (str(func), tuple(t.shape), t.dtype)))
            return out

    return StorageTracker()


@dataclass
class Trace:
    """The storages of one micro-batch's forward + backward on one GPU, from the fake-tensor trace,
    as an event log (``_storage_tracker``) with a ``HOOK`` event where each parameter gradient is
    handed over (``(HOOK, param id, bytes, storage key)``)."""

    log: list[tuple]
    seconds: float

    def series(self, held=None, spike=None):
        """(live bytes, event index) after every event, plus ``held(k)`` bytes the optimizer holds
        after k gradient hand-overs and ``spike(k, param id)`` bytes it allocates briefly at the
        k-th; a handed-over gradient leaves the live bytes (the optimizer's buffers hold it)."""
        sizes: dict[int, int] = {}
        live = hooks = 0
        for i, event in enumerate(self.log):
            kind = event[0]
            if kind == ALLOC:
                live += event[2]
                sizes[event[1]] = event[2]
            elif kind == FREE:
                live -= sizes.pop(event[1], 0)
            extra = held(hooks) if held else 0
            if kind == SPIKE:
                yield live + event[1] + extra, i
            elif kind == HOOK:
                yield live + extra + (spike(hooks, event[1]) if spike else 0), i
                hooks += 1
                live -= sizes.pop(event[3], 0)
                extra = held(hooks) if held else 0
            yield live + extra, i

    def peak(self, held=None, spike=None) -> int:
        return max((v for v, _ in self.series(held, spike)), default=0)

    @property
    def activations(self) -> int:
        """Peak of activations and transients (each gradient counted until it is handed over)."""
        return self.peak()

    def largest_at_peak(self, n: int = 6) -> list[tuple[int, str]]:
        """The ``n`` largest groups of storages alive at the activation peak: (bytes, description)."""
        best, at = -1, 0
        for v, i in self.series():
            if v > best:
                best, at = v, i
        live: dict[int, tuple] = {}
        for event in self.log[: at + 1]:
            if event[0] == ALLOC:
                live[event[1]] = (event[2], event[3])
            elif event[0] == FREE:
                live.pop(event[1], None)
        groups: dict[tuple, int] = {}
        for nbytes, (func, shape, dtype) in live.values():
            key = (func.split(".")[1] if func.startswith("aten.") else func, shape, str(dtype).split(".")[-1])
            groups[key] = groups.get(key, 0) + nbytes
        ranked = sorted(groups.items(), key=lambda kv: -kv[1])[:n]
        return [(nbytes, f"{op} {list(shape)} {dtype}" + (f" x{nbytes // _prod(shape, dtype)}"
                                                           if nbytes > _prod(shape, dtype) else ""))
                for (op, shape, dtype), nbytes in ranked]


def _prod(shape, dtype_name: str) -> int:
    import torch

    size = getattr(torch, dtype_name).itemsize
    for d in shape:
        size *= d
    return max(size, 1)


@dataclass(frozen=True)
class ParamInfo:
    numel: int
    trainable: bool
    leaf: int
    """Index of the ZeRO-3 fetch unit (module) the parameter is gathered with."""


class FakeModel:
    """The run's model on fake tensors, built as ``Trainer.build_model`` builds it: LoRA adapters,
    this rank's experts (simulated expert parallelism), the stage's frozen groups, checkpointing."""

    def __init__(self, cfg, dtype, ep_size: int, ep_imbalance: float = 1.0) -> None:
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode

        from aria.model.aria import Aria
        from aria.model.moe import MoE
        from aria.parallel.expert import simulate_expert_parallel
        from aria.train.stages import apply_stage

        self.cfg, self.dtype, self.ep_size, self.ep_imbalance = cfg, dtype, ep_size, ep_imbalance
        self.mode = FakeTensorMode()
        with self.mode:
            torch.set_default_dtype(dtype)
            try:
                model = Aria(cfg.model)
            finally:
                torch.set_default_dtype(torch.float32)
            if cfg.lora.enabled:
                from aria.model.lora import add_adapters

                add_adapters(model, cfg.lora)
            if cfg.parallel.sp_size > 1:
                from aria.parallel.sequence import simulate_sequence_parallel

                simulate_sequence_parallel(model, cfg.parallel.sp_size)
            if ep_size > 1:
                simulate_expert_parallel(model.moe_layers, ep_size, ep_imbalance)
                for layer in model.moe_layers:  # DeepSpeed's MoE tags, as tag_expert_parameters sets them
                    for p in layer.experts.parameters():
                        p.allreduce, p.group_name = False, f"ep_size_{ep_size}"
            apply_stage(model, cfg.stage, cfg.lora, cfg.optim.lr_scale)
            model.set_gradient_checkpointing(vision=cfg.parallel.checkpoint_vision,
                                             decoder=cfg.parallel.checkpoint_decoder)
        self.model = model.train()
        # ZeRO-3 fetch units: an MoE block whole (a leaf module), every other module its own params
        unit_of: dict[int, int] = {}
        units = 0
        for module in model.modules():
            if isinstance(module, MoE):
                for p in module.parameters():
                    unit_of.setdefault(id(p), units)
                units += 1
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) not in unit_of]
            if own:
                for p in own:
                    unit_of[id(p)] = units
                units += 1
        self.params = {id(p): ParamInfo(p.numel(), p.requires_grad, unit_of[id(p)])
                       for p in model.parameters()}

    def optimizer_groups(self) -> list[tuple[list[int], bool]]:
        """DeepSpeed's optimizer groups as (parameter ids in order, is an expert group): the
        trainer's ``param_groups``, split into MoE groups as ``build_engine`` does."""
        from aria.parallel.engine import param_groups

        o = self.cfg.optim
        groups = param_groups(self.model, o.lr, o.weight_decay, o.lr_scale)
        if self.ep_size > 1:
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        return [([id(p) for p in g["params"]], bool(g.get("moe"))) for g in groups if g["params"]]

    def trace(self, work: Workload, device: str = "cuda") -> Trace:
        """Forward + backward of one micro-batch as ``Trainer._accumulate`` runs it on ``device``
        (where the code takes another path on the CPU)."""
        from aria.model.layers import FAKE_DEVICE

        started = time.perf_counter()
        tracker = _storage_tracker([*self.model.parameters(), *self.model.buffers()])

        def hand_over(p):
            storage = p.grad.untyped_storage()
            tracker.log.append((HOOK, id(p), storage.nbytes(), tracker.seen.get(storage, -1)))
            p.grad = None

        hooks = [p.register_post_accumulate_grad_hook(hand_over) for p in self.model.parameters()
                 if p.requires_grad]
        planned = FAKE_DEVICE.set(device)
        try:
            with self.mode, tracker:
                inputs = synthetic_batch(self.cfg.model, work.rows, work.seq_len, work.crops,
                                         work.crop_size, work.docs)
                if inputs["pixel_values"] is None:
                    inputs.pop("pixel_values"), inputs.pop("pixel_mask")
                out = self.model(**inputs)
                loss = out.loss_sum * 1e-3
                if out.router_loss is not None:
                    loss = loss + out.router_loss / work.grad_accum
                if loss.requires_grad:
                    loss.backward()
                del out, loss, inputs
        finally:
            FAKE_DEVICE.reset(planned)
            for h in hooks:
                h.remove()
        return Trace(tracker.log, time.perf_counter() - started)


def adamw_temporaries(numel: int, foreach: bool) -> int:
    """Bytes AdamW's step allocates beyond its state for one fp32 parameter of ``numel`` elements
    (traced on fake tensors: the foreach kernels keep one sqrt buffer, the single-tensor loop two;
    the buffers scale with the parameter, so one trace per kernel choice serves every size)."""
    return numel * _adamw_bytes_per_element(foreach)


@functools.lru_cache(maxsize=None)
def _adamw_bytes_per_element(foreach: bool) -> int:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    numel = 1 << 20
    with FakeTensorMode():
        p = torch.nn.Parameter(torch.empty(numel, dtype=torch.float32))
        p.grad = torch.empty(numel, dtype=torch.float32)
        opt = torch.optim.AdamW([p], lr=1e-4, foreach=foreach)
        opt.step()  # creates the state, as the first step of a run does
        tracker = _storage_tracker([p, p.grad, *opt.state[p].values()])
        with tracker:
            opt.step()
    return Trace(tracker.log, 0.0).activations // numel


# ---------------------------------------------------------------------------------------------
# DeepSpeed's memory
# ---------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """Bytes alive at the peak of one phase of a step, on top of the persistent state."""

    name: str
    items: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.items.values())


@dataclass
class DeepSpeedMemory:
    wrapper: str
    """The optimizer wrapper DeepSpeed picks for the layout."""
    persistent: dict[str, int]
    phases: list[Phase]


@dataclass(frozen=True)
class _Group:
    """One DeepSpeed optimizer group on this rank: its parameters in order, flattened."""

    pids: tuple[int, ...]
    numels: tuple[int, ...]
    dp: int
    """Ranks its optimizer state is partitioned over (world, or world / ep_size for experts)."""
    expert: bool

    @property
    def flat(self) -> int:
        alignment = 2 * self.dp  # ZeRO-1/2 and BF16_Optimizer align the flat buffer to 2 * dp
        return -(-sum(self.numels) // alignment) * alignment

    @property
    def partition(self) -> int:
        return self.flat // self.dp

    def in_partition(self, rank: int) -> int:
        """Elements of the whole parameters that overlap ``rank``'s partition (ZeRO-1/2 keep their
        gradients whole: ``grads_in_partition``)."""
        start, end = self.partition * rank, self.partition * (rank + 1)
        total, offset = 0, 0
        for n in self.numels:
            if start <= offset < end or offset < start < offset + n:
                total += n
            offset += n
        return total


def _allreduce_copy(numels: list[int], bucket: int) -> int:
    """Largest flat copy of DeepSpeed's ``allreduce_no_retain``: tensors are gathered until their
    total exceeds ``bucket``; a bucket of more than one tensor is flattened into a new tensor."""
    largest, group = 0, []
    for n in numels:
        group.append(n)
        if sum(group) > bucket:
            largest = max(largest, sum(group) if len(group) > 1 else 0)
            group = []
    if len(group) > 1:
        largest = max(largest, sum(group))
    return largest


def _cumulative(sizes: list[int]) -> list[int]:
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out


class _ZeroBuckets:
    """ZeRO-1/2's gradient path over the backward's hook order (``DeepSpeedZeroOptimizer``): each
    gradient is copied into the current bucket (two with overlap_comm) and the bucket is reduced
    when the next gradient would overflow it -- its slices flattened into one tensor (when there
    are several) and cast to the communication dtype; the first reduction allocates the
    gradients this rank keeps. A gradient larger than a bucket keeps its own storage until the
    next reduction."""

    def __init__(self, groups: list[_Group], numel: dict[int, int], rank: int, bucket: int, b: int,
                 comm: int, overlap: bool, compact: bool, store: int, hooks: list[int]) -> None:
        where = {}
        for gi, g in enumerate(groups):
            offset = 0
            for pid, n in zip(g.pids, g.numels):
                where[pid] = (gi, offset)
                offset += n
        buffers = (2 if overlap else 1) * bucket * b
        held, spikes = [0], []
        bucket_pids: list[int] = []
        elements, large, stored = 0, 0, False
        self.final_spike = 0
        for pid in hooks + [None]:
            n = numel[pid] if pid is not None else 0
            spike = 0
            if pid is None or elements + n > bucket:
                if elements:
                    spike = self._reduce_bytes(bucket_pids, groups, where, numel, rank, b, comm, compact)
                    stored = True
                bucket_pids, elements, large = [], 0, 0
            if pid is None:
                self.final_spike = spike
                break
            spikes.append(spike)
            if n > bucket:
                large = n * b  # reduced from its own storage at the next reduction
            bucket_pids.append(pid)
            elements += n
            held.append(buffers + (store if stored else 0) + large)
        self.held, self.spikes = held, spikes
        self.end_held = buffers + store

    @staticmethod
    def _reduce_bytes(pids, groups, where, numel, rank, b, comm, compact) -> int:
        """Bytes ``average_tensor`` allocates for one bucket: per process group, the flattened
        slices (a copy when there are several) and their cast to the communication dtype."""
        per_group: dict[bool, list] = {}
        for pid in pids:
            gi, offset = where[pid]
            g = groups[gi]
            n, start = numel[pid], offset
            while n > 0:
                part = min(start // g.partition, g.dp - 1)
                take = min(n, g.partition * (part + 1) - start) if part < g.dp - 1 else n
                slices = per_group.setdefault(g.expert, [])
                mergeable = not (compact and part == rank)
                if slices and slices[-1][0] == part and slices[-1][2] and mergeable:
                    slices[-1][1] += take
                else:
                    slices.append([part, take, mergeable])
                n, start = n - take, start + take
        largest = 0
        for slices in per_group.values():
            elements = sum(s[1] for s in slices)
            copy = elements * b if len(slices) > 1 else 0
            largest = max(largest, copy + (elements * comm if comm != b else 0))
        return largest


def deepspeed_memory(fake: FakeModel, trace: Trace, world: int, dtype, device: str) -> DeepSpeedMemory:
    """Per-GPU bytes of the DeepSpeed engine ``aria.parallel.engine.build_engine`` builds, by phase
    of a step (see the module docstring), for the rank whose partitions are the largest."""
    import torch

    from aria.parallel.engine import deepspeed_config

    cfg = fake.cfg
    ds = deepspeed_config(cfg, dtype)
    zero = ds["zero_optimization"]
    stage = zero["stage"]
    b = torch.tensor([], dtype=dtype).element_size()
    fp32_accum = ds.get("data_types", {}).get("grad_accum_dtype") == "fp32"
    comm = 4 if ds.get("communication_data_type") == "fp32" else b
    ep = cfg.parallel.ep_size
    groups = [_Group(tuple(pids), tuple(fake.params[pid].numel for pid in pids), world // ep if expert else world,
                     expert) for pids, expert in fake.optimizer_groups()]
    numel = {pid: p.numel for pid, p in fake.params.items()}
    trainable = sum(p.numel for p in fake.params.values() if p.trainable)
    frozen = sum(p.numel for p in fake.params.values() if not p.trainable)
    largest_param = max((p.numel for p in fake.params.values() if p.trainable), default=0)
    hooks = [e[1] for e in trace.log if e[0] == HOOK]
    grads_so_far = _cumulative([numel[pid] * b for pid in hooks])
    foreach = device == "cuda"  # torch's AdamW default: foreach kernels on CUDA, a loop on CPU
    G = cfg.train.grad_accum
    later = "forward/backward, micro-batches 2..G" if G > 1 else None

    def adam(n: int) -> int:
        return adamw_temporaries(n, foreach) if n else 0

    if stage == 0:  # fp32 only (``deepspeed_config`` refuses bf16 without ZeRO)
        grads = trainable * b
        bucket_copy = max(_allreduce_copy([n for g in groups if g.expert == e for n in g.numels],
                                          DS_ALLREDUCE_ELEMENTS) for e in (False, True)) * b
        persistent = {"parameters": (trainable + frozen) * b, "optimizer state": 8 * trainable}
        wrapper = "client AdamW (ZeRO-0, fp32)"
        step = {"gradients (.grad)": grads, "AdamW temporaries": adam(largest_param)}
        phases = [Phase("forward/backward", {"activations + gradients so far":
                                             trace.peak(held=lambda k: grads_so_far[k])})]
        if later:
            phases.append(Phase(later, {"activations + gradients": trace.peak(held=lambda k: grads)}))
        phases += [Phase("gradient all-reduce", {"gradients (.grad)": grads, "flat bucket copy": bucket_copy}),
                   # the trainer's own gradient norm without ZeRO: a float64 square per tensor
                   Phase("gradient norm", {"gradients (.grad)": grads, "float64 copies": 16 * largest_param}),
                   Phase("optimizer step", step)]
        return DeepSpeedMemory(wrapper, persistent, phases)

    if stage == 1 and b == 2 and fp32_accum:
        persistent = {"parameters": (trainable + frozen) * b,
                      "gradients (fp32, whole groups)": 4 * sum(g.flat for g in groups),
                      "master weights (fp32)": 4 * sum(g.partition for g in groups),
                      "optimizer state": 8 * sum(g.partition for g in groups)}
        lp = trainable * b
        phases = [Phase("forward/backward", {"activations + bf16 gradients so far":
                                             trace.peak(held=lambda k: grads_so_far[k])})]
        if later:  # the bf16 gradients are zeroed between micro-batches, not freed
            phases.append(Phase(later, {"activations + bf16 gradients": trace.peak(held=lambda k: lp)}))
        bucket_copy = max(_allreduce_copy([g.flat for g in groups if g.expert == e], DS_ALLREDUCE_ELEMENTS)
                          for e in (False, True))
        phases += [Phase("gradient accumulation and reduction",
                         {"bf16 gradients (.grad)": lp, "fp32 cast of one gradient": 4 * largest_param,
                          "flat bucket copy": 4 * bucket_copy}),
                   Phase("optimizer step", {"bf16 gradients (.grad)": lp,
                                            "AdamW temporaries": adam(max(g.partition for g in groups))})]
        return DeepSpeedMemory("BF16_Optimizer (ZeRO-1, bf16 params, fp32 gradients)", persistent, phases)

    if stage in (1, 2):
        partitioned = stage == 2
        compact = partitioned and fp32_accum and b == 2
        rank = max(range(world), key=lambda r: sum(g.in_partition(r % g.dp) for g in groups))
        parts = [g.partition for g in groups]
        persistent = {"parameters": (trainable + frozen) * b, "master weights (fp32)": 4 * sum(parts),
                      "optimizer state": 8 * sum(parts)}
        store = 4 * sum(parts) if compact else b * sum(g.in_partition(rank % g.dp) for g in groups)
        store_name = "gradient partition (fp32)" if compact else "gradients of the partition's parameters"
        sim = _ZeroBuckets(groups, numel, rank, zero["reduce_bucket_size"], b, comm, zero["overlap_comm"],
                           compact, store, hooks)
        if partitioned or zero["overlap_comm"]:
            phases = [Phase("forward/backward", {"activations, buckets, gradients, reductions":
                                                 trace.peak(held=lambda k: sim.held[k],
                                                            spike=lambda k, pid: sim.spikes[k])}),
                      Phase("end of backward", {"buckets and gradients": sim.end_held,
                                                "last bucket's reduction": sim.final_spike})]
        else:  # ZeRO-1 without overlap keeps .grad through backward and reduces afterwards
            phases = [Phase("forward/backward", {"activations + gradients so far":
                                                 trace.peak(held=lambda k: grads_so_far[k])}),
                      Phase("gradient reduction", {"gradients (.grad)": trainable * b,
                                                   "buckets and gradients": sim.end_held,
                                                   "bucket reduction": max(sim.spikes + [sim.final_spike])})]
        if later:
            if partitioned:  # the previous micro-batches' gradients, accumulated into at the end
                again = 0 if compact else store
                phases.append(Phase(later, {"activations, buckets, gradients, reductions":
                                            trace.peak(held=lambda k: sim.held[k] + again,
                                                       spike=lambda k, pid: sim.spikes[k])}))
            else:  # ZeRO-1 keeps .grad between micro-batches and reduces at the last one only
                phases.append(Phase(later, {"activations + gradients (.grad)":
                                            trace.peak(held=lambda k: trainable * b)}))
        step = 0
        for g in groups:
            if compact:  # the fp32 partition buffer is the flat gradient already (no copy, no cast)
                step = max(step, adam(g.partition))
                continue
            # flatten the partition's gradients (a copy), cast to fp32, then step
            flat = g.partition * b
            step = max(step, flat + (g.partition * 4 if b != 4 else 0), g.partition * 4 + adam(g.partition))
        phases.append(Phase("optimizer step", {store_name: store, "flat fp32 gradient + AdamW": step}))
        name = f"DeepSpeedZeroOptimizer (ZeRO-{stage})"
        return DeepSpeedMemory(name, persistent, phases)

    # ZeRO-3: every parameter partitioned over all ranks; the small ones stay whole once gathered
    W = world
    part = {pid: -(-p.numel // W) for pid, p in fake.params.items()}
    small = sum(p.numel for p in fake.params.values() if p.numel <= DS_Z3_PERSISTENCE_THRESHOLD)
    trainable_part = sum(part[pid] for pid, p in fake.params.items() if p.trainable)
    sub_groups = []
    for g in groups:
        current = 0
        for pid in g.pids:
            if current and current + part[pid] > DS_Z3_SUB_GROUP_ELEMENTS:
                sub_groups.append(current)
                current = 0
            current += part[pid]
        sub_groups.append(current)
    accum = 4 if fp32_accum else b
    persistent = {"parameters (shards)": sum(part.values()) * b, "small parameters (whole)": small * b,
                  "master weights (fp32)": 4 * trainable_part, "optimizer state": 8 * trainable_part,
                  "gradient partitions": accum * trainable_part,
                  "gradient bucket": zero["reduce_bucket_size"] * comm}
    units: dict[int, int] = {}
    for p in fake.params.values():
        if p.numel > DS_Z3_PERSISTENCE_THRESHOLD:
            units[p.leaf] = units.get(p.leaf, 0) + p.numel
    # the running module (an MoE block whole) plus the prefetch bucket, which may overshoot by one
    # parameter, bounded by what is partitioned at all
    largest_big = max((p.numel for p in fake.params.values() if p.numel > DS_Z3_PERSISTENCE_THRESHOLD), default=0)
    gathered = min(sum(units.values()), max(units.values(), default=0) + zero["stage3_prefetch_bucket_size"]
                   + largest_big) * b
    reduce = zero["reduce_bucket_size"] * comm * (W + 1) // W
    phases = [Phase("forward/backward", {"activations": trace.activations, "gathered parameters": gathered,
                                         "bucket reduce-scatter": reduce}),
              Phase("optimizer step", {"flat fp32 gradient + AdamW": 4 * max(sub_groups) + adam(max(sub_groups))})]
    return DeepSpeedMemory("DeepSpeedZeroOptimizer_Stage3", persistent, phases)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


LAYOUT_FIELDS = ("parallel.zero_stage", "parallel.ep_size", "parallel.sp_size", "parallel.checkpoint_decoder",
                 "parallel.checkpoint_vision", "train.micro_batch_size", "train.grad_accum")
"""The config fields a layout is made of (what ``suggest_layout`` may change)."""


def layout_of(cfg) -> dict:
    return {"parallel.zero_stage": cfg.parallel.zero_stage, "parallel.ep_size": cfg.parallel.ep_size,
            "parallel.sp_size": cfg.parallel.sp_size,
            "parallel.checkpoint_decoder": cfg.parallel.checkpoint_decoder,
            "parallel.checkpoint_vision": cfg.parallel.checkpoint_vision,
            "train.micro_batch_size": cfg.train.micro_batch_size, "train.grad_accum": cfg.train.grad_accum}


def with_layout(cfg, layout: dict):
    """``cfg`` with the layout fields of ``layout`` (dotted names) replaced, validated again."""
    par = {k.split(".")[1]: v for k, v in layout.items() if k.startswith("parallel.")}
    train = {k.split(".")[1]: v for k, v in layout.items() if k.startswith("train.")}
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **par),
                               train=dataclasses.replace(cfg.train, **train))


def overrides(layout: dict) -> str:
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in layout.items())


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


@dataclass
class Plan:
    """Per-GPU memory (bytes) and time of one training step of a layout."""

    recipe: str
    model: str
    layout: dict
    """The layout's config fields (``LAYOUT_FIELDS``) and their values."""
    world_size: int
    gpus_per_node: int
    gpu_memory: int | None
    dtype: str
    workload: Workload
    parameters: dict[str, int]
    """Elements on this GPU: trainable, frozen."""
    wrapper: str
    persistent: dict[str, int]
    phases: list[Phase]
    largest_buffers: list[tuple[int, str]]
    """The largest groups of tensors alive at the activation peak of the trace."""
    trace_seconds: float
    step_flops: float
    """FLOPs of one GPU's share of a step."""
    mfu: float
    peak_flops: float

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak(self) -> int:
        """Peak of allocated bytes over the step."""
        return sum(self.persistent.values()) + self.peak_phase.total

    @property
    def total(self) -> int:
        """What the GPU must hold: the peak, allocator slack and the runtime's own memory."""
        return int(self.peak * (1 + FRAGMENTATION)) + RUNTIME_RESERVE

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    @property
    def step_seconds(self) -> float:
        return self.step_flops / (self.mfu * self.peak_flops)

    def report(self) -> str:
        nodes = self.world_size // self.gpus_per_node if self.world_size % self.gpus_per_node == 0 else None
        where = (f"{nodes} node{'s' if nodes != 1 else ''} x {self.gpus_per_node} GPUs" if nodes
                 else f"{self.world_size} GPUs")
        trainable, frozen = self.parameters["trainable"], self.parameters["frozen"]
        lines = [f"Memory and time plan: recipe {self.recipe}, model {self.model}, {where}, {self.dtype}",
                 f"layout:      {overrides(self.layout)}",
                 f"micro-batch: {self.workload.describe()}",
                 f"DeepSpeed:   {self.wrapper}",
                 f"on one GPU:  {trainable / 1e9:.3f}B trainable + {frozen / 1e9:.3f}B frozen parameters "
                 "(this rank's experts)",
                 "",
                 f"{'per GPU':46} {'GiB':>8}"]
        for name, nbytes in self.persistent.items():
            lines.append(f"  {name:44} {_gib(nbytes)}")
        lines.append(f"  {'= persistent state':44} {_gib(sum(self.persistent.values()))}")
        lines.append("  peak of each phase of a step, on top of it:")
        for phase in self.phases:
            mark = "  <- peak" if phase is self.peak_phase else ""
            lines.append(f"    {phase.name:42} {_gib(phase.total)}{mark}")
            if len(phase.items) > 1 or phase is self.peak_phase:
                for name, nbytes in phase.items.items():
                    lines.append(f"      {name:40} {_gib(nbytes)}")
        lines.append("  largest tensors at the activation peak (one micro-batch):")
        for nbytes, what in self.largest_buffers:
            lines.append(f"      {what[:40]:40} {_gib(nbytes)}")
        lines.append(f"  {'= peak allocated':44} {_gib(self.peak)}")
        lines.append(f"  {f'+ {FRAGMENTATION:.0%} allocator slack + {RUNTIME_RESERVE / GIB:.1f} GiB runtime':44} "
                     f"{_gib(self.total)}")
        if self.gpu_memory is not None:
            verdict = ("fits" if self.fits else "DOES NOT FIT")
            margin = self.gpu_memory - self.total
            lines.append(f"  {f'GPU memory: {verdict}':44} {_gib(self.gpu_memory)}   "
                         f"({'headroom' if margin >= 0 else 'short by'} {abs(margin) / GIB:.1f} GiB)")
        # a sequence-parallel group shares its rows' tokens
        tokens = self.workload.grad_accum * self.workload.rows * self.workload.seq_len // self.layout["parallel.sp_size"]
        lines += ["",
                  f"time: {self.step_flops:.3g} FLOPs per GPU per step ({tokens} tokens) -> "
                  f"{self.step_seconds:.2f} s at {self.mfu:.0%} MFU of {self.peak_flops / 1e12:.0f} TFLOP/s "
                  f"({tokens / self.step_seconds:,.0f} tokens/s per GPU)",
                  f"(traced on fake tensors in {self.trace_seconds:.1f} s)"]
        return "\n".join(lines)


def run_dtype(cfg, device: str):
    """The training dtype of ``cfg`` on ``device`` ("cuda" or "cpu"), as ``engine.precision`` picks it."""
    import torch

    if cfg.parallel.precision == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return torch.bfloat16 if cfg.parallel.precision == "bf16" else torch.float32


def workload(cfg, crops: int | None = None, docs: int = 1, crop_size: int | None = None) -> Workload:
    crop_size = crop_size or default_crop_size(cfg)
    crop_queries(cfg.model, crop_size)  # a size the model has
    return Workload(cfg.train.micro_batch_size, cfg.train.seq_len, cfg.train.grad_accum,
                    default_crops(cfg, crop_size) if crops is None else crops, crop_size, docs)


class PlanCache:
    """Fake models per expert-parallel size and traces per activation-relevant layout, shared by the
    plans of one config (``suggest_layout`` tries many layouts)."""

    def __init__(self) -> None:
        self.models: dict = {}
        self.traces: dict = {}

    def model(self, cfg, dtype, ep_imbalance: float = 1.0) -> FakeModel:
        key = (cfg.parallel.ep_size, cfg.parallel.sp_size, dtype, ep_imbalance)
        if key not in self.models:
            self.models[key] = FakeModel(cfg, dtype, cfg.parallel.ep_size, ep_imbalance)
        fake = self.models[key]
        fake.cfg = cfg  # the layout's config; parameters and groups depend on ep_size only
        fake.model.set_gradient_checkpointing(vision=cfg.parallel.checkpoint_vision,
                                              decoder=cfg.parallel.checkpoint_decoder)
        return fake

    def trace(self, fake: FakeModel, work: Workload, device: str = "cuda") -> Trace:
        par = fake.cfg.parallel
        key = (fake.ep_size, par.sp_size, fake.ep_imbalance, fake.dtype, par.checkpoint_decoder, par.checkpoint_vision, work.rows, work.seq_len,
               work.crops, work.crop_size, work.docs, device)
        if key not in self.traces:
            self.traces[key] = fake.trace(work, device)
        return self.traces[key]


def resolved(cfg, gpus_per_node: int):
    """``cfg`` with ``parallel.ep_size`` / ``sp_size`` 'node' made the numbers they are on nodes of
    ``gpus_per_node``."""
    return dataclasses.replace(cfg, parallel=cfg.parallel.resolved(gpus_per_node, cfg.model, cfg.train.seq_len))


def plan_run(cfg, world_size: int, gpus_per_node: int = 8, gpu_memory_bytes: int | None = None, *,
             crops: int | None = None, docs: int = 1, crop_size: int | None = None, mfu: float = DEFAULT_MFU,
             peak_flops: float = H100_BF16_PEAK, device: str = "cuda", ep_imbalance: float = 1.0,
             _cache: PlanCache | None = None) -> Plan:
    """The plan of ``cfg`` (a ``RunConfig``) on ``world_size`` GPUs of ``gpu_memory_bytes`` each
    (None: report without a verdict).

    ``crops``: image crops per row (None = ``default_crops``) of ``crop_size`` px (None =
    ``default_crop_size``; video frames are ``data.video.image_size``); ``docs``: documents per row;
    ``mfu`` and ``peak_flops``: the assumed efficiency and the GPU's dense bf16 FLOP/s;
    ``device``: "cuda" plans the GPU run, "cpu" what the same code allocates on a CPU (fp32 by
    default, AdamW's loop instead of foreach kernels; used to check the plan against measurement);
    ``ep_imbalance``: with expert parallelism, the rows a rank receives as a multiple of what it
    sends (1 = perfect balance; a router that favours this rank's experts needs more).
    """
    cfg = resolved(cfg, gpus_per_node)
    par = cfg.parallel
    if world_size < 1 or world_size % par.ep_size:
        raise ValueError(f"config field 'parallel.ep_size' = {par.ep_size} must divide the number of "
                         f"GPUs ({world_size})")
    if not 0 < mfu <= 1:
        raise ValueError(f"the assumed MFU {mfu} must be in (0, 1]")
    if gpus_per_node < 1:
        raise ValueError(f"GPUs per node = {gpus_per_node} must be at least 1")
    cache = _cache or PlanCache()
    dtype = run_dtype(cfg, device)
    work = workload(cfg, crops, docs, crop_size)
    fake = cache.model(cfg, dtype, ep_imbalance)
    trace = cache.trace(fake, work, device)
    ds = deepspeed_memory(fake, trace, world_size, dtype, device)
    counts = {"trainable": sum(p.numel for p in fake.params.values() if p.trainable),
              "frozen": sum(p.numel for p in fake.params.values() if not p.trainable)}
    # a sequence-parallel group shares its rows' FLOPs (the trainer's MFU counts them the same way;
    # the vision encoder, which every rank of a group runs whole, is undercounted)
    flops = micro_batch_flops(cfg.model, work) * work.grad_accum / par.sp_size
    return Plan(cfg.recipe, cfg.model.name, layout_of(cfg), world_size, gpus_per_node, gpu_memory_bytes,
                str(dtype).split(".")[-1], work, counts, ds.wrapper, ds.persistent, ds.phases,
                trace.largest_at_peak(), trace.seconds, flops, mfu, peak_flops)


LONG_ROWS = 16384
"""Rows at least this long also try sequence parallelism (it costs two all-to-alls per layer)."""


def candidate_layouts(cfg, world_size: int, gpus_per_node: int) -> list[dict]:
    """Layouts to try, cheapest first: no recomputation before recomputation, ZeRO-1/2 before ZeRO-3
    (which gathers every layer's weights twice a step), no sequence parallelism before it (long
    rows only), the run's micro-batch before smaller ones (the global batch kept through gradient
    accumulation), fewer changed fields first."""
    E, text = cfg.model.moe.num_experts, cfg.model.text
    eps = [p for p in range(1, min(gpus_per_node, world_size) + 1) if E % p == 0 and world_size % p == 0]
    sps = [1]
    if cfg.train.seq_len >= LONG_ROWS:
        sps += [p for p in range(2, min(gpus_per_node, world_size) + 1)
                if world_size % p == 0 and text.num_heads % p == 0 and text.num_kv_heads % p == 0
                and cfg.train.seq_len % p == 0]
    images = cfg.stage.name not in TEXT_ONLY_STAGES
    checkpoints = [(False, False), (True, False), (True, True)] if images else [(False, False), (True, False)]
    rows = cfg.train.micro_batch_size * cfg.train.grad_accum * (world_size // cfg.parallel.sp_size)
    mbs = []
    b = cfg.train.micro_batch_size
    while b >= 1:
        mbs.append(b)
        b //= 2
    current = layout_of(cfg)
    found = []
    for zero in (1, 2, 3):
        for ep in eps if zero < 3 else [1]:
            for sp in sps:
                for dec, vis in checkpoints:
                    for b in mbs:
                        readers = world_size // sp  # a sequence-parallel group reads one row
                        if rows % (b * readers):
                            continue
                        layout = {"parallel.zero_stage": zero, "parallel.ep_size": ep, "parallel.sp_size": sp,
                                  "parallel.checkpoint_decoder": dec,
                                  "parallel.checkpoint_vision": vis or (cfg.parallel.checkpoint_vision and not images),
                                  "train.micro_batch_size": b, "train.grad_accum": rows // (b * readers)}
                        changed = sum(layout[k] != current[k] for k in LAYOUT_FIELDS)
                        cost = (dec + 0.5 * vis, zero == 3, sp > 1, cfg.train.micro_batch_size // b, changed,
                                zero, sp, -ep)
                        found.append((cost, layout))
    found.sort(key=lambda cl: cl[0])
    return [layout for _, layout in found]


def suggest_layout(cfg, world_size: int, gpus_per_node: int, gpu_memory_bytes: int, **kwargs) -> dict | None:
    """The cheapest layout (``candidate_layouts``) that fits ``gpu_memory_bytes`` per GPU, as
    {config field: value}, or None if none does. ``kwargs`` as ``plan_run``."""
    cfg = resolved(cfg, gpus_per_node)
    cache = kwargs.pop("_cache", None) or PlanCache()
    dtype = run_dtype(cfg, kwargs.get("device", "cuda"))
    for layout in candidate_layouts(cfg, world_size, gpus_per_node):
        candidate = with_layout(cfg, layout)
        try:
            # the persistent state alone needs no trace: skip what cannot fit without tracing it
            state = deepspeed_memory(cache.model(candidate, dtype, kwargs.get("ep_imbalance", 1.0)),
                                     Trace([], 0.0), world_size, dtype,
                                     kwargs.get("device", "cuda")).persistent
            if sum(state.values()) * (1 + FRAGMENTATION) + RUNTIME_RESERVE > gpu_memory_bytes:
                continue
            plan = plan_run(candidate, world_size, gpus_per_node, gpu_memory_bytes, _cache=cache, **kwargs)
        except ValueError:
            continue  # a layout this DeepSpeed refuses
        if plan.fits:
            return layout
    return None


def check_fits(cfg, world_size: int, gpus_per_node: int, gpu_memory_bytes: int, **kwargs) -> Plan:
    """The plan of ``cfg``; raises ``ValueError`` with the plan and a layout that fits (as the
    key=value overrides that select it) when it does not fit ``gpu_memory_bytes`` per GPU."""
    cfg = resolved(cfg, gpus_per_node)
    cache = PlanCache()
    plan = plan_run(cfg, world_size, gpus_per_node, gpu_memory_bytes, _cache=cache, **kwargs)
    if plan.fits:
        return plan
    layout = suggest_layout(cfg, world_size, gpus_per_node, gpu_memory_bytes, _cache=cache, **kwargs)
    current = plan.layout
    if layout is None:
        advice = (f"no layout of {', '.join(LAYOUT_FIELDS)} fits {world_size} GPUs of "
                  f"{gpu_memory_bytes / GIB:.0f} GiB: use more GPUs or a shorter train.seq_len")
    else:
        changes = {k: v for k, v in layout.items() if v != current[k]}
        advice = f"a layout that fits: {overrides(changes)}"
    raise ValueError(f"the run does not fit: {plan.total / GIB:.1f} GiB per GPU needed with "
                     f"{overrides(current)} on {world_size} GPUs of {gpu_memory_bytes / GIB:.0f} GiB "
                     f"(parallel.gpu_memory_gb); {advice}\n\n{plan.report()}")
