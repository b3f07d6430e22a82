"""Official answer metrics (casa.train.scoring, casa.train.metrics) against the benchmarks'
published definitions and examples; multi-reference answers through the shard format, the
LLaVA converter and the sample meta. (The same scores against lmms-eval's own metric
functions: tests/test_lmms_eval.py, eval lane.)"""

import json
import math

import pytest

from casa.train.metrics import GroupedAnswerMetrics, sample_references
from casa.train.scoring import (anls_score, choice_match, exact_match, parse_choice, relaxed_match, to_number,
                                vqa_accuracy, vqa_normalize)


# ------------------------------------------------------------------------------------- ANLS
def test_anls_is_the_best_accepted_answer():
    # DocVQA lists every accepted answer; the closest one counts
    assert anls_score("1/8", ["0.125", "1/8", "one eighth"]) == 1.0
    assert anls_score("0.12", ["1/8", "0.125"]) == pytest.approx(1 - 1 / 5)
    assert anls_score("0.12", ["1/8"]) == 0.0


def test_anls_threshold_and_normalisation():
    # s = 1 - NL; s < 0.5 is 0 but s = 0.5 counts (DocVQA: `if question_result < threshold: 0`)
    assert anls_score("ab", "ac") == 0.5
    assert anls_score("Acme", "Acme Corp") == 0.0  # NL = 5/9
    assert anls_score("  ACME   corp ", "acme corp") == 1.0  # lower case, whitespace collapsed
    assert anls_score("", "") == 1.0


# ------------------------------------------------------------------------------ VQA accuracy
@pytest.mark.parametrize("humans,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_over_ten_answers(humans, expected):
    # the VQA paper's numbers: an answer given by 1, 2, 3, >=4 of the 10 humans scores 0.3, 0.6, 0.9, 1
    answers = ["yes"] * humans + ["no"] * (10 - humans)
    assert vqa_accuracy("yes", answers) == pytest.approx(expected)


def test_vqa_normalisation_evalai():
    assert vqa_normalize("The two dogs.") == "2 dogs"
    assert vqa_normalize("dont") == "don't"
    assert vqa_normalize("1,000") == "1000"
    assert vqa_normalize("Yes!") == "yes"
    assert vqa_normalize("left-hand side") == "left hand side"  # a hyphen between letters becomes a space
    assert vqa_normalize("3.5") == "3.5"  # a period before a digit stays
    assert vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # a single reference: the normalised exact match (no other annotators to count)
    assert vqa_accuracy("the cat", "Cat") == 1.0


# ------------------------------------------------------------------------------ relaxed accuracy
@pytest.mark.parametrize("pred,ref,ok", [
    ("45%", "0.45", True),        # percentages are fractions (Pix2Struct's _to_float)
    ("45", "45%", False),
    ("1,234", "1200", True),      # thousands separators: 2.8% off
    ("1,234.5", "1234.5", True),
    ("12", "12.5", True),         # 4% off
    ("12", "12.7", False),        # 5.5% off
    ("Yes", "yes", True),         # non-numeric: case-insensitive exact match
    ("0.0", "0", False),          # a zero reference is compared as a string, as in Pix2Struct
    ("0", "0", True),
    ("1,2", "12", False),         # not a thousands separator
])
def test_relaxed_accuracy_chartqa(pred, ref, ok):
    assert relaxed_match(pred, ref) == float(ok)


def test_relaxed_accuracy_multi_reference_and_number_parsing():
    assert relaxed_match("10", ["ten", "10.4"]) == 1.0
    assert to_number("12%") == pytest.approx(0.12) and to_number("abc") is None


# ------------------------------------------------------------------------------ multiple choice
@pytest.mark.parametrize("pred,idx", [
    ("(B)", 1), ("B", 1), ("B.", 1), ("B. square", 1), ("The answer is C", 2),
    ("square", 1), ("It is a Triangle.", 2), ("circle, no: square", 1),  # the option named last wins
    ("I'm not sure", None), ("squares", None), ("", None),
])
def test_parse_choice(pred, idx):
    assert parse_choice(pred, ["circle", "square", "triangle"]) == idx


def test_choice_match_by_text_or_letter():
    opts = ["circle", "square", "triangle"]
    assert choice_match("(C)", "triangle", opts) == 1.0
    assert choice_match("triangle", "C", opts) == 1.0
    assert choice_match("circle", "triangle", opts) == 0.0
    with pytest.raises(ValueError, match="2..26 options"):
        parse_choice("A", ["only"])


# ------------------------------------------------------------------------------ torchmetrics
def test_grouped_metrics_multi_reference_and_choices():
    m = GroupedAnswerMetrics()
    metas = [
        {"task": "docvqa", "answer": "1/8", "answers": ["0.125", "1/8"]},
        {"task": "mc", "answer": "square", "choices": ["circle", "square"]},
        {"task": "mc", "answer": "circle", "choices": ["circle", "square"]},
    ]
    m.update_samples("task", ["0.125", "(B)", "square"], metas)
    out = m.compute()
    assert out["docvqa"]["exact_match"] == 1.0 and out["docvqa"]["anls"] == 1.0
    assert "choice_accuracy" not in out["docvqa"]  # no options: the metric does not apply
    assert out["mc"]["choice_accuracy"] == 0.5
    assert out["mc"]["exact_match"] == 0.0  # "(B)" is not the string "square"
    assert sample_references(metas[0]) == (["0.125", "1/8"], None)
    with pytest.raises(ValueError, match="non-empty list"):
        exact_match("a", [])


def test_mean_score_of_no_answers_is_nan():
    m = GroupedAnswerMetrics(["empty"])
    with pytest.warns(UserWarning):
        value = m.sets["empty"]["exact_match"].compute()
    assert math.isnan(float(value))


# ------------------------------------------------------------------------------ shard format
def test_format_checks_answers_and_choices():
    from data.format import check_answers, make_sample

    msgs = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "square"}]}]
    check_answers({"messages": msgs, "answers": ["square", "a square"], "choices": ["circle", "square"]})
    check_answers({"messages": msgs, "choices": ["circle", "square"]})
    for bad, match in [({"answers": []}, "answers"), ({"answers": ["ok", ""]}, "answers"),
                       ({"choices": ["circle"]}, "choices"), ({"choices": ["a", "a"]}, "choices"),
                       ({"choices": ["circle", "triangle"]}, "none of conversation.choices")]:
        with pytest.raises(ValueError, match=match):
            check_answers({"messages": msgs, **bad})
    with pytest.raises(ValueError, match="answers"):
        make_sample("k", {"messages": msgs, "answers": "square"}, {})


def test_llava_converter_keeps_answers_and_dataset_meta_reads_them(tmp_path):
    from data.converters import convert_llava
    import webdataset as wds
    from PIL import Image

    from casa.processing.template import ChatTemplate
    from casa.processing.tokenizer import resolve_tokenizer
    from data.dataset import SampleProcessor

    Image.new("RGB", (28, 28), "red").save(tmp_path / "a.png")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    records = [{"id": "0", "image": "a.png", "conversations": turns, "answers": ["red"] * 9 + ["crimson"]},
               {"id": "1", "image": "a.png", "conversations": turns, "choices": ["red", "blue"]},
               {"id": "2", "image": "a.png", "conversations": turns, "choices": ["green", "blue"]}]
    (tmp_path / "r.json").write_text(json.dumps(records))
    summary = convert_llava(tmp_path / "r.json", tmp_path, tmp_path / "out", progress=False)
    assert summary.written == 2 and summary.skipped == {"bad_answers": 1}
    raws = list(wds.WebDataset(summary.shards, shardshuffle=False))
    template = ChatTemplate("helium", resolve_tokenizer("char"))
    metas = [SampleProcessor(template, max_pixels=28 * 28)(r).meta for r in raws]
    assert metas[0]["answers"] == ["red"] * 9 + ["crimson"] and "choices" not in metas[0]
    assert metas[1]["choices"] == ["red", "blue"] and "answers" not in metas[1]


# ------------------------------------------------------- the classes validation builds, at their thresholds
def _validation_scores(preds, refs, choices=None):
    """The scores of the metric set validation builds for a key (`GroupedAnswerMetrics()`, every
    class at its default): {metric name: mean over the answers}."""
    metrics = GroupedAnswerMetrics()
    metrics.update(["k"] * len(preds), preds, refs, choices)
    return metrics.compute()["k"]


@pytest.mark.parametrize("pred, counted", [
    ("105", True),     # exactly 5% above the reference: counted (|p - r| / |r| <= 0.05)
    ("95", True),      # exactly 5% below
    ("105.1", False),  # 5.1%: out
    ("94.9", False),
    ("10%", False),    # 0.1, not 10
])
def test_relaxed_accuracy_class_holds_a_5_percent_tolerance(pred, counted):
    """The validation class at its default: a tolerance of 0.5 (or 0.04) would move a row."""
    scores = _validation_scores([pred, "100"], ["100", "100"])  # the second answer is exact: 1
    assert scores["relaxed_accuracy"] == (1.0 if counted else 0.5)
    assert scores["exact_match"] == 0.5  # only the exact answer, whatever the tolerance


@pytest.mark.parametrize("pred, ref, anls", [
    ("ab", "ac", 0.5),                       # s = 1 - 1/2 = 0.5: at the threshold, counted
    ("abcdefXXXXX", "abcdefghijk", 6 / 11),  # s = 1 - 5/11 = 0.545: counted as s
    ("abcdeXXXXXX", "abcdefghijk", 0.0),     # s = 1 - 6/11 = 0.455: just below 0.5, scores 0
])
def test_anls_class_holds_its_0_5_threshold(pred, ref, anls):
    """The validation class at its default: a threshold of 0.3 would count the last case."""
    assert _validation_scores([pred], [ref])["anls"] == pytest.approx(anls)


def test_exact_match_vqa_and_choice_classes_at_their_edges():
    scores = _validation_scores(["  Red ", "reds"], ["red", "red"])
    assert scores["exact_match"] == 0.5  # case and surrounding space do not count; a plural does
    # VQA: 3 of 10 humans -> 0.9, 4 -> 1.0 (min(#humans / 3, 1) averaged over the 10 leave-one-out subsets)
    three, four = ["yes"] * 3 + ["no"] * 7, ["yes"] * 4 + ["no"] * 6
    assert _validation_scores(["yes", "yes"], [three, four])["vqa_accuracy"] == pytest.approx((0.9 + 1.0) / 2)
    # choices: counted only where the sample has options; the letter or the option's text names it
    scores = _validation_scores(["B", "green", "blue"], ["green", "green", "blue"],
                                [["red", "green"], ["red", "green"], None])
    assert scores["choice_accuracy"] == 1.0
    scores = _validation_scores(["A", "green"], ["green", "green"], [["red", "green"], ["red", "green"]])
    assert scores["choice_accuracy"] == 0.5
