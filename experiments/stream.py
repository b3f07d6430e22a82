"""Live captioning of a video with a trained checkpoint (paper §4.5, Fig. 4).

    python -m experiments.stream --ckpt CKPT --video PATH|URL|-|synthetic [--fps 2] [--frames N]
                                 [--no-wait] [--json] [--srt OUT] [--out CAPTIONED.mp4]
                                 [--max-new-tokens 32] [--temperature T] [--top-k K] [--top-p P]
                                 [--repetition-penalty R [--repetition-window N] [--repetition-decay D]
                                  [--repetition-max-count C]] [--no-repeat-ngram-size N] [--sampling-seed S]
                                 [--max-context TOKENS] [--keep-recent TOKENS]

Frames arrive at `--fps`; each opens a window and the model writes what it says at that
frame (usually nothing). Output: one line per caption, `[mm:ss.s|delay] text` (timestamp
of the frame, then how late the caption was done), a summary, and an SRT file
(`--srt`, default: next to a video, or runs/stream.srt for `synthetic`). `--no-wait`
processes frames back to back and reports the delay a real-time run would have had.
`--json` prints one JSON object with a `frames` list (index, t, text, new_tokens, wall_s,
delay_s, kv_tokens, window_kv_tokens, kv_bytes, memory_bytes). `--out captioned.mp4`
re-encodes the whole input video (every frame, h264) with each caption drawn from the time
it was produced (frame time + delay) until the next one (at most 3 s): what a viewer of
the live stream would have seen.

Generation (`casa.generation.GenerationConfig`, transformers' logits processors): greedy by
default; `--temperature` > 0 samples (with `--top-k`, `--top-p`, seeded by `--sampling-seed`);
`--repetition-penalty` > 1 discourages what the recent captions said (over the last
`--repetition-window` tokens, each repeat weighted `--repetition-decay ** age`, counted at most
`--repetition-max-count` times); `--no-repeat-ngram-size N` never repeats an n-gram of them.
Context: the text KV cache holds at most `--max-context` tokens (default: the model's
max_position_embeddings): past it the prompt and the last `--keep-recent` tokens are kept,
positions re-encoded (`casa.context_limit.ContextPolicy`), so a live URL runs in bounded memory.

Video sources:
    synthetic        moving-shape clips of the synthetic benchmark's live_caption task
                     (`data.synth_tasks.video`), rendered on the fly; their reference
                     captions are shown next to the model's
    DIR              a folder of frames (jpg/png/webp), in numeric order, one per 1/fps s
    FILE.gif/.webp   an animated image (PIL decodes it), resampled to --fps
    FILE.mp4 ...     a video file (mp4, mkv, webm, mov, avi; anything PyAV opens), decoded
                     as it is read: the frame nearest each 1/fps tick of the video's own
                     clock (pts), paced to that clock unless --no-wait
    URL, -           a stream PyAV opens (http, rtsp, ...) or stdin (`cat clip.mkv | ... --video -`),
                     read as it arrives
Bad input (missing checkpoint, checkpoint without run config, undecodable video, a frame
of another size) ends with one message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Iterator

from casa.processing.video import is_video_source


# ---------------------------------------------------------------------------------- sources
def synthetic_clips(frames: int, seed: int = 0, size: int | None = None) -> tuple[list[bytes], list[str]]:
    """`frames` frames of back-to-back live_caption clips -> (JPEG bytes per frame, reference
    caption per frame). Bytes, not decoded images: a stream decodes each frame when it
    arrives and does not keep it (a list of decoded frames would grow like a video buffer)."""
    from data.synth_tasks import DEFAULT_SIZES
    from data.synth_tasks.video import live_caption
    from data.video import expand_video

    out, refs, k = [], [], 0
    while len(out) < frames:
        conv, files = live_caption(random.Random(f"stream/{seed}/{k}"), size or DEFAULT_SIZES["video"])
        v = conv["video"]
        msgs = expand_video(conv, v["frames"], v["timestamps"])
        said = [m["content"][0]["text"] for m in msgs if m["role"] == "assistant"]
        out += [files[f"{f}.jpg"] for f in v["frames"]]
        refs += said
        k += 1
    return out[:frames], refs[:frames]


def video_frames(path: str, fps: float) -> Iterator:
    """Frames of a video file / URL / stdin, a frame folder, or an animated or still image
    (InputError for anything else). Video frames are `Frame`s: they carry their own time."""
    import itertools

    from PIL import Image, ImageSequence

    from casa.assistant import InputError
    from casa.processing.video import VideoError, open_video, sample_frames

    p = Path(path)
    if not is_video_source(path) and not p.exists():
        raise InputError(f"--video {path!r} does not exist (a video file, a URL, '-', a frame folder, "
                         f"a .gif/.webp, or 'synthetic')")
    if p.is_dir() or is_video_source(path):
        try:
            return open_video(path, fps).frames_at(fps)  # decoded lazily, one per arriving frame
        except VideoError as e:
            raise InputError(f"--video: {e}") from None
    try:
        img = Image.open(p)
        times, t, frames = [], 0.0, []
        for f in ImageSequence.Iterator(img):
            times.append(t)
            t += max(float(f.info.get("duration", 1000.0 / fps) or 1000.0 / fps), 1.0) / 1000.0
            frames.append(f.convert("RGB"))
    except Exception as e:  # PIL raises many types for bytes it cannot read
        try:  # not an image: a video under a suffix not listed (.ts, .m4a, ...)? Only if a frame decodes
            frames = open_video(path, fps).frames_at(fps)
            first = next(frames, None)
            if first is None:
                raise VideoError(f"{path}: no frame decodes")
            return itertools.chain([first], frames)
        except VideoError as video_error:
            raise InputError(f"--video {path!r} cannot be decoded as an image ({type(e).__name__}) nor as a video "
                             f"({video_error}); give a video file, a frame folder, an animated .gif/.webp, or "
                             f"'synthetic'") from None
    keep = sample_frames(times, fps, min_duration=0.0, max_duration=float("inf")) if len(frames) > 1 else [0]
    return iter([frames[i] for i in keep])


def caption_cues(records: list[dict], hold: float = 3.0) -> list[tuple[float, float, str]]:
    """(start, end, text) of each caption as a live viewer sees it: from when it was produced
    (frame time + delay) until the next caption is produced, at most `hold` s."""
    said = [(r["t"] + max(r["delay_s"], 0.0), r["text"].strip()) for r in records if r["text"].strip()]
    return [(t, min(said[k + 1][0], t + hold) if k + 1 < len(said) else t + hold, txt)
            for k, (t, txt) in enumerate(said)]


# ---------------------------------------------------------------------------------- output
def stamp(t: float) -> str:
    return f"{int(t // 60):02d}:{t % 60:04.1f}"


def srt_time(t: float) -> str:
    ms = int(round(t * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def to_srt(records: list[dict], fps: float, hold: float = 3.0) -> str:
    """One cue per captioned frame, shown until the next caption (at most `hold` s)."""
    said = [r for r in records if r["text"].strip()]
    cues = []
    for n, r in enumerate(said):
        end = r["t"] + hold if n + 1 == len(said) else min(said[n + 1]["t"], r["t"] + hold)
        cues.append(f"{n + 1}\n{srt_time(r['t'])} --> {srt_time(max(end, r['t'] + 1.0 / fps))}\n{r['text'].strip()}\n")
    return "\n".join(cues)


def summary(records: list[dict]) -> dict:
    if not records:
        return {"frames": 0}
    walls = [r["wall_s"] for r in records]
    return {"frames": len(records), "captions": sum(bool(r["text"].strip()) for r in records),
            "mean_wall_s": sum(walls) / len(walls), "max_delay_s": max(r["delay_s"] for r in records),
            "final_delay_s": records[-1]["delay_s"], "kv_tokens_first": records[0]["kv_tokens"],
            "kv_tokens_last": records[-1]["kv_tokens"], "kv_tokens_max": max(r["kv_tokens"] for r in records),
            "cache_trims": sum(r["dropped_tokens"] > 0 for r in records), "memory_bytes_first": records[0]["memory_bytes"],
            "memory_bytes_last": records[-1]["memory_bytes"]}


# ---------------------------------------------------------------------------------- main
def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """The generation and context flags shared by `experiments.stream` and `experiments.live`."""
    p.add_argument("--max-new-tokens", type=int, default=32, help="caption budget per frame")
    p.add_argument("--prompt", default=None, help="the user prompt opening the stream (default: the training one)")
    g = p.add_argument_group("generation (transformers' logits processors; greedy by default)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating recent captions")
    g.add_argument("--repetition-window", type=int, default=0, help="only the last N caption tokens count (0 = all kept)")
    g.add_argument("--repetition-decay", type=float, default=1.0, help="a repeat N tokens ago weighs decay**N")
    g.add_argument("--repetition-max-count", type=float, default=1.0, help="a token is penalised at most this many times")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of the captions (0 = off)")
    g.add_argument("--sampling-seed", type=int, default=0, help="seed of the sampling RNG")
    c = p.add_argument_group("context (casa.context_limit.ContextPolicy)")
    c.add_argument("--max-context", type=int, default=None,
                   help="most tokens in the text KV cache (default: the model's max_position_embeddings)")
    c.add_argument("--keep-recent", type=int, default=None,
                   help="recent tokens kept when the cache is trimmed (default: half the room)")


def generation_overrides(a: argparse.Namespace) -> dict:
    """Parsed flags -> `Assistant.generation_config` overrides (validated there: a bad value
    is a ValueError naming the field)."""
    return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p,
            "repetition_penalty": a.repetition_penalty, "repetition_window": a.repetition_window,
            "repetition_decay": a.repetition_decay, "repetition_max_count": a.repetition_max_count,
            "no_repeat_ngram_size": a.no_repeat_ngram_size, "seed": a.sampling_seed}


def context_policy(a: argparse.Namespace, assistant, prompt: str):
    """--max-context / --keep-recent -> a ContextPolicy, or None (the session's default)."""
    if a.max_context is None and a.keep_recent is None:
        return None
    from casa.assistant import CaptionLayout
    from casa.context_limit import ContextPolicy
    from casa.generation import max_positions

    limit = a.max_context or max_positions(assistant.model)
    if limit is None:
        raise ValueError("--keep-recent needs --max-context: the model has no max_position_embeddings")
    return ContextPolicy(limit, len(CaptionLayout.from_template(assistant.template, prompt).first_pre), a.keep_recent)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from casa.rebuild import add_checkpoint_arguments

    p = argparse.ArgumentParser(prog="python -m experiments.stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    p.add_argument("--video", required=True, help="a video file, a URL, '-' (stdin), a frame folder, an animated "
                                                  ".gif/.webp, or 'synthetic'")
    p.add_argument("--out", default=None, help="write the input video re-encoded with the captions drawn (mp4)")
    p.add_argument("--fps", type=float, default=2.0, help="frame rate of the stream (training: 2)")
    p.add_argument("--frames", type=int, default=None, help="stop after N frames (synthetic: default 48)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for frames; report the real-time delay")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of caption lines")
    p.add_argument("--srt", default=None, help="SRT subtitles output (default: VIDEO.srt, runs/stream.srt for synthetic)")
    p.add_argument("--seed", type=int, default=0, help="synthetic clips' seed")
    add_generation_arguments(p)
    a = p.parse_args(argv)
    if a.fps <= 0 or (a.frames is not None and a.frames < 1) or a.max_new_tokens < 1:
        p.error(f"--fps ({a.fps}) must be > 0, --frames ({a.frames}) and --max-new-tokens ({a.max_new_tokens}) >= 1")
    if a.out and (a.video in ("synthetic", "-") or Path(a.video).is_dir() or not is_video_source(a.video)):
        p.error(f"--out re-reads the input video: give a video file or URL as --video, not {a.video!r}")
    return a


def run(a: argparse.Namespace) -> int:
    import torch

    from casa.assistant import load

    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return _run(a, load(a.ckpt, a.device, a.config, a.precision))
    finally:
        torch.set_num_threads(threads)


def _run(a: argparse.Namespace, assistant) -> int:
    import itertools

    from casa.assistant import InputError
    from data.video import CAPTION_PROMPT

    refs: list[str] | None = None
    if a.video == "synthetic":
        frames, refs = synthetic_clips(a.frames or 48, a.seed)
        srt = Path(a.srt or "runs/stream.srt")
    else:
        frames = video_frames(a.video, a.fps)
        name = "runs/stream" if a.video == "-" or "://" in a.video else a.video.rstrip("/")
        srt = Path(a.srt) if a.srt else Path(name).with_suffix(".srt")
    if a.frames:
        frames = itertools.islice(frames, a.frames)
    records = []
    try:
        cfg = assistant.generation_config(**generation_overrides(a))
        prompt = CAPTION_PROMPT if a.prompt is None else a.prompt
        context = context_policy(a, assistant, prompt)
    except ValueError as e:
        raise InputError(str(e)) from None
    for rec in assistant.stream(frames, a.fps, cfg, prompt=prompt, wait=not a.no_wait, context=context):
        r = rec.to_dict()
        if refs is not None:
            r["reference"] = refs[rec.index]
        records.append(r)
        if not a.json and (r["text"].strip() or (refs is not None and r["reference"])):
            ref = f"    (reference: {r['reference'] or '-'})" if refs is not None else ""
            print(f"[{stamp(rec.t)}|{rec.delay_s:.2f}s] {rec.text or '-'}{ref}", flush=True)
    srt.parent.mkdir(parents=True, exist_ok=True)
    srt.write_text(to_srt(records, a.fps))
    s = summary(records)
    if a.out:
        from data.video import write_captioned

        s["out"] = write_captioned(a.video, a.out, caption_cues(records))
    if a.json:
        print(json.dumps({"ckpt": a.ckpt, "video": a.video, "fps": a.fps, "fusion": type(assistant.model.fusion).__name__,
                          "srt": str(srt), "summary": s, "frames": records}))
    elif records:
        print(f"{s['frames']} frames, {s['captions']} captions, {1000 * s['mean_wall_s']:.1f} ms/frame, "
              f"final delay {s['final_delay_s']:.2f} s, text KV cache {s['kv_tokens_first']} -> {s['kv_tokens_last']} "
              f"tokens (max {s['kv_tokens_max']}, trimmed {s['cache_trims']}x), "
              f"memory {s['memory_bytes_first'] / 2**20:.0f} -> {s['memory_bytes_last'] / 2**20:.0f} MiB; "
              f"subtitles: {srt}")
        if a.out:
            print(f"captioned video: {a.out} ({s['out']['frames']} frames, {s['out']['duration_s']:.2f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from casa.assistant import CheckpointError, InputError
    from casa.processing.video import VideoError

    a = parse_args(argv)
    try:
        return run(a)
    except (CheckpointError, InputError, VideoError) as e:  # VideoError: a stream that breaks mid-way
        if os.environ.get("CASA_TRACEBACK"):
            raise
        print(f"experiments.stream: error: {e}\n(set CASA_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
