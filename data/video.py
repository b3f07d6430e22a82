"""Video samples: frame sampling, the two window layouts, and writing captioned videos.

Sampling (paper App. "Video data"; `casa.processing.video.sample_frames`, re-exported here,
as the reader's other names): frames at `fps` (2), except that a clip shorter than
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
from fractions import Fraction
from pathlib import Path

from PIL import Image

from casa.processing.template import CAPTION_PROMPT
from casa.processing.video import (FRAME_SUFFIXES, VIDEO_FILE_SUFFIXES, Frame, VideoError, open_video,  # noqa: F401
                                   read_video, sample_frames)
from data.format import image, text

MS = Fraction(1, 1000)


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


# ---------------------------------------------------------------------------------- writing
class VideoWriter:
    """An h264 mp4 written frame by frame at explicit times (variable rate is fine).

    yuv420p needs even sizes: an odd row or column is cropped. `rate` is only the nominal rate
    the container advertises; each frame's pts is its own time (ms)."""

    def __init__(self, path: str | Path, rate: float = 30.0, crf: int = 23, preset: str = "veryfast"):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.path), "w")
        self.stream = self.container.add_stream("libx264", rate=Fraction(rate).limit_denominator(1001))
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.time_base = MS
        # veryfast: about 3x the encoding speed of x264's default for slightly bigger files
        self.stream.options = {"crf": str(crf), "preset": preset}
        self.size: tuple[int, int] | None = None
        self.last_pts = -1

    def write(self, image: Image.Image, t: float) -> None:
        import av

        if self.size is None:
            self.size = (image.width - image.width % 2, image.height - image.height % 2)
            self.stream.width, self.stream.height = self.size
        if image.size != self.size:
            image = image.crop((0, 0, *self.size)) if image.width >= self.size[0] and image.height >= self.size[1] \
                else image.resize(self.size)
        frame = av.VideoFrame.from_image(image.convert("RGB"))
        # strictly increasing pts: two frames within the same ms keep their order
        frame.pts, frame.time_base = max(int(round(t * 1000)), self.last_pts + 1), MS
        self.last_pts = frame.pts
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        if self.size is not None:
            self.container.mux(self.stream.encode())
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def draw_caption(image: Image.Image, caption: str) -> Image.Image:
    """The frame with `caption` as a subtitle: white text on a dark band at the bottom,
    wrapped to the frame's width (the paper's qualitative videos burn captions in)."""
    from PIL import ImageDraw, ImageFont

    if not caption.strip():
        return image
    img = image.convert("RGB").copy()
    size = max(9, img.height // 16)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(img, "RGBA")
    lines, line = [], ""
    for word in caption.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > img.width - 8:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    lines = lines[-3:]  # a subtitle, not a page: the latest three lines
    step = size + 3
    top = img.height - step * len(lines) - 6
    draw.rectangle((0, top, img.width, img.height), fill=(0, 0, 0, 170))
    for k, ln in enumerate(lines):
        w = draw.textlength(ln, font=font)
        draw.text(((img.width - w) / 2, top + 3 + k * step), ln, font=font, fill=(255, 255, 255))
    return img


def caption_at(cues: list[tuple[float, float, str]], t: float) -> str:
    """The text of the cue (start, end, text) showing at time t ("" if none; the latest wins)."""
    shown = [c for c in cues if c[0] <= t < c[1]]
    return shown[-1][2] if shown else ""


def write_captioned(source, out: str | Path, cues: list[tuple[float, float, str]]) -> dict:
    """Re-encode every frame of `source` (file or URL; upright) into `out` (h264 mp4) with the
    cue showing at each frame's time drawn on it. cues: (start, end, text), seconds from the
    source's first frame. -> {"frames", "duration_s", "out"}."""
    reader = open_video(source)
    try:
        rate = getattr(reader, "average_fps", None) or 25.0
        n, first, last = 0, None, 0.0
        with VideoWriter(out, rate) as writer:
            for f in reader.decode_all():
                first = f.t if first is None else first
                last = f.t - first
                writer.write(draw_caption(f.image, caption_at(cues, last)), last)
                n += 1
    finally:
        reader.close()
    return {"frames": n, "duration_s": round(last, 3), "out": str(out)}
