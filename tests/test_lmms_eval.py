"""lmms-eval's own evaluator on the `casa` model (the eval lane: `make test-eval`, marker `eval`).

One tiny CASA⊕ checkpoint (two training steps) and the local tasks built from the synthetic
test split (`experiments.lmms_tasks.build`). `python -m lmms_eval` runs as a user runs it
(entry-point discovery, --include_path, no hub); its per-sample answers and per-task scores
are compared with `experiments.evaluate` on the same samples. Our metric functions are
compared with lmms-eval's on the same predictions."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.eval
pytest.importorskip("lmms_eval", reason="the eval lane (`make test-eval`) installs lmms-eval")

from tests.helpers import fit_demo_tiny, tiny_synth  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LMMS_TASKS = ("casa_synth_image", "casa_synth_video", "casa_synth_choice")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """-> {"ckpt", "tasks", "shards", "root"}: a two-step checkpoint and the local tasks."""
    from experiments.lmms_tasks.build import build

    root = tmp_path_factory.mktemp("lmms")
    synth = tiny_synth(root)
    ckpt = fit_demo_tiny(root, synth)
    counts = build(synth, root / "lmms", "test")
    assert all(counts[t] >= 3 for t in LMMS_TASKS), counts
    out = {"root": root, "ckpt": ckpt, "tasks": root / "lmms" / "tasks",
           "shards": root / "lmms" / "shards"}
    _plant_answers(out)
    return out


def _plant_answers(run) -> None:
    """Make the scores of a two-step model say something: the model's own greedy answer becomes
    an accepted answer of every third document, a near miss of it (last two characters
    changed: ANLS about 0.95) of the next one; every other multiple-choice question takes the
    model's likeliest option as its answer. Written into the shard and the task files alike."""
    from collections import Counter

    import webdataset as wds

    from casa.assistant import load
    from data.format import ShardWriter
    from data.packing import build_row
    from experiments.evaluate import choice_logprobs, sample_processor

    a = load(run["ckpt"])
    processor = sample_processor(a)
    (shard,) = run["shards"].glob("*.tar")
    raws = list(wds.WebDataset(str(shard), shardshuffle=False))
    convs = {r["__key__"]: json.loads(r["json"]) for r in raws}
    free = [r for r in raws if not convs[r["__key__"]].get("choices")]
    preds = a.answer_batch(build_row([processor(r) for r in free]), a.generation_config(max_new_tokens=48))
    seen = Counter()  # documents per task so far
    for r, p in zip(free, preds):
        conv = convs[r["__key__"]]
        i, seen[conv["task"]] = seen[conv["task"]], seen[conv["task"]] + 1
        if i % 3 < 2 and p.strip():
            accepted = conv.get("answers") or [conv["messages"][-1]["content"][0]["text"]]
            conv["answers"] = accepted + [p.strip() if i % 3 == 0 else p.strip()[:-2] + "zz"]
    mc = [r for r in raws if convs[r["__key__"]].get("choices")]
    for i, (r, lps) in enumerate(zip(mc, choice_logprobs(a, processor, mc, [convs[r["__key__"]]["choices"] for r in mc], 8))):
        if i % 2 == 0:
            conv = convs[r["__key__"]]
            conv["messages"][-1]["content"][0]["text"] = conv["choices"][max(range(len(lps)), key=lps.__getitem__)]
    shard.unlink()
    with ShardWriter(run["shards"], "test") as w:
        for r in raws:
            w.write({**r, "json": json.dumps(convs[r["__key__"]]).encode()})
    for task in LMMS_TASKS:
        f = run["tasks"] / f"{task}.jsonl"
        docs = [json.loads(line) for line in f.read_text().splitlines()]
        for d in docs:
            conv = convs[d["id"]]
            d["answer"] = conv["messages"][-1]["content"][0]["text"]
            d["answers"] = conv.get("answers") or [d["answer"]]
        f.write_text("".join(json.dumps(d) + "\n" for d in docs))


def _lmms_eval(run, out: Path, launcher: tuple[str, ...] = ("-m",)) -> tuple[dict, dict[str, list[dict]]]:
    """`python -m lmms_eval` as a user runs it -> (results, {task: logged samples}). `launcher`:
    what runs the module (e.g. torchrun's arguments, then "-m")."""
    cmd = [sys.executable, *launcher, "lmms_eval", "--model", "casa", "--model_args", f"pretrained={run['ckpt']}",
           "--include_path", str(run["tasks"]), "--tasks", ",".join(LMMS_TASKS), "--batch_size", "4",
           "--log_samples", "--output_path", str(out), "--verbosity", "WARNING"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=run["root"], env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = list(out.rglob("*_results.json"))  # lmms-eval exits 0 after some errors: the results file tells
    assert len(results) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    results_file = results[0]
    samples = {t: [json.loads(line) for f in out.rglob(f"*_samples_{t}.jsonl") for line in f.read_text().splitlines()]
               for t in LMMS_TASKS}
    return json.loads(results_file.read_text()), samples


@pytest.fixture(scope="module")
def single(run, tmp_path_factory):
    """lmms-eval in one process over the three tasks -> (results, samples)."""
    return _lmms_eval(run, tmp_path_factory.mktemp("single"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _our_evaluation(run, predictions: Path) -> dict:
    from experiments.evaluate import main

    buf = io.StringIO()
    stdout, sys.stdout = sys.stdout, buf
    try:
        assert main(["--ckpt", str(run["ckpt"]), "--data", str(run["shards"]), "--json", "--no-stream",
                     "--predictions", str(predictions), "--threads", "1"]) == 0
    finally:
        sys.stdout = stdout
    return json.loads(buf.getvalue())


def _request(kind: str, args: tuple, idx: int = 0):
    """An lmms-eval request as its evaluator builds them (args: context, continuation or
    generation kwargs, doc_to_visual, doc_id, task, split)."""
    from lmms_eval.api.instance import Instance

    return Instance(kind, args, idx, metadata={"task": args[4], "doc_id": args[3], "repeats": 1})


def test_lmms_eval_scores_equal_experiments_evaluate(run, single, tmp_path):
    """The same samples through lmms-eval's evaluator and through `experiments.evaluate`: the
    same answers, sample by sample, and the same per-task scores. Metric definitions:
    exact_match (lmms-eval: case-insensitive equality with any accepted answer, on the
    stripped answer; ours also drops a final period: equal on these answers), anls (both the
    DocVQA definition over all accepted answers), acc of the multiple-choice task = our
    choice_loglikelihood (the likeliest option, `Assistant.answer_logprobs`)."""
    results, samples = single
    ours = _our_evaluation(run, tmp_path / "predictions.jsonl")
    predictions = {p["key"]: p for p in map(json.loads, (tmp_path / "predictions.jsonl").read_text().splitlines())}
    for task in LMMS_TASKS:
        docs = [json.loads(line) for line in (run["tasks"] / f"{task}.jsonl").read_text().splitlines()]
        assert len(samples[task]) == len(docs) == len([p for p in predictions.values() if p["task"] == task]) >= 3
        if task == "casa_synth_choice":
            continue
        for s in samples[task]:  # doc_id: the document's line in the task file
            assert s["filtered_resps"] == predictions[docs[s["doc_id"]]["id"]]["prediction"].strip(), (task, s["doc_id"])
        got, mine = results["results"][task], ours["tasks"][task]
        assert 0 < mine["exact_match"] < 1 and 0 < mine["anls"] < 1, mine  # the planted answers count
        assert got["exact_match,none"] == pytest.approx(mine["exact_match"], abs=1e-6), task
        assert got["anls,none"] == pytest.approx(mine["anls"], abs=1e-6), task
    acc, mine = results["results"]["casa_synth_choice"]["acc,none"], ours["tasks"]["casa_synth_choice"]
    assert 0 < mine["choice_loglikelihood"] and acc == pytest.approx(mine["choice_loglikelihood"], abs=1e-6)
    # the options are really ranked: lmms-eval asked one log-likelihood per option
    assert all(len(s["filtered_resps"]) == 4 for s in samples["casa_synth_choice"])


def test_loglikelihood_ranks_like_our_choice_scoring(run):
    """lmms-eval's loglikelihood requests for one document (one per option, batched) return
    -log p of each option as the answer, equal to `experiments.evaluate.choice_logprobs`."""
    import webdataset as wds

    from experiments.evaluate import choice_logprobs
    from experiments.lmms_eval_casa import Casa
    from experiments.lmms_tasks.utils import doc_to_visual

    model = Casa(pretrained=str(run["ckpt"]), batch_size=3)
    doc = json.loads((run["tasks"] / "casa_synth_choice.jsonl").read_text().splitlines()[0])
    model.task_dict = {"t": {"test": [doc]}}
    reqs = [_request("loglikelihood", (doc["question"], c, doc_to_visual, 0, "t", "test"), i)
            for i, c in enumerate(doc["choices"])]
    got = [r.text for r in model.loglikelihood(reqs)]  # GenerationResult: lmms-eval passes .text through
    raw = next(r for r in wds.WebDataset(sorted(map(str, run["shards"].glob("*.tar"))), shardshuffle=False)
               if r["__key__"] == doc["id"])
    (expected,) = choice_logprobs(model.assistant, model.processor, [raw], [doc["choices"]], per_batch=2)
    assert [nll for nll, _ in got] == pytest.approx([-lp for lp in expected], rel=1e-5, abs=1e-5)
    assert all(nll > 0 for nll, _ in got)


def test_generate_until_multi_image_video_file_and_stop_strings(run, tmp_path):
    """Visuals lmms-eval tasks hand over: several PIL images (one prompt, as `Assistant.chat`
    lays them out), an mp4 file (decoded with PyAV); `until` cuts the answer."""
    import av
    import numpy as np
    from PIL import Image

    from experiments.lmms_eval_casa import Casa, conversation, decode_video

    model = Casa(pretrained=str(run["ckpt"]), batch_size=2, max_new_tokens=6)
    a, b = Image.new("RGB", (56, 56), "red"), Image.new("RGB", (56, 56), "blue")
    mp4 = tmp_path / "clip.mp4"
    with av.open(str(mp4), "w") as c:
        s = c.add_stream("libx264", rate=2)
        s.width = s.height = 56
        s.pix_fmt = "yuv420p"
        for i in range(6):
            frame = np.zeros((56, 56, 3), np.uint8)
            frame[:, i * 9:i * 9 + 9] = 255
            c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(s.encode())
    frames, times = decode_video(mp4)
    assert len(frames) == 6 and times == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    docs = [{"v": [a, b]}, {"v": [str(mp4)]}, {"v": [a]}]
    model.task_dict = {"t": {"test": docs}}
    visual = lambda doc: doc["v"]  # noqa: E731
    greedy = {"max_new_tokens": 6, "temperature": 0, "do_sample": False}
    reqs = [_request("generate_until", ("Which colours?", greedy, visual, 0, "t", "test")),
            _request("generate_until", ("Which way?", greedy, visual, 1, "t", "test")),
            _request("generate_until", ("Which colours?", {**greedy, "until": ["\x00"]}, visual, 0, "t", "test"))]
    out = model.generate_until(reqs)
    cfg = model.assistant.generation_config(max_new_tokens=6)
    assert out[0] == model.assistant.chat("Which colours?", images=[a, b], config=cfg)
    assert out[2] == out[0]  # another generation config (its own batch), no stop string in the answer
    assert isinstance(out[1], str) and out[1] == model.generate_until(reqs[1:2])[0]  # batched = alone
    assert len(out[0]) >= 2, out[0]
    stop = out[0][-2:]  # cut where it first occurs
    (cut,) = model.generate_until([_request("generate_until", ("Which colours?", {**greedy, "until": [stop]}, visual, 0,
                                                                "t", "test"))])
    assert cut == out[0][:out[0].index(stop)]
    conv, files = conversation("q", [a, b], ".", 2.0)
    assert [c["type"] for c in conv["messages"][0]["content"]] == ["image", "image", "text"] and len(files) == 2
    with pytest.raises(ValueError, match="cannot use a visual"):
        conversation("q", [{"array": [0.0]}], ".", 2.0)
    with pytest.raises(ValueError, match="num_beams"):
        model.generation_config({"num_beams": 4})


def test_torchrun_two_ranks_equal_one(run, single, tmp_path):
    """`torchrun --nproc_per_node 2 -m lmms_eval` on CPU (gloo): each rank answers its share of
    the documents, rank 0 gathers them; every document's answer and every score equal the
    single-process run's."""
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), "-m")
    results, samples = _lmms_eval(run, tmp_path / "two", launcher)
    one_results, one_samples = single
    for task in LMMS_TASKS:
        two = {s["doc_id"]: s["filtered_resps"] for s in samples[task]}
        one = {s["doc_id"]: s["filtered_resps"] for s in one_samples[task]}
        assert len(two) == len(samples[task]) and sorted(two) == sorted(one) and len(one) >= 3, task  # each doc once
        if task == "casa_synth_choice":  # per option [-log p, greedy?]; other batch rows change float32 sums: approx
            for d in one:
                assert [float(nll) for nll, _ in two[d]] == pytest.approx([float(nll) for nll, _ in one[d]], rel=1e-3)
                assert [g for _, g in two[d]] == [g for _, g in one[d]]
        else:
            assert two == one, task
        for metric, value in one_results["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert results["results"][task][metric] == pytest.approx(value, abs=1e-6), (task, metric)


def test_generate_until_multi_round(run):
    """Round 0 is the request's context and visuals; each next round's prompt comes from the task's
    doc_to_text (given the answers so far), until it says done. Requests of different lengths
    run in one batch; each round's answer is the model's answer to that round's prompt alone."""
    from PIL import Image

    from experiments.lmms_eval_casa import Casa

    model = Casa(pretrained=str(run["ckpt"]), batch_size=2, max_new_tokens=5, max_rounds=3)
    red, blue = Image.new("RGB", (56, 56), "red"), Image.new("RGB", (84, 56), "blue")
    docs = [{"v": [red], "rounds": 3}, {"v": [blue], "rounds": 1}]
    model.task_dict = {"t": {"test": docs}}
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None,
                    lmms_eval_specific_kwargs=None):
        seen.append((doc["rounds"], round_idx, list(previous_output), previous_round_info))
        done = round_idx >= doc["rounds"]
        return [blue] if round_idx == 1 else None, f"Round {round_idx}: and now?", done, previous_output, round_idx

    greedy = {"max_new_tokens": 5, "temperature": 0}
    visual = lambda d: d["v"]  # noqa: E731
    reqs = [_request("generate_until_multi_round", ("What colour?", greedy, visual, doc_to_text, i, "t", "test"), i)
            for i in range(2)]
    out = model.generate_until_multi_round(reqs)
    assert [len(o) for o in out] == [3, 1] and all(isinstance(a, str) for o in out for a in o)
    cfg = model.assistant.generation_config(max_new_tokens=5)
    assert out[0][0] == model.assistant.chat("What colour?", images=[red], config=cfg)
    assert out[1][0] == model.assistant.chat("What colour?", images=[blue], config=cfg)
    assert out[0][1] == model.assistant.chat("Round 1: and now?", images=[blue], config=cfg)
    assert out[0][2] == model.assistant.chat("Round 2: and now?", config=cfg)  # no visual this round
    assert (3, 2, out[0][:2], 1) in seen and (1, 1, out[1][:1], None) in seen  # answers so far, the task's info
    never_done = lambda doc, **kw: (None, "more", False, kw["previous_output"], None)  # noqa: E731
    forever = [_request("generate_until_multi_round", ("Q", greedy, visual, never_done, 0, "t", "test"))]
    with pytest.raises(ValueError, match="max_rounds=3"):
        model.generate_until_multi_round(forever)


def test_image_size_model_args(run):
    """max_pixels / min_pixels in model_args set the image pixel range (the tiny run's is 56x56 at
    most: 4 visual tokens; 112x112 allowed: 16 for a large image); a bad value is an error naming
    the field, the value and the valid range."""
    from PIL import Image

    from experiments.lmms_eval_casa import MIN_TOKEN_PIXELS, Casa, pixel_range

    big = Image.new("RGB", (224, 224), "green")
    docs = [{"v": [big]}]
    tokens = {}
    for mp in (None, "12544"):  # lmms-eval hands model_args values over parsed or as strings
        model = Casa(pretrained=str(run["ckpt"]), max_pixels=mp, min_pixels=784 if mp else None)
        model.task_dict = {"t": {"test": docs}}
        req = _request("generate_until", ("Q", {}, lambda d: d["v"], 0, "t", "test"))
        tokens[mp] = sum(model._sample(req, "Q", ".").image_tokens)
    assert tokens == {None: 4, "12544": 16}, tokens  # 224x224 -> 56x56: 2x2 tokens, 112x112: 4x4
    assert model.processor.max_pixels == 12544 and model.processor.min_pixels == 784
    with pytest.raises(ValueError, match=r"max_pixels='big'.*integer.*\[784, "):
        pixel_range("big", None, 802816, 3136)
    with pytest.raises(ValueError, match=r"min_pixels=100 is out of range: valid \[784, 144000000\]"):
        pixel_range(None, 100, 802816, 3136)
    with pytest.raises(ValueError, match=r"min_pixels=10000 must be <= max_pixels=5000"):
        pixel_range(5000, 10000, 802816, 3136)
    with pytest.raises(ValueError, match="max_pixels=1000000000 is out of range"):
        Casa(pretrained=str(run["ckpt"]), max_pixels=10**9)
    assert pixel_range(None, None, 802816, 3136) == (802816, 3136) and MIN_TOKEN_PIXELS == 784


# ---------------------------------------------------------------------------- metrics vs lmms-eval's
PREDICTIONS = ["red", "Red.", "1/8", "0.125 ", "2", "two", "three dogs", "The cat's toy", "dont", "yes!", "45%",
               "1,234", "12", "12.7", "no", "left-hand", "3.5", "", "N/A", "1,000"]


def test_anls_matches_lmms_eval():
    from lmms_eval.api.metrics import anls

    from casa.train.scoring import anls_score

    refs = [["red"], ["1/8", "0.125"], ["two", "2"], ["3 dogs"], ["N/A"], ["1000"], ["Acme Corp"]]
    for pred in PREDICTIONS:
        for r in refs:
            assert anls_score(pred, r) == pytest.approx(anls(r, [pred.strip()])["anls"]), (pred, r)


def test_vqa_accuracy_matches_lmms_eval_textvqa():
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
    from lmms_eval.tasks.textvqa.utils import textvqa_process_results

    from casa.train.scoring import VQA_CONTRACTIONS, vqa_accuracy, vqa_normalize

    official = {k: v for k, v in EvalAIAnswerProcessor.CONTRACTIONS.items() if k != v}  # identity entries change nothing
    assert VQA_CONTRACTIONS == official
    proc = EvalAIAnswerProcessor()
    answers = [["red"] * 3 + ["dark red"] * 7, ["two"] * 2 + ["2"] * 2 + ["3"] * 6, ["3 dogs"] * 10,
               ["the cat's toy"] * 4 + ["toy"] * 6, ["don't"] * 9 + ["no"], ["1000"] * 5 + ["1,000"] * 5]
    for pred in PREDICTIONS + ["Dark-red", "a toy", "It's 3.5.", "(yes)", "x, y", "3 , 4"]:
        assert vqa_normalize(pred) == proc(pred), pred
        for ans in answers:
            expected = textvqa_process_results({"answers": list(ans), "question_id": 0}, [pred])["exact_match"]
            assert vqa_accuracy(pred, ans) == pytest.approx(expected), (pred, ans)


def test_relaxed_accuracy_matches_lmms_eval_chartqa():
    from lmms_eval.tasks.chartqa.utils import relaxed_correctness

    from casa.train.scoring import relaxed_match

    refs = ["0.45", "45%", "1200", "12.5", "Yes", "0", "12"]
    for pred in PREDICTIONS:
        for r in refs:
            if "," in pred and pred.replace(",", "").isdigit():
                continue  # thousands separators: read by ours only (tests/test_metrics.py)
            assert relaxed_match(pred, r) == float(relaxed_correctness(pred.strip(), r)), (pred, r)


def test_choice_parsing_matches_mmmu_on_letter_answers():
    from lmms_eval.tasks._task_utils.mmmu_mcq_utils import get_multi_choice_info, parse_mmmu_multi_choice_response

    from casa.train.scoring import parse_choice

    options = ["circle", "square", "triangle", "diamond"]
    index2ans, letters = get_multi_choice_info(options)
    for pred in ["A", "(B)", "C.", "The answer is D", "B. square", "(A) or (C)", "I pick A, not C", "D diamond",
                 "the circle, which is option A is wrong; it is (C)"]:
        assert letters[parse_choice(pred, options)] == parse_mmmu_multi_choice_response(pred, letters, index2ans), pred
