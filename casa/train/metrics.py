"""Answer metrics of the paper's benchmarks, as torchmetrics (synchronised across ranks).
The per-answer scores, with their official definitions, are in `casa.train.scoring`.

    exact_match       normalised string equality with any accepted answer
    relaxed_accuracy  ChartQA's rule: numbers within 5% of the reference count as correct
                      ("45%" = 0.45, thousands separators read), other answers need an exact match
    anls              DocVQA's Average Normalised Levenshtein Similarity (best accepted answer),
                      threshold 0.5
    vqa_accuracy      TextVQA / VQAv2 accuracy over the human answers (EvalAI normalisation)
    choice_accuracy   multiple choice: the option the answer names (MMMU parsing) is the
                      reference; counted only on samples that have options (`choices`), absent
                      from the results of a key without any

A sample's references come from its meta (`data.dataset`): "answers" (all accepted answers,
when the shard has them) or "answer" (the last assistant turn), and "choices" (the options).

`GroupedAnswerMetrics` keeps one set per task and per group (fine-grained reading, OCR,
coarse, video) so the validation table reads like the paper's.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torchmetrics import Metric

from casa.train.scoring import Reference, anls_score, choice_match, exact_match, relaxed_match, vqa_accuracy


class _MeanScore(Metric):
    """Mean of a per-answer score; states are sums so DDP reduction is exact."""

    full_state_update = False
    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def score(self, pred: str, ref: Reference, choices: Sequence[str] | None) -> float | None:
        """-> the answer's score, or None when the metric does not apply (not counted)."""
        raise NotImplementedError

    def update(self, preds: list[str], refs: list[Reference], choices: list[Sequence[str] | None] | None = None) -> None:
        if len(preds) != len(refs) or (choices is not None and len(choices) != len(preds)):
            raise ValueError(f"{len(preds)} predictions for {len(refs)} references"
                             + (f" and {len(choices)} option lists" if choices is not None else ""))
        for p, r, c in zip(preds, refs, choices or [None] * len(preds)):
            s = self.score(p, r, c)
            if s is not None:
                self.total += s
                self.count += 1

    def compute(self) -> torch.Tensor:
        """-> the mean score; NaN when no answer was counted (on any rank)."""
        return (self.total / self.count).float()


class ExactMatch(_MeanScore):
    def score(self, pred, ref, choices) -> float:
        return exact_match(pred, ref)


class RelaxedAccuracy(_MeanScore):
    def __init__(self, tolerance: float = 0.05) -> None:
        super().__init__()
        self.tolerance = tolerance

    def score(self, pred, ref, choices) -> float:
        return relaxed_match(pred, ref, self.tolerance)


class ANLS(_MeanScore):
    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold

    def score(self, pred, ref, choices) -> float:
        return anls_score(pred, ref, self.threshold)


class VQAAccuracy(_MeanScore):
    def score(self, pred, ref, choices) -> float:
        return vqa_accuracy(pred, ref)


class ChoiceAccuracy(_MeanScore):
    """Counted on samples with options only."""

    def score(self, pred, ref, choices) -> float | None:
        return None if not choices else choice_match(pred, ref, choices)


class WeightedMean(Metric):
    """sum(value * weight) / sum(weight), e.g. the validation loss per answer token from the
    batch losses and their answer-token counts. States are sums (float64), so the mean over
    ranks is exact; a NaN value stays NaN (a diverged run must show it). Written out because
    torchmetrics 1.9's MeanMetric either drops NaN values or, with nan_strategy="disable",
    ignores the weights."""

    full_state_update = False
    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: float) -> None:
        """value: [] tensor; weight: its weight (0 adds nothing, whatever the value)."""
        if weight:
            self.total += value.detach().to(self.total.dtype) * weight
            self.weight += weight

    def compute(self) -> torch.Tensor:
        return (self.total / self.weight).float()


METRICS = {"exact_match": ExactMatch, "relaxed_accuracy": RelaxedAccuracy, "anls": ANLS, "vqa_accuracy": VQAAccuracy,
           "choice_accuracy": ChoiceAccuracy}
OPTIONAL_METRICS = ("choice_accuracy",)
"""Metrics that apply to some samples only: left out of a key's results when none of its
samples had them (instead of a NaN in every table and log)."""


def sample_references(meta: dict) -> tuple[Reference, list[str] | None]:
    """A sample's meta (`data.dataset`) -> (its accepted answers, its options or None)."""
    return meta.get("answers") or meta["answer"], meta.get("choices") or None


class GroupedAnswerMetrics(torch.nn.Module):
    """Per-key (task or group) metric sets, created on first sight of a key.

    Distributed (one process per rank): every metric's `compute` is a collective, so all
    ranks must compute the same metrics in the same order. `compute` therefore first
    gathers the union of keys seen by any rank, creates those this rank never saw (empty
    states, which add nothing to the sums), and computes keys in sorted order.

    New metric sets live on the module's device (`.to(device)` moves a non-persistent
    anchor buffer with the states; torchmetrics states themselves are not buffers)."""

    def __init__(self, keys: list[str] | None = None) -> None:
        super().__init__()
        self.sets = torch.nn.ModuleDict()
        # an empty tensor that follows .to(device) so that lazily created sets land on that device
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        for k in keys or []:
            self._get(k)

    metric_classes = METRICS
    """name -> metric class of every key's set."""

    def _get(self, key: str) -> torch.nn.ModuleDict:
        safe = key.replace(".", "_")
        if safe not in self.sets:
            self.sets[safe] = torch.nn.ModuleDict({name: cls() for name, cls in self.metric_classes.items()}).to(
                self._device_anchor.device)
        return self.sets[safe]

    def update(self, keys: list[str], preds: list[str], refs: list[Reference],
               choices: list[Sequence[str] | None] | None = None) -> None:
        """One (key, prediction, reference[, options]) per answer; a reference is a str or
        the list of accepted answers."""
        for i, (k, p, r) in enumerate(zip(keys, preds, refs)):
            c = [choices[i]] if choices is not None else None
            for m in self._get(k).values():
                m.update([p], [r], c)

    def update_samples(self, by: str, preds: list[str], metas: list[dict]) -> None:
        """Score generated answers against their samples' meta (`sample_references`),
        per `meta[by]` (e.g. "task" or "group"; "all" when the meta has no such field)."""
        refs, choices = zip(*map(sample_references, metas)) if metas else ((), ())
        self.update([m.get(by, "all") for m in metas], preds, list(refs), list(choices))

    def _sync_keys(self) -> list[str]:
        """-> the sorted union of the keys of every rank (creating the missing ones here)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[list[str] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, sorted(self.sets.keys()))
            for keys in gathered:
                for k in keys or []:
                    self._get(k)
        return sorted(self.sets.keys())

    def compute(self) -> dict[str, dict[str, float]]:
        """-> {key: {metric name: value}}, synchronised across ranks (a collective: call it on every rank)."""
        out: dict[str, dict[str, float]] = {}
        with warnings.catch_warnings():
            # a key this rank never saw is computed for the sync: its empty states are expected
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            for k in self._sync_keys():
                values = {name: float(m.compute()) for name, m in self.sets[k].items()}
                out[k] = {n: v for n, v in values.items() if not (n in OPTIONAL_METRICS and math.isnan(v))}
        return out

    def reset(self) -> None:
        for ms in self.sets.values():
            for m in ms.values():
                m.reset()


class GroupedLoss(GroupedAnswerMetrics):
    """Per-key (task) answer loss: {key: {"loss": sum of cross-entropy / answer tokens}},
    synchronised across ranks like the answer metrics (the key union first, sorted order)."""

    metric_classes = {"loss": WeightedMean}

    def update(self, keys: list[str], sums: torch.Tensor, counts: torch.Tensor) -> None:
        """keys [S]; sums, counts [S]: per sample, the answer tokens' summed loss and their number."""
        for k, total, n in zip(keys, sums, counts.tolist()):
            if n:
                self._get(k)["loss"].update(total / n, n)
