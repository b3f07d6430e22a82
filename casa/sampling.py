"""Choosing the next token: transformers' logits processors, one recency-weighted penalty.

`casa.generation.generate` asks `choose` for one token per sample. The scores go through a
`transformers.LogitsProcessorList` built once per call by `logits_processors`, in the order
transformers' own `GenerationMixin._get_logits_processor` uses:

    penalties (always)   DecayedRepetitionPenaltyLogitsProcessor   (or transformers'
                         RepetitionPenaltyLogitsProcessor when decay = 1, max count 1, no window)
                         NoRepeatNGramLogitsProcessor
    warpers (sampling)   TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper

then the argmax (temperature 0: greedy, the penalties still apply, as transformers does with
`do_sample=False`) or one draw from the softmax (`torch.multinomial`, as transformers samples).
With every control at its default the list is empty and the choice is the argmax of the
raw logits: greedy output is what it was before these controls existed.

Samples of a batch have histories of different lengths, so each row is processed on its own
history ([1, L] input_ids: transformers' processors take a rectangular batch and a padding
token would count as a repeat); histories of one length go through as one [S, L] batch.
"""

from __future__ import annotations

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, NoRepeatNGramLogitsProcessor,
                          RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)


class DecayedRepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """CTRL's repetition penalty (Keskar et al. 2019, transformers'
    `RepetitionPenaltyLogitsProcessor`) over the recent past, weighted by recency and capped,
    for live captioning (kyutai's captioner has such a decay and cap: a long video repeats a
    caption frame after frame, and a plain presence penalty over hours of text ends up
    penalising every common word).

    For token v, over the last `window` tokens of the history (all of it when window = 0),
    with age a = 0 for the most recent token:

        weight(v) = min(max_count, sum over the positions holding v of decay ** a)
        score(v) <- score / penalty ** weight   if score > 0
                    score * penalty ** weight   otherwise

    decay = 1, max_count = 1, window = 0 is transformers' processor exactly (a token seen
    once or more is penalised once); max_count = 3 lets a token repeated three times in the
    window be penalised three times as hard (penalty ** 3); decay < 1 lets a repetition fade
    (at decay 0.9 a token said 20 tokens ago weighs 0.12).

    input_ids [B, L], scores [B, V] -> scores [B, V] (float)."""

    def __init__(self, penalty: float, window: int = 0, decay: float = 1.0, max_count: float = 1.0):
        if not penalty > 0:
            raise ValueError(f"repetition_penalty={penalty} must be > 0 (1 = off, > 1 discourages repeats)")
        if window < 0:
            raise ValueError(f"repetition_window={window} must be >= 0 (0 = the whole history)")
        if not 0 < decay <= 1:
            raise ValueError(f"repetition_decay={decay} must be in (0, 1] (1 = no decay)")
        if not max_count > 0:
            raise ValueError(f"repetition_max_count={max_count} must be > 0 (1 = a presence penalty)")
        self.penalty, self.window, self.decay, self.max_count = float(penalty), int(window), float(decay), float(max_count)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = input_ids[:, -self.window:] if self.window else input_ids  # [B, L']
        if ids.shape[1] == 0:
            return scores
        ages = torch.arange(ids.shape[1] - 1, -1, -1, device=scores.device, dtype=scores.dtype)  # [L'], 0 = newest
        weights = (self.decay ** ages).expand(ids.shape[0], -1)  # [B, L']
        V = scores.shape[1]
        # ids past the lm head's vocabulary (a larger embedding table) cannot be generated: one spare column takes them
        weight = scores.new_zeros(ids.shape[0], V + 1).scatter_add_(1, ids.clamp(max=V), weights)[:, :V]  # [B, V]
        weight = weight.clamp_(max=self.max_count)
        factor = torch.pow(torch.as_tensor(self.penalty, dtype=scores.dtype, device=scores.device), weight)  # [B, V]
        return torch.where(scores > 0, scores / factor, scores * factor)


def logits_processors(cfg) -> LogitsProcessorList:
    """A `casa.generation.GenerationConfig` -> its processors (empty for greedy defaults)."""
    procs = LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        if cfg.repetition_window == 0 and cfg.repetition_decay == 1.0 and cfg.repetition_max_count == 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
        else:
            procs.append(DecayedRepetitionPenaltyLogitsProcessor(cfg.repetition_penalty, cfg.repetition_window,
                                                                 cfg.repetition_decay, cfg.repetition_max_count))
    if cfg.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.temperature > 0:
        if cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k > 0:
            procs.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(cfg.top_p))
    return procs


def choose(logits: torch.Tensor, histories: list[list[int]], procs: LogitsProcessorList, sample: bool,
           generator: torch.Generator | None = None) -> list[int]:
    """logits [S, V], each sample's history (what the processors see: prompt or context, then
    the tokens generated so far) -> one token per sample."""
    scores = logits.float()
    if procs and len({len(h) for h in histories}) == 1:  # one rectangular batch, as transformers runs it
        scores = procs(torch.tensor(histories, dtype=torch.long, device=scores.device).view(len(histories), -1),
                       scores.clone())
    elif procs:
        rows = []
        for s, seen in enumerate(histories):
            ids = torch.tensor([seen], dtype=torch.long, device=scores.device)  # [1, L]
            rows.append(procs(ids, scores[s:s + 1].clone()))
        scores = torch.cat(rows)  # [S, V]
    if not sample:
        return scores.argmax(-1).tolist()
    probs = torch.softmax(scores, dim=-1)  # -inf (filtered by top-k / top-p / n-grams) -> 0
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).tolist()
