"""`casa.flops` against `torch.utils.flop_counter.FlopCounterMode` on the real tiny model of
every strategy, forward and backward counted separately, on a batch with several samples
(one text-only), several images per sample, images split into several vision windows and
windows with and without images.

The models run the `eager` attention backends (casa's and the tower's), whose products are
plain matmuls the counter sees: on CPU, SDPA's fused kernel (`_scaled_dot_product_flash_
attention_for_cpu`) has no flop formula, so the counter would miss attention entirely.
Tolerance 0.1%: the count is exact except where `einsum` turns a product with a single key
(a 1-token image in the Q-Former's cross-attention) into an elementwise multiply, which the
counter does not see."""

import inspect

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from casa.flops import BatchLayout, ModelDims, count_flops, training_flops
from casa.tiny import random_packed_batch, tiny_model
from experiments.strategies import build_fusion, fusion_class, names

SAMPLES = [[("text", 5), ("image", (12, 8)), ("text", 9), ("image", (4, 4)), ("image", (2, 2)), ("text", 6)],
           [("text", 7)],
           [("image", (4, 6)), ("text", 11)]]
"""A 12x8-patch image spans two tower windows (6x4 merged tokens, 4x4 windows); sample 0 has
a text-only first window and a window of two images."""

def _eager_fusion(name: str):
    """Strategy `name` of the matrix with every attention it owns on the eager backend: torch's
    counter has no formula for CPU SDPA's fused kernel and would miss those matmuls."""
    cls = fusion_class(name)
    params = inspect.signature(cls.__init__).parameters
    return build_fusion(name, **{k: "eager" for k in ("backend", "resampler_backend") if k in params})


def _measured(model, batch) -> tuple[int, int]:
    with FlopCounterMode(display=False) as fwd:
        loss = model(batch).loss
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


@pytest.mark.parametrize("frozen_backbone", [False, True], ids=["trained_backbone", "frozen_backbone"])
@pytest.mark.parametrize("name", names())
def test_flops_match_the_flop_counter(name, frozen_backbone):
    """Frozen parts count what autograd runs: the tiny tower trains its last block and merger
    only (block 0 and the patch embedding: forward only); with a frozen backbone, blocks get
    input gradients where a trainable layer sits upstream, never weight gradients."""
    model = tiny_model(_eager_fusion(name), hidden_size=32, num_layers=3, attn_backend="eager",
                       freeze_backbone=frozen_backbone)
    model.vision.tower.config._attn_implementation = "eager"
    batch = random_packed_batch(SAMPLES, seed=3)
    fwd, bwd = _measured(model, batch)
    count = count_flops(ModelDims.of(model), BatchLayout.of(batch))
    assert count.forward == pytest.approx(fwd, rel=1e-3)
    assert count.backward == pytest.approx(bwd, rel=1e-3)
    assert training_flops(model, batch) == count.forward + count.backward
    assert count.backward < 2 * count.forward  # frozen tower parts have no weight gradients


def test_layout_of_a_batch():
    batch = random_packed_batch(SAMPLES, seed=3)
    layout = BatchLayout.of(batch)
    # (text, image tokens, images) per sample; (text, image tokens) per window
    assert layout.samples == ((20, 24 + 4 + 1, 3), (7, 0, 0), (11, 6, 1))
    assert layout.windows == ((5, 0), (9, 24), (6, 5), (7, 0), (11, 6))
    assert layout.images == ((1, 12, 8), (1, 4, 4), (1, 2, 2), (1, 4, 6))


@pytest.mark.parametrize("name", ["casa_plus", "insertion"])
def test_a_text_only_batch_counts_what_runs(name):
    model = tiny_model(_eager_fusion(name), hidden_size=32, num_layers=2, attn_backend="eager")
    batch = random_packed_batch([[("text", 9)], [("text", 4)]], seed=1)
    fwd, bwd = _measured(model, batch)
    count = count_flops(ModelDims.of(model), BatchLayout.of(batch))
    assert (count.forward, count.backward) == (fwd, bwd)
