"""The fused image K/V projection against the plain composition it replaces:
k = rope(W_k norm(x)), v = W_v norm(x), through each family's own HF modules."""

import pytest
import torch
from torch import nn

from casa.backbone import Backbone, family_table
import casa.image_kv as image_kv_module
from casa.family import Family
from casa.image_kv import ROPE_LAYOUTS, _ImageKV, _rope, image_kv
from casa.tiny import tiny_backbone_config

FAMILIES = ["llama", "helium", "qwen2", "qwen3", "mistral", "qwen2_5_vl"]


def _reference(attn, norm, x, cos, sin, rope_fn):
    """What autograd ran before the fusion: norm, two projections, (k_norm), RoPE."""
    N, D = x.shape[0], attn.head_dim
    n = norm(x)
    k, v = attn.k_proj(n).view(N, -1, D), attn.v_proj(n).view(N, -1, D)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    return rope_fn(k, k, cos, sin, unsqueeze_dim=1)[0], v


def _layer(family, dtype):
    torch.manual_seed(0)
    bb = Backbone(family, config=tiny_backbone_config(family)).to(dtype)
    block = bb.layers[1]
    with torch.no_grad():  # a non-trivial norm scale and biases, so every term is exercised
        block.input_layernorm.weight.uniform_(0.5, 1.5)
        for proj in (block.self_attn.k_proj, block.self_attn.v_proj):
            if proj.bias is not None:
                proj.bias.normal_()
    return bb, block


def _grads(outputs, params, seed=1):
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, params, cot)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_image_kv_equals_the_plain_composition(family, dtype, monkeypatch):
    monkeypatch.setattr(image_kv_module, "ROW_BLOCK", 16)  # 37 rows: the backward's blocks 16, 16, 5
    bb, block = _layer(family, dtype)
    attn, norm = block.self_attn, block.input_layernorm
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(37, bb.hidden_size, generator=g)).to(dtype).requires_grad_(True)
    pos = torch.randint(0, 200, (37,), generator=g)
    cos, sin = bb.rope(pos if family != "qwen2_5_vl" else pos.expand(3, -1), dtype)
    params = [x, norm.weight, attn.k_proj.weight, attn.v_proj.weight]
    params += [p for p in (attn.k_proj.bias, attn.v_proj.bias) if p is not None]
    ours = image_kv(attn, norm, x, cos, sin, block.family)
    ref = _reference(attn, norm, x, cos, sin, block.family.rope_fn)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=6e-2, rtol=4e-2)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **tol)
    for name, a, b in zip(["x", "norm", "W_k", "W_v", "b_k", "b_v"], _grads(ours, params), _grads(ref, params)):
        # weight gradients sum over all rows: compared relative to their scale
        scale = b.abs().max().item()
        torch.testing.assert_close(a / scale, b / scale, **tol, msg=lambda m: f"grad {name}: {m}")


def test_every_supported_family_takes_the_fused_path(monkeypatch):
    """Observed, not inferred from the name tables: `_ImageKV.apply` runs once per call, and
    with the rotary tables (RoPE inside the function) for every family but Qwen3, whose
    k_norm sits between the projection and RoPE."""
    calls = []
    apply = _ImageKV.apply

    def counting_apply(*args):
        calls.append(args)
        return apply(*args)

    monkeypatch.setattr(_ImageKV, "apply", counting_apply)
    for family in FAMILIES:
        bb, block = _layer(family, torch.float32)
        x = torch.randn(5, bb.hidden_size, requires_grad=True)
        pos = torch.arange(5)
        cos, sin = bb.rope(pos if family != "qwen2_5_vl" else pos.expand(3, -1), torch.float32)
        calls.clear()
        image_kv(block.self_attn, block.input_layernorm, x, cos, sin, block.family)
        assert len(calls) == 1, family
        cos_arg, layout = calls[0][6], calls[0][8]
        if family == "qwen3":
            assert cos_arg is None, family
        else:
            assert cos_arg is cos and layout in ROPE_LAYOUTS, (family, layout)
    assert Backbone("helium", config=tiny_backbone_config("helium")).layers[0].family.rope_layout == "interleaved"


def _probe_layout(fn):
    """Which of `ROPE_LAYOUTS` `fn` computes, found numerically (the reference the table is checked against)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)
    cos, sin = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    got = fn(x, x, cos, sin, unsqueeze_dim=1)[0]
    return next((lay for lay in ROPE_LAYOUTS if torch.allclose(got, _rope(x, cos, sin, lay, inverse=False))), None)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_table_says_what_the_modules_compute(family):
    """Each `family_table` entry, bound at build time, against the family's own HF modules: the
    rotary function is the one its attention module uses, its layout is what it computes, the
    norm is w * x / rms(x), and q/k norms exist exactly where the table says."""
    import sys

    bb = Backbone(family, config=tiny_backbone_config(family))
    spec, block = family_table()[family], bb.layers[0]
    assert block.family == spec and bb.family_spec == spec
    assert spec.rope_fn is sys.modules[type(block.self_attn).__module__].apply_rotary_pos_emb
    assert spec.rope_layout == _probe_layout(spec.rope_fn)
    assert spec.qk_norm == hasattr(block.self_attn, "q_norm") == hasattr(block.self_attn, "k_norm")
    norm = block.input_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(4, bb.hidden_size)
        rms = norm.weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm.variance_epsilon)
        assert spec.norm == "rms" and torch.allclose(norm(x), rms, atol=1e-6)


def test_unknown_norm_and_rope_fall_back_to_autograd(monkeypatch):
    bb, block = _layer("llama", torch.float32)
    attn = block.self_attn
    norm = nn.LayerNorm(bb.hidden_size)  # not an RMSNorm: nothing to fold

    def odd_rope(q, k, cos, sin, unsqueeze_dim=1):  # not a rotation we know
        return q * cos.unsqueeze(unsqueeze_dim), k * cos.unsqueeze(unsqueeze_dim)

    calls = []
    monkeypatch.setattr(_ImageKV, "apply", lambda *a: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    x = torch.randn(5, bb.hidden_size, requires_grad=True)
    cos, sin = bb.rope(torch.arange(5), torch.float32)
    k, v = image_kv(attn, norm, x, cos, sin, Family("odd", odd_rope, rope_layout=None, norm="other", qk_norm=False))
    kr, vr = _reference(attn, norm, x, cos, sin, odd_rope)
    assert not calls and torch.equal(k, kr) and torch.equal(v, vr)
    assert _probe_layout(odd_rope) is None


def test_empty_and_frozen_inputs():
    bb, block = _layer("llama", torch.float32)
    attn, norm = block.self_attn, block.input_layernorm
    cos, sin = bb.rope(torch.arange(0), torch.float32)
    k, v = image_kv(attn, norm, torch.zeros(0, bb.hidden_size), cos, sin, block.family)
    assert k.shape == (0, 2, 16) and v.shape == (0, 2, 16)
    # a decoding step (no grad, no image) builds no folded weights: no op touches W_k / W_v
    from torch.profiler import profile

    with torch.no_grad(), profile(record_shapes=True) as prof:
        k, v = image_kv(attn, norm, torch.zeros(0, bb.hidden_size), cos, sin, block.family)
    assert k.shape == (0, 2, 16) and v.shape == (0, 2, 16)
    w = list(attn.k_proj.weight.shape)
    assert not [e.name for e in prof.events() if any(shape == w for shape in e.input_shapes)]
    # frozen everything but the input: only dx is computed, and it matches
    for p in block.parameters():
        p.requires_grad_(False)
    x = torch.randn(6, bb.hidden_size, requires_grad=True)
    cos, sin = bb.rope(torch.arange(6), torch.float32)
    (a,), (b,) = _grads(image_kv(attn, norm, x, cos, sin, block.family), [x]), \
        _grads(_reference(attn, norm, x, cos, sin, block.family.rope_fn), [x])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "helium"])
def test_backward_keeps_only_the_inputs_and_one_scale_per_token(family):
    """The point of the fusion: autograd keeps x [N, d], r [N] and the rotary tables for
    the backward, not the normalised tokens or the norm's fp32 copies (docs/benchmarks.md,
    `layer`: those were more training memory than the keys and values themselves)."""
    bb, block = _layer(family, torch.float32)
    attn, norm = block.self_attn, block.input_layernorm
    N, d = 48, bb.hidden_size  # N differs from every weight dimension
    x = torch.randn(N, d, requires_grad=True)
    cos, sin = bb.rope(torch.arange(N), torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    def image_bytes(fn):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        # what scales with the image tokens: tensors with N rows (weights have other shapes)
        seen = {(t.data_ptr(), t.numel()) for t in saved if t.dim() >= 1 and t.shape[0] == N}
        return sum(numel for _, numel in seen) * 4

    fused = image_bytes(lambda: image_kv(attn, norm, x, cos, sin, block.family))
    plain = image_bytes(lambda: _reference(attn, norm, x, cos, sin, block.family.rope_fn))
    D = cos.shape[-1]
    assert fused <= 4 * (N * d + N + 2 * N * D)  # x, r, cos, sin (Helium: half-width tables, repeated)
    assert plain >= 2 * fused
