"""CasaForConditionalGeneration: casa's VisionLanguageModel as a Hugging Face model (see `casa.hf`).

This file and the casa modules it needs are copied into every export directory as its remote
code (`casa.hf.source`), so the directory runs where transformers runs, without casa.

    model = AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    model(**inputs).logits              [B, L, V]
    model.generate(**inputs, max_new_tokens=32)   transformers' GenerationMixin, casa's KV cache

Inputs are Hugging Face's: input_ids [B, L] (left padding allowed) with one placeholder per
image (`config.image_token_id`) and one per video frame (`config.video_token_id`),
attention_mask [B, L], pixel_values [P, C*2*14*14] with image_grid_thw [I, 3] (one row per
image, in placeholder order over the batch), pixel_values_videos / video_grid_thw (one row per
frame: casa encodes a frame as an image). The model runs them as casa does: padding and
placeholders are taken out, the rows become the samples of one `PackedBatch`, and each image
opens its window at the text token its placeholder precedes. Logits are returned at the text
positions; placeholder and padding positions hold zeros.

With `use_cache` the returned `past_key_values` is a `CasaCache` (casa's `KVCache`: SA keys,
one window per fused layer): every later call feeds new text tokens of every row, so a
generated token costs one token's forward. Beam search is refused (`_validate_generation_mode`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from casa.batch import build_batch
from casa.cache import KVCache
from casa.generation import text_chunk

from .configuration_casa import CasaConfig
from .parts import resolve

ATTN_BACKENDS = {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "flash"}
"""transformers' attn_implementation -> casa's attention backend (`casa.attention.BACKENDS`)."""


def instantiate(spec: Any) -> Any:
    """A class_path/init_args spec (as jsonargparse writes it, every default filled in) -> the
    object, nested specs first. No jsonargparse: the export runs with transformers alone."""
    if isinstance(spec, dict) and "class_path" in spec:
        args = {k: instantiate(v) for k, v in (spec.get("init_args") or {}).items()}
        return resolve(spec["class_path"])(**args)
    if isinstance(spec, dict):
        return {k: instantiate(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [instantiate(v) for v in spec]
    return spec


def with_attention(spec: dict, attn_implementation: str) -> dict:
    """The model spec with the language model's attention (backbone and fusion layers) set to
    the casa backend of `attn_implementation`; the vision tower follows eager/sdpa (its own
    flash path needs flash-attn installed, which the stand-in does not provide)."""
    spec = {**spec, "init_args": dict(spec.get("init_args") or {})}
    init = spec["init_args"]
    for part in ("backbone", "fusion", "vision"):
        sub = init.get(part)
        if not isinstance(sub, dict):
            continue
        args = dict(sub.get("init_args") or {})
        if part == "backbone":
            args["attn_backend"] = ATTN_BACKENDS[attn_implementation]
        elif part == "fusion" and "backend" in args:
            args["backend"] = None  # the fusion layers take the backbone's
        elif part == "vision" and attn_implementation in ("eager", "sdpa") and "attn_implementation" in args:
            args["attn_implementation"] = attn_implementation
        init[part] = {**sub, "init_args": args}
    return spec


class CasaCache:
    """`past_key_values` of CasaForConditionalGeneration: casa's KVCache, one sample per row."""

    is_compileable = False
    is_croppable = False

    def __init__(self, rows: int):
        self.kv = KVCache(rows)
        self.tokens = 0
        """Columns of input_ids fed so far (padding and placeholders included, as transformers counts)."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens


class CasaForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """config: CasaConfig; model: an already built VisionLanguageModel to wrap (the export),
    else one is built from `config.model_spec` with the requested attention (weights:
    from_pretrained's)."""

    config_class = CasaConfig
    base_model_prefix = "casa"  # not "model": the wrapped model's own attribute is `model`
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supported_generation_modes = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)

    def __init__(self, config: CasaConfig, model=None):
        super().__init__(config)
        if model is None:
            model = instantiate(with_attention(config.model_spec, config._attn_implementation or "sdpa"))
        self.model = model
        self.post_init()

    def _check_and_adjust_attn_implementation(self, attn_implementation: str | None, is_init_check: bool = False,
                                              allow_all_kernels: bool = False) -> str:
        """eager, sdpa, flash_attention_2: casa's own backends (`ATTN_BACKENDS`), so transformers'
        checks of its own kernels do not apply; casa's flash backend says when it cannot run."""
        name = "sdpa" if attn_implementation is None else attn_implementation
        if name not in ATTN_BACKENDS:
            raise ValueError(f"attn_implementation={attn_implementation!r} is not one of {list(ATTN_BACKENDS)}")
        return name

    def _init_weights(self, module) -> None:
        """Nothing: casa's modules initialise themselves when built, and from_pretrained then
        loads every weight (re-initialising would overwrite a wrapped model's weights)."""

    def get_input_embeddings(self):
        return self.model.backbone.embed_tokens

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        if generation_mode not in self._supported_generation_modes:
            raise ValueError(
                f"{type(self).__name__}.generate: {generation_mode.value} (num_beams={generation_config.num_beams}) is "
                "not supported: casa's KV cache appends each row's keys in place into that row's buffers and keeps "
                "one open window per row in the fusion layers, so rows cannot be copied and reordered between steps "
                "as beams need. Use greedy decoding or do_sample=True (num_beams=1).")
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)

    # ------------------------------------------------------------------ inputs -> PackedBatch
    def _placeholders(self) -> tuple[int, int]:
        return int(self.config.image_token_id), int(self.config.video_token_id)

    def _rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
        """[B, L] -> each row's ids without its padding (host lists: read once per prompt)."""
        ids = input_ids.tolist()
        if attention_mask is None:
            return ids
        keep = attention_mask.bool().tolist()
        return [[t for t, k in zip(row, m) if k] for row, m in zip(ids, keep)]

    def _prompt_batch(self, rows: list[list[int]], pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """Rows with placeholders -> the PackedBatch of their B samples (placeholders taken out)."""
        image_id, video_id = self._placeholders()
        grids = {image_id: [] if image_grid_thw is None else image_grid_thw.reshape(-1, 3).tolist(),
                 video_id: [] if video_grid_thw is None else video_grid_thw.reshape(-1, 3).tolist()}
        pixels = {image_id: pixel_values, video_id: pixel_values_videos}
        names = {image_id: ("image", "image_grid_thw", "pixel_values"),
                 video_id: ("video frame", "video_grid_thw", "pixel_values_videos")}
        used = {image_id: 0, video_id: 0}
        row_start = {image_id: 0, video_id: 0}  # pixel row where the next visual of each kind starts
        text, cu, positions, visual_grids, chunks = [], [0], [], [], []
        for row in rows:
            for t in row:
                if t in grids:
                    kind, grid_name, pixel_name = names[t]
                    k = used[t]
                    if k >= len(grids[t]):
                        raise ValueError(f"input_ids hold more {kind} placeholders (token {t}) than {grid_name} has "
                                         f"rows ({len(grids[t])}): every placeholder needs its {kind}")
                    n = int(torch.tensor(grids[t][k]).prod())
                    chunks.append(pixels[t][row_start[t]:row_start[t] + n])
                    row_start[t] += n
                    used[t] += 1
                    positions.append(len(text))
                    visual_grids.append(grids[t][k])
                else:
                    text.append(t)
            if len(text) == cu[-1]:
                raise ValueError("a row of input_ids has no text token (only padding or placeholders)")
            cu.append(len(text))
        for t, (kind, grid_name, pixel_name) in names.items():
            if used[t] != len(grids[t]):
                raise ValueError(f"{grid_name} has {len(grids[t])} rows but input_ids hold {used[t]} {kind} "
                                 f"placeholders (token {t}): each {kind} needs one placeholder in the text")
            have = 0 if pixels[t] is None else pixels[t].shape[0]
            if row_start[t] != have:
                raise ValueError(f"{pixel_name} has {have} rows but {grid_name} describes {row_start[t]} patches")
        dev = self.device
        patch_dim = self.model.vision._patch_dim
        pv = torch.cat(chunks).to(dev, self.dtype) if chunks else torch.zeros(0, patch_dim, device=dev, dtype=self.dtype)
        return build_batch(torch.tensor(text, dtype=torch.long, device=dev), cu, pixel_values=pv,
                           image_grid_thw=visual_grids, image_text_position=positions,
                           merge=self.model.vision.spatial_merge_size)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                past_key_values: CasaCache | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, return_dict: bool | None = None) -> CausalLMOutputWithPast:
        """input_ids [B, L] (a first call: the prompts; with a filled cache: L new text tokens
        per row) -> CausalLMOutputWithPast(logits [B, L, V], or [B, k, V] with logits_to_keep=k,
        past_key_values: a CasaCache when use_cache)."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        B, L = input_ids.shape
        if past_key_values is not None and past_key_values.tokens:
            # new tokens are text, whatever their ids: a sampled token may be a placeholder's id
            # (it is in the language model's vocabulary), and casa's own loop feeds it as text too
            if any(x is not None for x in (pixel_values, pixel_values_videos)):
                raise ValueError("images and videos are read with the prompt only: a call that continues a cache "
                                 "takes new text tokens (no pixel_values)")
            rows = input_ids.tolist()  # one read per step, as casa's own loop
            if past_key_values.kv.num_samples != B:
                raise ValueError(f"past_key_values holds {past_key_values.kv.num_samples} rows but input_ids has {B}")
            batch = text_chunk(rows, device=self.device, patch_dim=self.model.vision._patch_dim)
            cache = past_key_values
            hidden = self.model.hidden_states(batch, cache=cache.kv, images_on_any_rank=False)  # [B*L, d]
            cache.tokens += L
            keep = L if logits_to_keep in (0, None) else min(int(logits_to_keep), L)
            hidden = hidden.view(B, L, -1)[:, L - keep:]  # [B, keep, d]
            return CausalLMOutputWithPast(logits=self.model.backbone.head(hidden), past_key_values=cache)
        rows = self._rows(input_ids, attention_mask)
        batch = self._prompt_batch(rows, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        cache = CasaCache(B) if use_cache else None
        hidden = self.model.hidden_states(batch, cache=None if cache is None else cache.kv)  # [T, d]
        if cache is not None:
            cache.tokens = L
        ends = batch.sample_cu_seqlens[1:].long() - 1  # [B] last text token of each row
        if logits_to_keep == 1:
            return CausalLMOutputWithPast(logits=self.model.backbone.head(hidden[ends])[:, None], past_key_values=cache)
        logits = self.model.backbone.head(hidden)  # [T, V]
        out = logits.new_zeros(B, L, logits.shape[-1])  # [B, L, V]: zeros at padding and placeholders
        out[self._text_columns(input_ids, attention_mask)] = logits
        if logits_to_keep:
            out = out[:, -int(logits_to_keep):]
        return CausalLMOutputWithPast(logits=out, past_key_values=cache)

    def _text_columns(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, L] bool: the text tokens (not padding, not a placeholder), row-major as packed."""
        text = ~torch.isin(input_ids, torch.tensor(self._placeholders(), device=input_ids.device))
        return text if attention_mask is None else text & attention_mask.bool()

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """num_return_sequences > 1: rows repeat, and so do each row's images (pixel rows are
        per image, not per row, so transformers' repeat along dim 0 would misplace them)."""
        if expand_size == 1:
            return input_ids, model_kwargs
        image_id, video_id = self._placeholders()
        for token, pv_key, grid_key in ((image_id, "pixel_values", "image_grid_thw"),
                                        (video_id, "pixel_values_videos", "video_grid_thw")):
            grids = model_kwargs.get(grid_key)
            if grids is None:
                continue
            per_row = (input_ids == token).sum(-1).tolist()  # visuals of each row
            patches = grids.reshape(-1, 3).prod(-1).tolist()
            pv, g, start, first = [], [], 0, 0
            for n in per_row:
                rows = sum(patches[first:first + n])
                pv += [model_kwargs[pv_key][start:start + rows]] * expand_size
                g += [grids[first:first + n]] * expand_size
                start, first = start + rows, first + n
            model_kwargs[pv_key], model_kwargs[grid_key] = torch.cat(pv), torch.cat(g)
        kept = {k: model_kwargs.pop(k) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                                 "video_grid_thw") if k in model_kwargs}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids,
                                                                        **model_kwargs)
        return input_ids, {**model_kwargs, **kept}

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length: int | None = None,
                                      past_key_values: CasaCache | None = None, attention_mask=None,
                                      is_first_iteration: bool | None = False, **kwargs) -> dict:
        """The model inputs of one generation step. With a filled cache: the last
        `next_sequence_length` tokens and the cache only (the images are in it, padding is not);
        else the prompt with its images. transformers' own version also clones the ids, builds
        position ids and 4-D masks the model does not read, a per-token cost on a model this
        small; it also passes on generate's `tokenizer` (stop_strings), which this one drops."""
        if past_key_values is not None and past_key_values.tokens:
            n = 1 if next_sequence_length is None else next_sequence_length
            inputs = {"input_ids": input_ids[:, -n:], "past_key_values": past_key_values}
        else:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "past_key_values": past_key_values}
            inputs.update({k: kwargs[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                                  "video_grid_thw") if k in kwargs})
        inputs.update({k: kwargs[k] for k in ("use_cache", "logits_to_keep") if k in kwargs})
        return inputs

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """The cache is casa's (`CasaCache`, made by the first forward), not a DynamicCache."""
        return False


CasaForCausalLM = CasaForConditionalGeneration
"""The name of the earlier exports' auto_map entry."""
