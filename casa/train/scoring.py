"""Per-answer scores as the benchmarks define them (pure functions of strings).

A reference is one accepted answer (str) or all of them (list: DocVQA's accepted answers,
TextVQA's 10 human answers). Every score takes the best over the references, except VQA
accuracy, which counts them.

    exact_match      normalised string equality (`normalize`) with any reference
    relaxed_match    ChartQA / Pix2Struct relaxed accuracy: a number within 5% of the
                     reference ("45%" is 0.45; "1,234" is 1234), otherwise a case-insensitive
                     exact match
    anls_score       DocVQA / InfoVQA ANLS: 1 - normalised Levenshtein distance to the closest
                     accepted answer, 0 below the 0.5 threshold
    vqa_accuracy     VQA / TextVQA accuracy: min(#humans who gave the answer / 3, 1), averaged
                     over the 10 leave-one-annotator-out subsets, after the EvalAI answer
                     normalisation (`vqa_normalize`)
    parse_choice     the option a free-form answer picks (MMMU's parsing rules)
    choice_match     1 if the parsed option is the reference, 0 otherwise

Sources: ANLS, Biten et al. 2019 (Scene Text VQA) and the DocVQA evaluation; relaxed accuracy,
Methani et al. 2020 as implemented in Pix2Struct / Qwen-VL's evaluate_vqa.py; VQA accuracy and
its normalisation, the VQA evaluation code as run on EvalAI (mmf's EvalAIAnswerProcessor); choice
parsing, MMMU's eval_utils.parse_multi_choice_response. Where we deviate, the function says so.
"""

from __future__ import annotations

import re
from typing import Sequence

from torchmetrics.functional.text import edit_distance

Reference = str | Sequence[str]


def references(ref: Reference) -> list[str]:
    """A reference -> its accepted answers (a non-empty list of str)."""
    refs = [ref] if isinstance(ref, str) else list(ref)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"a reference must be a str or a non-empty list of str, got {ref!r}")
    return refs


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, a final period dropped (our exact match)."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text[:-1] if text.endswith(".") else text


def exact_match(pred: str, ref: Reference) -> float:
    p = normalize(pred)
    return float(any(p == normalize(r) for r in references(ref)))


# ------------------------------------------------------------------------- relaxed accuracy
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?")


def to_number(text: str) -> float | None:
    """Pix2Struct's `_to_float`: "45%" -> 0.45, "12.5" -> 12.5, else None. Also reads
    thousands separators ("1,234.5" -> 1234.5), which charts print and Pix2Struct's parser
    does not (it would compare "1,234" as a string)."""
    t = text.strip()
    percent = t.endswith("%")
    t = t.rstrip("%") if percent else t
    if _THOUSANDS.fullmatch(t):
        t = t.replace(",", "")
    try:
        value = float(t)
    except ValueError:
        return None
    return value / 100.0 if percent else value


def relaxed_match(pred: str, ref: Reference, tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy: max over the references of
    |p - r| / |r| <= tolerance when both are numbers and r != 0, else p.lower() == r.lower()
    (surrounding whitespace ignored)."""
    p = to_number(pred)
    for r in references(ref):
        q = to_number(r)
        if p is not None and q:  # a zero reference falls back to the string test, as in Pix2Struct
            ok = abs(p - q) / abs(q) <= tolerance
        else:
            ok = pred.strip().lower() == r.strip().lower()
        if ok:
            return 1.0
    return 0.0


# ------------------------------------------------------------------------------------- ANLS
def _anls_normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls_score(pred: str, ref: Reference, threshold: float = 0.5) -> float:
    """DocVQA's ANLS for one question: s = 1 - min over accepted answers of
    lev(p, a) / max(|p|, |a|) (normalised strings), and 0 when s < threshold (s = 0.5 counts).

    Lengths are those of the normalised strings, as in the DocVQA evaluation; lmms-eval's
    copy measures the raw strings, which differs only when an answer has extra whitespace."""
    p = _anls_normalize(pred)
    distances = []
    for r in map(_anls_normalize, references(ref)):
        longest = max(len(p), len(r))
        distances.append(float(edit_distance([p], [r], reduction="none")[0]) / longest if longest else 0.0)
    s = 1.0 - min(distances)
    return s if s >= threshold else 0.0


# ------------------------------------------------------------------------------ VQA accuracy
# The EvalAI normalisation, step by step (`vqa_normalize`). Contractions: the official table maps
# a contraction written without one of its apostrophes to the contraction; it is generated here
# from the contractions themselves, with the official table's two omissions (she's, let's) and its
# one odd entry (somebody'd -> somebodyd). Its capitalised entries (I'm, I've, I'd've) never match
# the lower-cased words they are compared with, in the official code and here alike.
_CONTRACTED = (
    "'ow's'at 'twas I'd've I'm I've ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't "
    "hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am might've "
    "mightn't mightn't've must've mustn't needn't not've o'clock oughtn't shan't she'd've should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd "
    "who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'd've "
    "y'all'll you'd you'd've you'll you're you've").split()
VQA_CONTRACTIONS = {c[:i] + c[i + 1:]: c for c in _CONTRACTED for i, ch in enumerate(c) if ch == "'"}
VQA_CONTRACTIONS["somebody'd"] = "somebodyd"
VQA_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
VQA_NUMBERS["none"] = "0"
VQA_ARTICLES = ("a", "an", "the")
VQA_PUNCTUATION = tuple(';/[]"{}()=+\\_->,<@`?!')
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
# the official pattern is r"(?!<=\d)(\.)(?!\d)": its first group is a look-AHEAD for "<=" and a
# digit, always true before a ".", so it strips every period not followed by a digit
_PERIOD = re.compile(r"\.(?!\d)")


def vqa_normalize(text: str) -> str:
    """EvalAI's answer processing: lower case; drop "," and "?"; split "'s"; punctuation
    removed (next to a space, or anywhere when the text has a 1,000-style comma) or replaced
    by a space; periods not followed by a digit removed; number words 0-10 as digits;
    articles dropped; apostrophe-less contractions restored."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    original, comma = text, _DIGIT_COMMA.search(text) is not None
    for p in VQA_PUNCTUATION:  # tested against the text before any replacement, as in the official code
        text = text.replace(p, "" if (p + " " in original or " " + p in original or comma) else " ")
    # the official code passes re.UNICODE as sub's `count`: at most 32 periods are removed
    text = _PERIOD.sub("", text, count=32)
    words = [VQA_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_accuracy(pred: str, ref: Reference) -> float:
    """mean over annotators i of min(1, #(other annotators j != i whose answer == pred) / 3),
    answers and prediction normalised by `vqa_normalize` (TextVQA / VQAv2 on 10 answers).

    With a single reference there are no other annotators: it is the normalised exact match
    (lmms-eval's formula would give 0)."""
    answers = [vqa_normalize(a) for a in references(ref)]
    p = vqa_normalize(pred)
    if len(answers) == 1:
        return float(p == answers[0])
    matches = sum(a == p for a in answers)
    # leaving annotator i out removes one match when i gave the answer
    return sum(min(1.0, (matches - (a == p)) / 3) for a in answers) / len(answers)


# -------------------------------------------------------------------------- multiple choice
def option_letters(n: int) -> list[str]:
    if not 2 <= n <= 26:
        raise ValueError(f"a multiple-choice question needs 2..26 options, got {n}")
    return [chr(ord("A") + i) for i in range(n)]


def parse_choice(pred: str, choices: Sequence[str]) -> int | None:
    """The option (index into `choices`) a free-form answer picks, or None.

    MMMU's order: "(B)"; else "B " or "B." as a word of the answer; else the text of an option.
    When several options are found, the one mentioned last wins. Two deviations, both for
    models that answer with the option's text: the option text is looked for in answers of
    any length (MMMU only in answers longer than five words), as a whole word; and an answer
    naming no option is None (scored wrong), where MMMU draws a random letter."""
    letters = option_letters(len(choices))
    r = " " + pred.strip().strip(",.!?;:'") + " "
    found = {i: r.rfind(f"({x})") for i, x in enumerate(letters) if f"({x})" in r}
    if not found:
        found = {i: r.rfind(f" {x}") for i, x in enumerate(letters) if f" {x} " in r or f" {x}." in r}
    if not found:
        low = r.lower()
        for i, c in enumerate(choices):
            hits = [m.start() for m in re.finditer(rf"(?<!\w){re.escape(c.strip().lower())}(?!\w)", low)] if c.strip() else []
            if hits:
                found[i] = hits[-1]
    return max(found, key=found.get) if found else None


def choice_match(pred: str, ref: Reference, choices: Sequence[str]) -> float:
    """1 if the option `pred` picks is a reference (by its text or its letter), else 0."""
    i = parse_choice(pred, choices)
    if i is None:
        return 0.0
    accepted = {normalize(r) for r in references(ref)}
    return float(normalize(choices[i]) in accepted or option_letters(len(choices))[i].lower() in accepted)
