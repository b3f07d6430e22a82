"""Every attention backend against the dense reference, and the reference against a naive loop."""

import pytest
import torch

import casa.attention as attention
from casa.attention import BACKENDS, DecodeKV, FlashBackend, check_backend, dense_mask, flash_kernels, varlen_attention
from tests.builders import strict_flash_attn_varlen_func, strict_flash_attn_with_kvcache

# (Lq, Lk) per segment. CASA windows have keys = image tokens + text tokens (Lk > Lq); a
# window without image has Lq == Lk; plus the edge cases the primitive must accept.
LAYOUTS = {
    "uneven": [(3, 7), (4, 4), (2, 9)],  # image + text keys, and one image-less window
    "text_only": [(3, 3), (4, 4), (1, 1)],  # zero image tokens everywhere: Lq == Lk
    "no_keys": [(2, 5), (3, 0), (2, 2)],  # a query segment without keys -> zeros
    "no_queries": [(0, 4), (3, 6)],  # a key segment without queries
    "single": [(1, 1), (1, 3), (1, 1)],  # single-token segments
    "more_queries": [(5, 3), (2, 2)],  # Lq > Lk: the first 2 queries see nothing when causal
}
HEADS = {"gqa": (4, 2), "mha": (2, 2)}  # (H, Hkv)
RUNNABLE = ["sdpa", "eager", "flex", "flash"]  # flex forward only, flash via a CPU stand-in


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _inputs(layout, heads="gqa", D=8, seed=0):
    H, Hkv = HEADS[heads]
    g = torch.Generator().manual_seed(seed)
    Tq, Tk = sum(a for a, _ in layout), sum(b for _, b in layout)
    q = torch.randn(Tq, H, D, generator=g).requires_grad_()
    k = torch.randn(Tk, Hkv, D, generator=g).requires_grad_()
    v = torch.randn(Tk, Hkv, D, generator=g).requires_grad_()
    return q, k, v, _cu([a for a, _ in layout]), _cu([b for _, b in layout])


def _visible(layout, causal, masked_key=None):
    """[(query, [keys it sees])] by the textbook rule, all indices global."""
    rows, q0, k0 = [], 0, 0
    for lq, lk in layout:
        for j in range(lq):
            keys = [k0 + i for i in range(lk) if not causal or i <= lk - lq + j]  # bottom-right
            if masked_key is not None:
                keys = [i for i in keys if i != int(masked_key[q0 + j])]
            rows.append((q0 + j, keys))
        q0, k0 = q0 + lq, k0 + lk
    return rows


def _naive(q, k, v, layout, causal, scale=None, masked_key=None):
    """Per-query, per-head softmax over the visible keys, in float64: independent of casa."""
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    scale = D ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    for i, keys in _visible(layout, causal, masked_key):
        for h in range(H):
            if keys:
                p = torch.softmax(k[keys, h // (H // Hkv)] @ q[i, h] * scale, dim=0)
                out[i, h] = p @ v[keys, h // (H // Hkv)]
    return out.float()


BF16_TOL = dict(atol=3e-2, rtol=3e-2)
"""bf16 inputs against the fp32 reference on the same (rounded) values: bf16 output rounding."""


def _for(backend, *tensors):
    """flash-attn takes bf16/fp16 only: its inputs in bf16 (leaves, gradients kept), others as given."""
    if backend != "flash":
        return tensors
    return tuple(t.detach().to(torch.bfloat16).requires_grad_(t.requires_grad) for t in tensors)


def _tol(backend, atol=1e-5, rtol=1e-5):
    return BF16_TOL if backend == "flash" else dict(atol=atol, rtol=rtol)


def _keyless_rows(layout, causal):
    return [i for i, keys in _visible(layout, causal) if not keys]


@pytest.fixture
def flash_stand_in():
    """Route the flash backend to the strict stand-in (`tests.builders`: flash-attn's input
    contract, then the reference; bf16/fp16 only), recording what it was given."""
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False):
        calls.append(dict(cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, max_q=max_seqlen_q, max_k=max_seqlen_k,
                          dropout_p=dropout_p, scale=softmax_scale, causal=causal))
        return strict_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal)

    with flash_kernels(flash_attn_varlen_func, strict_flash_attn_with_kvcache):  # for backends built inside
        yield calls


def _backend(name: str, flash_fn):
    """Backend `name`; for "flash" one whose varlen kernel is `flash_fn` (injected, no global)."""
    return FlashBackend(flash_fn, strict_flash_attn_with_kvcache) if name == "flash" else name


def test_dense_mask_picture():
    """The module docstring's picture: segments (Lq=2, Lk=5) and (Lq=3, Lk=3), causal."""
    picture = """
        x x x x . . . .
        x x x x x . . .
        . . . . . x . .
        . . . . . x x .
        . . . . . x x x
    """
    want = torch.tensor([[c == "x" for c in line.split()] for line in picture.strip().splitlines()])
    torch.testing.assert_close(dense_mask(_cu([2, 3]), _cu([5, 3]), 5, 8, causal=True), want)
    assert dense_mask(_cu([2, 3]), _cu([5, 3]), 5, 8, causal=False).sum() == 2 * 5 + 3 * 3


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("causal", [True, False])
def test_dense_equals_naive(layout, causal, heads):
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS[layout], heads)
    with torch.no_grad():
        out = varlen_attention(q, k, v, cu_q, cu_k, causal, "dense")
        torch.testing.assert_close(out, _naive(q, k, v, LAYOUTS[layout], causal), atol=1e-5, rtol=1e-5)
        out = varlen_attention(q, k, v, cu_q, cu_k, causal, "dense", scale=0.3)
        torch.testing.assert_close(out, _naive(q, k, v, LAYOUTS[layout], causal, scale=0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("causal", [True, False])
def test_backend_equals_dense_forward_and_backward(backend, layout, causal, heads, flash_stand_in):
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS[layout], heads)
    q, k, v = _for(backend, q, k, v)
    ref = varlen_attention(*(x.float() for x in (q, k, v)), cu_q, cu_k, causal, "dense")
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype).float()
    grads_ref = torch.autograd.grad(ref, (q, k, v), upstream)
    if backend == "flex":  # no flex backward on CPU: forward only
        with torch.no_grad():
            out = varlen_attention(q, k, v, cu_q, cu_k, causal, "flex")
        torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)
        return
    out = varlen_attention(q, k, v, cu_q, cu_k, causal, backend)
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.float(), ref, **_tol(backend))
    grads = torch.autograd.grad(out, (q, k, v), upstream.to(out.dtype))
    for name, g, gr in zip("qkv", grads, grads_ref):
        assert torch.isfinite(g).all(), f"d{name} has non-finite entries"
        torch.testing.assert_close(g.float(), gr.float(), **_tol(backend), msg=f"d{name} differs from dense")


@pytest.mark.parametrize("backend", ["dense", *RUNNABLE])
@pytest.mark.parametrize("layout,causal", [("no_keys", True), ("no_keys", False), ("more_queries", True)])
def test_rows_without_keys_are_zero_with_finite_grads(backend, layout, causal, flash_stand_in):
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS[layout])
    q, k, v = _for(backend, q, k, v)
    rows = _keyless_rows(LAYOUTS[layout], causal)
    assert rows  # the layout does exercise the case
    if backend == "flex":
        with torch.no_grad():
            out = varlen_attention(q, k, v, cu_q, cu_k, causal, backend)
        assert torch.equal(out[rows], torch.zeros_like(out[rows]))
        return
    out = varlen_attention(q, k, v, cu_q, cu_k, causal, backend)
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[rows], torch.zeros_like(dq[rows]))  # a query that sees nothing has no gradient


def test_flash_plumbing(flash_stand_in):
    """Boundaries reach flash-attn as int32 (even when given int64), max lengths as Python
    ints, the scale and causality unchanged, and the output keeps q's shape."""
    layout = LAYOUTS["uneven"]
    q, k, v, cu_q, cu_k = _inputs(layout)
    q, k, v = _for("flash", q, k, v)
    out = varlen_attention(q, k, v, cu_q.long(), cu_k.long(), True, "flash", scale=0.3)
    (call,) = flash_stand_in
    assert call["cu_q"].dtype == torch.int32 and call["cu_k"].dtype == torch.int32
    assert type(call["max_q"]) is int and call["max_q"] == max(a for a, _ in layout)
    assert type(call["max_k"]) is int and call["max_k"] == max(b for _, b in layout)
    assert call["scale"] == 0.3 and call["causal"] is True and call["dropout_p"] == 0.0
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _naive(q.detach(), k.detach(), v.detach(), layout, True, scale=0.3),
                               **BF16_TOL)
    varlen_attention(q, k, v, cu_q, cu_k, False, "flash")
    assert flash_stand_in[1]["scale"] == 8 ** -0.5 and flash_stand_in[1]["causal"] is False  # default D ** -0.5
    # host max lengths from the caller (`casa.batch.SeqLens`) reach the kernel as given, with no sync
    calls = []
    tolist = torch.Tensor.tolist
    torch.Tensor.tolist = lambda self: calls.append(1) or tolist(self)
    try:
        from tests.builders import SyncCounter

        with SyncCounter() as syncs:
            varlen_attention(q, k, v, cu_q, cu_k, True, "flash", max_seqlen_q=4, max_seqlen_k=9)
    finally:
        torch.Tensor.tolist = tolist
    assert flash_stand_in[2]["max_q"] == 4 and flash_stand_in[2]["max_k"] == 9 and syncs.count == 0
    with pytest.raises(ValueError, match=r"max_seqlen_q=tensor\(4\) must be a Python int"):
        varlen_attention(q, k, v, cu_q, cu_k, True, "flash", max_seqlen_q=torch.tensor(4), max_seqlen_k=9)


def test_sdpa_syncs_once(monkeypatch):
    """The training path reads both boundary tensors with a single `.tolist()` per call."""
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS["uneven"])
    calls = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or tolist(self))
    varlen_attention(q, k, v, cu_q, cu_k, True, "sdpa")
    assert len(calls) == 1


# Cached decoding: few queries per segment against its keys, no gradients. `sdpa` sends every
# segment with 1 <= Lq <= min(Lk, DECODE_MAX_QUERIES) whose keys are stored head-major (as a
# one-sample KV cache stores them) to `_decode_segment`.
DECODE_LAYOUTS = {
    "one_token": [(1, 9), (1, 1), (1, 4)],  # one new token against a cache (and a cache of 1)
    "chunk": [(5, 12), (3, 3), (2, 7)],  # a few new tokens: Lq < Lk and Lq == Lk
    "empty_segments": [(1, 6), (0, 3), (2, 0), (4, 9)],  # no queries; no keys (zeros)
    "mixed": [(1, 10), (12, 20), (3, 3), (5, 3)],  # Lq > DECODE_MAX_QUERIES, Lq > Lk: SDPA as before
}
DECODED = {"one_token": 3, "chunk": 3, "empty_segments": 2, "mixed": 2}  # segments that take the fast path


def _head_major(k: torch.Tensor) -> torch.Tensor:
    """[T, Hkv, D] with the same values, stored [Hkv, D, T] (the one-sample cache's layout)."""
    return k.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def _decode_kv(k, v) -> DecodeKV:
    """k, v as the cache hands them to its decoding path (both arguments of `varlen_attention`)."""
    return DecodeKV(k, v)


def _spy_decode(monkeypatch):
    calls = []
    decode = attention._decode_segment
    monkeypatch.setattr(attention, "_decode_segment", lambda q, *a: calls.append(q.shape[0]) or decode(q, *a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("layout", list(DECODE_LAYOUTS))
@pytest.mark.parametrize("causal", [True, False])
def test_decode_path_equals_dense(layout, causal, heads, dtype, monkeypatch):
    assert attention.DECODE_MAX_QUERIES < 12  # "mixed" keeps one segment on SDPA
    q, k, v, cu_q, cu_k = (x.detach() for x in _inputs(DECODE_LAYOUTS[layout], heads, D=16))
    calls = _spy_decode(monkeypatch)
    with torch.no_grad():
        kv = _decode_kv(_head_major(k.to(dtype)), v.to(dtype))
        out = varlen_attention(q.to(dtype), kv, kv, cu_q, cu_k, causal, "sdpa")
        assert len(calls) == DECODED[layout]
        # token-major keys (several samples' caches concatenated) stay on SDPA, same values
        token_major = varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), cu_q, cu_k, causal, "sdpa")
        assert len(calls) == DECODED[layout]
        # the path is the caller's explicit choice (`DecodeKV`), not read off the keys' strides
        varlen_attention(q.to(dtype), _head_major(k.to(dtype)), v.to(dtype), cu_q, cu_k, causal, "sdpa")
        assert len(calls) == DECODED[layout]
    torch.testing.assert_close(token_major.float(), out.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               rtol=0)
    assert out.dtype == dtype and out.shape == q.shape
    ref = varlen_attention(q, k, v, cu_q, cu_k, causal, "dense")
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, _naive(q, k, v, DECODE_LAYOUTS[layout], causal), atol=1e-5, rtol=1e-5)
    else:  # bf16 inputs: within twice the dense reference's own bf16 error of the fp32 result
        dense_bf16 = varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), cu_q, cu_k, causal, "dense")
        tol = 2 * (dense_bf16.float() - ref).abs().max().item() + 1e-3
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=0)
    rows = _keyless_rows(DECODE_LAYOUTS[layout], causal)
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))


@pytest.mark.parametrize("heads", list(HEADS))
def test_decode_path_reads_cache_views_in_place(heads):
    """K/V as the cache hands them out (strided views of head-major buffers, keys transposed)
    give the same result as contiguous tensors, and no op copies them (the profiler sees the
    ops run inside the matmuls too)."""
    from torch.profiler import profile

    from casa.cache import KVCache

    lk = 37  # a length no other tensor here has
    q, k, v, cu_q, cu_k = (x.detach() for x in _inputs([(3, lk)], heads, D=16))
    bufs = [None]
    kc, vc = KVCache._append(bufs, 0, None, k[:30], v[:30], head_major=True)
    kc, vc = KVCache._append(bufs, 0, (kc, vc), k[30:], v[30:], head_major=True)  # [37, Hkv, D] views of one buffer
    assert kc.data_ptr() == bufs[0][0].data_ptr() and not kc.is_contiguous()
    kv = _decode_kv(kc, vc)
    with torch.no_grad(), profile(record_shapes=True) as prof:
        out = varlen_attention(q, kv, kv, cu_q, cu_k, True, "sdpa")
    copies = [(e.name, e.input_shapes) for e in prof.events()
              if e.name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")
              and any(lk in shape for shape in e.input_shapes if isinstance(shape, list))]
    assert not copies
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu_q, cu_k, True, "dense"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["dense", *RUNNABLE])
@pytest.mark.parametrize("lq", [3, 12])  # 12 > DECODE_MAX_QUERIES: `sdpa` runs SDPA's kernel
def test_every_backend_takes_cache_views(backend, lq):
    """The cache's keys are transposed views; kernels that need contiguous rows get them."""
    from casa.cache import KVCache

    q, k, v, cu_q, cu_k = (x.detach() for x in _inputs([(lq, 37)], D=16))
    kc, vc = KVCache._append([None], 0, None, k, v, head_major=True)
    assert kc.stride(-1) != 1
    seen = []

    def flash_attn_varlen_func(q, k, v, *args, **kwargs):
        seen.append(k.stride(-1) == 1 and v.stride(-1) == 1)  # the strict stand-in refuses strided rows
        return strict_flash_attn_varlen_func(q, k, v, *args, **kwargs)

    q, kc, vc = _for(backend, q, kc, vc)
    kv = _decode_kv(kc, vc)  # as the cache hands them out; every backend reads them
    with torch.no_grad():
        out = varlen_attention(q, kv, kv, cu_q, cu_k, True, _backend(backend, flash_attn_varlen_func))
    assert seen == ([True] if backend == "flash" else [])
    torch.testing.assert_close(out.float(), varlen_attention(q.float(), kc.float(), vc.float(), cu_q, cu_k, True, "dense"),
                               **_tol(backend))


def test_decode_path_only_without_gradients(monkeypatch):
    """With gradients every segment stays on SDPA (its backward, no [H, Lq, Lk] scores kept)."""
    q, k, v, cu_q, cu_k = _inputs(DECODE_LAYOUTS["chunk"])
    kv = _decode_kv(_head_major(k), v)
    calls = _spy_decode(monkeypatch)
    out = varlen_attention(q, kv, kv, cu_q, cu_k, True, "sdpa")
    assert not calls and out.requires_grad
    with torch.no_grad():
        varlen_attention(q, kv, kv, cu_q, cu_k, True, "sdpa")
    assert calls == [5, 3, 2]


@pytest.mark.parametrize("layout", ["uneven", "no_keys", "no_queries", "more_queries"])
@pytest.mark.parametrize("causal", [True, False])
def test_eager_probabilities(layout, causal):
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS[layout])
    H, Hkv = q.shape[1], k.shape[1]
    with torch.no_grad():
        out, probs = varlen_attention(q, k, v, cu_q, cu_k, causal, "eager", return_probs=True)
        torch.testing.assert_close(out, varlen_attention(q, k, v, cu_q, cu_k, causal, "dense"))
    assert len(probs) == len(LAYOUTS[layout])
    visible = dict(_visible(LAYOUTS[layout], causal))
    for w, (lq, lk) in enumerate(LAYOUTS[layout]):
        q0, k0 = int(cu_q[w]), int(cu_k[w])
        p = probs[w]
        assert p.shape == (H, lq, lk)  # a keyless segment gives [H, lq, 0]
        for j in range(lq):
            keys = [i - k0 for i in visible[q0 + j]]
            torch.testing.assert_close(p[:, j].sum(-1), torch.full((H,), float(bool(keys))))
            hidden = [i for i in range(lk) if i not in keys]
            assert torch.equal(p[:, j, hidden], torch.zeros(H, len(hidden)))  # nothing leaks past the mask
        vw = v[k0:k0 + lk].repeat_interleave(H // Hkv, dim=1)  # [lk, H, D]
        torch.testing.assert_close(torch.einsum("hqk,khd->qhd", p, vw), out[q0:q0 + lq])


@pytest.mark.parametrize("causal", [True, False])
def test_masked_key_hides_exactly_that_key(causal):
    layout = LAYOUTS["uneven"]
    q, k, v, cu_q, cu_k = _inputs(layout)
    # queries 0-2 see keys 0-6, 3-6 see 7-10, 7-8 see 11-19: in-window keys ("-rnd"), the
    # query's own text key ("-self": keys 4-6 are text 0-2 of window 0), -1 (none) and one key
    # of another window (hides nothing)
    masked = torch.tensor([4, 5, -1, 7, 8, 9, 10, 19, 0])
    ref = varlen_attention(q, k, v, cu_q, cu_k, causal, "dense", masked_key=masked)
    torch.testing.assert_close(ref, _naive(q, k, v, layout, causal, masked_key=masked), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, varlen_attention(q, k, v, cu_q, cu_k, causal, "dense"))  # the mask matters
    grads_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    out, probs = varlen_attention(q, k, v, cu_q, cu_k, causal, "eager", masked_key=masked, return_probs=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(probs[0][:, 0, 4], torch.zeros(4)) and torch.equal(probs[1][:, 0, 0], torch.zeros(4))
    for g, gr in zip(torch.autograd.grad(out.sum(), (q, k, v)), grads_ref):
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["dense", "eager"])
def test_masking_the_only_visible_key_gives_zeros(backend):
    # causal, Lq == Lk: the first query of each window sees only its own key
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS["text_only"])
    masked = torch.full((8,), -1)
    masked[[0, 3, 7]] = torch.tensor([0, 3, 7])  # "-self" on the window openers
    out = varlen_attention(q, k, v, cu_q, cu_k, True, backend, masked_key=masked)
    assert torch.equal(out[[0, 3, 7]], torch.zeros(3, 4, 8))
    torch.testing.assert_close(out, _naive(q, k, v, LAYOUTS["text_only"], True, masked_key=masked), atol=1e-5,
                               rtol=1e-5)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), (q, k, v)))


def test_error_messages_name_the_valid_backends():
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS["uneven"])
    assert BACKENDS == ("dense", "sdpa", "eager", "flex", "flash")
    with pytest.raises(ValueError, match=r"backend='foo' is not one of \['dense', 'sdpa', 'eager', 'flex', 'flash'\]"):
        varlen_attention(q, k, v, cu_q, cu_k, True, "foo")
    with pytest.raises(ValueError, match=r"no backward on CPU.*can run here.*\['dense', 'sdpa', 'eager'\]$"):
        varlen_attention(q, k, v, cu_q, cu_k, True, "flex")  # q requires grad
    with pytest.raises(ValueError, match=r"needs a CUDA device.*can run here.*\['dense', 'sdpa', 'eager', 'flex'\]$"):
        check_backend("flash", "cpu", requires_grad=False)
    with pytest.raises(ValueError, match=r"needs a CUDA device.*can run here.*\['dense', 'sdpa', 'eager'\]$"):
        check_backend("flash", "cpu", requires_grad=True)  # with gradients flex drops out of the list
    with pytest.raises(ValueError, match="masked_key needs backend 'dense' or 'eager'"):
        varlen_attention(q, k, v, cu_q, cu_k, True, "sdpa", masked_key=torch.full((9,), -1))
    with pytest.raises(ValueError, match="return_probs=True needs backend 'eager'"):
        varlen_attention(q, k, v, cu_q, cu_k, True, "dense", return_probs=True)


def test_backends_that_can_run_pass_the_check(flash_stand_in):
    check_backend("flex", "cpu", requires_grad=False)  # forward-only flex is fine on CPU
    check_backend("flex", "cuda", requires_grad=True)
    check_backend("flash", "cpu", requires_grad=True)  # the stand-in is installed
    if not attention._flash_installed():
        with pytest.raises(ValueError, match="flash-attn package"):
            FlashBackend().check("cuda", requires_grad=True)  # flash-attn's own kernels


def test_bad_shapes_and_boundaries_fail_loudly():
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS["uneven"])
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        varlen_attention(q, torch.randn(20, 3, 8), torch.randn(20, 3, 8), cu_q, cu_k, True, "sdpa")
    with pytest.raises(ValueError, match=r"cu_seqlens_k=\[0, 7, 11, 19\] must rise from 0 to the token count 20"):
        varlen_attention(q, k, v, cu_q, torch.tensor([0, 7, 11, 19], dtype=torch.int32), True, "sdpa")
    with pytest.raises(ValueError, match=r"must both be \[W\+1\]"):
        varlen_attention(q, k, v, cu_q, cu_k[:-1], True, "sdpa")


def test_decode_path_scores_in_a_reused_workspace():
    """With a workspace the decoding path computes its scores there (fp32), gives the same
    outputs, and no output aliases the buffer (a second call leaves the first intact)."""
    from casa.cache import KVCache

    q, k, v, cu_q, cu_k = (x.detach() for x in _inputs(DECODE_LAYOUTS["chunk"], D=16))
    kv = _decode_kv(_head_major(k), v)
    cache = KVCache(1)
    asked = []

    def workspace(numel, like):
        asked.append(numel)
        return cache.workspace(numel, like)

    with torch.no_grad():
        ref = varlen_attention(q, kv, kv, cu_q, cu_k, True, "sdpa")
        out = varlen_attention(q, kv, kv, cu_q, cu_k, True, "sdpa", workspace=workspace)
        kept = out.clone()
        varlen_attention(q * 2, kv, kv, cu_q, cu_k, True, "sdpa", workspace=workspace)
    assert len(asked) == 6 and cache._workspace.numel() >= max(asked)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(out, kept)


# ---------------------------------------------------------------------- segmented keys
@pytest.mark.parametrize("backend,grad", [(b, False) for b in ["dense", *RUNNABLE]] +
                         [(b, True) for b in ["dense", "sdpa", "eager"]])  # flex: no CPU backward
@pytest.mark.parametrize("layout", ["uneven", "no_keys", "more_queries"])
def test_segmented_keys_equal_concatenated(backend, layout, grad, flash_stand_in):
    """Keys/values given per segment (a cache's per-sample buffers, `casa.cache`) give what
    the concatenated tensors give, gradients included, on every backend."""
    q, k, v, cu_q, cu_k = _inputs(LAYOUTS[layout])
    q, k, v = _for(backend, q, k, v)
    lens = (cu_k[1:] - cu_k[:-1]).tolist()
    with torch.set_grad_enabled(grad):
        ref = varlen_attention(q, k, v, cu_q, cu_k, True, backend)
        got = varlen_attention(q, k.split(lens), v.split(lens), cu_q, cu_k, True, backend)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    if grad:
        g = torch.randn_like(ref)
        want = torch.autograd.grad(ref, (q, k, v), g)
        torch.testing.assert_close(torch.autograd.grad(got, (q, k, v), g), want, atol=1e-6, rtol=1e-6)


def test_segmented_keys_are_read_in_place_by_the_decoding_path(monkeypatch):
    """No concatenation of the segments on the `sdpa` decoding path: each goes to its own
    `_decode_segment` call as the very tensor the caller passed."""
    q, k, v, cu_q, cu_k = (x.detach() for x in _inputs(DECODE_LAYOUTS["one_token"]))
    lens = (cu_k[1:] - cu_k[:-1]).tolist()
    from casa.cache import KVCache

    bufs = [None] * len(lens)  # one buffer per segment, as a one-sample-per-segment cache holds them
    ks, vs = zip(*(KVCache._append(bufs, w, None, kw, vw, head_major=True)
                   for w, (kw, vw) in enumerate(zip(k.split(lens), v.split(lens)))))
    seen = []
    decode = attention._decode_segment
    monkeypatch.setattr(attention, "_decode_segment", lambda q, k, v, *a: seen.append((k, v)) or decode(q, k, v, *a))
    kv = _decode_kv(list(ks), list(vs))
    with torch.no_grad():
        out = varlen_attention(q, kv, kv, cu_q, cu_k, True, "sdpa")
    assert [(a.data_ptr(), b.data_ptr()) for a, b in seen] == [(a.data_ptr(), b.data_ptr()) for a, b in zip(ks, vs)]
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu_q, cu_k, True, "dense"), atol=1e-5, rtol=1e-5)


def test_segmented_keys_that_disagree_with_cu_seqlens_are_refused():
    q, k, v, cu_q, cu_k = (x.detach() for x in _inputs(LAYOUTS["uneven"]))
    lens = (cu_k[1:] - cu_k[:-1]).tolist()
    with pytest.raises(ValueError, match="one tensor per segment: 3 segments"):
        varlen_attention(q, k.split(lens)[:2], v.split(lens)[:2], cu_q, cu_k, True, "sdpa")
    wrong = [k[:3], k[3:8], k[8:]]  # 3, 5, 12 keys where cu_seqlens_k says 7, 4, 9
    for backend in ("sdpa", "eager", "dense"):  # read in place, or concatenated first
        with pytest.raises(ValueError, match="segment 0: 3 keys where cu_seqlens_k says 7"):
            varlen_attention(q, wrong, [v[:3], v[3:8], v[8:]], cu_q, cu_k, True, backend)
    with pytest.raises(ValueError, match=r"segment 1: keys \(5, 2, 8\) and values \(4, 2, 8\) must both be"):
        varlen_attention(q, wrong, [v[:3], v[3:7], v[7:]], cu_q, cu_k, True, "sdpa")
