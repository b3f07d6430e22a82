"""Fusion by composition (issue 15, step 3): blocks composed of attention steps, checkpoint
keys as they were, new parameters marked where they are created, compression in the base
class (the Perceiver resampler feeding gated cross-attention), and a CASA variant with
another window rule written as one file (`casa.fusion.casa_previous`)."""

import json
from pathlib import Path

import pytest
import torch

from casa.blocks import AttentionStep, Before, DecoderBlock, Parallel, Replace, SelfAttention
from casa.fusion import CASA, CrossAttention, GatedCrossAttention, Insertion, QFormer
from casa.fusion.layers import WindowAttention
from casa.fusion.casa_previous import CASAPrevious
from casa.fusion.perceiver import Perceiver, PerceiverCrossAttention
from casa.fusion.windows import WindowedFusion
from casa.tiny import random_packed_batch, tiny_model

STRATEGIES = {
    "insertion": lambda: Insertion(),
    "qformer": lambda: QFormer(num_queries=4, depth=1, heads=4),
    "cross_attention": lambda: CrossAttention(),
    "cross_attention_before": lambda: CrossAttention(placement="before"),
    "gated_cross_attention": lambda: GatedCrossAttention(),
    "gated_cross_attention_before": lambda: GatedCrossAttention("before"),
    "casa_plus": lambda: CASA("plus"),
    "casa_before": lambda: CASA("before"),
    "casa_replace": lambda: CASA("replace", "every_k", 2),
    "casa_plus_ffn_updates": lambda: CASA("plus", image_ffn_updates=True),
    "perceiver_gated_cross_attention": lambda: PerceiverCrossAttention(num_latents=3, depth=1),
}

KEYS = json.loads((Path(__file__).parent / "state_dict_keys.json").read_text())
"""State-dict keys of `tiny_model(strategy, num_layers=3)` per strategy, written at the commit
before the composition (the Perceiver's when it was added): keys shared by every strategy,
then each strategy's own."""

SAMPLES = [
    [("text", 5), ("image", (4, 4)), ("text", 7)],
    [("image", (2, 4)), ("text", 3), ("image", (4, 2)), ("image", (2, 2)), ("text", 6)],
    [("text", 9)],
]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_state_dict_keys_are_the_checkpoints(name):
    """Old checkpoints load: every strategy's keys are exactly the stored ones."""
    keys = set(tiny_model(STRATEGIES[name](), num_layers=3).state_dict())
    assert keys == set(KEYS["common"]) | set(KEYS["strategies"][name])


def _set_difference_groups(model):
    """The rule `parameter_groups` replaced: new = not the backbone's as loaded, not the tower's."""
    loaded = {f"backbone.{n}" for n in model.backbone.pretrained_names} | {
        f"vision.{n}" for n, _ in model.vision.named_parameters()}
    return {"new": sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in loaded),
            "pretrained": sorted(n for n, p in model.named_parameters() if p.requires_grad and n in loaded)}


@pytest.mark.parametrize("freeze", [False, True], ids=["trained", "frozen"])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_marked_parameters_are_the_new_ones(name, freeze):
    model = tiny_model(STRATEGIES[name](), num_layers=3, freeze_backbone=freeze)
    groups = {k: sorted(n for n, _ in v) for k, v in model.parameter_groups().items()}
    assert groups == _set_difference_groups(model)
    assert groups["new"]  # the projector at least


class _ForgetsToMark(CrossAttention):
    """A strategy that adds a fusion layer without `mark_new`: its parameters would train at
    the pretrained rate, silently."""

    def attach(self, backbone, merge):
        super().attach(backbone, merge)
        block = backbone.layers[0]
        block.fuse(Parallel(), WindowAttention(block.self_attn, block.family, "cross_attention", "sdpa"))


def test_an_unmarked_new_parameter_is_an_error():
    with pytest.raises(ValueError, match=r"_ForgetsToMark\.attach added parameters .*fusion_attn.* without .*mark_new"):
        tiny_model(_ForgetsToMark())


@pytest.mark.parametrize("name,forms", [
    ("insertion", ["none"] * 4),
    ("casa_plus", ["parallel"] * 4),
    ("casa_before", ["before"] * 4),
    ("casa_replace", ["replace", "none", "replace", "none"]),
    ("cross_attention_before", ["before"] * 4),
    ("perceiver_gated_cross_attention", ["before"] * 4),
])
def test_strategies_compose_blocks_from_steps(name, forms):
    """CASA's mode "plus" is the block form "parallel"; CrossAttention's placement is a form."""
    model = tiny_model(STRATEGIES[name]())
    assert [b.attention.form for b in model.backbone.layers] == forms
    for block in model.backbone.layers:
        assert isinstance(block.attention, AttentionStep)
        assert (block.fusion_attn is not None) == block.attention.uses_fusion_layer


def test_fuse_checks_the_step_and_its_layer():
    block = tiny_model(Insertion()).backbone.layers[0]
    layer = tiny_model(CrossAttention()).backbone.layers[0].fusion_attn
    with pytest.raises(ValueError, match="a Parallel step needs fusion layer"):
        block.fuse(Parallel())
    with pytest.raises(ValueError, match="a Replace step takes no fusion layer"):
        block.fuse(Replace(lambda *a, **k: None), layer)
    with pytest.raises(TypeError, match="is not an AttentionStep"):
        block.fuse("parallel", layer)
    block.fuse(SelfAttention(), image_ffn_updates=True)
    assert not block.image_ffn_updates  # an unfused block never updates the images


def test_a_new_step_is_one_class():
    """A block form nobody wrote yet (fusion after SA: x' = x + SA(n(x)); x' + F(n(x'))) is one
    AttentionStep; `DecoderBlock.forward` is not touched. Checked against the same block run by
    hand."""

    class After(AttentionStep):
        form = "after"
        uses_fusion_layer = True

        def forward(self, block, x, images, ctx):
            x = super().forward(block, x, images, ctx)
            h = block.input_layernorm(x)
            return x + block.fusion_attn(h, images, block.input_layernorm, ctx, block.layer_idx)

    model = tiny_model(CrossAttention()).eval()
    for block in model.backbone.layers:
        block.fuse(After(), block.fusion_attn)
    batch = random_packed_batch(SAMPLES, seed=2)
    with torch.no_grad():
        text = model.backbone.embed_tokens(batch.input_ids)
        stream, images, ctx = model.fusion.prepare(batch, text, model.encode_images(batch), model.backbone)
        block: DecoderBlock = model.backbone.layers[0]
        got, _ = block(stream, images, ctx)
        x = stream + block.self_attention(block.input_layernorm(stream), ctx)
        x = x + block.fusion_attn(block.input_layernorm(x), images, block.input_layernorm, ctx, 0)
        want = x + block.mlp(block.post_attention_layernorm(x))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ---------------------------------------------------------------------- the Perceiver
def _perceiver_reference(resampler: Perceiver, media: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Flamingo's resampler written plainly, one image at a time (dense softmax attention)."""
    out, start = [], 0
    for n in counts:
        image = media[start:start + n]
        start += n
        x = resampler.latents
        for layer in resampler.layers:
            H = layer.heads
            d = x.shape[1]
            h = layer.norm_latents(x)
            kv = torch.cat([layer.norm_media(image), h])
            q = layer.to_q(h).view(-1, H, d // H).transpose(0, 1)
            k, v = layer.to_kv(kv).view(-1, 2, H, d // H).unbind(1)
            a = torch.softmax(q @ k.transpose(0, 1).transpose(1, 2) / (d // H) ** 0.5, -1) @ v.transpose(0, 1)
            x = x + layer.to_out(a.transpose(0, 1).reshape(-1, d))
            x = x + layer.ffn(layer.norm_ffn(x))
        out.append(resampler.norm(x))
    return torch.cat(out)


def test_perceiver_resampler_matches_flamingos_formula_per_image():
    torch.manual_seed(0)
    resampler = Perceiver(dim=32, num_latents=3, depth=2, heads=4, backend="sdpa")
    counts = [4, 1, 6]
    media = torch.randn(sum(counts), 32)
    with torch.no_grad():
        got = resampler(media, torch.tensor(counts))
        want = _perceiver_reference(resampler, media, counts)
    assert got.shape == (9, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_perceiver_windows_hold_q_tokens_per_image():
    model = tiny_model(PerceiverCrossAttention(num_latents=3, depth=1))
    batch = random_packed_batch(SAMPLES, seed=1)
    text = model.backbone.embed_tokens(batch.input_ids)
    _, images, ctx = model.fusion.prepare(batch, text, model.encode_images(batch), model.backbone)
    per_window = torch.diff(ctx.windows.window_cu_image).tolist()
    raw = torch.diff(batch.window_cu_seqlens_image).tolist()
    images_per_window = [0, 1, 1, 2, 0]  # (text | -) (A | text), (B | text) (C D | text), (- | text)
    assert raw == [0, 16 // 4, 8 // 4, (8 + 4) // 4, 0]
    assert per_window == [3 * k for k in images_per_window]
    assert images.shape[0] == 3 * 4 and ctx.windows.image_cos.shape[0] == 12


# ---------------------------------------------------------------------- another window rule
def test_a_casa_window_rule_variant_is_one_file():
    """`casa.fusion.casa_previous.CASAPrevious` overrides `visible_windows` only. One fused
    block: text after image B sees image A too (CASA's does not), text before B computes what
    CASA computes, and packing changes nothing. (Incremental decoding == full forward for it:
    tests/test_generation.py, over the strategy matrix.)"""
    assert set(vars(CASAPrevious)) - {"__module__", "__doc__", "__init__", "__qualname__", "__static_attributes__",
                                      "__firstlineno__"} == {"name", "visible_windows", "extra_repr"}
    spec = [("text", 3), ("image", (4, 4)), ("text", 4), ("image", (2, 4)), ("text", 5)]
    variant = tiny_model(CASAPrevious(mode="plus"), num_layers=1).eval()
    base = tiny_model(CASA("plus"), num_layers=1).eval()
    batch = random_packed_batch([spec], seed=4)
    other = random_packed_batch([spec], seed=4)
    other.pixel_values = batch.pixel_values.clone()
    other.pixel_values[:16] += 1.0  # image A (4x4 patches) changes, image B does not
    with torch.no_grad():
        v1, v2 = variant(batch).logits, variant(other).logits
        b1, b2 = base(batch).logits, base(other).logits
    assert not torch.allclose(b1[3:7], b2[3:7])  # A's window sees A
    torch.testing.assert_close(b1[7:], b2[7:], atol=0, rtol=0)  # CASA: B's window does not see A
    assert not torch.allclose(v1[7:], v2[7:])  # the variant's does
    torch.testing.assert_close(v1[:7], b1[:7], atol=1e-6, rtol=1e-6)  # same windows up to B
    # packed with a sample that opens with an image: each computes what it computes alone
    # (no window keeps images of the sample before it)
    second = [("image", (2, 4)), ("text", 3), ("image", (2, 2)), ("text", 6)]
    packed = random_packed_batch([spec, second], seed=4)
    with torch.no_grad():
        out = variant(packed).logits
        for spec_s, (lo, hi), (p_lo, p_hi) in ((spec, (0, 12), (0, 24)), (second, (12, 21), (24, 36))):
            alone = random_packed_batch([spec_s], seed=4)
            alone.input_ids = packed.input_ids[lo:hi].clone()
            alone.pixel_values = packed.pixel_values[p_lo:p_hi].clone()
            torch.testing.assert_close(variant(alone).logits, out[lo:hi], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="previous=0 must be an int >= 1"):
        CASAPrevious(previous=0)


def test_the_cache_keeps_what_the_window_rule_still_needs():
    """Frame after frame, a CASAPrevious window caches [previous frame | frame | text] and
    CASA's [frame | text]; a rule that looks back past what the window before saw cannot be
    served from the cache, and says so."""
    from casa.cache import KVCache
    from casa.generation import image_chunk

    g = torch.Generator().manual_seed(0)
    frames = [torch.randn(16, 3 * 2 * 14 * 14, generator=g) for _ in range(4)]
    for fusion, images in ((CASA("plus"), 4), (CASAPrevious(mode="plus"), 8), (CASAPrevious(2, mode="plus"), 12)):
        model = tiny_model(fusion, num_layers=1).eval()
        cache = KVCache(1)
        sizes = []
        with torch.no_grad():
            for f in frames:
                model.hidden_states(image_chunk([5, 6], f, torch.tensor([[1, 4, 4]])), cache=cache)
                sizes.append(cache.window_kv_tokens())
                held = sum(k.shape[0] for k, _ in cache._win_open[0][0].seen.values())
        assert sizes[-1] == images + 2, type(fusion).__name__  # the last window: its images + 2 text tokens
        assert held == images - 4  # images kept for the next window (CASA: none)

    class SkipOne(CASA):  # window j sees j - 2 and j: window 1 saw only itself, not window 0
        def visible_windows(self, j):
            return [j - 2, j] if j >= 2 else [j]

    model = tiny_model(SkipOne("plus"), num_layers=1).eval()
    cache = KVCache(1)
    with torch.no_grad(), pytest.raises(ValueError, match=r"window 2 sees windows \[0, 2\].*no longer holds"):
        for f in frames:
            model.hidden_states(image_chunk([5, 6], f, torch.tensor([[1, 4, 4]])), cache=cache)


def test_windowed_strategies_share_one_prepare():
    for cls in (CASA, CrossAttention, GatedCrossAttention, PerceiverCrossAttention):
        assert issubclass(cls, WindowedFusion) and "prepare" not in vars(cls)
