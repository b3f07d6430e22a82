"""Answer metrics of the paper's benchmarks, as torchmetrics (synchronised across ranks).

    exact_match       normalised string equality (lower case, spaces collapsed, final period dropped)
    relaxed_accuracy  ChartQA's rule: numbers within 5% of the reference count as correct,
                      other answers need an exact match
    anls              DocVQA's Average Normalised Levenshtein Similarity, threshold 0.5

`GroupedAnswerMetrics` keeps one set per task and per group (fine-grained reading, OCR,
coarse, video) so the validation table reads like the paper's.
"""

from __future__ import annotations

import re
import warnings

import torch
from torchmetrics import Metric
from torchmetrics.functional.text import edit_distance


def normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text[:-1] if text.endswith(".") else text


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("%"))
    except ValueError:
        return None


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def relaxed_match(pred: str, ref: str, tolerance: float = 0.05) -> float:
    p, r = _number(normalize(pred)), _number(normalize(ref))
    if p is not None and r is not None:
        return float(abs(p - r) <= tolerance * abs(r)) if r != 0 else float(p == 0)
    return exact_match(pred, ref)


def anls_score(pred: str, ref: str, threshold: float = 0.5) -> float:
    p, r = normalize(pred), normalize(ref)
    if not p and not r:
        return 1.0
    dist = float(edit_distance([p], [r], reduction="none")[0]) if p and r else float(max(len(p), len(r)))
    nl = dist / max(len(p), len(r))
    return 1.0 - nl if nl < threshold else 0.0


class _MeanScore(Metric):
    """Mean of a per-answer score; states are sums so DDP reduction is exact."""

    full_state_update = False
    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def score(self, pred: str, ref: str) -> float:
        raise NotImplementedError

    def update(self, preds: list[str], refs: list[str]) -> None:
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
        for p, r in zip(preds, refs):
            self.total += self.score(p, r)
            self.count += 1

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class ExactMatch(_MeanScore):
    def score(self, pred: str, ref: str) -> float:
        return exact_match(pred, ref)


class RelaxedAccuracy(_MeanScore):
    def __init__(self, tolerance: float = 0.05) -> None:
        super().__init__()
        self.tolerance = tolerance

    def score(self, pred: str, ref: str) -> float:
        return relaxed_match(pred, ref, self.tolerance)


class ANLS(_MeanScore):
    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold

    def score(self, pred: str, ref: str) -> float:
        return anls_score(pred, ref, self.threshold)


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


METRICS = {"exact_match": ExactMatch, "relaxed_accuracy": RelaxedAccuracy, "anls": ANLS}


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

    def update(self, keys: list[str], preds: list[str], refs: list[str]) -> None:
        for k, p, r in zip(keys, preds, refs):
            for m in self._get(k).values():
                m.update([p], [r])

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
                out[k] = {name: float(m.compute()) for name, m in self.sets[k].items()}
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
