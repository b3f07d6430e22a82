"""Generation for every strategy: greedy or sampled, cached or not, a batch of prompts.

The prompts are one `PackedBatch` (several samples, images anywhere). With the cache the
prompt is run once (`KVCache` keeps what each layer needs, see `casa.cache`) and every
step feeds one token per unfinished sample; without it every step re-runs the whole
sequence (the reference the cached path is tested against, and the path used with the
Table 8 masks, whose key indices refer to full windows). With several ranks, `sync=True`
keeps them stepping together (every FSDP2 block forward is a collective).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from casa.batch import PackedBatch, build_batch
from casa.cache import KVCache
from casa.sampling import choose, logits_processors


@dataclass
class GenerationConfig:
    """How `generate` picks tokens (`casa.sampling`: transformers' logits processors)."""

    max_new_tokens: int = 32
    stop_token_ids: tuple[int, ...] = ()
    temperature: float = 0.0
    """0 = greedy (argmax after the penalties); > 0 samples (`TemperatureLogitsWarper`)."""
    top_k: int = 0
    """Sampling: keep the k most likely tokens (`TopKLogitsWarper`); 0 = off."""
    top_p: float = 1.0
    """Sampling: keep the smallest set of tokens holding this probability (`TopPLogitsWarper`); 1 = off."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the history (CTRL's rule; 1 = off). With the three
    fields below at their defaults it is transformers' `RepetitionPenaltyLogitsProcessor`
    over the prompt and the generated tokens; otherwise
    `casa.sampling.DecayedRepetitionPenaltyLogitsProcessor`."""
    repetition_window: int = 0
    """Only the last N tokens of the history count (0 = all of it)."""
    repetition_decay: float = 1.0
    """A token seen a tokens ago weighs decay ** a (1 = no decay)."""
    repetition_max_count: float = 1.0
    """Cap on a token's summed weight: 1 = penalised once however often it was seen."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of the history (`NoRepeatNGramLogitsProcessor`); 0 = off."""
    seed: int | None = None
    """Sampling: seeds a generator when none is passed (None: torch's global RNG)."""
    use_cache: bool = True

    def __post_init__(self):
        checks = [("max_new_tokens", self.max_new_tokens >= 0, ">= 0"),
                  ("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
                  ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 = off)"),
                  ("repetition_window", self.repetition_window >= 0, ">= 0 (0 = the whole history)"),
                  ("repetition_decay", 0 < self.repetition_decay <= 1, "in (0, 1] (1 = no decay)"),
                  ("repetition_max_count", self.repetition_max_count > 0, "> 0"),
                  ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, ">= 0 (0 = off)")]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"GenerationConfig.{name}={getattr(self, name)!r} must be {valid}")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def text_chunk(tokens: list[list[int]], device: torch.device | str = "cpu", patch_dim: int = 3 * 2 * 14 * 14) -> PackedBatch:
    """One text-only segment per sample (local positions 0..n-1; a cache adds its offsets)."""
    cu = [0]
    for t in tokens:
        cu.append(cu[-1] + len(t))
    return build_batch(torch.tensor([x for t in tokens for x in t], dtype=torch.long, device=device), cu,
                       pixel_values=torch.zeros(0, patch_dim, device=device), image_grid_thw=[],
                       image_text_position=[], merge=1)  # no image: the merge is never used


def image_chunk(tokens: list[int], pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, merge: int = 2) -> PackedBatch:
    """One sample: images (a frame) opening a new window, followed by `tokens` of text."""
    n = len(tokens)
    if n == 0:
        raise ValueError("an image chunk needs at least one text token after the image (its window's first query)")
    dev = pixel_values.device
    return build_batch(torch.tensor(tokens, dtype=torch.long, device=dev), [0, n], pixel_values=pixel_values,
                       image_grid_thw=image_grid_thw, image_text_position=[0] * image_grid_thw.shape[0], merge=merge)


def append_tokens(batch: PackedBatch, new: list[list[int]], merge: int = 2) -> PackedBatch:
    """Append new[s] to the end of sample s (extending its last window) -> a new batch.
    merge: the vision encoder's spatial merge (the batch's image token counts)."""
    cu = batch.sample_cu_seqlens.tolist()
    ids, pos, labels = [], [], []
    add = [0]
    for s in range(len(cu) - 1):
        seg = batch.input_ids[cu[s]:cu[s + 1]]
        p = batch.position_ids[..., cu[s]:cu[s + 1]]
        extra = torch.tensor(new[s], dtype=torch.long, device=seg.device)
        ids.append(torch.cat([seg, extra]))
        last = p[..., -1:] if p.shape[-1] else torch.full_like(p[..., :1], -1)
        pos.append(torch.cat([p, last + 1 + torch.arange(len(new[s]), device=seg.device)], dim=-1))
        labels.append(torch.cat([batch.labels[cu[s]:cu[s + 1]], torch.full_like(extra, -100)]))
        add.append(add[-1] + len(new[s]))
    img_pos = []
    for p in batch.image_text_position.tolist():
        s = next(j for j in range(len(cu) - 1) if cu[j] <= p < cu[j + 1])
        img_pos.append(p + add[s])
    return build_batch(torch.cat(ids), [c + a for c, a in zip(cu, add)], labels=torch.cat(labels),
                       position_ids=torch.cat(pos, dim=-1), pixel_values=batch.pixel_values,
                       image_grid_thw=batch.image_grid_thw, image_text_position=img_pos, merge=merge, meta=batch.meta)


@torch.no_grad()
def generate(model, prompts: PackedBatch, cfg: GenerationConfig | None = None,
             generator: torch.Generator | None = None, cache: KVCache | None = None,
             sync: bool = False, history: list[list[int]] | None = None,
             check_positions: bool = True) -> list[list[int]]:
    """Generate for every sample of `prompts` -> new token ids per sample (stop token included
    when one was produced).

    `cache`: continue a conversation whose past is already in this cache (live captioning:
    each frame's chunk is a prompt); the last generated token is not fed, so the caller
    sends it with the next chunk. Without it a fresh cache starts from `prompts`.

    `history`: per sample, the tokens the logits processors (repetition penalty, n-grams) see
    before the generated ones; default: the sample's prompt (transformers' rule). The stream
    passes its recent captions instead of the chunk's template tokens.

    Positions: a prompt reaching past the backbone's `max_position_embeddings` is a
    `ValueError` (it used to generate silently; the prompt's text positions plus the cache's
    offset: insertion's image tokens in a fresh prompt are not counted here); a sample stops when its next token would
    take a position past the last one (a warning says so). `check_positions=False` lifts both
    (RoPE extrapolates; benchmarks of unbounded cache growth).

    `sync`: step in lock-step with every rank of the default process group (validation
    under FSDP2, where every block forward is an all-gather, so all ranks must make the same
    forward calls). Each step all-reduces "is any sample of any rank still running?"; a rank
    whose samples are all done runs a one-token dummy forward per step (output discarded)
    until every rank is done. Outputs per sample are those of `sync=False`.

    An FSDP2-wrapped model (`fully_shard` on the model) runs every step as a forward of its
    root (`model.last_logits`, registered with `register_fsdp_forward_method`): the root's
    parameters are gathered by its own pre-forward, with or without a forward before."""
    cfg = cfg or GenerationConfig()
    if sync and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("generate(sync=True) needs an initialised torch.distributed process group")
    _forward_through_fsdp_root(model)
    S = prompts.num_samples
    cu = prompts.sample_cu_seqlens.tolist()
    if history is None:
        history = [prompts.input_ids[cu[s]:cu[s + 1]].tolist() for s in range(S)]
    elif len(history) != S:
        raise ValueError(f"history has {len(history)} rows for {S} samples")
    room = _position_room(model, prompts, cache) if check_positions else [float("inf")] * S  # tokens each may feed
    procs = logits_processors(cfg)
    if generator is None and cfg.seed is not None and cfg.sampling:
        generator = torch.Generator(device=prompts.input_ids.device).manual_seed(cfg.seed)
    out: list[list[int]] = [[] for _ in range(S)]
    stop = set(cfg.stop_token_ids)
    active = list(range(S))
    # Table 8 masks hide one key chosen over the whole window; the cache only sees the new
    # chunk, so a masked model generates without it (slower, but the mask means what it says)
    use_cache = cfg.use_cache and not _masked(model)
    if cache is not None and not use_cache:
        raise ValueError("generate(cache=...) needs use_cache=True and no Table 8 inference mask")
    if use_cache:
        if model.needs_idle_sample(prompts):
            # text-only prompts on one of several ranks: the idle sample goes through the
            # cache too (the prompt step is the one cached step that may hold images), then
            # leaves it, so the decoding steps see only the real samples
            if cache is not None:
                raise ValueError("generate(cache=...) continues a conversation in one process; with several "
                                 "ranks and text-only prompts the idle sample would enter that cache")
            cache = KVCache(S + 1)
            logits = model.last_logits(model.with_idle_sample(prompts), cache=cache)[:S]  # [S, V]
            cache.keep(list(range(S)))
        else:
            cache = cache if cache is not None else KVCache(S)
            logits = model.last_logits(prompts, cache=cache)  # [S, V]
    else:
        logits = model.last_logits(prompts)
    for step in range(cfg.max_new_tokens):
        still = []
        if active:
            toks = choose(logits, [history[s] + out[s] for s in active], procs, cfg.sampling, generator)
            for s, t in zip(active, toks):
                out[s].append(t)
                if t not in stop and len(out[s]) <= room[s]:
                    still.append(s)
                elif t not in stop and step < cfg.max_new_tokens - 1:
                    warnings.warn(f"sample {s} stopped after {len(out[s])} new tokens: the next one would take a "
                                  f"position past the model's max_position_embeddings", stacklevel=3)
        if step == cfg.max_new_tokens - 1 or not _any_rank(bool(still), sync, prompts.input_ids.device):
            break
        if not still:
            # done here, not on another rank: the same forward calls as a decoding step there
            # (cached steps are text-only on every rank; uncached ones run the tower, see
            # `needs_idle_sample`), on one throwaway token outside the cache
            model.last_logits(text_chunk([[0]], device=prompts.input_ids.device), images_on_any_rank=not use_cache)
        elif use_cache:
            cache.keep([active.index(s) for s in still])
            step_batch = text_chunk([[out[s][-1]] for s in still], device=prompts.input_ids.device)
            logits = model.last_logits(step_batch, cache=cache, images_on_any_rank=False)  # [S', V]
        else:
            logits = model.last_logits(append_tokens(prompts, [out[s] for s in range(S)],
                                                     merge=model.vision.spatial_merge_size))[still]
        active = still
    return out


def max_positions(model) -> int | None:
    """The backbone's `max_position_embeddings` (None: the config has none)."""
    config = getattr(getattr(model, "backbone", None), "config", None)
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else None


def _position_room(model, prompts: PackedBatch, cache: KVCache | None) -> list[float]:
    """Per sample, how many generated tokens can still be fed before a position reaches
    `max_position_embeddings` (inf without a limit); ValueError when the prompt itself does."""
    limit = max_positions(model)
    S = prompts.num_samples
    if limit is None:
        return [float("inf")] * S
    cu = prompts.sample_cu_seqlens.tolist()
    pos = prompts.position_ids if prompts.position_ids.dim() == 1 else prompts.position_ids.amax(0)  # [T]
    offset = cache.offset.tolist() if cache is not None else [0] * S
    room = []
    for s in range(S):
        last = int(pos[cu[s]:cu[s + 1]].max()) + int(offset[s]) if cu[s + 1] > cu[s] else int(offset[s]) - 1
        if last >= limit:
            raise ValueError(f"prompt of sample {s} reaches position {last} ({cu[s + 1] - cu[s]} tokens"
                             f"{f' after {offset[s]} cached' if offset[s] else ''}), past the model's "
                             f"max_position_embeddings={limit}: shorten it (a stream trims its cache: "
                             f"casa.context_limit.ContextPolicy)")
        room.append(limit - 1 - last)
    return room


def _any_rank(running: bool, sync: bool, device: torch.device) -> bool:
    """Whether this rank (`sync=False`) or any rank of the default group (`sync=True`) has a
    sample still generating: one all-reduce of one flag per step."""
    if not sync:
        return running
    flag = torch.tensor([int(running)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _forward_through_fsdp_root(model) -> None:
    """Under FSDP2 the root's parameters (embeddings, norm, lm_head, projector, patch
    embedding) are gathered only by the root's pre-forward, which also runs FSDP's lazy
    initialisation (which module is the root); calling `hidden_states` and `backbone.head`
    directly worked only when a root forward had run before. `register_fsdp_forward_method`
    (torch.distributed.fsdp's documented API) makes `last_logits` such a forward; once per
    model, and a no-op without FSDP2."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(model, FSDPModule) and "last_logits" not in vars(model):
        register_fsdp_forward_method(model, "last_logits")


def _masked(model) -> bool:
    """Whether a fusion layer applies a Table 8 inference mask right now (eval mode only)."""
    fusion = getattr(model, "fusion", None)
    return getattr(fusion, "inference_mask", None) is not None and not model.training


def truncate_samples(batch: PackedBatch, lengths: list[int], merge: int = 2) -> PackedBatch:
    """Keep the first lengths[s] text tokens of every sample (and the images that precede
    them): turns an evaluation batch into its prompts (`meta[s]["prompt_len"]`).
    merge: the vision encoder's spatial merge (the Qwen2.5-VL 2x2 merge by default)."""
    cu = batch.sample_cu_seqlens.tolist()
    patch_counts = batch.image_grid_thw.prod(-1).tolist()  # patches per image (pixel_values rows)
    keep_text, keep_img = [], []
    new_cu = [0]
    img_pos = batch.image_text_position.tolist()
    patch_start = [0]
    for c in patch_counts:
        patch_start.append(patch_start[-1] + c)
    for s in range(len(cu) - 1):
        n = lengths[s]
        if not 0 < n <= cu[s + 1] - cu[s]:
            raise ValueError(f"prompt length {n} is not within sample {s}'s {cu[s + 1] - cu[s]} tokens")
        lo, hi = cu[s], cu[s] + n
        keep_text.extend(range(lo, hi))
        keep_img.extend(i for i, p in enumerate(img_pos) if lo <= p < hi)
        new_cu.append(len(keep_text))
    idx = torch.tensor(keep_text, dtype=torch.long, device=batch.input_ids.device)
    patches = [torch.arange(patch_start[i], patch_start[i + 1]) for i in keep_img]
    pidx = torch.cat(patches).to(batch.pixel_values.device) if patches else torch.zeros(0, dtype=torch.long)
    old_to_new = {old: new for new, old in enumerate(keep_text)}
    out = build_batch(batch.input_ids[idx], new_cu, position_ids=batch.position_ids[..., idx],
                      pixel_values=batch.pixel_values[pidx], image_grid_thw=batch.image_grid_thw[keep_img],
                      image_text_position=[old_to_new[img_pos[i]] for i in keep_img], merge=merge, meta=batch.meta)
    out.validate()
    return out
