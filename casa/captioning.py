"""One live-captioning conversation, frame by frame: `CaptionSession`.

`Assistant.stream` (a whole iterable of frames, paced to their clock) and the live web view
(`experiments.live`, whose settings change between frames) both run a session, so the
captions of a page equal those of `experiments.stream` for the same frames and settings.
The layout per frame (`casa.assistant`'s module doc, `CaptionLayout`): one chunk `[tail of
the previous turn | frame | tokens opening the assistant turn]` (`frame_chunk`), then the
caption decoded with the cache. Each frame's outcome is a `FrameRecord`.

What the session adds per frame:
- generation settings of that frame (`step(config=...)`: temperature, penalties, ... may
  change mid-stream; the cache does not depend on them);
- the context policy (`casa.context_limit.ContextPolicy`): before the chunk, the SA cache is trimmed
  if the chunk and its caption could pass `max_tokens` (default: the backbone's
  `max_position_embeddings`), so hours of video run in bounded memory;
- the repetition history: the penalties and n-gram blocking see the recent captions (the
  last `HISTORY` generated tokens, end tokens excluded), not the template's tokens, which
  repeat every frame by construction (penalising the end token would stop the model from
  ever falling silent);
- optionally (`attention=True`) the CASA layers' attention mass of the frame's queries on
  the image / the window's other text / themselves (paper Fig. 7, the implicit gate),
  captured through the eager backend (`VisionLanguageModel.capture_attention`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import torch

from casa.batch import PackedBatch, build_batch
from casa.cache import KVCache
from casa.context_limit import ContextPolicy, key_shifter
from casa.generation import GenerationConfig, max_positions
from casa.inputs import InputError, to_image
from casa.processing.image import ORIGINAL_SIZE
from casa.processing.template import CAPTION_PROMPT, ChatTemplate

def frame_chunk(pre: list[int], post: list[int], pixel_values: torch.Tensor, image_grid_thw,
                merge: int = 2) -> PackedBatch:
    """One cached sample's chunk: `pre` continues its open window, then the frame opens a new
    window followed by `post` -> PackedBatch (S = 1, local positions 0..len-1).
    image_grid_thw: [I, 3] (t, h, w) of the frame's images, host list or tensor."""
    if not post:
        raise ValueError("a frame needs at least one text token after it (its window's first query)")
    dev = pixel_values.device
    grids = image_grid_thw.tolist() if isinstance(image_grid_thw, torch.Tensor) else [list(g) for g in image_grid_thw]
    return build_batch(torch.tensor(pre + post, dtype=torch.long, device=dev), [0, len(pre) + len(post)],
                       pixel_values=pixel_values, image_grid_thw=grids,
                       image_text_position=[len(pre)] * len(grids), merge=merge)


@dataclass
class CaptionLayout:
    """Token pieces of the live-captioning conversation, read off the template.

    first_pre: before frame 0 (opens the user turn, the prompt);  pre: before frame i > 0;
    post: between a frame and its caption (closes the user turn, opens the assistant's);
    end: the end-of-turn token (generation stops on it);  after_end: what follows it."""

    first_pre: list[int]
    pre: list[int]
    post: list[int]
    end: list[int]
    after_end: list[int]

    @classmethod
    def from_template(cls, template: ChatTemplate, prompt: str = CAPTION_PROMPT) -> "CaptionLayout":
        def probe(content):  # a user turn with one image, then an empty assistant turn
            enc = template.encode([{"role": "user", "content": content},
                                   {"role": "assistant", "content": [{"type": "text", "text": ""}]}])
            (pos,) = enc.image_positions
            return enc.input_ids[:pos], enc.input_ids[pos:enc.prompt_len], enc.input_ids[enc.prompt_len:]

        image = {"type": "image", "ref": "frame"}
        first_pre, post0, tail = probe([{"type": "text", "text": prompt}, image] if prompt else [image])
        pre, post, _ = probe([image])
        if post0 != post:
            raise ValueError(f"template {template.name!r}: the tokens after a frame differ between turns")
        end = template.stop_token_ids
        return cls(first_pre, pre, post, end, tail[len(end):])

    def close(self, last: int, stopped: bool) -> list[int]:
        """Tokens that end a caption whose last generated token is `last` (not yet fed)."""
        return [last] + ([] if stopped else self.end) + self.after_end


@dataclass
class FrameRecord:
    """What happened at one frame of a stream."""

    index: int
    t: float
    """Frame timestamp (s): index / fps, or a video frame's own time from the first frame's."""
    text: str
    """The caption written after this frame ("" = silence)."""
    new_tokens: int
    """Tokens generated for this frame (the end token included)."""
    stopped: bool
    """The caption ended with the end token (False: it hit max_new_tokens and was closed)."""
    wall_s: float
    """Processing time of this frame: vision encoder, prefill of its chunk, caption decoding."""
    delay_s: float
    """When the caption was done, relative to the frame's timestamp (real-time when the
    stream waits for frames, simulated from `wall_s` with `wait=False`)."""
    kv_tokens: int
    """Tokens in the text (SA) KV cache after this frame (image tokens too for insertion)."""
    text_tokens: int
    """Text tokens the model has read so far (prompt, template tokens and captions)."""
    image_tokens: int
    """Image tokens the model has been given so far (all frames up to this one)."""
    window_kv_tokens: int
    """Tokens in the fused layers' window cache (CASA/CA: the current frame's window)."""
    kv_bytes: int
    """Bytes held by the KV cache (all layers, keys and values)."""
    memory_bytes: int
    """CUDA: allocated bytes; CPU: process RSS."""
    dropped_tokens: int = 0
    """SA cache tokens the context policy dropped before this frame (`casa.context_limit.ContextPolicy`)."""
    attention: dict | None = None
    """`stream(attention=True)`: mean attention mass of the frame's CASA queries on
    {"image", "text", "self"} (`casa.captioning.attention_masses`)."""

    def to_dict(self) -> dict:
        return asdict(self)


HISTORY = 1024
"""Generated tokens the repetition controls can look back on (a bounded deque)."""


@dataclass
class FrameCaption:
    """What one `CaptionSession.step` produced."""

    tokens: list[int]
    text: str
    stopped: bool
    chunk_text_tokens: int
    chunk_image_tokens: int
    dropped: int = 0
    """SA tokens the context policy dropped before this frame."""
    attention: dict[str, float] | None = None
    """{"image", "text", "self"} mean attention mass of the frame's queries (CASA layers)."""


class CaptionSession:
    """A stream's state: its KV cache, the tokens not fed yet, the repetition history.

    assistant: a `casa.assistant.Assistant`; prompt: the user prompt opening the stream;
    config: the default generation settings (`Assistant.generation_config`); context: the
    cache policy (None: max_tokens = the backbone's max_position_embeddings, keep_first = the
    prompt's tokens; False: none, the cache grows and positions may pass the model's limit,
    for benchmarks that measure that growth); generator: the sampling RNG (None: seeded from config.seed, else torch's)."""

    def __init__(self, assistant, prompt: str = CAPTION_PROMPT, config: GenerationConfig | None = None,
                 context: ContextPolicy | None | bool = None, generator: torch.Generator | None = None,
                 attention: bool = False):
        self.assistant = assistant
        self.config = config or assistant.generation_config()
        if self.config.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.config.max_new_tokens} must be >= 1 for captioning")
        if assistant.inference_mask is not None:
            raise ValueError(f"streaming decodes with the KV cache, which cannot apply the "
                             f"{assistant.inference_mask!r} mask")
        model = assistant.model
        self.layout = CaptionLayout.from_template(assistant.template, prompt)
        self.check_positions = context is not False
        if context is None:
            limit = max_positions(model)
            context = ContextPolicy(limit, len(self.layout.first_pre)) if limit else None
        elif context is True or not (context is False or isinstance(context, ContextPolicy)):
            raise ValueError(f"context={context!r} must be a casa.context_limit.ContextPolicy, None (the model's limit) or False")
        self.context = context or None
        self._rotate = key_shifter(model.backbone) if context is not None else None
        if generator is None and self.config.seed is not None:
            generator = torch.Generator(device=assistant.device).manual_seed(self.config.seed)
        self.generator = generator
        self.attention = attention
        self.cache = KVCache(1)
        self.pending = list(self.layout.first_pre)
        self.recent: deque[int] = deque(maxlen=HISTORY)
        self.size = None
        self.text_seen = self.image_seen = 0
        self._image_growth = 0  # SA cache rows a frame's images took last time (insertion, Q-Former)

    def step(self, frame, index: int, config: GenerationConfig | None = None) -> FrameCaption:
        """Caption one frame (PIL image, path, bytes or array) -> FrameCaption."""
        a, cfg = self.assistant, config or self.config
        if cfg.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={cfg.max_new_tokens} must be >= 1 for captioning")
        cap = min(a.settings.max_pixels, a.settings.frame_max_pixels)
        img = to_image(frame, cap)
        stored = img.info.get(ORIGINAL_SIZE, img.size)  # before any reduced-scale decode
        if self.size is None:
            self.size = stored
        elif stored != self.size:
            raise InputError(f"frame {index} is {stored[0]}x{stored[1]} but the stream's frames are "
                             f"{self.size[0]}x{self.size[1]} (a video keeps one frame size)")
        pv, grid = a.pixels(img, cap)
        chunk = frame_chunk(self.pending, self.layout.post, pv.to(a.device), [grid],
                            merge=a.model.vision.spatial_merge_size)
        dropped = 0
        if self.context is not None:
            incoming = chunk.num_text_tokens + self._image_growth + cfg.max_new_tokens
            dropped = self.context.make_room(self.cache, incoming, self._rotate)
        before = max(self.cache.lengths(), default=0)
        self.text_seen += chunk.num_text_tokens
        self.image_seen += chunk.num_image_tokens
        history = [list(self.recent)]
        if self.attention:
            with a.model.capture_attention() as records:
                out = a._generate(chunk, cfg, self.generator, cache=self.cache, history=history,
                                  check_positions=self.check_positions)[0]
            masses = attention_masses(records)
        else:
            out = a._generate(chunk, cfg, self.generator, cache=self.cache, history=history,
                                  check_positions=self.check_positions)[0]
            masses = None
        stop = set(cfg.stop_token_ids)
        fed = len(out) - 1  # the last token is fed with the next chunk
        self._image_growth = max(0, max(self.cache.lengths()) - before - chunk.num_text_tokens - fed)
        self.text_seen += fed
        stopped = out[-1] in stop
        self.recent.extend(t for t in out if t not in stop)
        self.pending = self.layout.close(out[-1], stopped) + self.layout.pre
        return FrameCaption(out, a.decode(out), stopped, chunk.num_text_tokens, chunk.num_image_tokens, dropped, masses)


def attention_masses(records: list[dict]) -> dict[str, float] | None:
    """Captured CASA records of one frame (its chunk, then one record per layer per decoding
    step) -> mean attention mass {"image", "text", "self"} over heads, layers and the frame's
    window's queries; None without CASA layers.

    The chunk's last window is the frame's: keys [image_w | its text], causal, so its image
    count is Lk - Lq (`callbacks.attention_stats.window_masses`' layout). A decoding step's one
    query is the window's last key: keys [image_w | text so far | itself], with the same image
    count as the frame's window in that layer (the record's own `window_cu_image` says 0: the
    step's batch holds no image, the cache does)."""
    sums = {"image": 0.0, "text": 0.0, "self": 0.0}
    n, images = 0, {}
    for rec in records:
        if rec.get("kind") != "casa" or not rec["probs"]:
            continue
        p = rec["probs"][-1].float()  # [H, Lq, Lk]
        H, Lq, Lk = p.shape
        if Lq == 0 or Lk == 0:  # no key: eq. 3's indicator, a window without image
            continue
        if rec["layer"] not in images:  # the frame's chunk: the window it opens
            images[rec["layer"]] = Lk - Lq
        n_img = images[rec["layer"]]
        j = torch.arange(Lq)
        self_p = p[:, j, Lk - Lq + j]  # [H, Lq]: query j is key Lk - Lq + j
        image = p[..., :n_img].sum(-1)  # [H, Lq]
        sums["self"] += float(self_p.sum())
        sums["image"] += float(image.sum())
        sums["text"] += float((1.0 - self_p - image).sum())
        n += H * Lq
    return {k: v / n for k, v in sums.items()} if n else None
