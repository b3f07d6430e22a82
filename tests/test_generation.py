"""Cached decoding against full forwards, for every strategy; what the text KV cache holds."""

import pytest
import torch

from casa.cache import KVCache
from casa.fusion import CASA
from casa.generation import GenerationConfig, append_tokens, generate, image_chunk, text_chunk
from casa.tiny import random_packed_batch, tiny_model
from experiments.strategies import build_fusion, names


# text 0..4 | image A | text 5..10 | image B | text 11..14
SPEC = [("text", 5), ("image", (2, 4)), ("text", 6), ("image", (4, 2)), ("text", 4)]


def _gates(model):
    for n, p in model.named_parameters():
        if n.endswith("fusion_attn.gate"):
            p.data.fill_(0.5)


@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("family", ["llama", "qwen2_5_vl"])
def test_incremental_decoding_equals_full_forward(name, family):
    model = tiny_model(build_fusion(name), family=family).eval()
    _gates(model)
    full = random_packed_batch([SPEC], seed=7)
    with torch.no_grad():
        ref = model(full).logits  # [15, V]
        cache = KVCache(1)
        ids = full.input_ids.tolist()
        # chunk 1: text 0..4, image A, text 5..6 (prefill with an image inside)
        first = random_packed_batch([[("text", 5), ("image", (2, 4)), ("text", 2)]], seed=7)
        first.input_ids = full.input_ids[:7].clone()
        first.pixel_values = full.pixel_values[:8].clone()
        got = [model.backbone.head(model.hidden_states(first, cache=cache))]
        for p in range(7, 11):  # one token at a time
            got.append(model.backbone.head(model.hidden_states(text_chunk([[ids[p]]]), cache=cache)))
        # image B arrives mid-conversation, with the next two tokens
        chunk = image_chunk(ids[11:13], full.pixel_values[8:].clone(), full.image_grid_thw[1:].clone())
        got.append(model.backbone.head(model.hidden_states(chunk, cache=cache)))
        for p in range(13, 15):
            got.append(model.backbone.head(model.hidden_states(text_chunk([[ids[p]]]), cache=cache)))
    torch.testing.assert_close(torch.cat(got), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", names())
def test_cached_generation_equals_uncached(name):
    model = tiny_model(build_fusion(name)).eval()
    _gates(model)
    prompts = random_packed_batch([SPEC, [("text", 3), ("image", (2, 2)), ("text", 2)], [("text", 4)]], seed=8)
    cfg = GenerationConfig(max_new_tokens=6, stop_token_ids=(3,))
    cached = generate(model, prompts, cfg)
    uncached = generate(model, prompts, GenerationConfig(max_new_tokens=6, stop_token_ids=(3,), use_cache=False))
    assert cached == uncached
    assert all(1 <= len(o) <= 6 for o in cached)


@pytest.mark.parametrize("mask", ["self", "rnd", "rnd_txt"])
def test_table8_masks_generate_the_same_with_or_without_the_cache_flag(mask):
    """A masked key is drawn over the whole window, which the cache never holds at once:
    `generate` must then ignore `use_cache` instead of applying the mask to a chunk."""
    model = tiny_model(CASA("plus", inference_mask=mask)).eval()
    prompts = random_packed_batch([SPEC, [("text", 3), ("image", (2, 2)), ("text", 5)]], seed=3)
    cached = generate(model, prompts, GenerationConfig(max_new_tokens=6))
    uncached = generate(model, prompts, GenerationConfig(max_new_tokens=6, use_cache=False))
    assert cached == uncached


def test_sampling_is_seeded_and_top_p_one_token_is_greedy():
    model = tiny_model(CASA("plus")).eval()
    prompts = random_packed_batch([SPEC], seed=9)
    a = generate(model, prompts, GenerationConfig(max_new_tokens=5, temperature=1.0), torch.Generator().manual_seed(0))
    b = generate(model, prompts, GenerationConfig(max_new_tokens=5, temperature=1.0), torch.Generator().manual_seed(0))
    assert a == b
    greedy = generate(model, prompts, GenerationConfig(max_new_tokens=5))
    nucleus = generate(model, prompts, GenerationConfig(max_new_tokens=5, temperature=1.0, top_p=1e-6))
    assert greedy == nucleus


@pytest.mark.parametrize("name,grows", [("casa_plus", False), ("cross_attention", False), ("casa_replace", False),
                                        ("insertion", True)])
def test_text_kv_cache_holds_images_only_for_insertion(name, grows):
    model = tiny_model(build_fusion(name)).eval()
    g = torch.Generator().manual_seed(0)
    cache = KVCache(1)
    sizes = []
    with torch.no_grad():
        for frame in range(6):
            pix = torch.randn(16, 3 * 2 * 14 * 14, generator=g)
            model.hidden_states(image_chunk([5, 6], pix, torch.tensor([[1, 4, 4]])), cache=cache)
            sizes.append(cache.text_kv_tokens())
    text_only = [2 * (i + 1) for i in range(6)]
    if grows:
        assert sizes == [t + 4 * (i + 1) for i, t in enumerate(text_only)]
    else:
        assert sizes == text_only
        assert cache.window_kv_tokens() <= 4 + 2 or name == "cross_attention"


def test_append_tokens_matches_a_rebuilt_batch():
    # before: t t t [I] t t | t t [I] t t      after: t t t [I] t t 7 8 | t t [I] t t 9
    layout = [("text", 3), ("image", (2, 2)), ("text", 2)]
    batch = random_packed_batch([layout, [("text", 2), ("image", (2, 2)), ("text", 2)]], seed=1)
    grown = append_tokens(batch, [[7, 8], [9]])
    assert grown.sample_cu_seqlens.tolist() == [0, 7, 12]
    assert grown.window_cu_seqlens_text.tolist() == [0, 3, 7, 9, 12]
    assert grown.image_text_position.tolist() == [3, 9]
    assert grown.input_ids.tolist()[5:7] == [7, 8] and grown.input_ids.tolist()[-1] == 9
    assert grown.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]
    grown.validate()


@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("samples", [1, 2])
def test_a_chunk_that_closes_a_window_and_opens_the_next(name, samples):
    """Live captioning's chunk (`casa.assistant.frame_chunk`): the last tokens of the open
    window, then a frame opening a new one, then text. The cache extends the old window
    while it opens the new one in the same forward, so the new window's buffer must not be
    the old one's; logits equal one full forward (one sample: head-major buffers; two:
    token-major, `KVCache._append`)."""
    model = tiny_model(build_fusion(name)).eval()
    _gates(model)
    full = random_packed_batch([SPEC] * samples, seed=9)
    cu = full.sample_cu_seqlens.tolist()
    ids = [full.input_ids[cu[s]:cu[s + 1]].tolist() for s in range(samples)]
    pix = full.pixel_values.view(samples, 2, 8, -1)  # [S, image A|B, 8 patches, patch_dim]

    def chunk(spec, lo, hi, image):  # tokens lo..hi-1 of every sample, image A/B of each
        b = random_packed_batch([spec] * samples, seed=0)
        b.input_ids = torch.tensor([t for s in range(samples) for t in ids[s][lo:hi]])
        b.pixel_values = pix[:, image].reshape(samples * 8, -1).clone()
        return b

    with torch.no_grad():
        ref = model(full).logits.view(samples, 15, -1)  # [S, 15, V]
        cache = KVCache(samples)
        got = [model.backbone.head(model.hidden_states(chunk([("text", 5), ("image", (2, 4)), ("text", 2)], 0, 7, 0),
                                                       cache=cache)).view(samples, 7, -1)]
        for p in (7, 8):
            step = text_chunk([[ids[s][p]] for s in range(samples)])
            got.append(model.backbone.head(model.hidden_states(step, cache=cache)).view(samples, 1, -1))
        # [text 9..10 (closes A's window) | image B | text 11..12 (opens B's)]
        both = chunk([("text", 2), ("image", (4, 2)), ("text", 2)], 9, 13, 1)
        got.append(model.backbone.head(model.hidden_states(both, cache=cache)).view(samples, 4, -1))
        for p in (13, 14):
            step = text_chunk([[ids[s][p]] for s in range(samples)])
            got.append(model.backbone.head(model.hidden_states(step, cache=cache)).view(samples, 1, -1))
    torch.testing.assert_close(torch.cat(got, dim=1), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("samples", [1, 2])
def test_decoded_tokens_extend_the_casa_window_in_place(samples):
    """A decoding step writes its key into the open window's buffer; only an image opens a
    new buffer (the old per-token concatenation copied the whole window every step)."""
    model = tiny_model(CASA("plus")).eval()
    cache = KVCache(samples)
    g = torch.Generator().manual_seed(0)
    layer = None
    ptrs = []
    with torch.no_grad():
        for frame in range(2):
            pix = torch.randn(16 * samples, 3 * 2 * 14 * 14, generator=g)
            opening = random_packed_batch([[("image", (4, 4)), ("text", 2)]] * samples, seed=frame)
            opening.pixel_values = pix
            model.hidden_states(opening, cache=cache)
            layer = min(cache.win) if layer is None else layer
            for t in range(3):
                model.hidden_states(text_chunk([[5 + t]] * samples), cache=cache)
                ptrs.append([e[0].data_ptr() for e in cache.win[layer]])
            assert cache.window_kv_tokens() == samples * (4 + 2 + 3)
    assert ptrs[0] == ptrs[1] == ptrs[2] and ptrs[3] == ptrs[4] == ptrs[5]
    assert all(a != b for a, b in zip(ptrs[2], ptrs[3]))  # the second frame opened new buffers
