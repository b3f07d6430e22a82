"""Choices made when the model is built, not per call (issue 15, step 5): each attention layer
holds a validated backend object, the cache takes an explicit decoding path, capture and the
Table 8 masks are modes of the model, and flash's kernels are injected."""

import pytest
import torch

import casa.attention as attention
from casa.attention import EAGER, AttentionBackend, DecodeKV, FlashBackend, make_backend, varlen_attention
from casa.cache import KVCache
from casa.context import AttentionRecorder
from casa.fusion import CASA, CrossAttention
from casa.tiny import random_packed_batch, tiny_model
from tests.builders import flash_stand_in, strict_flash_attn_varlen_func, strict_flash_attn_with_kvcache

SAMPLES = [[("text", 5), ("image", (4, 4)), ("text", 7)], [("image", (2, 4)), ("text", 3)], [("text", 9)]]


def _window_sites(model):
    return [m for m in model.modules() if hasattr(m, "window_backend")]


@pytest.mark.parametrize("fusion", [lambda: CASA("plus"), lambda: CASA("replace", "every_k", 2), CrossAttention])
def test_layers_hold_a_backend_bound_at_build_and_resolve_no_name_per_call(fusion, monkeypatch):
    """Every block and fusion layer holds an `AttentionBackend` object from build time; a
    forward resolves no backend name (`make_backend`) and re-validates none by name
    (`check_backend`): only the bound objects' cheap device/grad check runs."""
    model = tiny_model(fusion(), num_layers=2, attn_backend="eager").eval()
    for block in model.backbone.layers:
        assert block.kernel is EAGER and block.attn_backend == "eager"
    layers = [b.fusion_attn for b in model.backbone.layers if b.fusion_attn is not None]
    assert all(isinstance(layer.kernel, AttentionBackend) for layer in layers)
    resolved = []
    # a bound object passed on (`varlen_attention(..., backend=obj)`) is no resolution; a name is
    monkeypatch.setattr(attention, "make_backend",
                        lambda name: (isinstance(name, str) and resolved.append(name)) or make_backend(name))
    monkeypatch.setattr(attention, "check_backend", lambda *a: resolved.append(a))
    with torch.no_grad():
        model(random_packed_batch(SAMPLES))
    assert resolved == []


def test_setting_a_backend_name_validates_it_then():
    model = tiny_model(CASA("plus"), num_layers=2)
    block = model.backbone.layers[0]
    with pytest.raises(ValueError, match=r"backend='nope' is not one of \['dense', 'sdpa', 'eager', 'flex', 'flash'\]"):
        block.attn_backend = "nope"
    block.fusion_attn.backend = "dense"  # build time: rebinds the layer's object
    assert block.fusion_attn.kernel is make_backend("dense") and block.fusion_attn.backend == "dense"
    flash = tiny_model(CASA("plus"), num_layers=1, attn_backend="flash")
    assert attention.half_precision_modules(flash) == {
        name: "backend='flash'" for name in ("backbone", "backbone.lm.model.layers.0",
                                              "backbone.lm.model.layers.0.fusion_attn")}


def test_flash_kernels_are_injected_per_backend_not_global():
    """Two flash backends with different kernels run side by side; a backend built without
    kernels (and no flash-attn installed) refuses to run off CUDA, whatever others hold."""
    q, k, v = (torch.randn(5, h, 8, dtype=torch.bfloat16) for h in (4, 2, 2))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    seen = []

    def spy(tag):
        def fn(*args, **kwargs):
            seen.append(tag)
            return strict_flash_attn_varlen_func(*args, **kwargs)
        return fn

    a, b = (FlashBackend(spy(tag), strict_flash_attn_with_kvcache) for tag in ("a", "b"))
    torch.testing.assert_close(a(q, k, v, cu, cu, True), b(q, k, v, cu, cu, True))
    assert seen == ["a", "b"]
    if not attention._flash_installed():
        with pytest.raises(ValueError, match="backend='flash' cannot run here .flash-attn needs a CUDA device"):
            FlashBackend()(q, k, v, cu, cu, True)


def test_flash_stand_in_points_a_built_model_at_the_stand_ins_and_back():
    model = tiny_model(CASA("plus"), num_layers=1, attn_backend="flash").to(torch.bfloat16).eval()
    block = model.backbone.layers[0]
    built = block.kernel
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return strict_flash_attn_varlen_func(*args, **kwargs)

    with torch.no_grad(), flash_stand_in(spy, model=model):
        assert block.kernel is not built and block.kernel.varlen_fn is spy
        model(random_packed_batch(SAMPLES))
    assert calls and block.kernel is built  # restored: the model holds its own kernels again


def test_the_cache_takes_the_explicit_decoding_path():
    """A one-sample cache (head-major buffers) hands its keys over as `DecodeKV` for sdpa /
    eager, without gradients; several samples, gradients, or flash get plain keys."""
    k, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with torch.no_grad():
        kk, vv, _ = KVCache(1).self_attention(0, k, v, cu, make_backend("sdpa"))
        assert isinstance(kk, DecodeKV) and vv is kk and kk.k[0].stride(0) == 1  # head-major: keys transposed
        kk, _, _ = KVCache(1).self_attention(0, k, v, cu, "dense")
        assert isinstance(kk, list)
        kk, _, _ = KVCache(2).self_attention(0, k, v, torch.tensor([0, 3, 6], dtype=torch.int32), "sdpa")
        assert isinstance(kk, list)
    kk, _, _ = KVCache(1).self_attention(0, k, v, cu, "sdpa")
    assert isinstance(kk, list)


def test_one_sample_generation_decodes_through_decode_segment(monkeypatch):
    from casa.generation import GenerationConfig, generate, truncate_samples

    calls = []
    decode = attention._decode_segment
    monkeypatch.setattr(attention, "_decode_segment", lambda q, *a: calls.append(q.shape[0]) or decode(q, *a))
    model = tiny_model(CASA("plus"), num_layers=2).eval()
    prompts = truncate_samples(random_packed_batch(SAMPLES[:1]), [10])
    generate(model, prompts, GenerationConfig(max_new_tokens=3, stop_token_ids=()))
    assert calls.count(1) >= 2 * 2  # the decoding steps' one-token segments, SA and CASA layers


@pytest.mark.parametrize("fusion", [lambda: CASA("plus"), lambda: CASA("replace", "every_k", 2), CrossAttention])
def test_capture_is_a_mode_that_binds_eager_to_every_window(fusion):
    model = tiny_model(fusion(), num_layers=2).eval()
    sites = _window_sites(model)
    assert sites and all(m.window_backend is None for m in sites)
    recorder = AttentionRecorder()
    model.set_capture(recorder)
    assert all(m.window_backend is EAGER for m in sites)
    with torch.no_grad():
        model(random_packed_batch(SAMPLES))
    assert recorder.records
    model.set_capture(None)
    assert all(m.window_backend is None for m in sites)


def test_capture_without_the_mode_is_refused_not_silently_switched():
    """A record needs the eager backend; the per-call switch is gone, so a stray recorder in the
    context fails loudly instead of changing kernels behind the layer's back."""
    model = tiny_model(CASA("plus"), num_layers=1).eval()
    model._capture = AttentionRecorder()  # the recorder without `set_capture`'s binding
    refused = "return_probs=True needs backend 'eager', not backend='sdpa'"
    with torch.no_grad(), pytest.raises(ValueError, match=refused):
        model(random_packed_batch(SAMPLES))


def test_table8_masks_are_a_mode_set_on_the_model():
    model = tiny_model(CASA("plus"), num_layers=2).eval()
    batch = random_packed_batch(SAMPLES)
    with torch.no_grad():
        ref = model(batch).logits
        model.set_inference_mask("self")
        assert all(m.window_backend is EAGER for m in _window_sites(model))
        masked = model(batch).logits
        model.set_inference_mask(None)
        assert all(m.window_backend is None for m in _window_sites(model))
        torch.testing.assert_close(model(batch).logits, ref)
    assert not torch.allclose(masked, ref)
    built = tiny_model(CASA("plus", inference_mask="rnd"), num_layers=2)  # a strategy built with a mask
    assert all(m.window_backend is EAGER for m in _window_sites(built))
    with pytest.raises(ValueError, match=r"inference mask 'all' is not one of \['self', 'rnd', 'rnd_txt'\]"):
        model.set_inference_mask("all")
    with pytest.raises(ValueError, match="inference masks apply to CASA layers; this model's fusion is CrossAttention"):
        tiny_model(CrossAttention(), num_layers=1).set_inference_mask("self")
