"""Video samples: frame sampling and the two window layouts.

Sampling (paper App. "Video data", `casa.processing.video.sample_frames`, re-exported here): frames at `fps` (2), except that a clip shorter than
`min_duration` (10 s) gets `min_frames` (20) uniformly spread frames instead, and only the
first `max_duration` (180 s) is used. Frames are then ordinary images, capped at 448^2
pixels by the dataset (256 tokens each), processed frame by frame (no temporal merge: the
paper found Qwen's 2-frame patches detrimental).

Layouts (t = text, F = frame tokens, | separates windows):
    qa       all frames, consecutive, form ONE window followed by the question and answer
             user: [F0 F1 ... FK] question   assistant: answer
             windows: (<|user|> | -) (question <|end|><|assistant|> answer <|end|> | F0..FK)
    caption  live captioning: one window per frame, each followed by an assistant turn with
             the captions whose timestamps fall in [t_i, t_{i+1}) -- or an empty assistant
             turn (just the end token) when nothing is said, so the model learns when to
             stay silent. A short user prompt opens the conversation:
             user: prompt [F0]  assistant: caption_0 | ""   user: [F1]  assistant: ...
             windows: (<|user|> prompt | -) (<|end|><|assistant|> caption_0 <|end|><|user|> | F0) ...
"""

from __future__ import annotations

import math

from casa.processing.template import CAPTION_PROMPT
from casa.processing.video import (FRAME_SUFFIXES, VIDEO_FILE_SUFFIXES, Frame, VideoError, open_video,  # noqa: F401
                                   read_video, sample_frames)
from data.format import image, text


def expand_video(conv: dict, frame_refs: list[str], frame_times: list[float], prompt: str = CAPTION_PROMPT,
                 end: float = math.inf) -> list[dict]:
    """Rewrite a video conversation into image messages for the template (see module doc).

    conv: the sample JSON (`data.format`); frame_refs / frame_times [K]: the sampled frames;
    end: captions at or after this time are dropped (the clip was cut at `max_duration`)."""
    video = conv["video"]
    layout = video.get("layout", "qa")
    if layout == "qa":
        out, placed = [], False
        for m in conv["messages"]:
            content = []
            for c in m["content"]:
                if c["type"] == "video":
                    content.extend(image(r) for r in frame_refs)
                    placed = True
                else:
                    content.append(c)
            out.append({"role": m["role"], "content": content})
        if not placed:  # no {"type": "video"} item: the frames open the first user turn
            first = next((m for m in out if m["role"] == "user"), None)
            if first is None:
                raise ValueError("a 'qa' video conversation needs a user turn to hold its frames")
            first["content"] = [*(image(r) for r in frame_refs), *first["content"]]
        return out
    if layout != "caption":
        raise ValueError(f"video.layout={layout!r} is not one of ['qa', 'caption']")
    prompt = video.get("prompt", prompt)  # a source's own request (LiveCC records carry one)
    captions = sorted(video.get("captions", []), key=lambda c: c["t"])
    msgs = [m for m in conv.get("messages", []) if m["role"] == "system"]
    bounds = list(frame_times[1:]) + [end]
    for i, (ref, t, t_next) in enumerate(zip(frame_refs, frame_times, bounds)):
        lo = -math.inf if i == 0 else t  # words said before the first kept frame go with it
        said = " ".join(c["text"].strip() for c in captions if lo <= c["t"] < t_next and c["text"].strip())
        msgs.append({"role": "user", "content": [text(prompt), image(ref)] if i == 0 else [image(ref)]})
        msgs.append({"role": "assistant", "content": [text(said)]})
    return msgs
