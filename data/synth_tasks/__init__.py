"""Task generators of the built-in synthetic benchmark (see `data.synth`, docs/synth.md).

Each task is a function `make(rng: random.Random, size: int) -> (conversation, files)`:
a conversation in the `data.format` layout (without `task`/`group`, which `data.synth`
adds) and its files (`{"img0.png": bytes}` or `{"f000.jpg": bytes, ...}`). `size` is the
image (or frame) side in pixels, set per group. The function draws only from `rng`.
"""

from data.synth_tasks import coarse, describe, detail, gap, ocr, phrase, reading, text, video

TASKS = {
    "color": ("coarse", coarse.color),
    "shape": ("coarse", coarse.shape),
    "count": ("coarse", coarse.count),
    "bar_value": ("reading", reading.bar_value),
    "table_value": ("reading", reading.table_value),
    "word": ("ocr", ocr.word),
    "video_direction": ("video", video.direction),
    "live_caption": ("video", video.live_caption),
    "arithmetic": ("text", text.arithmetic),
    "spot_color": ("fine", detail.spot_color),
    "read_number": ("read", detail.read_number),
    "describe": ("lm", describe.describe),
    "describe_after_image": ("lm", describe.describe_after_image),
    # protocol v2 (docs/reproduction.md): the same 224 px images for fine and coarse, answers
    # independent of coarse cues, digits scored exactly
    "dot_color": ("fine", gap.dot_color),
    "big_color": ("coarse", gap.big_color),
    "read_digit": ("read", gap.read_digit),
    "phrase": ("lm", phrase.phrase),
    "phrase_after_image": ("lm", phrase.phrase_after_image),
}
"""task -> (group, generator). Groups mirror the paper's evaluation groups: coarse VQA,
fine-grained reading (HRES-like: charts, tables), text reading (OCR-like), video; and
text-only conversations, which have no image. The protocol's groups (docs/reproduction.md):
`fine` and `read`, fine detail and text reading learnable at tiny scale, and `lm`, held-out
text whose answer loss is the LM's perplexity (never trained on by the fusion runs)."""

GROUPS = ("coarse", "reading", "ocr", "video", "text", "fine", "read", "lm")

DEFAULT_SIZES = {"coarse": 56, "reading": 112, "ocr": 112, "video": 56, "fine": 112, "read": 112, "lm": 56}
"""Image side per group with images: 56 px -> 4 visual tokens after the 2x2 merge, 112 px -> 16.
The text group has no image and no size."""

ANSWER_SETS = {
    "color": coarse.COLOR_NAMES, "shape": coarse.SHAPES, "count": tuple(str(n) for n in range(1, coarse.MAX_COUNT + 1)),
    "spot_color": detail.COLOR_NAMES, "read_number": tuple(str(n) for n in range(10, 100)),
    "video_direction": tuple(sorted(video.DIRECTIONS)), "arithmetic": tuple(str(n) for n in range(19)),
    **gap.ANSWERS,
}
"""task -> its closed answer set, for the tasks that have one: what teacher-forced scoring
(`casa.answer_set`, `experiments.evaluate`) ranks, and what a uniform guess draws from.
Open-answer tasks (bar and table values, words, captions, descriptions) have none."""
