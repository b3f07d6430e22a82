"""Task generators of the built-in synthetic benchmark (see `data.synth`).

Each task is a function `make(rng: random.Random, size: int) -> (conversation, files)`
returning a conversation in the `data.format` layout and its image files.
"""

from data.synth_tasks import coarse, ocr, reading, video

TASKS = {
    "color": ("coarse", coarse.color),
    "shape": ("coarse", coarse.shape),
    "count": ("coarse", coarse.count),
    "bar_value": ("reading", reading.bar_value),
    "table_value": ("reading", reading.table_value),
    "word": ("ocr", ocr.word),
    "video_direction": ("video", video.direction),
    "live_caption": ("video", video.live_caption),
}
"""task -> (group, generator). Groups mirror the paper's: fine-grained reading (HRES-like),
text reading (OCR-like), coarse VQA, video."""

DEFAULT_SIZES = {"coarse": 56, "reading": 112, "ocr": 112, "video": 56}
