"""Protocol v2's tasks (`data.synth_tasks.gap`): answers recovered from the pixels, the
fine answer independent of the coarse one, closed answer sets, and the regime (64 image
tokens against <= 8 prompt tokens per window)."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data.synth import make_one
from data.synth_tasks import ANSWER_SETS, TASKS
from data.synth_tasks.gap import DOT, digit_font_size
from data.synth_tasks.render import COLORS, INK, PAPER, canvas, font, nearest_color

SIZE = 224
DARK = 128  # the anti-aliased glyph's dark core; the distractor lines are grey >= 155


def decoded(task: str, j: int, split: str = "val"):
    s = make_one(0, split, task, j, SIZE)
    conv = json.loads(s["json"])
    img = np.asarray(Image.open(io.BytesIO(s["img0.png"])).convert("RGB"))
    return conv, img


def answer(conv) -> str:
    return conv["messages"][-1]["content"][0]["text"]


def dot_colour_from_pixels(img: np.ndarray) -> str:
    """The dot is the one exact-palette square of side round(DOT * size) (the big shape is jittered)."""
    side = round(SIZE * DOT)
    hits = [name for name, rgb in COLORS.items() if (img == rgb).all(-1).sum() == side * side]
    assert len(hits) == 1, hits
    return hits[0]


def big_colour_from_pixels(img: np.ndarray) -> str:
    fg = img[(img != (24, 24, 24)).any(-1)]
    colours = Counter(nearest_color(tuple(int(c) for c in px)) for px in fg[:: max(1, len(fg) // 400)])
    return colours.most_common(1)[0][0]


def test_dot_and_big_colour_are_read_off_the_pixels():
    for j in range(12):
        conv, img = decoded("dot_color", j)
        assert dot_colour_from_pixels(img) == answer(conv)
        conv, img = decoded("big_color", j)
        assert big_colour_from_pixels(img) == answer(conv)


def test_read_digit_matches_the_rendered_glyph():
    fs = digit_font_size(SIZE)
    glyphs = {}
    for d in "0123456789":
        g = canvas(64, PAPER)
        ImageDraw.Draw(g).text((4, 4), d, fill=INK, font=font(fs))
        a = (np.asarray(g) < DARK).all(-1)
        ys, xs = np.nonzero(a)
        glyphs[d] = a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    for j in range(12):
        conv, img = decoded("read_digit", j)
        ink = (img < DARK).all(-1)  # distractor lines (>= 155 grey) are lighter than the glyph's core
        ys, xs = np.nonzero(ink)
        crop = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        matches = [d for d, g in glyphs.items() if g.shape == crop.shape and (g == crop).all()]
        assert matches == [answer(conv)]


def test_the_dot_colour_is_independent_of_the_big_shape():
    """v1's spot_color drew the marker's colour to differ from the big shapes (seeing them gave 1/4);
    here the dot's colour given the big one is uniform: equal 1/6 of the time, every pair occurs."""
    from data.synth_tasks.gap import shape_and_dot

    pairs = [shape_and_dot(random.Random(f"t/{j}"), 64)[1:] for j in range(1800)]
    same = sum(b == d for b, d in pairs) / len(pairs)
    assert abs(same - 1 / 6) < 0.03  # 1/6 +- 3.4 s.e.
    assert len(set(pairs)) == 36


@pytest.mark.parametrize("task", sorted(ANSWER_SETS))
def test_every_answer_is_in_its_tasks_answer_set(task):
    size = 0 if TASKS[task][0] == "text" else (56 if TASKS[task][0] in ("coarse", "video") else 112)
    for j in range(30):
        s = make_one(0, "train", task, j, SIZE if task in ("dot_color", "big_color", "read_digit") else size)
        assert answer(json.loads(s["json"])) in ANSWER_SETS[task]


def test_the_v2_regime_64_image_tokens_against_at_most_8_prompt_tokens():
    from casa.processing.image import num_image_tokens
    from casa.processing.template import get_template
    from casa.processing.tokenizer import resolve_tokenizer

    tpl = get_template("helium", resolve_tokenizer("char"))
    for task in ("dot_color", "big_color", "read_digit"):
        conv, img = decoded(task, 0)
        assert num_image_tokens(SIZE, SIZE, max_pixels=SIZE * SIZE) == 64  # 16 x 16 patches, 2x2 merge
        enc = tpl.encode(conv["messages"])
        prompt_in_window = enc.prompt_len - enc.image_positions[0]
        assert prompt_in_window <= 8, (task, prompt_in_window)
