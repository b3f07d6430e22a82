"""Evaluate a checkpoint on the test shards: generated answers scored per task and group.

    python -m experiments.evaluate --ckpt CKPT --data DIR [--split test] [--json]
                                   [--mask self|rnd|rnd_txt] [--max-samples N] [--precision run|32|bf16-mixed|...]
                                   [--predictions FILE.jsonl]

Every sample's last assistant answer is generated (greedy) from its prompt, exactly as
validation does during training (`Assistant.answer_batch` = `CasaModule.validation_step`'s
truncate + generate + decode), and scored with exact match, relaxed accuracy (ChartQA),
ANLS (DocVQA), VQA accuracy (TextVQA) and, for samples with options, choice accuracy, per
task and per group, against all accepted answers (`casa.train.metrics`). Samples with
options are also scored by log-likelihood: task metric `choice_loglikelihood`, the option
whose answer is likeliest (teacher-forced, `Assistant.answer_logprobs`), as lmms-eval's
multiple_choice tasks score them. Samples of a task with a closed answer set
(`data.synth_tasks.ANSWER_SETS`: colours, digits, counts, directions) are ALSO scored
teacher-forced over that set (`casa.answer_set`): metric `answer_set_accuracy`, the argmax
of the candidates' log-likelihoods (end token included) against the reference, per task and
group, with no parsing and no generation budget; the images are encoded once per sample and
all candidates of a batch run in one packed forward, so thousands of items cost seconds.
Its chance levels are reported beside it (`chance`: uniform over the answer set, and the
answer prior, the share of the commonest reference on the items scored).
`--no-generate` skips generation and scores teacher-forced only.

`--position-loss L` adds, per task, the answer loss at each window position 0..L-1 (the
position of the predicting token in its window: an image opens a window, docs/synth.md) and
the perplexity over those positions: the text-ability probe of protocol v2 on windows no
longer than training's. `--step0` scores the run's model as it was before its first step
(its config built under its seed, no trained weights): the baseline the end is compared to.
Live-captioning clips are ALSO run as a live
stream (`Assistant.stream`, no teacher forcing): task `live_caption_stream` scores the
frames where the reference or the model says something (a caption at the wrong frame
counts as a miss and as a false alarm). Its chance level, `live_caption_stream_other_clip`,
scores the same references while the model watches another test clip of the same length.
Both are reported per task only, so group numbers stay comparable with validation.
`--no-stream` skips them.

`--precision run` (the default) evaluates in the precision the run validated in (its
trainer's `bf16-mixed` autocast, or FSDP2's bf16 parameters), so the scores and the
`--predictions` file reproduce the run's own validation on the same samples.

`--mask` applies the paper's Table 8 masks in the CASA layers; generation then runs
without the KV cache (which cannot apply them) and the stream evaluation is skipped.
Output: a rich table, or with `--json` exactly one JSON object on stdout,
`{"tasks": {task: {metric: value}}, "groups": {group: {metric: value}},
"loss": {"answer_loss": mean cross-entropy per answer token (teacher-forced, as val/loss),
"answer_tokens": N}, "chance": {task: {"uniform": 1/|answer set|, "prior": commonest answer's
share, "items": N}}}`. Progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from itertools import islice
from pathlib import Path

METRIC_NAMES = ("exact_match", "relaxed_accuracy", "anls", "vqa_accuracy", "choice_accuracy", "choice_loglikelihood",
                "answer_set_accuracy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from casa.rebuild import add_checkpoint_arguments

    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    p.add_argument("--data", required=True, help="shard directory (or glob / brace pattern)")
    p.add_argument("--split", default="test", help="shard prefix: DIR/SPLIT-*.tar (default test)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--mask", choices=("self", "rnd", "rnd_txt"), default=None, help="Table 8 inference mask (CASA)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate the first N samples only")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer budget (live captions are ~25 characters)")
    p.add_argument("--batch-samples", type=int, default=None, help="samples per generation batch (default: the run's "
                                                                    "val_rows_samples)")
    p.add_argument("--no-stream", action="store_true", help="skip the live-stream evaluation of live_caption clips")
    p.add_argument("--position-loss", type=int, default=None, metavar="L",
                   help="per task, the answer loss at window positions 0..L-1 and its perplexity")
    p.add_argument("--step0", action="store_true",
                   help="evaluate the run's step-0 model (its config under its seed, no trained weights)")
    p.add_argument("--no-generate", action="store_true",
                   help="skip generation: score closed-answer tasks teacher-forced over their answer set only")
    p.add_argument("--predictions", default=None, metavar="FILE.jsonl",
                   help="write every generated answer (key, task, group, prediction, reference), sorted by key: "
                        "the format of a training run's predictions/val_step_*.jsonl")
    a = p.parse_args(argv)
    for name in ("max_samples", "batch_samples", "position_loss"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    return a


def sample_processor(assistant):
    """Raw sample -> `Sample` with the run's image and frame settings (what validation reads)."""
    from data.dataset import SampleProcessor, VideoOptions

    s = assistant.settings
    video = VideoOptions(s.fps, s.min_duration, s.min_frames, s.max_duration, s.frame_max_pixels, layout=s.layout)
    return SampleProcessor(assistant.template, s.max_pixels, s.min_pixels, video)


def split_stream(assistant, urls: list[str]):
    """The shards read once, in order, with the run's image and frame settings."""
    from data.dataset import ShardStream

    s = assistant.settings
    packer = dict(max_text_tokens=s.max_text_tokens, max_image_tokens=s.max_image_tokens, buffer_size=1)
    return ShardStream(urls, sample_processor(assistant), packer, 1, shuffle=False, repeat=False)


def with_answer(raw: dict, answer: str) -> dict:
    """A raw sample whose last (assistant) turn says `answer` instead."""
    conv = json.loads(raw["json"])
    conv["messages"][-1] = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    conv.pop("answers", None)
    return {**raw, "json": json.dumps(conv).encode()}


def choice_logprobs(assistant, processor, raws: list[dict], choices: list[list[str]], per_batch: int) -> list[list[float]]:
    """Per sample, the log-likelihood of each option as its last answer (`Assistant.answer_logprobs`,
    packed `per_batch` answers at a time): what lmms-eval's multiple_choice output type ranks."""
    from data.packing import build_row

    variants = [processor(with_answer(raw, c)) for raw, opts in zip(raws, choices) for c in opts]
    scores = []
    for i in range(0, len(variants), per_batch):
        scores += [lp for lp, _ in assistant.answer_logprobs(build_row(variants[i:i + per_batch]))]
    out, k = [], 0
    for opts in choices:
        out.append(scores[k:k + len(opts)])
        k += len(opts)
    return out


def evaluate_choices(assistant, stream, a: argparse.Namespace, progress) -> dict[str, dict[str, float]]:
    """Samples with options (`choices`): the option of highest log-likelihood is the answer
    ("choice_loglikelihood", per task; lmms-eval's `acc` of a multiple_choice task)."""
    from casa.train.metrics import GroupedAnswerMetrics

    items = []  # (task, raw, choices, references)
    for raw in islice(stream.raw_samples(), a.max_samples):
        conv = json.loads(raw["json"])
        if conv.get("choices"):
            refs = conv.get("answers") or ["".join(c.get("text", "") for c in conv["messages"][-1]["content"])]
            items.append((conv.get("task", "unknown"), raw, conv["choices"], refs))
    if not items:
        return {}
    job = progress.add_task("options (log-likelihood)", total=len(items))
    per_batch = a.batch_samples or assistant.settings.val_rows_samples
    metrics = GroupedAnswerMetrics()
    processor = sample_processor(assistant)
    for i in range(0, len(items), per_batch):
        chunk = items[i:i + per_batch]
        lps = choice_logprobs(assistant, processor, [r for _, r, _, _ in chunk], [c for _, _, c, _ in chunk], per_batch)
        best = [opts[max(range(len(opts)), key=lp.__getitem__)] for (_, _, opts, _), lp in zip(chunk, lps)]
        metrics.update([t for t, *_ in chunk], best, [refs for *_, refs in chunk])
        progress.advance(job, len(chunk))
    return {k: {"choice_loglikelihood": v["exact_match"]} for k, v in metrics.compute().items()}


def expected_samples(data: str, split: str) -> int | None:
    """The split's size from data.synth's manifest, when there is one (for the progress bar)."""
    m = Path(data) / "manifest.json"
    try:
        return int(json.loads(m.read_text())["splits"][split])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def caption_clip(raw: dict, assistant) -> tuple[list, list[str]] | None:
    """A raw live-captioning sample -> (frames, what is said at each frame), sampled like training."""
    from data.video import expand_video, sample_frames

    conv = json.loads(raw["json"])
    v = conv.get("video") or {}
    if v.get("layout") != "caption":
        return None
    s = assistant.settings
    keep = sample_frames(v["timestamps"], s.fps, s.min_duration, s.min_frames, s.max_duration)
    refs, times = [v["frames"][i] for i in keep], [v["timestamps"][i] for i in keep]
    msgs = expand_video(conv, refs, times)
    said = [m["content"][0]["text"] for m in msgs if m["role"] == "assistant"]
    from data.format import unpack_frames

    files = {k.split(".")[0]: val for k, val in raw.items() if not k.startswith("__") and k != "json"}
    files = unpack_frames(v, files)  # either frame layout
    return [files[r] for r in refs], said


class AnswerSetScorer:
    """Teacher-forced accuracy over each task's closed answer set (`casa.answer_set`), per task
    and group, with the chance levels of the items it scored."""

    def __init__(self, assistant, answer_sets: dict[str, tuple[str, ...]]):
        from casa.answer_set import tokenize_candidates
        from casa.train.metrics import GroupedAnswerMetrics

        self.assistant, self.answer_sets = assistant, answer_sets
        encode = lambda t: assistant.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731 (the template's text pieces)
        end = list(assistant.stop_token_ids)
        self.tokens = {t: tokenize_candidates(list(a), encode, end) for t, a in answer_sets.items()}
        self.tasks, self.groups = GroupedAnswerMetrics(), GroupedAnswerMetrics()
        self.references: dict[str, list[str]] = {}

    def update(self, batch) -> list[str | None]:
        """-> per sample the likeliest answer of its task's set (None: the task has no set)."""
        from casa.answer_set import argmax_answers, candidate_logprobs

        tasks = [m.get("task") for m in batch.meta]
        if not any(t in self.tokens for t in tasks):
            return [None] * len(tasks)
        cands = [self.tokens.get(t, []) for t in tasks]
        with self.assistant._autocast():
            scores = candidate_logprobs(self.assistant.model, batch.to(self.assistant.device), cands)
        keep = [i for i, t in enumerate(tasks) if t in self.tokens]
        best = argmax_answers([scores[i] for i in keep], [list(self.answer_sets[tasks[i]]) for i in keep])
        preds: list[str | None] = [None] * len(tasks)
        for i, b in zip(keep, best):
            preds[i] = b
        meta = [batch.meta[i] for i in keep]
        refs = [m["answer"] for m in meta]
        self.tasks.update([m["task"] for m in meta], [preds[i] for i in keep], refs)
        self.groups.update([m.get("group", "all") for m in meta], [preds[i] for i in keep], refs)
        for m in meta:
            self.references.setdefault(m["task"], []).append(m["answer"])
        return preds

    def compute(self) -> dict:
        """-> {"tasks": {task: {"answer_set_accuracy"}}, "groups": {...}, "chance": {task: {...}}}"""
        from collections import Counter

        def acc(metrics):
            return {k: {"answer_set_accuracy": v["exact_match"]} for k, v in metrics.compute().items()}

        chance = {t: {"uniform": 1 / len(self.answer_sets[t]),
                      "prior": Counter(refs).most_common(1)[0][1] / len(refs), "items": len(refs)}
                  for t, refs in self.references.items()}
        return {"tasks": acc(self.tasks), "groups": acc(self.groups), "chance": chance}


class PositionLoss:
    """Answer loss per task and window position (< `length`): sums and token counts."""

    def __init__(self, length: int):
        self.length = length
        self.sums: dict[str, list[float]] = {}
        self.counts: dict[str, list[int]] = {}

    def update(self, batch, logits) -> None:
        """batch [T] with labels (pre-shifted) and windows; logits [T, V]."""
        import torch

        T = batch.num_text_tokens
        target = batch.labels[:T] != -100  # [T]
        loss = torch.nn.functional.cross_entropy(logits[:T].float(), batch.labels[:T].clamp(min=0), reduction="none")  # [T]
        bounds = batch.window_cu_seqlens_text.long()  # [W+1]
        idx = torch.arange(T, device=bounds.device)
        start = bounds[torch.searchsorted(bounds, idx, right=True) - 1]  # [T] first text index of each token's window
        pos = idx - start
        sample = torch.searchsorted(batch.sample_cu_seqlens.long(), idx, right=True) - 1  # [T]
        keep = target & (pos < self.length)
        for p, s_, l in zip(pos[keep].tolist(), sample[keep].tolist(), loss[keep].tolist()):
            task = batch.meta[s_].get("task", "all")
            sums = self.sums.setdefault(task, [0.0] * self.length)
            counts = self.counts.setdefault(task, [0] * self.length)
            sums[p] += l
            counts[p] += 1

    def compute(self) -> dict:
        """-> {task: {"ppl": exp(mean loss over scored tokens), "tokens": n,
        "ppl_by_position": [exp(mean loss at p) or None]}}"""
        import math

        out = {}
        for task, sums in self.sums.items():
            counts = self.counts[task]
            n = sum(counts)
            out[task] = {"ppl": math.exp(sum(sums) / n), "tokens": n,
                         "ppl_by_position": [math.exp(s / c) if c else None for s, c in zip(sums, counts)]}
        return out


def step0_model(assistant):
    """The run's model before its first step: its config built under its seed (as `experiments.fit`
    seeds before building), no trained weights loaded."""
    import torch

    from casa.rebuild import build_model

    torch.manual_seed(int(assistant.config.get("seed_everything") or 0))
    model = build_model(assistant.config)
    return model.to(assistant.device).eval()


def evaluate(assistant, urls: list[str], a: argparse.Namespace, progress) -> dict:
    from casa.train.metrics import GroupedAnswerMetrics
    from data.packing import build_row
    from data.synth_tasks import ANSWER_SETS

    tasks, groups = GroupedAnswerMetrics(), GroupedAnswerMetrics()
    scorer = AnswerSetScorer(assistant, ANSWER_SETS)
    positions = PositionLoss(a.position_loss) if a.position_loss else None
    stream = split_stream(assistant, urls)
    total = expected_samples(a.data, a.split)
    total = min(total, a.max_samples) if total and a.max_samples else (total or a.max_samples)
    job = progress.add_task(f"{a.split} answers", total=total)
    cfg = assistant.generation_config(max_new_tokens=a.max_new_tokens)
    per_batch = a.batch_samples or assistant.settings.val_rows_samples
    samples = islice(stream.samples(), a.max_samples)
    answers, loss_sum, answer_tokens = [], 0.0, 0
    while chunk := list(islice(samples, per_batch)):
        batch = build_row(chunk)
        batch_loss, n = assistant.answer_loss(batch)
        loss_sum, answer_tokens = loss_sum + batch_loss, answer_tokens + n
        if positions is not None:
            import torch

            with torch.no_grad(), assistant._autocast():
                positions.update(batch.to(assistant.device), assistant.model(batch.to(assistant.device)).logits)
        closed = scorer.update(batch)
        refs = [m["answer"] for m in batch.meta]
        if a.no_generate:
            preds = [None] * len(chunk)
        else:
            preds = assistant.answer_batch(batch, cfg)
            tasks.update_samples("task", preds, batch.meta)  # all accepted answers, options (casa.train.metrics)
            groups.update_samples("group", preds, batch.meta)
        answers += [{"key": m.get("key"), "task": m["task"], "group": m["group"], "prediction": p, "reference": r,
                     **({"answer_set_prediction": c} if c is not None else {})}
                    for m, p, r, c in zip(batch.meta, preds, refs, closed)]
        progress.advance(job, len(chunk))
    if a.predictions:
        out = Path(a.predictions)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(x) + "\n" for x in sorted(answers, key=lambda x: str(x["key"]))))
    out = {"tasks": tasks.compute() if not a.no_generate else {},
           "groups": groups.compute() if not a.no_generate else {},
           # teacher-forced, token-weighted like validation's val/loss
           "loss": {"answer_loss": loss_sum / max(answer_tokens, 1), "answer_tokens": answer_tokens}}
    closed = scorer.compute()
    for kind in ("tasks", "groups"):
        for key, scores in closed[kind].items():
            out[kind].setdefault(key, {}).update(scores)
    out["chance"] = closed["chance"]
    if positions is not None:
        out["position_loss"] = positions.compute()
    skipped = {k: v for k, v in stream.stats().items() if v and k not in ("samples_read", "samples_kept", "epochs")}
    if skipped:
        progress.console.print(f"[yellow]skipped samples: {skipped}")
    for task, scores in evaluate_choices(assistant, stream, a, progress).items():
        out["tasks"].setdefault(task, {}).update(scores)
    if not a.no_stream and not a.no_generate and assistant.inference_mask is None:
        live = evaluate_stream(assistant, stream, a, progress)
        if live is not None:
            out["tasks"]["live_caption_stream"] = live["stream"]
            if "other_clip" in live:
                out["tasks"]["live_caption_stream_other_clip"] = live["other_clip"]
    return out


def evaluate_stream(assistant, stream, a: argparse.Namespace, progress) -> dict | None:
    """Free-running live captioning of every caption-layout clip; frames where either the
    reference or the model speaks are scored ("stream").

    Its chance level ("other_clip"): the same scoring against the same references, but the
    model watches ANOTHER test clip of the same length. The text prior (what captions look
    like, when they usually come) is identical, so the gap between the two is what the
    model reads off the frames."""
    from casa.train.metrics import GroupedAnswerMetrics

    clips = [c for c in (caption_clip(raw, assistant) for raw in islice(stream.raw_samples(), a.max_samples)) if c]
    if not clips:
        return None
    metrics = GroupedAnswerMetrics()
    runs = []  # (score as, frames watched, reference captions)
    for i, (frames, said) in enumerate(clips):
        runs.append(("stream", frames, said))
        other = next((j for j in range(len(clips)) if j != i and len(clips[j][0]) == len(frames)), None)
        if other is not None:
            runs.append(("other_clip", clips[other][0], said))
    job = progress.add_task("live captions (stream)", total=len(runs))
    cfg = assistant.generation_config(max_new_tokens=a.max_new_tokens)
    for name, frames, said in runs:
        for rec in assistant.stream(frames, assistant.settings.fps, cfg, wait=False):
            if rec.text.strip() or said[rec.index].strip():
                metrics.update([name], [rec.text], [said[rec.index]])
        progress.advance(job)
    return metrics.compute()


def print_table(results: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("group / task")
    for n in METRIC_NAMES:
        table.add_column(n, justify="right")
    for kind in ("groups", "tasks"):
        for key in sorted(results[kind]):
            vals = results[kind][key]
            table.add_row(f"{kind[:-1]}:{key}", *(f"{100 * vals[n]:.1f}" if n in vals else "-" for n in METRIC_NAMES))
    console = Console()
    console.print(table)
    if "loss" in results:
        loss = results["loss"]
        console.print(f"answer loss: {loss['answer_loss']:.4f} over {loss['answer_tokens']} answer tokens")
    for task, c in sorted(results.get("chance", {}).items()):
        console.print(f"chance on {task}: uniform {100 * c['uniform']:.1f}, answer prior {100 * c['prior']:.1f} "
                      f"({c['items']} items)")


def main(argv: list[str] | None = None) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from casa.assistant import CheckpointError, load
    from data.format import expand_shards  # no Lightning on the inference path

    a = parse_args(argv)
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        try:  # everything the user can get wrong is checked before the first sample
            urls = expand_shards(a.data, a.split)
            assistant = load(a.ckpt, a.device, a.config, a.precision)
            if a.step0:
                assistant.model = step0_model(assistant)
            assistant.set_inference_mask(a.mask)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            if os.environ.get("CASA_TRACEBACK"):
                raise
            print(f"experiments.evaluate: error: {e}\n(set CASA_TRACEBACK=1 for the full traceback)", file=sys.stderr)
            return 2
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=a.json) as progress:
            results = evaluate(assistant, urls, a, progress)
    finally:
        torch.set_num_threads(threads)
    if a.json:
        print(json.dumps(results))
    else:
        mask = f", mask {a.mask}" if a.mask else ""
        print_table(results, f"{a.ckpt} on {a.data} [{a.split}] (step {0 if a.step0 else assistant.global_step}{mask})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
