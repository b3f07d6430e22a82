"""Video samples: frame sampling and the two window layouts.

Sampling (paper §4.2): frames at `fps` (2), a clip shorter than `min_duration` (10 s) gets
`min_frames` (20) uniformly spread frames instead, and only the first `max_duration`
(180 s) is used. Frames are then ordinary images (capped at 448^2 by the dataset).

Layouts:
    qa       the frames, consecutive, form ONE window followed by the question and answer
             user: [f0 f1 ... fK] question   assistant: answer
    caption  live captioning: one window per frame, each followed by the captions whose
             timestamps fall in [t_i, t_i+1) -- or an empty assistant turn (just the end
             token), so the model learns when to stay silent
             user: prompt   then per frame:  user: [f_i]   assistant: caption_i | ""
"""

from __future__ import annotations

from data.format import image, text


def sample_frames(timestamps: list[float], fps: float = 2.0, min_duration: float = 10.0, min_frames: int = 20,
                  max_duration: float = 180.0) -> list[int]:
    """Indices of the frames to keep, in time order (pure; nearest available frame)."""
    if fps <= 0:
        raise ValueError(f"fps={fps} must be > 0")
    if not timestamps:
        return []
    t0 = timestamps[0]
    end = min(timestamps[-1], t0 + max_duration)
    duration = end - t0
    if duration < min_duration:
        n = min(min_frames, len(timestamps))
        wanted = [t0 + duration * i / max(n - 1, 1) for i in range(n)]
    else:
        step = 1.0 / fps
        wanted = [t0 + i * step for i in range(int(duration * fps) + 1)]
    picked: list[int] = []
    j = 0
    for w in wanted:
        while j + 1 < len(timestamps) and abs(timestamps[j + 1] - w) <= abs(timestamps[j] - w):
            j += 1
        if not picked or picked[-1] != j:
            picked.append(j)
    return picked


def expand_video(conv: dict, frame_refs: list[str], frame_times: list[float], prompt: str = "Describe what happens.") -> list[dict]:
    """Rewrite a video conversation into image messages for the template (see module doc)."""
    video = conv["video"]
    layout = video.get("layout", "qa")
    if layout == "qa":
        out = []
        for m in conv["messages"]:
            content = []
            for c in m["content"]:
                if c["type"] == "video":
                    content.extend(image(r) for r in frame_refs)
                else:
                    content.append(c)
            out.append({"role": m["role"], "content": content})
        return out
    captions = sorted(video.get("captions", []), key=lambda c: c["t"])
    msgs = [m for m in conv.get("messages", []) if m["role"] == "system"]
    msgs.append({"role": "user", "content": [text(prompt)]})
    msgs.append({"role": "assistant", "content": [text("")]})  # the model is silent before the first frame
    bounds = list(frame_times[1:]) + [float("inf")]
    for ref, t, t_next in zip(frame_refs, frame_times, bounds):
        said = " ".join(c["text"] for c in captions if t <= c["t"] < t_next)
        msgs.append({"role": "user", "content": [image(ref)]})
        msgs.append({"role": "assistant", "content": [text(said)]})
    return msgs
