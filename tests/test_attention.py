"""Every attention backend against the dense reference, and the reference against a naive loop."""

import pytest
import torch

from casa.attention import BACKENDS, check_backend, set_flash_fn, varlen_attention

# (Lq, Lk) per segment: uneven windows with image keys (Lk > Lq), windows without image
# (Lq == Lk), a query segment with no keys, a key segment with no queries, single tokens,
# and Lq > Lk (the first queries see nothing under bottom-right causality)
LAYOUTS = {
    "uneven": [(3, 7), (4, 4), (2, 9)],
    "no_keys": [(2, 5), (3, 0), (2, 2)],
    "no_queries": [(0, 4), (3, 6)],
    "single": [(1, 1), (1, 3), (1, 1)],
    "more_queries": [(5, 3), (2, 2)],
}


def _inputs(layout, H=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tq, Tk = sum(a for a, _ in layout), sum(b for _, b in layout)
    q = torch.randn(Tq, H, D, generator=g, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(Tk, Hkv, D, generator=g).requires_grad_()
    v = torch.randn(Tk, Hkv, D, generator=g).requires_grad_()
    cu_q = torch.tensor([0] + torch.tensor([a for a, _ in layout]).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor([b for _, b in layout]).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def _naive(q, k, v, cu_q, cu_k, causal, masked_key=None):
    """Per-query softmax over the keys it may see: the textbook definition."""
    H, D = q.shape[1], q.shape[2]
    out = torch.zeros_like(q)
    for w in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[w]), int(cu_q[w + 1]), int(cu_k[w]), int(cu_k[w + 1])
        lq, lk = q1 - q0, k1 - k0
        for j in range(lq):
            visible = [k0 + i for i in range(lk) if not causal or i <= lk - lq + j]
            if masked_key is not None:
                visible = [i for i in visible if i != int(masked_key[q0 + j])]
            if not visible:
                continue
            for h in range(H):
                kh = k[visible, h * k.shape[1] // H]
                vh = v[visible, h * k.shape[1] // H]
                p = torch.softmax(kh @ q[q0 + j, h] / D ** 0.5, dim=0)
                out[q0 + j, h] = p @ vh
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("causal", [True, False])
def test_dense_equals_naive(layout, causal):
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS[layout])
    with torch.no_grad():
        torch.testing.assert_close(varlen_attention(q, k, v, cu_q, cu_k, causal, "dense"),
                                   _naive(q, k, v, cu_q, cu_k, causal), atol=1e-5, rtol=1e-5)


def _reference_flash(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     softmax_scale=None, causal=False):
    """Stand-in for flash_attn_varlen_func with its signature and semantics (int32 boundaries,
    int max lengths, bottom-right causal, native GQA), checking what it is given."""
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert isinstance(max_seqlen_q, int) and max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    assert isinstance(max_seqlen_k, int) and dropout_p == 0.0
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, "dense", scale=softmax_scale)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex", "flash"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("causal", [True, False])
def test_backend_equals_dense_forward_and_backward(backend, layout, causal):
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS[layout])
    ref = varlen_attention(q, k, v, cu_q, cu_k, causal, "dense")
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    if backend == "flex":  # forward only on CPU (no flex backward there)
        with torch.no_grad():
            out = varlen_attention(q, k, v, cu_q, cu_k, causal, "flex")
        torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)
        return
    if backend == "flash":
        set_flash_fn(_reference_flash)
    try:
        out = varlen_attention(q, k, v, cu_q, cu_k, causal, backend)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    finally:
        set_flash_fn(None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, gr in zip(grads, grads_ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


def test_rows_without_keys_are_zero():
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS["no_keys"])
    for backend in ("dense", "sdpa", "eager"):
        out = varlen_attention(q, k, v, cu_q, cu_k, True, backend)
        assert torch.equal(out[2:5], torch.zeros_like(out[2:5]))


def test_eager_probabilities():
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS["uneven"])
    with torch.no_grad():
        out, probs = varlen_attention(q, k, v, cu_q, cu_k, True, "eager", return_probs=True)
        for w, p in enumerate(probs):
            assert p.shape == (4, int(cu_q[w + 1] - cu_q[w]), int(cu_k[w + 1] - cu_k[w]))
            torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:2]))
            vw = v[int(cu_k[w]):int(cu_k[w + 1])].repeat_interleave(2, dim=1)  # [lk, H, D]
            torch.testing.assert_close(torch.einsum("hqk,khd->qhd", p, vw), out[int(cu_q[w]):int(cu_q[w + 1])])


def test_masked_key_hides_exactly_that_key():
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS["uneven"])
    masked = torch.tensor([0, 5, -1, 7, 8, 9, 10, 19, 13])  # some in-window keys, one -1
    with torch.no_grad():
        want = _naive(q, k, v, cu_q, cu_k, True, masked)
        for backend in ("dense", "eager"):
            torch.testing.assert_close(varlen_attention(q, k, v, cu_q, cu_k, True, backend, masked_key=masked), want,
                                       atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="masked_key needs backend 'dense' or 'eager'"):
        varlen_attention(q, k, v, cu_q, cu_k, True, "sdpa", masked_key=masked)


def test_backend_errors_name_the_valid_backends():
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS["uneven"])
    with pytest.raises(ValueError, match=r"backend='fast' is not one of \['dense', 'sdpa', 'eager', 'flex', 'flash'\]"):
        varlen_attention(q, k, v, cu_q, cu_k, True, "fast")
    with pytest.raises(ValueError, match=r"no backward on CPU.*backends that can: \['dense', 'sdpa', 'eager'\]"):
        varlen_attention(q, k, v, cu_q, cu_k, True, "flex")
    with pytest.raises(ValueError, match="flash-attn needs CUDA"):
        check_backend("flash", "cpu", requires_grad=False)
    assert BACKENDS == ("dense", "sdpa", "eager", "flex", "flash")
