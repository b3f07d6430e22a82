"""Generation controls (`casa.sampling`): greedy as before, sampling as transformers' processors define it."""

import pytest
import torch
from transformers import (LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from casa.fusion import CASA
from casa.generation import GenerationConfig, append_tokens, generate
from casa.sampling import DecayedRepetitionPenaltyLogitsProcessor, choose, logits_processors
from casa.tiny import random_packed_batch, tiny_model
from experiments.strategies import build_fusion

SPEC = [("text", 5), ("image", (2, 4)), ("text", 6)]


def _ctrl_reference(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """The hand-written penalty `casa.generation.next_token` applied before transformers' processors."""
    logits = logits.clone()
    if penalty != 1.0 and seen:
        idx = torch.tensor(sorted(set(seen)))
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def _greedy_reference(model, prompts, steps: int, penalty: float = 1.0) -> list[list[int]]:
    """The old greedy decoding written out: a full uncached forward per step, argmax of the
    (CTRL-penalised) last logits, no stop token."""
    S = prompts.num_samples
    cu = prompts.sample_cu_seqlens.tolist()
    hist = [prompts.input_ids[cu[s]:cu[s + 1]].tolist() for s in range(S)]
    out = [[] for _ in range(S)]
    with torch.no_grad():
        for _ in range(steps):
            logits = model.last_logits(append_tokens(prompts, out, merge=model.vision.spatial_merge_size)).float()
            for s in range(S):
                out[s].append(int(_ctrl_reference(logits[s], hist[s] + out[s], penalty).argmax()))
    return out


@pytest.mark.parametrize("name", ["casa_plus", "insertion", "cross_attention"])
@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_output_is_the_old_greedy(name, penalty):
    model = tiny_model(build_fusion(name)).eval()
    prompts = random_packed_batch([SPEC, [("text", 3), ("image", (2, 2)), ("text", 4)]], seed=4)
    got = generate(model, prompts, GenerationConfig(max_new_tokens=6, repetition_penalty=penalty))
    assert got == _greedy_reference(model, prompts, 6, penalty)


def test_default_config_has_no_processor_and_argmax_is_unchanged():
    assert len(logits_processors(GenerationConfig())) == 0
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert choose(logits, [[1, 2]] * 3, LogitsProcessorList(), sample=False) == logits.argmax(-1).tolist()


def test_decayed_penalty_with_defaults_is_transformers_repetition_penalty():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 40, generator=g) * 3
    ids = torch.randint(0, 40, (2, 25), generator=g)
    ours = DecayedRepetitionPenaltyLogitsProcessor(1.7)(ids, scores.clone())
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(ids, scores.clone())
    torch.testing.assert_close(ours, theirs)


def test_decayed_penalty_weights_recent_repeats_up_to_the_cap():
    # history (oldest first): 7 7 3 7 5 ; window 4 -> 7 3 7 5, ages 3 2 1 0
    ids = torch.tensor([[7, 7, 3, 7, 5]])
    scores = torch.full((1, 10), 2.0)
    scores[0, 3] = -2.0
    proc = DecayedRepetitionPenaltyLogitsProcessor(2.0, window=4, decay=0.5, max_count=1.0)
    out = proc(ids, scores.clone())[0]
    w7 = min(1.0, 0.5 ** 3 + 0.5 ** 1)  # 0.625
    assert out[7].item() == pytest.approx(2.0 / 2.0 ** w7)
    assert out[3].item() == pytest.approx(-2.0 * 2.0 ** 0.25)  # negative scores are multiplied
    assert out[5].item() == pytest.approx(1.0)  # weight 1: the plain penalty
    assert out[0].item() == 2.0
    capped = DecayedRepetitionPenaltyLogitsProcessor(2.0, window=0, decay=1.0, max_count=2.0)(ids, scores.clone())[0]
    assert capped[7].item() == pytest.approx(2.0 / 4.0)  # seen 3 times, counted 2
    assert capped[5].item() == pytest.approx(1.0)


def test_processors_follow_transformers_order_and_sampling_draws_from_their_softmax():
    cfg = GenerationConfig(temperature=0.7, top_k=4, top_p=0.9, repetition_penalty=1.3, no_repeat_ngram_size=2)
    procs = logits_processors(cfg)
    assert [type(p) for p in procs] == [RepetitionPenaltyLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper]
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.2, -1.0, 1.9, 0.0]])
    seen = [6, 1, 6]  # the bigram (6, 1) was seen: after a 6, 1 is banned; 1 and 6 are penalised
    ref = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(2),
                               TemperatureLogitsWarper(0.7), TopKLogitsWarper(4), TopPLogitsWarper(0.9)])
    expected = torch.softmax(ref(torch.tensor([seen]), logits.clone()), -1)[0]
    assert expected[1] == 0 and (expected > 0).sum() <= 4
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.tensor(choose(logits.expand(n, -1), [seen] * n, procs, True, g))  # n samples of one row
    freq = torch.bincount(draws, minlength=8).float() / n
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_sampling_controls_on_the_model():
    model = tiny_model(CASA("plus")).eval()
    prompts = random_packed_batch([SPEC, [("text", 4)]], seed=9)
    greedy = generate(model, prompts, GenerationConfig(max_new_tokens=8))
    assert generate(model, prompts, GenerationConfig(max_new_tokens=8, temperature=1.5, top_k=1, seed=3)) == greedy
    seeded = [generate(model, prompts, GenerationConfig(max_new_tokens=8, temperature=2.0, seed=s)) for s in (0, 0, 1)]
    assert seeded[0] == seeded[1] != seeded[2]
    cfg = GenerationConfig(max_new_tokens=12, no_repeat_ngram_size=2)
    cu = prompts.sample_cu_seqlens.tolist()
    for s, out in enumerate(generate(model, prompts, cfg)):
        seq = prompts.input_ids[cu[s]:cu[s + 1]].tolist() + out
        grams = list(zip(seq, seq[1:]))
        assert len(grams) == len(set(grams))  # no bigram twice, prompt included (transformers' rule)


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2),
                                         ("repetition_decay", 1.5), ("repetition_penalty", 0.0),
                                         ("no_repeat_ngram_size", -1), ("repetition_window", -3)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"GenerationConfig.{field}="):
        GenerationConfig(**{field: value})
