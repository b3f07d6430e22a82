"""Teacher-forced answer-set scoring (`casa.answer_set`) against references: the
log-likelihood of each candidate from one plain forward over [prompt | candidate] with its
own pixels (no shared embeddings, no packing), and greedy generation on a confident model."""

from __future__ import annotations

import pytest
import torch

from casa.answer_set import argmax_answers, candidate_logprobs, candidate_rows, tokenize_candidates
from casa.batch import build_batch, collate_packed
from casa.fusion import CASA, CrossAttention, GatedCrossAttention, Insertion, QFormer
from casa.generation import GenerationConfig, generate, truncate_samples
from casa.tiny import TINY_VOCAB, tiny_model

PATCH = 3 * 2 * 14 * 14


def eval_sample(seed: int, pre: int, grid: tuple[int, int], post: int, answer: int, images: int = 1):
    """[pre text][image][post text][answer] with meta prompt_len (the answer starts after post)."""
    g = torch.Generator().manual_seed(seed)
    n = pre + post + answer
    ids = torch.randint(0, TINY_VOCAB, (n,), generator=g)
    h, w = grid
    pix = torch.randn(images * h * w, PATCH, generator=g)
    pos = [pre + i for i in range(images)]  # consecutive images share a window
    labels = torch.full((n,), -100)
    labels[pre + post - 1:n - 1] = ids[pre + post:]
    row = build_batch(ids, [0, n], pixel_values=pix, image_grid_thw=[[1, h, w]] * images, image_text_position=pos,
                      merge=2, labels=labels, meta=[{"key": f"s{seed}", "prompt_len": pre + post}])
    return row, (ids[:pre + post], pix, [[1, h, w]] * images, pos)


def reference_logprob(model, prompt, candidate: list[int]) -> float:
    """One sample [prompt | candidate], its own pixels, a plain forward: sum of log p(candidate)."""
    ids, pix, grids, pos = prompt
    n, c = len(ids), torch.tensor(candidate)
    full = torch.cat([ids, c])
    labels = torch.full((len(full),), -100)
    labels[n - 1:n - 1 + len(c)] = c
    batch = build_batch(full, [0, len(full)], pixel_values=pix, image_grid_thw=grids, image_text_position=pos,
                        merge=2, labels=labels)
    with torch.no_grad():
        logp = model(batch).logits.float().log_softmax(-1)  # [T, V]
    t = labels != -100
    return float(logp[t].gather(-1, labels[t][:, None]).sum())


FUSIONS = {"casa_plus": lambda: CASA("plus"), "casa_before": lambda: CASA("before"),
           "casa_replace": lambda: CASA("replace", placement="every_k", k=2), "cross_attention": CrossAttention,
           "gated_cross_attention": GatedCrossAttention, "insertion": Insertion,
           "qformer": lambda: QFormer(num_queries=2, depth=1, heads=2)}


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_candidate_logprobs_equal_a_plain_forward_per_candidate(name):
    model = tiny_model(FUSIONS[name](), hidden_size=32, num_layers=2).eval()
    if name == "gated_cross_attention":  # a zero gate would make the images irrelevant: open it
        for n, p in model.named_parameters():
            if "gate" in n:
                torch.nn.init.constant_(p, 0.7)
    # three samples: different prompt lengths, one with two images in a window, one image of 16 tokens
    rows = [eval_sample(0, 3, (4, 4), 5, 2), eval_sample(1, 2, (2, 4), 3, 3, images=2), eval_sample(2, 4, (8, 8), 2, 1)]
    batch = collate_packed([r for r, _ in rows])
    g = torch.Generator().manual_seed(7)
    candidates = [[torch.randint(0, TINY_VOCAB, (L,), generator=g).tolist() for L in lens]
                  for lens in ([1, 3, 2], [2, 2], [4, 1, 1, 3])]
    got = candidate_logprobs(model, batch, candidates)
    want = [[reference_logprob(model, p, c) for c in cands] for (_, p), cands in zip(rows, candidates)]
    assert [len(x) for x in got] == [3, 2, 4]
    torch.testing.assert_close(torch.tensor([v for x in got for v in x]), torch.tensor([v for x in want for v in x]),
                               rtol=1e-4, atol=1e-4)
    # the images matter: scoring against other pixels changes the numbers (the gathered embeddings are used)
    swapped = [r for r, _ in rows]
    swapped[0] = eval_sample(9, 3, (4, 4), 5, 2)[0]
    swapped[0].input_ids[:] = rows[0][0].input_ids
    other = candidate_logprobs(model, collate_packed(swapped), candidates)
    assert max(abs(a - b) for a, b in zip(other[0], got[0])) > 1e-4


def test_argmax_agrees_with_greedy_generation_on_a_confident_model():
    model = tiny_model(CASA("plus"), hidden_size=32, num_layers=2).eval()
    with torch.no_grad():
        model.backbone.lm_head.weight.mul_(300.0)  # near one-hot next-token distributions
    rows = [eval_sample(s, 3, (4, 4), 4, 3) for s in range(4)]
    batch = collate_packed([r for r, _ in rows])
    prompts = truncate_samples(batch, [m["prompt_len"] for m in batch.meta])
    greedy = generate(model, prompts, GenerationConfig(max_new_tokens=3, stop_token_ids=()))
    candidates, answers = [], []
    for s, gen in enumerate(greedy):
        alt = [[(t + 1 + k) % TINY_VOCAB if i == k % 3 else t for i, t in enumerate(gen)] for k in range(3)]
        cands = alt[:s % 3] + [gen] + alt[s % 3:]  # the greedy answer at a different place per sample
        candidates.append(cands)
        answers.append([str(c) for c in cands])
    scores = candidate_logprobs(model, batch, candidates)
    assert argmax_answers(scores, answers) == [str(g) for g in greedy]
    for s, lp in enumerate(scores):
        assert lp[s % 3] > -0.5  # confident: the greedy answer has nearly all the mass


def test_candidate_rows_layout():
    """Labels sit on the candidate tokens (pre-shifted), positions continue the prompt's, and
    every (sample, candidate) keeps its own copy of the sample's image slots:

        prompt  p0 p1 [img 4 tok] p2 p3 | cand c0 c1 end
        labels  .  .              .  c0 | c1 end .
    """
    row, _ = eval_sample(0, 2, (4, 4), 2, 1)
    prompts = truncate_samples(row, [4])
    rows, index = candidate_rows(prompts, [[[5, 6, 9], [7, 9]]], merge=2)
    assert rows.sample_cu_seqlens.tolist() == [0, 7, 13]
    assert rows.labels.tolist() == [-100, -100, -100, 5, 6, 9, -100, -100, -100, -100, 7, 9, -100]
    assert rows.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5]
    assert rows.image_text_position.tolist() == [2, 9]
    assert index.tolist() == [0, 1, 2, 3] * 2
    with pytest.raises(ValueError, match="2 candidate lists for 1 prompts"):
        candidate_rows(prompts, [[[1]], [[2]]], merge=2)


def test_tokenize_candidates_appends_the_end_token_and_refuses_collisions():
    enc = {"red": [1, 2], "blue": [3]}.__getitem__
    assert tokenize_candidates(["red", "blue"], enc, [9]) == [[1, 2, 9], [3, 9]]
    with pytest.raises(ValueError, match="distinct"):
        tokenize_candidates(["red", "red"], enc, [9])


@pytest.mark.slow  # a 2-step fit + evaluate: ~18 s
def test_evaluate_scores_closed_tasks_as_the_per_candidate_reference(tmp_path, capsys):
    """`experiments.evaluate --no-generate`: every closed-answer sample's pick is the argmax of
    the independent per-candidate path (`choice_logprobs`: each candidate re-processed as the
    sample's answer, its own image encoding, `Assistant.answer_logprobs`), and the accuracy and
    chance levels are those of the picks and references."""
    import json

    from casa.assistant import load
    from data.datamodule import expand_shards
    from data.synth import ensure_synth
    from data.synth_tasks import ANSWER_SETS
    from experiments.evaluate import choice_logprobs, main, sample_processor, split_stream
    from tests.helpers import fit_demo_tiny

    tasks = ["color", "count", "dot_color", "read_digit"]
    synth = ensure_synth(tmp_path / "synth", train=16, val=4, test=24, tasks=tasks,
                         image_size={"coarse": 56, "fine": 56, "read": 56}, progress=False)
    ckpt = fit_demo_tiny(tmp_path, synth)
    capsys.readouterr()  # the fit's own output
    pred_file = tmp_path / "pred.jsonl"
    assert main(["--ckpt", str(ckpt), "--data", str(synth), "--json", "--no-generate", "--threads", "1",
                 "--predictions", str(pred_file)]) == 0
    out = json.loads(capsys.readouterr().out)
    preds = [json.loads(line) for line in pred_file.read_text().splitlines()]
    assert len(preds) == 24 and all(p["prediction"] is None for p in preds)  # nothing generated
    assert set(out["tasks"]) == set(tasks) and all(set(v) == {"answer_set_accuracy"} for v in out["tasks"].values())

    assistant = load(ckpt)
    raws = list(split_stream(assistant, expand_shards(str(synth), "test")).raw_samples())
    by_key = {p["key"]: p for p in preds}
    processor = sample_processor(assistant)
    for raw in raws:
        conv = json.loads(raw["json"])
        options = list(ANSWER_SETS[conv["task"]])
        lp = choice_logprobs(assistant, processor, [raw], [options], per_batch=16)[0]
        assert by_key[raw["__key__"]]["answer_set_prediction"] == options[max(range(len(options)), key=lp.__getitem__)]
    for task in tasks:
        mine = [p for p in preds if p["task"] == task]
        acc = sum(p["answer_set_prediction"] == p["reference"] for p in mine) / len(mine)
        assert out["tasks"][task]["answer_set_accuracy"] == pytest.approx(acc)
        refs = [p["reference"] for p in mine]
        assert out["chance"][task] == {"uniform": pytest.approx(1 / len(ANSWER_SETS[task])), "items": 6,
                                       "prior": pytest.approx(max(map(refs.count, refs)) / 6)}
    # --step0: the run's config under its seed, untrained: the same scoring, another model
    assert main(["--ckpt", str(ckpt), "--data", str(synth), "--json", "--no-generate", "--threads", "1",
                 "--step0", "--position-loss", "12"]) == 0
    start = json.loads(capsys.readouterr().out)
    assert start["loss"]["answer_tokens"] == out["loss"]["answer_tokens"]
    assert start["loss"]["answer_loss"] != out["loss"]["answer_loss"]
    # v2's tags keep answers within 12 positions of the image; v1's long questions do not
    assert set(start["position_loss"]) == {"dot_color", "read_digit"}
    assert all(len(v["ppl_by_position"]) == 12 for v in start["position_loss"].values())
