"""A folder of mp4 files with annotations in the published formats, standing in for your own
videos in the README's "Your own videos" walk-through.

    python -m data.video_demo --out runs/video-demo [--clips 400] [--size 160] [--seed 0]

writes
    OUT/videos/caption_00000.mp4 ...   the synthetic live_caption clips (`data.synth_tasks.video`)
    OUT/videos/direction_00000.mp4 ... the synthetic direction clips
    OUT/livecc.jsonl                   LiveCC records over the caption clips: word-level
                                       text_stream, each word ending by the frame that shows
                                       its event (see `data.converters` livecc --jsonl)
    OUT/videos.jsonl                   LLaVA-Video-178K QA records over the direction clips

The synthetic frames are 2 fps; each is held for 5 frames of a 10 fps h264 video, so the
files are ordinary videos that the reader samples back at 2 fps. Half the clips of each
kind are captions, half QA; the last `--val` of each go to OUT/val-*.jsonl instead.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path

from PIL import Image

from casa.processing.template import CAPTION_PROMPT
from data.video import VideoWriter

HOLD = 5  # video frames per synthetic frame: 2 fps -> 10 fps


def write_clip(path: Path, frames: list[bytes], times: list[float]) -> None:
    step = (times[1] - times[0]) / HOLD if len(times) > 1 else 0.1
    with VideoWriter(path, rate=1 / step) as w:
        for jpg, t in zip(frames, times):
            img = Image.open(io.BytesIO(jpg)).convert("RGB")
            for k in range(HOLD):
                w.write(img, t + k * step)


def words_of(captions: list[dict], span: float = 0.45) -> list[list]:
    """Captions at frame times -> LiveCC's [start, end, word]: each caption's words end within
    `span` s before (and at) its frame, so they count as said by that frame."""
    out = []
    for c in captions:
        ws = c["text"].split()
        for k, w in enumerate(ws):
            end = c["t"] - span + span * (k + 1) / len(ws)
            out.append([round(max(end - span / len(ws), 0.0), 3), round(max(end, 0.0), 3), w])
    return out


def livecc_record(video: str, captions: list[dict]) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": video, "video_start": 0.0},
                                         {"type": "text", "text": CAPTION_PROMPT}]},
            {"role": "assistant", "content": [{"type": "text_stream", "text_stream": words_of(captions)}]}]


def qa_record(video: str, conv: dict, key: str) -> dict:
    question = next(c["text"] for c in conv["messages"][0]["content"] if c["type"] == "text")
    answer = conv["messages"][1]["content"][0]["text"]
    return {"id": key, "video": video, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                          {"from": "gpt", "value": answer}]}


def write_demo(out: str | Path, clips: int = 400, val: int = 20, size: int = 160, seed: int = 0) -> dict:
    from data.synth_tasks.video import direction, live_caption

    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    records: dict[str, list] = {"livecc.jsonl": [], "videos.jsonl": [], "val-livecc.jsonl": [], "val-videos.jsonl": []}
    for i in range(clips):
        kind = "caption" if i % 2 == 0 else "direction"
        conv, files = (live_caption if kind == "caption" else direction)(random.Random(f"video-demo/{seed}/{i}"), size)
        v = conv["video"]
        name = f"{kind}_{i:05d}.mp4"
        write_clip(out / "videos" / name, [files[f"{r}.jpg"] for r in v["frames"]], v["timestamps"])
        split = "val-" if i >= clips - 2 * val else ""
        if kind == "caption":
            records[f"{split}livecc.jsonl"].append(livecc_record(name, v["captions"]))
        else:
            records[f"{split}videos.jsonl"].append(qa_record(name, conv, name[:-4]))
    for fname, recs in records.items():
        (out / fname).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return {fname: len(r) for fname, r in records.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data.video_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--clips", type=int, default=400, help="clips in all (half captions, half QA)")
    p.add_argument("--val", type=int, default=20, help="clips of each kind held out for validation")
    p.add_argument("--size", type=int, default=160, help="frame side in pixels")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.clips < 2 or a.val < 0 or 2 * a.val >= a.clips or a.size < 28:
        p.error(f"--clips ({a.clips}) >= 2, 0 <= 2 * --val ({a.val}) < --clips, --size ({a.size}) >= 28")
    counts = write_demo(a.out, a.clips, a.val, a.size, a.seed)
    print(json.dumps({"out": a.out, **counts}))
    return counts


if __name__ == "__main__":
    main(sys.argv[1:])
