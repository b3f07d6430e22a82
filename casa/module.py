"""The LightningModule: one training loop for every fusion strategy.

Training: loss on answer tokens only (labels are -100 elsewhere). Optimiser: Adam with
the new / pretrained learning rates of `casa.optim`, warmup-constant-decay schedule.
Validation: the loss, and greedy generation from each sample's prompt scored against its
reference answer with `casa.metrics`, per task and per task group.
"""

from __future__ import annotations

from typing import Literal

import time

import lightning as L
import torch

from casa.batch import PackedBatch
from casa.generation import GenerationConfig, generate, truncate_samples
from casa.metrics import GroupedAnswerMetrics
from casa.model import VisionLanguageModel
from casa.optim import build_optimizer, build_scheduler


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
        val_max_samples: cap on generated validation samples per validation run (per rank).
        compile: `torch.compile` every decoder block (GPU runs).
        activation_checkpointing: recompute each decoder block in the backward pass.
        fsdp_param_dtype: under FSDP2 (`ModelParallelStrategy`), the parameter dtype of the
            sharded blocks' compute ("bfloat16" on H100s; gradients are reduced in fp32).
    """

    def __init__(self, model: VisionLanguageModel, lr_new: float = 1e-4, lr_pretrained: float = 1e-5,
                 weight_decay: float = 0.0, warmup_steps: int = 100, decay_steps: int = 0, val_generate: bool = True,
                 val_max_new_tokens: int = 16, val_max_samples: int = 256, compile: bool = False,
                 activation_checkpointing: bool = False, fsdp_param_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
                 init_from: str | None = None):
        super().__init__()
        if lr_new <= 0 or lr_pretrained < 0:
            raise ValueError(f"CasaModule: lr_new={lr_new} must be > 0 and lr_pretrained={lr_pretrained} >= 0")
        if fsdp_param_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"CasaModule.fsdp_param_dtype={fsdp_param_dtype!r} is not one of [None, 'bfloat16', 'float16', 'float32']")
        self.model = model
        model.activation_checkpointing = activation_checkpointing
        if init_from is not None:
            self._load_weights(init_from)
        self.save_hyperparameters(ignore=["model"])
        self.task_metrics = GroupedAnswerMetrics()
        self.group_metrics = GroupedAnswerMetrics()
        self._val_generated = 0
        self._step_start = 0.0

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
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(
            self.hparams.fsdp_param_dtype or "", None)
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
        dp_mesh = mesh["data_parallel"]
        for block in self.model.backbone.layers:
            fully_shard(block, mesh=dp_mesh, mp_policy=mp)
        for block in self.model.vision.tower.blocks:
            fully_shard(block, mesh=dp_mesh, mp_policy=mp)
        fully_shard(self.model, mesh=dp_mesh, mp_policy=mp)
        self._sharded = True

    # ------------------------------------------------------------------ training
    def forward(self, batch: PackedBatch):
        return self.model(batch)

    def on_train_batch_start(self, batch: PackedBatch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        out = self.model(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=max(out.num_targets, 1))
        self.log("train/answer_tokens", float(out.num_targets), reduce_fx="sum")
        return out.loss

    def on_train_batch_end(self, outputs, batch: PackedBatch, batch_idx: int) -> None:
        self.log("train/step_time_s", time.perf_counter() - self._step_start)

    def configure_optimizers(self):
        h = self.hparams
        opt = build_optimizer(self.model.parameter_groups(), h.lr_new, h.lr_pretrained, h.weight_decay)
        total = int(self.trainer.max_steps) if self.trainer and self.trainer.max_steps > 0 else 0
        if total <= 0:
            raise ValueError("trainer.max_steps must be set: the data streams have no fixed length")
        sched = build_scheduler(opt, min(h.warmup_steps, total), min(h.decay_steps, total - min(h.warmup_steps, total)), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_generated = 0
        self.task_metrics.reset()
        self.group_metrics.reset()

    def validation_step(self, batch: PackedBatch, batch_idx: int) -> None:
        out = self.model(batch)
        if out.num_targets:
            self.log("val/loss", out.loss, batch_size=out.num_targets, sync_dist=True, prog_bar=True)
        if not self.hparams.val_generate or self._val_generated >= self.hparams.val_max_samples:
            return
        if not batch.meta or "answer" not in batch.meta[0] or "prompt_len" not in batch.meta[0]:
            return
        tok = self._tokenizer()
        if tok is None:
            return
        prompts = truncate_samples(batch, [m["prompt_len"] for m in batch.meta])
        gen = generate(self.model, prompts, GenerationConfig(max_new_tokens=self.hparams.val_max_new_tokens,
                                                             stop_token_ids=tuple(self._stop_ids())))
        stop = set(self._stop_ids())
        preds = [tok.decode([t for t in g if t not in stop], skip_special_tokens=True) for g in gen]
        refs = [m["answer"] for m in batch.meta]
        self.task_metrics.update([m.get("task", "all") for m in batch.meta], preds, refs)
        self.group_metrics.update([m.get("group", "all") for m in batch.meta], preds, refs)
        self._val_generated += len(preds)

    def on_validation_epoch_end(self) -> None:
        if not self.hparams.val_generate:
            return
        for prefix, metrics in (("val_task", self.task_metrics), ("val_group", self.group_metrics)):
            for key, values in metrics.compute().items():
                for name, v in values.items():
                    self.log(f"{prefix}/{key}/{name}", v, rank_zero_only=False)

    # ------------------------------------------------------------------ checkpoints
    #: the full run config (YAML text) set by `experiments.fit`; stored in every checkpoint so
    #: `casa.inference.load` can rebuild model, tokenizer and template from the file alone.
    run_config: str | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["casa_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.run_config = checkpoint.get("casa_config", self.run_config)

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
