"""The one training loop, for every stage and every fine-tune.

Letters: B rows per micro-batch, T tokens per row, G micro-batches per step (gradient
accumulation), W data-parallel processes.

Design decisions:
- Order: the data loader's workers are forked first, before CUDA and NCCL exist in the process
  (a fork after them is unsafe); then the process group; then the model.
- Build: the model is constructed on the meta device (under ZeRO-3 inside ``deepspeed.zero.Init``,
  partitioned as it is built), its experts sharded for expert parallelism, then materialised on the
  device in the training dtype, so no rank ever holds more than its share. Weights come from the
  checkpoint the run resumes, an HF directory, a previous run / checkpoint, or a seeded random init
  that is the same for every layout (``aria.train.weights``); each rank reads or draws only its
  part. With ``lora.enabled`` the adapters are added before the experts are sharded (expert
  adapters shard with their experts), then loaded from a LoRA checkpoint the run starts from or
  initialised (B = 0: the run starts at its base model).
- Resuming on another layout (number of processes, ``parallel.ep_size``, ZeRO stage) keeps the
  global batch: ``train.grad_accum`` becomes saved rows per step / (processes x
  micro_batch_size), and the data streams are dealt to the new ranks.
- Loss: each micro-batch contributes ``W * CE_sum / N`` with N the supervised tokens of the whole
  step on all ranks (one all-reduce per step, before any backward), so DeepSpeed's average over
  ranks yields exactly the token-mean of the global batch, however tokens fall across ranks and
  micro-batches. Router losses are averaged over micro-batches. In stage 0 CE_sum is the
  image-caption loss of ``aria.train.contrastive`` (``train.objective=contrastive``) or the
  caption-word loss of ``aria.train.caption_words`` (``caption_words``), and N the step's images.
- One host sync per step: the all-reduce of token counts and, after backward, of the step's loss
  statistics, which also decides the non-finite check *before* the optimizer applies anything.
  The first also carries the number of bad samples the ranks have skipped: only when it grew do
  the ranks gather their counts by kind (``skipped_samples`` in the metrics covers every rank).
  (Stage 0 adds a few per micro-batch: document sizes, see ``aria.train.contrastive``.)
- Extras are hooks around the step, each a small method of ``Trainer``, not branches inside the
  model: auxiliary-loss-free bias updates before the optimizer step, evaluation and checkpoints
  after it, SIGTERM turning into a checkpoint at the next step boundary (agreed by all ranks
  through the same all-reduce).
- A non-finite loss or gradient norm stops the run with nothing of the step applied (without ZeRO
  the norm is taken before the optimizer step; under ZeRO DeepSpeed skips the update of a
  non-finite norm) and saves the weights before the step with the data position after it: the
  rerun skips the step's data instead of failing on it again.
- The paths a run reads (datasets, tokenizer, starting weights) are checked before anything starts
  (``check_inputs``): a missing one is one line naming its config field, not a traceback per rank.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from aria.config import RunConfig, image_cache_level, parse_mixture
from aria.convert.lora_base import checked_base, read_base
from aria.data.packing import to_device
from aria.data.sources import check_datasets
from aria.model.aria import Aria, ImageTokenCache
from aria.model.layers import slow_bf16_warning
from aria.model.lora import add_adapters, init_adapters
from aria.model.moe import update_expert_bias
from aria.parallel.dist import (DistInfo, barrier, expert_parallel_groups, init_distributed, placement,
                                sequence_parallel_group)
from aria.parallel.engine import build_engine, deepspeed_config, precision
from aria.parallel.expert import shard_experts_over, tag_expert_parameters
from aria.parallel.sequence import SequenceParallel, enable_sequence_parallel
from aria.parallel.shards import local_parts, sum_over_parts
from aria.rundir import MODEL, RUN_CONFIG, latest_checkpoint, resolve_model_dir
from aria.train import checkpoint as ckpt
from aria.train import weights
from aria.train.caption_words import break_ids, caption_words_loss_sum, pair_losses, step_classes, word_losses
from aria.train.contrastive import contrastive_loss_sum
from aria.train.schedule import lr_multiplier
from aria.train.stages import apply_stage, stage_model_config

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE, EXIT_TERMINATED = 0, 2, 3, 143
# Model fields that are options of a training run, not of the weights: they come from the run's
# config even when the architecture comes from the weights' source (loss and chunking options, and
# the init std of the groups that start fresh, which ``init.groups`` leaves out).
TRAINING_ONLY_FIELDS = {"moe": ("aux_loss_coeff", "z_loss_coeff", "balance_scope", "bias_balancing",
                                "bias_update_rate", "token_chunk"),
                        "vision": ("crop_chunk",),
                        "text": ("initializer_range",)}


def resolve_model_config(cfg: RunConfig):
    """The architecture comes from the weights' source when there is one; the training options
    (``TRAINING_ONLY_FIELDS``) always come from this run's config; the stage may set the RoPE base."""
    model = cfg.model
    source = cfg.init.from_hf or cfg.init.from_checkpoint
    if source:
        model = ckpt.source_model_config(source, hf=bool(cfg.init.from_hf))
        model = dataclasses.replace(model, **{
            node: dataclasses.replace(getattr(model, node), **{f: getattr(getattr(cfg.model, node), f)
                                                               for f in fields})
            for node, fields in TRAINING_ONLY_FIELDS.items()})
    return stage_model_config(model, cfg.stage)


def _flat_fields(node, prefix: str = "") -> dict:
    """A config dataclass as {dotted field: value} (``_path`` and the model's ``name`` left out)."""
    out = {}
    for f in dataclasses.fields(node):
        if f.name in ("_path", "name"):
            continue
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat_fields(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def _parameter_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in Aria(model_cfg).named_parameters()}


def check_model_overrides(cfg: RunConfig, overrides: list[str]) -> None:
    """``ValueError`` when the command line asks for a model that ``cfg`` would not build.

    A run that starts from weights (``init.from_hf`` / ``init.from_checkpoint``) takes the whole
    architecture from them (``resolve_model_config``): a ``model.FIELD=VALUE`` given with it would
    be dropped, unless it is a training option (``TRAINING_ONLY_FIELDS``) or the source has that
    value already. ``model=NAME`` is allowed (a pipeline passes it to every stage) as long as NAME
    has the source's parameter shapes; each stage still sets its RoPE base (``stage.rope_theta``).
    The error names every dropped field with both values. Nothing is checked without a source, or
    with one that does not exist (``check_inputs`` reports it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    source = cfg.init.from_hf or cfg.init.from_checkpoint
    if not source or not Path(source).exists():
        return
    keys = [o.key_or_group.replace("/", ".") for o in OverridesParser.create().parse_overrides(overrides)]
    fields = [k.removeprefix("model.") for k in keys if k.startswith("model.")]
    if not fields and "model" not in keys:
        return
    run_only = [f"{node}.{f}" for node, names in TRAINING_ONLY_FIELDS.items() for f in names]
    have_cfg = ckpt.source_model_config(source, hf=bool(cfg.init.from_hf))
    asked, have = _flat_fields(cfg.model), _flat_fields(have_cfg)
    differing = [f for f in asked if f not in run_only and asked[f] != have.get(f)]
    if "model" in keys and _parameter_shapes(cfg.model) != _parameter_shapes(have_cfg):
        ignored = differing
    else:
        ignored = [f for f in differing if any(f == k or f.startswith(k + ".") for k in fields)]
    if ignored:
        given = "init.from_hf" if cfg.init.from_hf else "init.from_checkpoint"
        raise ValueError(f"the model's architecture comes from {given}={source}, so these settings "
                         f"would be ignored (asked -> the source's): "
                         f"{'; '.join(f'model.{f} {asked[f]!r} -> {have.get(f)!r}' for f in ignored)}. "
                         f"Drop them; of the model's fields only the training options "
                         f"{', '.join('model.' + f for f in run_only)} follow the command line (the "
                         f"RoPE base: stage.rope_theta)")


@torch.no_grad()
def gradient_norm(model) -> float:
    """Global L2 norm of the (already all-reduced) gradients, whatever the layout."""
    parts = local_parts(model, buffers=False)
    device = next(model.parameters()).device
    return float(sum_over_parts(parts, ((name, p.grad.detach().double().square().sum())
                                        for name, p in model.named_parameters() if p.grad is not None),
                                device).sqrt())


def keep_global_batch(cfg: RunConfig, saved: dict, world: int) -> RunConfig:
    """``cfg`` with ``train.grad_accum`` set so that a step holds the rows it held when ``saved``
    (a checkpoint's layout) was written, on ``world`` processes (rows are read per group of
    ``parallel.sp_size`` ranks)."""
    old_rows = saved["world_size"] // saved.get("sp_size", 1)
    rows = saved["micro_batch_size"] * saved["grad_accum"] * old_rows
    readers = world // cfg.parallel.sp_size
    per_pass = cfg.train.micro_batch_size * readers
    if rows % per_pass:
        raise ValueError(f"the checkpoint's steps hold {rows} rows ({old_rows} row readers x "
                         f"micro_batch_size {saved['micro_batch_size']} x grad_accum {saved['grad_accum']}); "
                         f"{readers} row readers ({world} processes / parallel.sp_size) x "
                         f"train.micro_batch_size={cfg.train.micro_batch_size} do not divide it. Resume with "
                         f"processes, parallel.sp_size and train.micro_batch_size that divide {rows}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=rows // per_pass))


def attention_pairs(segment_ids_BT: torch.Tensor) -> int:
    """Query-key pairs of causal attention within the packed documents (for FLOP counting)."""
    pairs = 0
    for row in segment_ids_BT:
        n = torch.bincount(row[row > 0])
        pairs += int((n * (n + 1) // 2).sum())
    return pairs


class Trainer:
    pair_breaks: torch.Tensor | None = None  # caption_words.pair_breaks' token ids (set by build_data)

    def __init__(self, cfg: RunConfig) -> None:
        self.run_dir = Path(cfg.run_dir)
        self.resume_from = latest_checkpoint(self.run_dir)
        self.model_cfg = resolve_model_config(cfg)
        rank, world, per_node = placement()
        cfg = dataclasses.replace(cfg, model=self.model_cfg,
                                  parallel=cfg.parallel.resolved(per_node, self.model_cfg, cfg.train.seq_len))
        self.resumed_layout = None
        if self.resume_from is not None:
            saved = ckpt.read_layout(self.resume_from)
            layout = (world, cfg.parallel.ep_size, cfg.parallel.zero_stage, cfg.parallel.sp_size)
            if layout != (saved["world_size"], saved["ep_size"], saved["zero_stage"], saved.get("sp_size", 1)):
                self.resumed_layout = saved
                cfg = keep_global_batch(cfg, saved, world)
        self.cfg = cfg
        self.stop_requested = False
        sp = cfg.parallel.sp_size  # the ranks of a sequence-parallel group read the same rows
        self.loader = self.build_data(rank // sp, world // sp)  # forks the workers: before CUDA, NCCL
        self.info: DistInfo = init_distributed()
        if self.pair_breaks is not None:  # read by every micro-batch's pair loss
            self.pair_breaks = self.pair_breaks.to(self.info.device)
        self.check_memory(per_node)

    # -- building -----------------------------------------------------------------------------

    def check_memory(self, per_node: int) -> None:
        """Refuse, before any weight is loaded, a layout the memory plan says cannot fit (see
        ``ParallelConfig.memory_check``). The plan assumes images filling half of each row where the
        stage sees images; a layout that fits text rows but not those is let through with a warning
        (whether such rows come depends on the data)."""
        par, device = self.cfg.parallel, self.info.device
        if not par.memory_check or (par.gpu_memory_gb is None and device.type != "cuda"):
            return
        from aria.train.plan import GIB, check_fits, plan_run

        memory = (int(par.gpu_memory_gb * GIB) if par.gpu_memory_gb is not None
                  else torch.cuda.get_device_properties(device).total_memory)
        world = self.info.world_size
        try:
            heavy = plan_run(self.cfg, world, per_node, memory)
        except Exception as err:  # a planner that cannot follow new code must not stop a run
            if self.info.is_main:
                print(f"warning: the memory plan failed ({type(err).__name__}: {err}); starting without "
                      "the memory check", flush=True)
            return
        if heavy.fits:
            message = f"memory plan: {heavy.total / GIB:.1f} GiB per GPU of {memory / GIB:.1f}"
        else:
            try:
                text = check_fits(self.cfg, world, per_node, memory, crops=0)
            except ValueError as err:
                raise ValueError(f"{err}\n(parallel.memory_check=false starts anyway)") from None
            message = (f"warning: the memory plan fits text rows ({text.total / GIB:.1f} GiB per GPU of "
                       f"{memory / GIB:.1f}) but not rows whose images fill half the row "
                       f"({heavy.total / GIB:.1f} GiB): image-heavy rows may run out of memory "
                       f"(python -m aria.tools.plan ... --suggest finds a layout for them)")
        if self.info.is_main:
            print(message, flush=True)

    def build_model(self) -> Aria:
        cfg, info = self.cfg, self.info
        dtype = precision(cfg)
        torch.set_default_dtype(dtype)
        try:
            if cfg.parallel.zero_stage == 3:  # partitioned as it is built: no rank holds it whole
                import deepspeed

                # the dtype comes from the config (bf16 enabled or not): DeepSpeed 0.19.8 ignores an
                # explicit dtype= on an accelerator without fp16 (a CPU without AVX512-FP16/AMX-FP16)
                # and builds in bf16
                with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, dtype)):
                    model = Aria(self.model_cfg)
                built = {p.dtype for p in model.parameters()}
                if built != {dtype}:
                    raise RuntimeError(f"deepspeed.zero.Init built the model in {built}, not {dtype} "
                                       f"(parallel.precision={cfg.parallel.precision})")
            else:
                with torch.device("meta"):
                    model = Aria(self.model_cfg)
        finally:
            torch.set_default_dtype(torch.float32)
        if cfg.lora.enabled:
            add_adapters(model, cfg.lora)
        self.ep_group_name = None
        if cfg.parallel.ep_size > 1:
            group, self.ep_group_name = expert_parallel_groups(cfg.parallel.ep_size)
            shard_experts_over(model.moe_layers, group, self.ep_group_name)
        sp = cfg.parallel.sp_size
        if sp > 1:
            enable_sequence_parallel(model, SequenceParallel(sequence_parallel_group(sp), sp, info.rank % sp))
        if cfg.parallel.zero_stage != 3:
            model = model.to_empty(device=info.device)
        tag_expert_parameters(model.moe_layers)
        with torch.no_grad():
            self.loaded = None  # what was read, when weights came from files
            if self.resume_from is not None:
                source = self.resume_from / MODEL
            elif cfg.init.from_hf:
                source = Path(cfg.init.from_hf)
            elif cfg.init.from_checkpoint:
                source = resolve_model_dir(cfg.init.from_checkpoint)
            else:
                source = None
                weights.init_weights(model, cfg.train.seed)
            groups = cfg.init.groups if self.resume_from is None else None
            if source is not None and groups is not None:  # the other groups as from scratch
                weights.init_weights(model, cfg.train.seed)
            if source is not None:
                self.loaded = weights.load_weights(model, source, hf=bool(cfg.init.from_hf) and
                                                   self.resume_from is None, groups=groups)
                self.load_message = (f"loaded {source}: rank {info.rank} read "
                                     f"{self.loaded.bytes_read / 2**30:.3f} GiB of its "
                                     f"{self.loaded.bytes_stored / 2**30:.3f} GiB")
            if cfg.lora.enabled and not (self.loaded and self.loaded.adapters):
                init_adapters(model, cfg.train.seed)
        self.trainable = apply_stage(model, cfg.stage, cfg.lora, cfg.optim.lr_scale)
        model.set_gradient_checkpointing(vision=cfg.parallel.checkpoint_vision,
                                         decoder=cfg.parallel.checkpoint_decoder)
        return model.train()

    def build_data(self, rank: int, world: int):
        """The training data stream of this rank, positioned where the resumed checkpoint left it
        (on any layout), its workers started."""
        from aria.data.loader import build_train_loader, merge_states
        from aria.data.processor import Processor

        self.processor = Processor.from_config(self.cfg.data, self.model_cfg)
        words = self.cfg.caption_words.pair_breaks if self.cfg.train.objective == "caption_words" else []
        self.pair_breaks = break_ids(words, self.processor.tokenizer) if words else None
        data = self.cfg.data
        loader = build_train_loader(data, self.processor, self.cfg.train.seq_len,
                                    self.cfg.train.micro_batch_size, rank, world, self.cfg.train.seed,
                                    data.prefetch_factor, data.loader_timeout,
                                    image_caption=self.cfg.train.objective != "lm")
        if self.resume_from is not None:
            states = ckpt.read_trainer_states(self.resume_from)
            old_sp = ckpt.read_layout(self.resume_from).get("sp_size", 1)  # a group's ranks hold one position
            loader.load_state_dict(merge_states([s["data"] for s in states[::old_sp]]))
        loader.start()
        return loader

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Train to ``train.max_steps`` or to a stop; returns the process exit code."""
        self._start()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            code = self._loop()
            if code == EXIT_OK:
                self._finish()
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.metrics.close()
        return code

    def _start(self) -> None:
        """Model and engine; the resumed checkpoint's state, or (rank 0) the run's config and
        starting point written; the metrics logger, with what was loaded reported."""
        from aria.train.compose import resolved_yaml
        from aria.train.metrics import MetricsLogger, Throughput, peak_flops

        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.train.seed)
        self.load_message = None
        self.model = model = self.build_model()
        if cfg.stage.image_token_cache_gb:  # the loader asks the cache the model fills (num_workers=0)
            model.image_token_cache = ImageTokenCache(int(cfg.stage.image_token_cache_gb * 2**30),
                                                      image_cache_level(cfg))
            self.processor.cached_media = model.image_token_cache
        self.engine, _, self.scheduler = build_engine(model, cfg, lr_multiplier(cfg.optim, cfg.train.max_steps),
                                                      self.ep_group_name)
        self.config_yaml = resolved_yaml(cfg)
        self.step, self.tokens_seen, self.saved_at = 0, 0, None
        if self.resume_from is not None:
            state = ckpt.load_checkpoint(self.engine, model, self.resume_from, info, self.scheduler)
            self.step, self.tokens_seen, self.saved_at = state["step"], state["tokens_seen"], state["step"]
        else:
            fingerprint = weights.weights_fingerprint(model)
            if info.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / RUN_CONFIG).write_text(self.config_yaml)
                source = cfg.init.from_hf or cfg.init.from_checkpoint
                (self.run_dir / "init.json").write_text(json.dumps(
                    {"source": str(source) if source else f"random (seed {cfg.train.seed})",
                     "fingerprint": fingerprint}) + "\n")
        barrier()
        self.metrics = metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.to_dict(), cfg.train.max_steps,
                                               self.step, info.is_main, info.world_size)
        if self.resume_from is not None:
            metrics.message(f"resumed from {self.resume_from} at step {self.step}")
        if self.resumed_layout is not None:
            saved = self.resumed_layout
            metrics.message(f"the checkpoint was written by {saved['world_size']} processes with "
                            f"parallel.ep_size={saved['ep_size']}, zero_stage={saved['zero_stage']}; "
                            f"continuing on {info.world_size} with ep_size={cfg.parallel.ep_size}, "
                            f"zero_stage={cfg.parallel.zero_stage} and train.grad_accum="
                            f"{cfg.train.grad_accum} (the same rows per step)")
        if self.load_message:
            metrics.message(self.load_message)
        slow = slow_bf16_warning(info.device, precision(cfg), "parallel.precision=fp32 (or auto, fp32 on "
                                 "the CPU) trains much faster")
        if slow:
            metrics.message(slow)
        if cfg.lora.enabled:
            total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: whole
            metrics.message(f"LoRA rank {cfg.lora.rank} on {cfg.lora.targets}: "
                            f"{sum(self.trainable.values()):,} of the {total:,} parameters on rank 0 "
                            "train (the adapters)")
        self.throughput = Throughput(peak_flops(info.device))
        self.skipped_total, self.skipped_by_kind = 0, {}  # all ranks' skipped samples (``_skipped``)

    def _loop(self) -> int:
        """The steps, each followed by its hooks; returns the exit code (a stop has saved its
        checkpoint)."""
        cfg, batches = self.cfg, iter(self.loader)
        G, W = cfg.train.grad_accum, self.info.world_size
        while self.step < cfg.train.max_steps:
            started = time.perf_counter()
            before = self.loader.state_dict()  # the data position of a stop agreed below
            micro = [next(batches) for _ in range(G)]
            n_global, stop, skipped = self._agree(micro)
            if stop:
                return self._stop_on_sigterm(before)
            stats, tokens_per_expert, flops, tokens = self._accumulate(self.engine, micro, n_global, W, G)
            if not math.isfinite(stats["loss"]):
                return self._stop_non_finite(f"loss {stats['loss']}")
            self._balance_experts(tokens_per_expert)
            grad_norm, applied = self._optimizer_step()
            if not applied:
                return self._stop_non_finite(f"gradient norm {grad_norm}")
            self.step += 1
            self.tokens_seen += tokens
            # tokens/s of the whole run; FLOP/s and MFU per device (the step's FLOPs are global)
            self.throughput.update(time.perf_counter() - started, tokens, flops / W)
            self._after_step(self._record(stats, grad_norm, tokens_per_expert, skipped))
        return EXIT_OK

    def _loss_count(self, batch) -> int:
        """What the loss of a micro-batch is a sum over: supervised tokens, or stage 0's images."""
        return batch.num_targets if self.cfg.train.objective == "lm" else batch.num_samples

    def _forward(self, engine, batch):
        """The micro-batch's forward and its summed loss: cross-entropy, or (``train.objective=
        contrastive``) the image-caption loss of this rank's images against all ranks' captions, or
        (``caption_words``) the caption-word loss of this rank's images."""
        inputs = to_device(batch.model_inputs(), self.info.device)
        objective = self.cfg.train.objective
        if objective == "lm":
            out = engine(**inputs)
            return out, out.loss_sum
        if objective == "caption_words":
            out = engine(**inputs, words=self.cfg.caption_words.pool)
            loss_sum, _ = caption_words_loss_sum(out.word_logits_SV, inputs["input_ids"], inputs["segment_ids"],
                                                 inputs["targets"], self.model_cfg.image_token_id,
                                                 self.word_classes_V, batch.where, out.token_logits_NV,
                                                 out.image_documents_N, self.cfg.caption_words.pairs,
                                                 self.pair_breaks)
            return out, loss_sum
        out = engine(**inputs, towers=True)
        loss_sum, _ = contrastive_loss_sum(out.embeds_BTD, out.hidden_BTD, inputs["input_ids"],
                                           inputs["segment_ids"], inputs["targets"],
                                           self.model_cfg.image_token_id, self.cfg.contrastive, batch.where)
        return out, loss_sum

    def _agree(self, micro) -> tuple[float, bool, int]:
        """(supervised tokens, or stage 0's images, of the step on all ranks; whether any rank was
        asked to stop; bad samples skipped so far on all ranks): one all-reduce, before any backward.
        With ``train.objective=caption_words`` it also carries the tokens of the step's captions,
        whose union is the step's classes (``self.word_classes_V``)."""
        info, SP = self.info, self.cfg.parallel.sp_size
        agreed = torch.tensor([float(sum(self._loss_count(b) for b in micro)), float(self.stop_requested),
                               float(sum(self.loader.skipped().values()))], dtype=torch.float64)
        words = self.cfg.train.objective == "caption_words"
        if words:
            agreed = torch.cat([agreed, step_classes([b.targets for b in micro], self.model_cfg.text.vocab_size)])
        agreed = agreed.to(info.device)
        if info.world_size > 1:
            dist.all_reduce(agreed)
        if words:
            self.word_classes_V = agreed[3:] > 0
        # the ranks of a sequence-parallel group hold the same rows: count them once
        counts = agreed[:3].tolist()
        return max(counts[0] / SP, 1.0), counts[1] > 0, round(counts[2] / SP)

    def _skipped(self, total: int) -> dict:
        """Bad samples skipped so far on all ranks, by kind; the ranks gather their counts only when
        their ``total`` (agreed by all ranks) changed since the last call."""
        if self.info.world_size == 1:
            return dict(self.loader.skipped())
        if total != self.skipped_total:
            parts = [None] * self.info.world_size
            dist.all_gather_object(parts, dict(self.loader.skipped()))
            merged = collections.Counter()
            for part in parts[::self.cfg.parallel.sp_size]:  # one rank per sequence-parallel group
                merged.update(part)
            self.skipped_total, self.skipped_by_kind = total, dict(merged)
        return self.skipped_by_kind

    def _balance_experts(self, tokens_per_expert_LE: torch.Tensor | None) -> None:
        """Auxiliary-loss-free balancing: nudge the routers' selection bias by the step's expert
        load, between backward and the optimizer step."""
        if tokens_per_expert_LE is not None and self.model_cfg.moe.bias_balancing:
            update_expert_bias(self.model.moe_layers, tokens_per_expert_LE, reduce=False)  # summed already

    def _optimizer_step(self) -> tuple[float | None, bool]:
        """Apply the accumulated gradients unless their global norm is non-finite; returns (norm,
        whether the update was applied). The norm is None where nobody computes it."""
        engine = self.engine
        if self.cfg.parallel.zero_stage == 0:
            # without ZeRO DeepSpeed keeps no global norm: take it from the reduced gradients,
            # before anything is applied
            norm = gradient_norm(self.model)
            if not math.isfinite(norm):
                return norm, False
            engine.step()
            return norm, True
        # under ZeRO DeepSpeed takes the norm and skips the update of a non-finite one
        engine.step()
        norm, applied = engine.get_global_grad_norm(), engine.was_step_applied()
        norm = float(norm) if norm is not None else None
        assert norm is None or applied == math.isfinite(norm), f"DeepSpeed: norm {norm}, applied {applied}"
        return norm, applied

    def _record(self, stats: dict, grad_norm: float | None, tokens_per_expert_LE: torch.Tensor | None,
                skipped: int) -> dict:
        """The metrics of the step just taken (a norm nobody computed is logged as NaN)."""
        from aria.train.metrics import expert_load

        throughput = self.throughput
        record = {**stats, "grad_norm": float("nan") if grad_norm is None else grad_norm,
                  "lr": self.engine.get_lr()[0], "tokens_seen": self.tokens_seen, "tokens_per_s": throughput.tokens_per_s(),
                  "tflops": throughput.tflops(), "mfu": throughput.mfu(),
                  "skipped_samples": self._skipped(skipped)}
        if tokens_per_expert_LE is not None:
            record.update(expert_load(tokens_per_expert_LE))
        if self.model.image_token_cache is not None:
            record.update(self.model.image_token_cache.stats())
        return record

    def _evaluation_due(self) -> bool:
        every = self.cfg.train.eval_every
        return bool(self.cfg.data.eval and every and self.step % every == 0)

    def _after_step(self, record: dict) -> None:
        """Held-out loss every ``train.eval_every`` steps, the step's metrics, a checkpoint every
        ``checkpoint.every_steps``."""
        if self._evaluation_due():
            record.update(self.evaluate(self.engine))
        self.metrics.log(self.step, record)
        every = self.cfg.checkpoint.every_steps
        if every and self.step % every == 0:
            self._save(self.loader.state_dict())

    def _finish(self) -> None:
        """The end of a run that reached ``train.max_steps``: the held-out loss (unless the last step
        just took it) and a checkpoint (unless the last step just wrote one)."""
        if self.cfg.data.eval and not self._evaluation_due():
            self.metrics.log(self.step, self.evaluate(self.engine))
        if self.saved_at != self.step:
            self._save(self.loader.state_dict())
        if self.model.image_token_cache is not None:
            self.metrics.message(self.model.image_token_cache.summary())

    def _stop_on_sigterm(self, before: dict) -> int:
        """The step's micro-batches stay untrained: the checkpoint starts with them (``before``)."""
        self.metrics.message(f"SIGTERM: saving a checkpoint at step {self.step} and stopping")
        if self.saved_at != self.step:
            self._save(before)
        return EXIT_TERMINATED

    def _stop_non_finite(self, what: str) -> int:
        """Nothing of the step was applied: the checkpoint holds the weights before it and the data
        position after it, so a resumed run skips its micro-batches (even where a checkpoint of
        this step exists already: it holds the position before them)."""
        self.metrics.message(f"non-finite {what} at step {self.step + 1}: the update was not applied; "
                             f"saving the step-{self.step} weights and stopping (a resumed run skips "
                             "this step's data)")
        self._save(self.loader.state_dict())
        return EXIT_NONFINITE

    def _accumulate(self, engine, micro, n_global: float, W: int, G: int):
        """Forward + backward of the G micro-batches; the step's all-reduced statistics."""
        from aria.train.metrics import batch_flops

        device, SP = self.info.device, self.cfg.parallel.sp_size
        ce = torch.zeros((), device=device, dtype=torch.float64)
        aux = torch.zeros((), device=device, dtype=torch.float64)
        z = torch.zeros((), device=device, dtype=torch.float64)
        tokens_per_expert, flops, tokens = None, 0.0, 0
        for i, batch in enumerate(micro):
            out, loss_sum = self._forward(engine, batch)
            loss = loss_sum * (W / n_global)
            if out.router_loss is not None:
                # under sequence parallelism each rank holds its tokens' part of the rows' router
                # losses; DeepSpeed averages over all W ranks, so the parts are scaled by SP
                loss = loss + out.router_loss * (SP / G)
                aux += out.aux_loss_L.detach().sum() * (SP / G)
                z += out.z_loss_L.detach().sum() * (SP / G)
                tpe = out.tokens_per_expert_LE.detach()
                tokens_per_expert = tpe if tokens_per_expert is None else tokens_per_expert + tpe
            engine.backward(loss, scale_wrt_gas=False)
            if i < G - 1:
                engine.step()  # DeepSpeed counts micro-steps; the update happens on the last one
            ce += loss_sum.detach()
            crops = {}
            pixels = batch.pixel_values
            for pv in ([pixels] if isinstance(pixels, torch.Tensor) else pixels or []):
                crops[pv.shape[-1]] = crops.get(pv.shape[-1], 0) + pv.shape[0]
            flops += batch_flops(self.model_cfg, batch.num_tokens, attention_pairs(batch.segment_ids), crops,
                                 lm_head=self.cfg.train.objective == "lm",
                                 decoder=self.cfg.train.objective != "caption_words")
            tokens += batch.num_tokens
        counts = torch.tensor([float(tokens), flops], device=device, dtype=torch.float64)
        totals = torch.cat([torch.stack([ce, aux, z]), counts])
        if W > 1:
            dist.all_reduce(totals)
        ce_sum, aux_sum, z_sum, all_tokens, all_flops = totals.tolist()
        stats = {"loss": ce_sum / n_global, "aux_loss": aux_sum / W, "z_loss": z_sum / W}
        all_tokens, all_flops = all_tokens / SP, all_flops / SP  # every rank of a group counted its rows
        if tokens_per_expert is not None and W > 1:
            dist.all_reduce(tokens_per_expert)
        return stats, tokens_per_expert, all_flops, int(all_tokens)

    @torch.no_grad()
    def evaluate(self, engine) -> dict:
        """Held-out loss per ``data.eval`` dataset and overall: each rank encodes its share of the
        records (``eval_batches``), the sums are reduced. ``train.eval_batches`` caps the batches
        per rank."""
        import itertools

        from aria.data.loader import eval_batches

        cfg, info = self.cfg, self.info
        engine.module.eval()

        def most(value: int) -> int:  # over the ranks, before every batch: who still has one
            flag = torch.tensor([value], dtype=torch.int64, device=info.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return int(flag.item())

        # caption words: per-token loss sums and the held-out captions' tokens, for the set's classes
        # (and the documents' pair losses, summed into sums[0])
        words, V = cfg.train.objective == "caption_words", self.model_cfg.text.vocab_size
        pairs = cfg.caption_words.pairs
        results, total_ce, total_n = {}, 0.0, 0.0
        for entry in parse_mixture(cfg.data.eval, "data.eval"):
            sums = torch.zeros(2 + 2 * V * words, dtype=torch.float64, device=info.device)
            sp = cfg.parallel.sp_size  # a sequence-parallel group reads the same rows
            batches = eval_batches(entry.path, self.processor, cfg.train.seq_len, cfg.train.micro_batch_size,
                                   info.rank // sp, info.world_size // sp, cfg.data.strict,
                                   cfg.data.allow_outside_media, entry.columns,
                                   most if info.world_size > 1 else None,
                                   image_caption=cfg.train.objective != "lm")
            for batch in itertools.islice(batches, cfg.train.eval_batches or None):
                if words:
                    inputs = to_device(batch.model_inputs(), info.device)
                    out = engine(**inputs, words=cfg.caption_words.pool)
                    loss_SV, words_SV = word_losses(out.word_logits_SV, inputs["input_ids"], inputs["segment_ids"],
                                                    inputs["targets"], self.model_cfg.image_token_id, batch.where)
                    if pairs:
                        sums[0] += pair_losses(out.token_logits_NV, out.image_documents_N, loss_SV.shape[0],
                                               inputs["targets"], inputs["segment_ids"], pairs,
                                               self.pair_breaks).sum().double()
                    sums[1] += loss_SV.shape[0]
                    sums[2:] += torch.cat([loss_SV.sum(0), words_SV.sum(0)]).double()
                    continue
                out, loss_sum = self._forward(engine, batch)
                # the model's count: under sequence parallelism each rank holds its part of the targets
                count = out.num_targets if cfg.train.objective == "lm" else batch.num_samples
                sums += torch.stack([loss_sum.double(), torch.as_tensor(count, dtype=torch.float64,
                                                                        device=info.device)])
            if info.world_size > 1:
                dist.all_reduce(sums)
            if words:
                classes_V = sums[2 + V:] > 0
                sums[0] += sums[2:2 + V][classes_V].sum() / classes_V.sum().clamp(min=1)
            ce_sum, n = sums[:2].tolist()
            results[f"eval_loss/{Path(entry.path).stem}"] = ce_sum / max(n, 1.0)
            total_ce, total_n = total_ce + ce_sum, total_n + n
        engine.module.train()
        results["eval_loss"] = total_ce / max(total_n, 1.0)
        return results

    def _save(self, data: dict) -> None:
        """A checkpoint of the current step with the data position ``data``."""
        path = ckpt.save_checkpoint(self.engine, self.model, self.cfg,
                                    {"step": self.step, "tokens_seen": self.tokens_seen, "data": data},
                                    self.info, self.config_yaml, self.model_cfg)
        self.saved_at = self.step
        self.metrics.message(f"saved checkpoint {path}")

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True


def check_inputs(cfg: RunConfig) -> None:
    """Every path the run reads exists (datasets, tokenizer, starting weights), and the base of
    adapter-only LoRA weights it starts or resumes from is the one they were trained on; else
    ``FileNotFoundError`` / ``ValueError`` naming the config field (or the checkpoint) and the path."""
    check_datasets(cfg.data)
    for field, path in (("data.tokenizer", cfg.data.tokenizer), ("init.from_hf", cfg.init.from_hf),
                        ("init.from_checkpoint", cfg.init.from_checkpoint)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"config field '{field}': not found: {path}")
    resumed = latest_checkpoint(cfg.run_dir)
    start = (resumed / MODEL if resumed is not None else
             resolve_model_dir(cfg.init.from_checkpoint) if cfg.init.from_checkpoint else None)
    ref = read_base(start) if start is not None else None
    if ref is not None:
        checked_base(start, ref)


def train(cfg: RunConfig) -> int:
    """Run ``cfg`` to completion (or a clean stop); returns the process exit code."""
    try:
        check_inputs(cfg)
    except (FileNotFoundError, ValueError) as err:  # before any rank works; one line per node, no traceback
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"aria-train: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    trainer = Trainer(cfg)
    code = trainer.run()
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    return code
