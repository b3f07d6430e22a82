"""Text-only conversations (paper §4.1: the image mixtures keep text-only samples, as
LLaVA's do): no image at all, so a packed row or a whole batch may carry none.

They exercise the paths a text-only batch takes (no vision tower input, no window with an
image, CASA's indicator `1[i > K]` with no K) and measure what fusion training leaves of
the LM's own ability.
"""

from __future__ import annotations

import random

from data.format import text

WORDS = ("plus", "minus")


def arithmetic(rng: random.Random, size: int):
    """Small-number addition or subtraction in words -> the result's digits (`size` unused:
    there is no image)."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice(WORDS)
    if op == "minus" and b > a:
        a, b = b, a  # answers stay non-negative
    result = a + b if op == "plus" else a - b
    conv = {"messages": [{"role": "user", "content": [text(f"What is {a} {op} {b}?")]},
                         {"role": "assistant", "content": [text(str(result))]}]}
    return conv, {}
