"""One live-captioning conversation, frame by frame: `CaptionSession`.

`Assistant.stream` (a whole iterable of frames, paced to their clock) and the live web view
(`experiments.live`, whose settings change between frames) both run a session, so the
captions of a page equal those of `experiments.stream` for the same frames and settings.
The layout per frame is `casa.assistant`'s (module doc): one chunk `[tail of the previous
turn | frame | tokens opening the assistant turn]`, then the caption decoded with the cache.

What the session adds per frame:
- generation settings of that frame (`step(config=...)`: temperature, penalties, ... may
  change mid-stream; the cache does not depend on them);
- the context policy (`casa.cache.ContextPolicy`): before the chunk, the SA cache is trimmed
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
from dataclasses import dataclass, field

import torch

from casa.assistant import CaptionLayout, InputError, frame_chunk, to_image
from casa.cache import ContextPolicy, KVCache, key_shifter
from casa.generation import GenerationConfig, max_positions
from casa.processing.image import ORIGINAL_SIZE
from casa.processing.template import CAPTION_PROMPT

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
    extra: dict = field(default_factory=dict)


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
            raise ValueError(f"context={context!r} must be a casa.cache.ContextPolicy, None (the model's limit) or False")
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
