"""Context limits (issue 26 item 7): prompts past the model's positions, and the stream's
text KV cache policy (`casa.cache.ContextPolicy`, `KVCache.trim`)."""

import pytest
import torch

from casa.assistant import Assistant, frame_chunk
from casa.batch import build_batch
from casa.cache import KVCache
from casa.context_limit import ContextPolicy, key_shifter
from casa.generation import GenerationConfig, generate, text_chunk
from casa.processing.template import ChatTemplate
from casa.processing.tokenizer import resolve_tokenizer
from casa.rebuild import DataSettings
from casa.tiny import random_packed_batch, tiny_model
from experiments.strategies import build_fusion


def tiny_assistant(name: str = "casa_plus") -> Assistant:
    tok = resolve_tokenizer("char")
    model = tiny_model(build_fusion(name), num_layers=2).eval()
    return Assistant(model, tok, ChatTemplate("helium", tok), DataSettings(max_pixels=3136, frame_max_pixels=3136))


def test_a_prompt_past_max_position_embeddings_is_an_error():
    model = tiny_model(build_fusion("casa_plus"), num_layers=2).eval()
    model.backbone.config.max_position_embeddings = 20
    long = random_packed_batch([[("text", 10), ("image", (2, 2)), ("text", 15)]], seed=0)
    with pytest.raises(ValueError, match="reaches position 24 .*max_position_embeddings=20"):
        generate(model, long, GenerationConfig(max_new_tokens=2))
    # one that fits generates, and stops (with a warning) when the next token would pass the limit
    model.backbone.config.max_position_embeddings = 30
    with pytest.warns(UserWarning, match="past the model's max_position_embeddings"):
        out = generate(model, long, GenerationConfig(max_new_tokens=20))
    assert len(out[0]) == 30 - 25 + 1  # positions 25..29 fed, the last token never is


@pytest.mark.parametrize("family", ["llama", "helium", "qwen2_5_vl"])
@pytest.mark.parametrize("name", ["casa_plus", "cross_attention"])
def test_trim_re_encodes_kept_keys_at_their_new_positions(family, name):
    """Layer 0's keys depend on a token and its position only, so after a trim they must be
    exactly the keys of a fresh forward over the kept tokens alone: the prompt's first 3 and
    the last 7 (which include the open window: its image keys and its text).

        before: t0..t9 | t10 t11 [I] t12 t13 t14 | t15 | t16       (17 positions)
        kept:   t0 t1 t2 . . . . . . . t10 t11 [I] t12 .. t16      (positions 0..9)"""
    model = tiny_model(build_fusion(name), family=family, num_layers=2).eval()
    ids = list(range(20, 37))
    g = torch.Generator().manual_seed(0)
    pix = torch.randn(4, 3 * 2 * 14 * 14, generator=g)
    cache = KVCache(1)
    with torch.no_grad():
        model.hidden_states(text_chunk([ids[:10]]), cache=cache)
        model.hidden_states(frame_chunk(ids[10:12], ids[12:15], pix, [[1, 2, 2]]), cache=cache)
        for t in ids[15:]:
            model.hidden_states(text_chunk([[t]]), cache=cache)
        assert cache.lengths() == [17] and cache.offset.tolist() == [17]
        assert cache.trim(3, 7, key_shifter(model.backbone)) == 7
        kept = ids[:3] + ids[10:]
        ref = KVCache(1)
        fresh = build_batch(torch.tensor(kept), [0, 10], pixel_values=pix, image_grid_thw=[[1, 2, 2]],
                            image_text_position=[5], merge=2)
        model.hidden_states(fresh, cache=ref)
    assert cache.lengths() == [10] and cache.offset.tolist() == ref.offset.tolist() == [10]
    sa, win = min(cache.sa), min(cache.win)
    for got, want in ((cache.sa[sa][0], ref.sa[sa][0]), (cache.win[win][0], ref.win[win][0])):
        torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)  # keys
        torch.testing.assert_close(got[1], want[1])  # values carry no position
    assert cache.trim(3, 7, key_shifter(model.backbone)) == 0  # nothing past the limit: untouched


def test_trim_refuses_positions_that_are_not_rows():
    model = tiny_model(build_fusion("insertion"), family="qwen2_5_vl", num_layers=2).eval()
    cache = KVCache(1)
    with torch.no_grad():
        model.hidden_states(random_packed_batch([[("text", 4), ("image", (4, 4)), ("text", 6)]], seed=0), cache=cache)
    with pytest.raises(ValueError, match="not the cache lengths"):
        cache.trim(2, 4, key_shifter(model.backbone))


def test_policy_arguments_are_checked():
    with pytest.raises(ValueError, match="keep_first=10 .* keep_last=20 .* max_tokens=25"):
        ContextPolicy(25, 10, 20)
    with pytest.raises(ValueError, match="up to 40 tokens"):
        ContextPolicy(50, 10, 20).make_room(KVCache(1), 40, None)


def test_a_long_stream_keeps_its_cache_bounded_and_its_start_unchanged():
    """Every frame writes 6 caption tokens (no stop token), so the cache passes the limit
    after ~9 frames; with the policy it never holds more than max_tokens and positions stay
    below it; the frames before the first trim are captioned exactly as without a policy."""
    from experiments.stream import synthetic_clips

    assistant = tiny_assistant()
    frames, _ = synthetic_clips(36, seed=1)
    cfg = GenerationConfig(max_new_tokens=6, stop_token_ids=())
    policy = ContextPolicy(max_tokens=120, keep_first=30)
    bounded = list(assistant.stream(frames, config=cfg, wait=False, context=policy))
    free = list(assistant.stream(frames[:16], config=cfg, wait=False, context=False))
    assert max(r.kv_tokens for r in bounded) <= 120 < free[-1].kv_tokens
    first_trim = next(r.index for r in bounded if r.dropped_tokens)
    assert 5 <= first_trim < 16 and sum(r.dropped_tokens > 0 for r in bounded) >= 3
    assert [r.text for r in bounded[:first_trim]] == [r.text for r in free[:first_trim]]
    late = [r.kv_bytes for r in bounded[first_trim:]]
    assert max(late) <= 1.5 * min(late)  # flat: the buffers are rebuilt at the kept size
    # the default policy: the backbone's own limit
    from casa.captioning import CaptionSession

    session = CaptionSession(assistant)
    assert session.context.max_tokens == assistant.model.backbone.config.max_position_embeddings
    assert session.context.keep_first == len(session.layout.first_pre)
