"""Cached decoding with `flash` over several samples (issue 14, item 8): a decoding step hands
the layer's whole cache to `flash_attn_with_kvcache` (no per-token concatenation of every
sample's keys), through the strict CPU stand-in `tests.builders.strict_flash_attn_with_kvcache`."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from casa.attention import CachedKV, varlen_attention
from casa.cache import KVCache
from casa.fusion import CASA, Insertion
from casa.tiny import random_packed_batch, tiny_model
from tests.builders import flash_stand_in, strict_flash_attn_with_kvcache
from tests.builders import flash_stand_in

LAYOUT = [[("text", 5), ("image", (4, 4)), ("text", 9)], [("image", (2, 4)), ("text", 12)],
          [("text", 4), ("image", (2, 2)), ("text", 11)]]


class _CatCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.cats = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.cat, torch.concat, torch.concatenate):
            self.cats += 1
        return func(*args, **(kwargs or {}))


def _reference(q, keys, values, causal=True):
    """Dense fp32 attention of each sample's queries over its own keys."""
    outs = []
    for qs, ks, vs in zip(q, keys, values):
        cu_q = torch.tensor([0, qs.shape[0]], dtype=torch.int32)
        cu_k = torch.tensor([0, ks.shape[0]], dtype=torch.int32)
        outs.append(varlen_attention(qs.float(), ks.float(), vs.float(), cu_q, cu_k, causal, "dense"))
    return torch.cat(outs)


def test_a_decoding_step_hands_the_cache_to_the_kernel_without_concatenating():
    g = torch.Generator().manual_seed(0)
    H, Hkv, D, dt = 4, 2, 8, torch.bfloat16
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dt)  # noqa: E731
    lens = [7, 3, 12]
    cache = KVCache(3)
    keys = [rnd(n, Hkv, D) for n in lens]
    values = [rnd(n, Hkv, D) for n in lens]
    cu = torch.tensor([0, 7, 10, 22], dtype=torch.int32)
    calls = []

    def spy(q, k_cache, v_cache, **kw):
        calls.append((k_cache.data_ptr(), v_cache.data_ptr()))
        return strict_flash_attn_with_kvcache(q, k_cache, v_cache, **kw)

    with torch.no_grad(), flash_stand_in(kvcache_fn=spy):
        # prefill (unequal lengths): the varlen path, written into the layer's buffer
        k, v, cu_k = cache.self_attention(0, torch.cat(keys), torch.cat(values), cu, "flash")
        q = rnd(22, H, D)
        out = varlen_attention(q, k, v, cu, cu_k, causal=True, backend="flash")
        torch.testing.assert_close(out.float(), _reference(q.split(lens), keys, values), atol=2e-2, rtol=0)
        buf = cache._flash_sa[0].k
        for step, m in enumerate([1, 1, 3, 1]):  # one token each, and a 3-token chunk per sample
            if step == 3:  # sample 1 finishes: the others keep decoding
                cache.keep([0, 2])
                keys, values = [keys[0], keys[2]], [values[0], values[2]]
                buf = cache._flash_sa[0].k
            S = len(keys)
            k_new, v_new, q = rnd(S * m, Hkv, D), rnd(S * m, Hkv, D), rnd(S * m, H, D)
            keys = [torch.cat([ks, kn]) for ks, kn in zip(keys, k_new.split(m))]
            values = [torch.cat([vs, vn]) for vs, vn in zip(values, v_new.split(m))]
            step_cu = torch.arange(0, S * m + 1, m, dtype=torch.int32)
            with _CatCounter() as cats:
                k, v, cu_k = cache.self_attention(0, k_new, v_new, step_cu, "flash")
                out = varlen_attention(q, k, v, step_cu, cu_k, causal=True, backend="flash")
            assert isinstance(k, CachedKV) and cats.cats == 0
            assert calls[-1] == (buf.data_ptr(), cache._flash_sa[0].v.data_ptr())  # the cache itself, in place
            assert len(calls) == step + 1
            torch.testing.assert_close(out.float(), _reference(q.split(m), keys, values), atol=2e-2, rtol=0)
            # the kernel appended the new keys into the cache where the cache's views read them
            for (ks, vs), ref_k, ref_v in zip(cache.sa[0], keys, values):
                assert torch.equal(ks, ref_k) and torch.equal(vs, ref_v)
        assert cache.text_kv_tokens() == sum(k.shape[0] for k in keys)


def test_the_cache_grows_by_doubling_and_keeps_its_keys():
    H, Hkv, D, dt = 2, 1, 8, torch.float16
    cache = KVCache(2)
    keys = [torch.randn(n, Hkv, D).to(dt) for n in (2, 5)]
    with torch.no_grad(), flash_stand_in():
        cache.self_attention(0, torch.cat(keys), torch.cat(keys), torch.tensor([0, 2, 7], dtype=torch.int32),
                             "flash")
        cap = cache._flash_sa[0].k.shape[1]
        m = cap  # more new tokens than the room left: one doubling
        k_new = torch.randn(2 * m, Hkv, D).to(dt)
        q = torch.randn(2 * m, H, D).to(dt)
        k, v, cu_k = cache.self_attention(0, k_new, k_new, torch.tensor([0, m, 2 * m], dtype=torch.int32), "flash")
        out = varlen_attention(q, k, v, None, cu_k, causal=True, backend="flash")
    assert cache._flash_sa[0].k.shape[1] == 2 * cap
    keys = [torch.cat([ks, kn]) for ks, kn in zip(keys, k_new.split(m))]
    torch.testing.assert_close(out.float(), _reference(q.split(m), keys, keys), atol=1e-2, rtol=0)


@pytest.mark.parametrize("strategy", ["casa_plus", "insertion"])
def test_cached_generation_of_several_samples_with_flash_equals_sdpa(strategy):
    """bf16 cached generation of 3 prompts of different lengths: flash (decoding steps through
    flash_attn_with_kvcache, the cache buffer itself) generates sdpa's tokens, including after
    samples finish at different steps (`KVCache.keep`)."""
    from casa.generation import GenerationConfig, generate, truncate_samples

    fusion = {"casa_plus": lambda: CASA(mode="plus"), "insertion": Insertion}[strategy]
    # seed 1: with seed 0 the bf16 logits of one step tie exactly (both backends agree with their
    # own uncached runs; the tie breaks differently), which says nothing about the cache
    prompts = truncate_samples(random_packed_batch(LAYOUT, seed=1), [10, 8, 14])
    calls = []

    def spy(q, k_cache, v_cache, **kw):
        calls.append(q.shape[0])
        return strict_flash_attn_with_kvcache(q, k_cache, v_cache, **kw)

    out = {}
    for backend in ("flash", "sdpa"):
        model = tiny_model(fusion(), num_layers=2, attn_backend=backend).to(torch.bfloat16).eval()
        with flash_stand_in(kvcache_fn=spy, model=model):
            out[backend] = generate(model, prompts, GenerationConfig(max_new_tokens=5, stop_token_ids=()))
    assert out["flash"] == out["sdpa"]
    assert len(calls) == 4 * 2 and set(calls) == {3}  # 4 decoding steps x 2 SA layers, 3 samples each
    # plain `flash_stand_in` (varlen only) pairs itself with the strict kvcache stand-in
    model = tiny_model(fusion(), num_layers=2, attn_backend="flash").to(torch.bfloat16).eval()
    with flash_stand_in(model=model):
        assert generate(model, prompts, GenerationConfig(max_new_tokens=5, stop_token_ids=())) == out["sdpa"]


@pytest.mark.parametrize("case", ["fp32", "mixed", "seqlens_int64", "full", "strided", "batch_idx"])
def test_strict_kvcache_stand_in_enforces_the_contract(case):
    B, cap, H, Hkv, D, dt = 2, 6, 4, 2, 8, torch.bfloat16
    q, kc, vc = torch.randn(B, 1, H, D, dtype=dt), torch.zeros(B, cap, Hkv, D, dtype=dt), torch.zeros(B, cap, Hkv, D, dtype=dt)
    k = v = torch.randn(B, 1, Hkv, D, dtype=dt)
    kw = dict(k=k, v=v, cache_seqlens=torch.tensor([2, 5], dtype=torch.int32), causal=True)
    if case == "fp32":
        q = q.float()
    elif case == "mixed":
        k = v = k.half()
        kw.update(k=k, v=v)
    elif case == "seqlens_int64":
        kw["cache_seqlens"] = kw["cache_seqlens"].long()
    elif case == "full":
        kw["cache_seqlens"] = torch.tensor([2, 6], dtype=torch.int32)
    elif case == "strided":
        kc = torch.zeros(B, cap, D, Hkv, dtype=dt).transpose(2, 3)
    elif case == "batch_idx":
        kw["cache_batch_idx"] = torch.tensor([1, 0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="flash_attn_with_kvcache"):
        strict_flash_attn_with_kvcache(q, kc, vc, **kw)
    kw = dict(k=k.to(dt), v=v.to(dt), cache_seqlens=torch.tensor([2, 5], dtype=torch.int32), causal=True)
    out = strict_flash_attn_with_kvcache(q.to(dt), vc.clone(), vc, **kw)  # the valid call passes
    assert out.shape == (B, 1, H, D) and torch.equal(vc[1, 5], v[1, 0].to(dt))
