"""Teacher-forced answer-set accuracy in validation, so that a grid's `results.md` and
`metrics.json` carry it beside the generated answers' scores.

Every validation sample whose task has a closed answer set is scored by
`casa.answer_set.candidate_logprobs` (the candidates' log-likelihoods, end token included;
the argmax is the prediction). Unlike generation, which `CasaModule.val_max_samples` caps,
it scores the whole validation split: at 64 image tokens, 1000 items per task cost seconds.
Logged at the end of validation as `val_task/<task>/answer_set_accuracy` and
`val_group/<group>/answer_set_accuracy`, plus `val_task/<task>/answer_set_items`; every
item's pick is written to `<run_dir>/predictions/answer_set_step_XXXXXX.jsonl` (key, task,
group, prediction, reference, sorted by key), what contrasts paired by item read.

YAML (experiments/configs/protocol_v2/base.yaml):

    - class_path: callbacks.answer_set.AnswerSetAccuracy
      init_args: {answer_sets: {dot_color: [blue, green, ...], read_digit: ["0", ...]}}

The answer sets are given in the config (callbacks do not import the data package);
tests/test_answer_set_callback.py checks the protocol's against `data.synth_tasks.ANSWER_SETS`.
Single process only: the scoring forward bypasses the FSDP2 root's forward.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch

from casa.answer_set import argmax_answers, candidate_logprobs, tokenize_candidates


class AnswerSetAccuracy(pl.Callback):
    def __init__(self, answer_sets: dict[str, list[str]]):
        """answer_sets: task -> its candidate answers (>= 2, distinct)."""
        for task, answers in answer_sets.items():
            if len(answers) < 2 or len(set(answers)) != len(answers):
                raise ValueError(f"AnswerSetAccuracy.answer_sets[{task!r}]={answers!r} must hold >= 2 distinct answers")
        self.answer_sets = {t: [str(a) for a in answers] for t, answers in answer_sets.items()}
        self._tokens: dict[str, list[list[int]]] | None = None
        self._hits: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # (kind, key) -> [correct, items]
        self._items: list[dict] = []  # this validation run's picks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            raise ValueError(f"AnswerSetAccuracy runs in one process (world_size={trainer.world_size}); score a "
                             "checkpoint with `python -m experiments.evaluate` instead")

    def _candidates(self, pl_module) -> dict[str, list[list[int]]]:
        if self._tokens is None:
            tok = pl_module._tokenizer()
            encode = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731 (the template's text pieces)
            self._tokens = {t: tokenize_candidates(a, encode, pl_module._stop_ids()) for t, a in self.answer_sets.items()}
        return self._tokens

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._hits.clear()
        self._items = []

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or not batch.meta:
            return
        tasks = [m.get("task") for m in batch.meta]
        keep = [i for i, t in enumerate(tasks) if t in self.answer_sets and "prompt_len" in batch.meta[i]]
        if not keep:
            return
        tokens = self._candidates(pl_module)
        cands = [tokens[tasks[i]] if i in keep else [] for i in range(len(tasks))]
        scores = candidate_logprobs(pl_module.model, batch, cands)
        best = argmax_answers([scores[i] for i in keep], [self.answer_sets[tasks[i]] for i in keep])
        for i, pred in zip(keep, best):
            m = batch.meta[i]
            hit = int(pred.strip().lower() == str(m["answer"]).strip().lower())
            self._items.append({"key": m.get("key"), "task": tasks[i], "group": m.get("group", "all"),
                                "prediction": pred, "reference": m["answer"]})
            for key in (("task", tasks[i]), ("group", m.get("group", "all"))):
                self._hits[key][0] += hit
                self._hits[key][1] += 1

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if self._items and trainer.is_global_zero:
            out = Path(trainer.default_root_dir) / "predictions" / f"answer_set_step_{trainer.global_step:06d}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(json.dumps(x) + "\n" for x in sorted(self._items, key=lambda x: str(x["key"]))))
        for (kind, key), (hit, n) in sorted(self._hits.items()):
            pl_module.log(f"val_{kind}/{key}/answer_set_accuracy", hit / n)
            if kind == "task":
                pl_module.log(f"val_task/{key}/answer_set_items", float(n))
