"""The LightningModule: one training loop for every fusion strategy.

Training: loss on answer tokens only (labels are -100 elsewhere). Optimiser: Adam with
the new / pretrained learning rates of `casa.train.optim`, warmup-constant-decay schedule.
Validation: the loss, and greedy generation from each sample's prompt scored against its
reference answer with `casa.train.metrics`, per task and per task group. `val/loss` is the mean of
the batch losses weighted by their answer tokens over the whole validation set (with
`loss_reduction="token"`: the cross-entropy per answer token), the same on 1 or N ranks.
"""

from __future__ import annotations

from typing import Literal

import time

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch.distributed.fsdp import FSDPModule

from casa.batch import PackedBatch
from casa.generation import GenerationConfig, generate, truncate_samples
from casa.model import VisionLanguageModel, answer_loss_per_sample
from casa.train.metrics import GroupedAnswerMetrics, GroupedLoss, WeightedMean
from casa.train.optim import build_optimizer, build_scheduler, random_init_in_pretrained


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only; CPU work is already done when it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block_precision_policies(dtype: torch.dtype | None):
    """-> (root policy, per-block policy) of FSDP2 mixed precision: parameters gathered in
    `dtype` (None: as stored), gradients reduced in fp32.

    Only the root casts its floating inputs (the batch's pixels); the blocks take what the
    model hands them. With the default input cast, FSDP2 would also round the fp32 rotary
    tables the Qwen2.5-VL tower computes for its blocks (and copy our StreamContext per block),
    so a sharded bf16 model would compute something other than the same model with bf16
    parameters; without it the two are equal (tests/test_h100_recipe.py compares the answers)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dtype is None:
        return MixedPrecisionPolicy(), MixedPrecisionPolicy()
    return (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
            MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False))


_CLI_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
"""What LightningCLI records in the hyperparameters it gives (`load_from_checkpoint` calls it)."""


def shard_model(model: VisionLanguageModel, mesh, param_dtype: str | None = None) -> None:
    """FSDP2 as training applies it (`CasaModule.configure_model`; `experiments.bench plan`
    traces the same): one `fully_shard` unit per decoder block and per vision block, then the
    root, over the 1-D data-parallel `mesh`; `param_dtype` ("bfloat16", "float16", "float32"
    or None: as stored) is the blocks' compute dtype, gradients are reduced in fp32."""
    from torch.distributed.fsdp import fully_shard

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(param_dtype or "", None)
    root, blocks = block_precision_policies(dtype)
    for block in model.backbone.layers:
        fully_shard(block, mesh=mesh, mp_policy=blocks)
    for block in model.vision.tower.blocks:
        fully_shard(block, mesh=mesh, mp_policy=blocks)
    fully_shard(model, mesh=mesh, mp_policy=root)


class CasaModule(L.LightningModule):
    """Args:
        model: the vision-language model (backbone + vision + fusion).
        lr_new: learning rate of new parameters (paper: 1e-4).
        lr_pretrained: learning rate of pretrained trainable parameters (paper: 1e-5).
        weight_decay: Adam weight decay.
        warmup_steps: linear warmup steps.
        decay_steps: final linear decay steps (0 = constant to the end).
        val_generate: run generation metrics during validation.
        val_max_new_tokens: generation budget per validation answer.
        val_predictions: write every generated validation answer, with its sample key, task and
            reference, to `<run_dir>/predictions/val_step_XXXXXX.jsonl` (rank zero, all ranks'
            answers, sorted by key): what the metrics scored, to read or to diff across runs.
        val_max_samples: cap on generated validation samples per validation run, counted over
            all ranks: a validation batch is generated on every rank while the ranks together
            have generated fewer (so the last generated step may pass the cap by up to one
            batch per rank); padding batches do not count.
        compile: `torch.compile` every decoder block (GPU runs).
        activation_checkpointing: recompute each decoder block in the backward pass.
        fsdp_param_dtype: under FSDP2 (`ModelParallelStrategy`), the parameter dtype of the
            sharded blocks' compute ("bfloat16" on H100s; gradients are reduced in fp32).
        require_pretrained: refuse to train (ValueError at `configure_optimizers`) when a
            trainable parameter in the "pretrained" group comes from a randomly initialised
            backbone or vision tower (`casa.train.optim.random_init_in_pretrained`): the
            protocol's guard for the paper's learning-rate rule.
        perplexity_groups: validation task groups that measure the LM's held-out text (the
            synthetic `lm` group, docs/reproduction.md): their samples are scored by answer
            loss only, logged as `val_ppl/<task>` = exp(loss per answer token), and never
            scored by generation (nor counted in `val_max_samples`). Every task's answer loss
            is logged as `val_task/<task>/loss`.
    """

    def __init__(self, model: VisionLanguageModel, lr_new: float = 1e-4, lr_pretrained: float = 1e-5,
                 weight_decay: float = 0.0, warmup_steps: int = 100, decay_steps: int = 0, val_generate: bool = True,
                 val_max_new_tokens: int = 16, val_predictions: bool = True, val_max_samples: int = 256, compile: bool = False,
                 activation_checkpointing: bool = False, fsdp_param_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
                 init_from: str | None = None, require_pretrained: bool = False,
                 perplexity_groups: list[str] = ["lm"]):
        super().__init__()
        if lr_new <= 0 or lr_pretrained < 0:
            raise ValueError(f"CasaModule: lr_new={lr_new} must be > 0 and lr_pretrained={lr_pretrained} >= 0")
        if fsdp_param_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"CasaModule.fsdp_param_dtype={fsdp_param_dtype!r} is not one of [None, 'bfloat16', 'float16', 'float32']")
        self.model = model
        model.activation_checkpointing = activation_checkpointing
        if init_from is not None:
            self._load_weights(init_from)
        # Under the fit CLI the hyperparameters are the parsed config, `model` being the
        # VisionLanguageModel's spec (class_path + init_args): Lightning stores it in every
        # checkpoint (load_from_checkpoint rebuilds the model from it) and the loggers show it
        # (TensorBoard's HParams). Built in Python, `model` is a module, not a hyperparameter.
        self.save_hyperparameters(ignore=[] if _given_hyperparameters.get() is not None else ["model"])
        self.task_metrics = GroupedAnswerMetrics()
        self.group_metrics = GroupedAnswerMetrics()
        # sum of loss x answer tokens over sum of answer tokens, synced once per epoch
        self.val_loss = WeightedMean()
        self.task_loss = GroupedLoss()  # per task, every validation sample
        self.text_loss = GroupedLoss()  # per task, the perplexity groups' samples only
        self._val_generated = 0  # generated validation samples, summed over ranks
        self._val_answers: list[dict] = []  # this rank's generated answers of the current validation run
        self._step_start: float | None = None  # host clock at the first micro-batch of the current optimizer step

    # ------------------------------------------------------------------ sharding
    def configure_model(self) -> None:
        """FSDP2 under Lightning's ModelParallelStrategy: one `fully_shard` per decoder block
        (and per vision block), then the root, so each block's parameters are gathered just
        for its own forward/backward. Under other strategies: optional torch.compile only."""
        if self.hparams.compile:
            for block in self.model.backbone.layers:
                block.compile()
        mesh = getattr(self, "device_mesh", None) if self._trainer is not None else None
        if mesh is None or getattr(self, "_sharded", False):
            return
        shard_model(self.model, mesh["data_parallel"], self.hparams.fsdp_param_dtype)
        self._sharded = True

    # ------------------------------------------------------------------ training
    #: FLOPs (forward + backward, `casa.flops.training_flops`) of the batch being measured, which
    #: Lightning's `ThroughputMonitor` reads for FLOPs/s and MFU; `callbacks.throughput.TokenThroughput`
    #: sets it per batch (None: not counted, e.g. validation's generation).
    flops_per_batch: int | None = None

    def forward(self, batch: PackedBatch):
        return self.model(batch)

    def _steps_on_this_batch(self) -> bool:
        """Whether Lightning runs the optimizer after the current micro-batch: the last of
        `accumulate_grad_batches`, or the last batch of an epoch (Lightning steps there even
        mid-accumulation). The signal Lightning's own loop uses (`_AutomaticOptimization.run`)."""
        return not self.trainer.fit_loop._should_accumulate()

    def on_train_batch_start(self, batch: PackedBatch, batch_idx: int) -> None:
        if self._step_start is None:  # the first micro-batch of an optimizer step
            _synchronize(self.device)  # work queued before (validation, callbacks) is not this step's
            self._step_start = time.perf_counter()

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        if isinstance(self.model, FSDPModule):
            # FSDP2 reduce-scatters every backward unless told not to, and Lightning's
            # accumulation only blocks DDP's sync (`no_sync`): without this, each of the
            # `accumulate_grad_batches` micro-batches pays a full gradient reduce-scatter. Between
            # syncs each rank accumulates unsharded fp32 (`reduce_dtype`) gradients locally, the
            # documented trade of memory for communication.
            self.model.set_requires_gradient_sync(self._steps_on_this_batch())
        out = self.model(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=max(out.num_targets, 1))
        self.log("train/answer_tokens", float(out.num_targets), reduce_fx="sum")
        return out.loss

    def on_train_batch_end(self, outputs, batch: PackedBatch, batch_idx: int) -> None:
        """`train/step_time_s`: one optimizer step (all its micro-batches, backward and
        optimizer included), measured after the device has finished it (CUDA is asynchronous:
        without the synchronize, the host clock measures kernel launches)."""
        if not self._steps_on_this_batch():
            return
        _synchronize(self.device)
        self.log("train/step_time_s", time.perf_counter() - self._step_start)
        self._step_start = None

    def configure_optimizers(self):
        h = self.hparams
        groups = self.model.parameter_groups()
        if h.require_pretrained:
            random_init = tuple(f"{name}." for name in ("backbone", "vision")
                                if not getattr(getattr(self.model, name), "loaded", True))
            # init_from loads every weight from an earlier stage: nothing is random then
            bad = [] if h.init_from else random_init_in_pretrained(groups, random_init)
            if bad:
                raise ValueError(f"CasaModule.require_pretrained=True but {len(bad)} trainable parameters of the "
                                 f"\"pretrained\" group (lr_pretrained={h.lr_pretrained}) are randomly initialised, "
                                 f"e.g. {bad[:3]}: load them (Backbone.path / VisionEncoder.path), freeze them, or "
                                 f"set require_pretrained: false")
        opt = build_optimizer(groups, h.lr_new, h.lr_pretrained, h.weight_decay)
        total = int(self.trainer.max_steps) if self.trainer and self.trainer.max_steps > 0 else 0
        if total <= 0:
            raise ValueError("trainer.max_steps must be set: the data streams have no fixed length")
        sched = build_scheduler(opt, min(h.warmup_steps, total), min(h.decay_steps, total - min(h.warmup_steps, total)), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ validation
    # Rank lock-step: under FSDP2 every block forward is a collective, and every metric sync
    # is one too, so each rank makes the same calls in the same order whatever its batch
    # holds. The datamodule gives every rank the same number of validation batches (short
    # ranks get a padding batch: meta "padding"), each batch runs the forward, the generation
    # decision is taken over all ranks, and the loss and answer metrics are synced once, at
    # the end of the epoch.
    def on_validation_epoch_start(self) -> None:
        self._val_generated = 0
        self._val_answers = []
        self.val_loss.reset()
        self.task_loss.reset()
        self.text_loss.reset()
        self.task_metrics.reset()
        self.group_metrics.reset()

    def validation_step(self, batch: PackedBatch, batch_idx: int) -> None:
        out = self.model(batch)
        padding = _is_padding(batch)
        # token-weighted; a padding batch has weight 0: it counts nothing but is still an update
        self.val_loss.update(out.loss, 0 if padding else out.num_targets)
        if not padding and batch.meta:
            self._update_task_losses(batch, out.logits)
        if not self._generation_wanted():
            return
        generatable = bool(batch.meta) and all("answer" in m and "prompt_len" in m for m in batch.meta)
        # samples of the perplexity groups are generated with their batch but never scored
        scoring = [m.get("group") not in self.hparams.perplexity_groups for m in batch.meta]
        real = 0 if padding or not generatable else sum(scoring)
        # one all-reduce: [samples scored this step, ranks whose batch cannot be generated,
        # ranks with a sample to score]
        counts = self._sum_over_ranks(torch.tensor([real, int(not generatable), int(not padding and any(scoring))],
                                                   device=self.device))
        scored, refusals, wanted = (int(c) for c in counts.tolist())
        if refusals or not wanted:  # no rank generates, or some would generate alone, or nothing to score
            return
        tok = self._tokenizer()
        prompts = truncate_samples(batch, [m["prompt_len"] for m in batch.meta],
                                   merge=self.model.vision.spatial_merge_size)
        gen = generate(self.model, prompts, GenerationConfig(max_new_tokens=self.hparams.val_max_new_tokens,
                                                             stop_token_ids=tuple(self._stop_ids())),
                       sync=self.trainer.world_size > 1)
        self._val_generated += scored
        if padding:
            return
        stop = set(self._stop_ids())
        meta = [m for m, keep in zip(batch.meta, scoring) if keep]
        preds = [tok.decode([t for t in g if t not in stop], skip_special_tokens=True)
                 for g, keep in zip(gen, scoring) if keep]
        self.task_metrics.update_samples("task", preds, meta)  # all accepted answers, options
        self.group_metrics.update_samples("group", preds, meta)
        refs = [m["answer"] for m in meta]
        # with the accepted answers and options the metrics used, so an item can be scored again exactly
        self._val_answers += [{"key": m.get("key"), "task": m.get("task", "all"), "group": m.get("group", "all"),
                               "prediction": p, "reference": r, **{k: m[k] for k in ("answers", "choices") if m.get(k)}}
                              for m, p, r in zip(meta, preds, refs)]

    def _update_task_losses(self, batch: PackedBatch, logits: torch.Tensor) -> None:
        """Answer loss per task (and per perplexity-group task) of a real validation batch."""
        S = len(batch.meta)
        sums, counts = answer_loss_per_sample(logits[:batch.num_text_tokens], batch.labels, batch.sample_cu_seqlens)
        sums, counts = sums[:S], counts[:S]  # [S]
        tasks = [m.get("task", "all") for m in batch.meta]
        self.task_loss.update(tasks, sums, counts)
        text = [i for i, m in enumerate(batch.meta) if m.get("group") in self.hparams.perplexity_groups]
        if text:
            self.text_loss.update([tasks[i] for i in text], sums[text], counts[text])

    def _generation_wanted(self) -> bool:
        """Generate this batch? The same answer on every rank: `_val_generated` counts all ranks."""
        return (self.hparams.val_generate and self._val_generated < self.hparams.val_max_samples
                and self._tokenizer() is not None)

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        return t

    def on_validation_epoch_end(self) -> None:
        # every rank ran the same number of validation steps, so update_count agrees across ranks
        if self.val_loss.update_count:
            self.log("val/loss", self.val_loss.compute(), prog_bar=True, rank_zero_only=False)
        # collectives: every rank computes both (the key union is gathered first)
        for task, values in self.task_loss.compute().items():
            self.log(f"val_task/{task}/loss", values["loss"], rank_zero_only=False)
        for task, values in self.text_loss.compute().items():
            self.log(f"val_ppl/{task}", torch.exp(torch.tensor(values["loss"])), rank_zero_only=False)
        if not self.hparams.val_generate:
            return
        for prefix, metrics in (("val_task", self.task_metrics), ("val_group", self.group_metrics)):
            for key, values in metrics.compute().items():
                for name, v in values.items():
                    self.log(f"{prefix}/{key}/{name}", v, rank_zero_only=False)
        if self.hparams.val_predictions and not self.trainer.sanity_checking:
            self._write_answers()

    def _write_answers(self) -> None:
        """All ranks' generated answers -> one JSONL file, written by rank zero."""
        import json
        from pathlib import Path

        answers = self._val_answers
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, answers)  # every rank calls it: the same collectives everywhere
            answers = [a for part in gathered for a in part]
        if not self.trainer.is_global_zero:
            return
        out = Path(self.trainer.default_root_dir) / "predictions" / f"val_step_{self.global_step:06d}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(a) + "\n" for a in sorted(answers, key=lambda a: str(a["key"]))))

    # ------------------------------------------------------------------ checkpoints
    #: the full run config (YAML text) set by `experiments.fit`; stored in every checkpoint so
    #: `casa.assistant.load` can rebuild model, tokenizer and template from the file alone.
    run_config: str | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["casa_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.run_config = checkpoint.get("casa_config", self.run_config)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Lightning's loader for every checkpoint `experiments.fit` writes: a file, or FSDP2's
        directory (read by `casa.checkpoint.read_checkpoint`, without optimizer states).

        The model is rebuilt from the hyperparameters (the fit CLI stores its spec there); a
        checkpoint written before they held it is converted: the model spec of its run config
        (`casa_config`) goes into its hyperparameters, as the fit CLI puts it there today.
        `init_from` is not re-read: the checkpoint's weights replace the ones it would load.
        kwargs override hyperparameters, as in Lightning. The checkpoint is handed to Lightning
        in memory (twice its size, briefly)."""
        import io

        from casa.checkpoint import CheckpointError, read_checkpoint

        ckpt = read_checkpoint(checkpoint_path)
        kwargs.setdefault("init_from", None)
        hparams = ckpt.setdefault("hyper_parameters", {})
        if "model" not in hparams and "model" not in kwargs:
            if not ckpt.get("casa_config"):
                raise CheckpointError(f"{checkpoint_path}: neither its hyperparameters nor a 'casa_config' give the "
                                      "model; pass model=VisionLanguageModel(...) to load_from_checkpoint")
            import yaml

            # converted to what the fit CLI stores today: the model's spec, built by Lightning's instantiator
            hparams["model"] = yaml.safe_load(ckpt["casa_config"])["model"]["model"]
            hparams["_instantiator"] = _CLI_INSTANTIATOR
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        buffer.seek(0)
        return super().load_from_checkpoint(buffer, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, weights_only=True, **kwargs)

    # ------------------------------------------------------------------ helpers
    def _load_weights(self, path: str) -> None:
        """Weights of a previous stage: what `fit` wrote under any trainer (file or FSDP2 directory)."""
        from casa.checkpoint import CheckpointError, read_checkpoint

        try:
            state = read_checkpoint(path)["state_dict"]
        except CheckpointError as e:
            raise CheckpointError(f"CasaModule.init_from={path!r}: {e}") from None
        weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"CasaModule.init_from={path!r} does not match this model: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")

    def _datamodule(self):
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def _tokenizer(self):
        dm = self._datamodule()
        return getattr(dm, "tokenizer", None)

    def _stop_ids(self) -> list[int]:
        dm = self._datamodule()
        ids = getattr(dm, "stop_token_ids", None)
        if ids:
            return list(ids)
        tok = self._tokenizer()
        return [tok.eos_token_id] if tok is not None and tok.eos_token_id is not None else []


def _is_padding(batch: PackedBatch) -> bool:
    """A padding batch (the datamodule's filler that evens out validation batches per rank)?"""
    flags = [bool(m.get("padding", False)) for m in batch.meta]
    if any(flags) and not all(flags):
        raise ValueError(f"a validation batch mixes padding and real samples: meta padding flags {flags}")
    return bool(flags) and all(flags)
