"""A live web view of the captioner: the video plays, captions appear as they are written.

    python -m experiments.live --ckpt CKPT --video FILE|URL|DIR|synthetic [--port 7860] [--host 127.0.0.1]
                               [generation and context flags of experiments.stream]

Serves one page on http://127.0.0.1:PORT (localhost only unless --host says otherwise):
the video plays at its native speed in the browser (an HTML5 <video> of the file, or of an
http(s) URL; sources a browser cannot play, such as a frame folder, rtsp or `synthetic`, show
the frame the model just read), and every caption appears as soon as it is decoded, under the
video at the frame time it belongs to. Controls act on the next frame: prompt (restarts the
conversation at the current frame), temperature, repetition penalty, pause/resume (the video
and the captioner's clock stop together). A panel shows the CASA layers' attention mass of
the latest frame's tokens on the image / the window's other text / themselves (paper Fig. 7,
the implicit gate), captured through the eager backend.

Why Starlette + uvicorn + server-sent events, not Gradio: the page needs a <video> that plays
at native speed with captions pushed onto the same clock, which is a dozen lines of plain
JavaScript over an EventSource; Gradio's video and streaming components re-render on every
update and would add a large, fast-moving dependency for one page. SSE is one-way
(server -> page), which is all captions need; controls are plain POSTs.

The caption loop is `casa.captioning.CaptionSession`, the one `Assistant.stream` runs, with
frames from `experiments.stream.video_frames`, paced to the video's own clock: for the same
video and settings the page's captions are experiments.stream's. A bad video or URL is one
line on stderr and one on the page (the server keeps serving it until Ctrl-C); a bad
checkpoint ends the command (exit 2). Ctrl-C stops the server, then the caption thread.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path

from experiments.stream import add_generation_arguments, context_policy, generation_overrides, stamp

PAGE = Path(__file__).with_name("live.html")
MAX_EVENTS = 2000
"""Events kept for (re)connecting pages: a bounded deque, hours of captions do not pile up."""


class VideoClock:
    """Seconds of video played since `start`, stopped while paused."""

    def __init__(self):
        self.t0: float | None = None
        self.paused_at: float | None = None

    def start(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def pause(self, on: bool) -> None:
        now = time.perf_counter()
        if on and self.paused_at is None:
            self.paused_at = now
        elif not on and self.paused_at is not None:
            if self.t0 is not None:
                self.t0 += now - self.paused_at  # the paused span is not video time
            self.paused_at = None

    def now(self) -> float:
        if self.t0 is None:
            return 0.0
        return (self.paused_at or time.perf_counter()) - self.t0


class Captioner(threading.Thread):
    """The caption loop, in its own thread: one `CaptionSession` step per arriving frame,
    with the settings current at that frame; every result is an event for the pages."""

    def __init__(self, assistant, source: str, fps: float, config, prompt: str, context, max_frames: int | None = None):
        super().__init__(daemon=True, name="captioner")
        self.assistant, self.source, self.fps, self.context = assistant, source, fps, context
        self.config, self.prompt, self.max_frames = config, prompt, max_frames
        self.events: deque[dict] = deque(maxlen=MAX_EVENTS)
        self.next_id = 0
        self.lock = threading.Lock()
        self.clock = VideoClock()
        self.started, self.stopping = threading.Event(), threading.Event()
        self.paused = False
        self.restart = False
        self.error: str | None = None
        self.frame_jpeg: bytes | None = None

    # ------------------------------------------------------------------ shared with the server
    def publish(self, event: dict) -> None:
        with self.lock:
            self.events.append({**event, "id": self.next_id})
            self.next_id += 1

    def since(self, last: int) -> list[dict]:
        with self.lock:
            return [e for e in self.events if e["id"] > last]

    def settings(self) -> dict:
        c = self.config
        return {"prompt": self.prompt, "temperature": c.temperature, "repetition_penalty": c.repetition_penalty,
                "max_new_tokens": c.max_new_tokens, "paused": self.paused}

    def control(self, change: dict) -> dict:
        """A page's POST -> the new settings (ValueError naming the field for a bad value)."""
        allowed = {"prompt", "temperature", "repetition_penalty", "paused", "start"}
        unknown = sorted(set(change) - allowed)
        if unknown:
            raise ValueError(f"unknown control(s) {unknown}; valid: {sorted(allowed)}")
        with self.lock:
            gen = {k: float(change[k]) for k in ("temperature", "repetition_penalty") if k in change}
            config = dataclasses.replace(self.config, **gen) if gen else self.config  # validates
            if "prompt" in change and not isinstance(change["prompt"], str):
                raise ValueError(f"prompt must be a string, got {change['prompt']!r}")
            self.config = config
            if "prompt" in change and change["prompt"] != self.prompt:
                self.prompt, self.restart = change["prompt"], True
            if "paused" in change:
                self.paused = bool(change["paused"])
                self.clock.pause(self.paused)
        if change.get("start"):
            self.clock.start()
            self.started.set()
        self.publish({"type": "settings", **self.settings()})
        return self.settings()

    def fail(self, message: str) -> None:
        self.error = message
        print(f"experiments.live: error: {message}", file=sys.stderr, flush=True)
        self.publish({"type": "error", "message": message})

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        from casa.assistant import InputError
        from casa.processing.video import VideoError

        try:
            self._run()
        except (InputError, VideoError, ValueError) as e:
            self.fail(str(e).splitlines()[0])
        except Exception as e:  # the page must say why it stopped, in one line
            self.fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    def frames(self):
        import itertools

        from experiments.stream import synthetic_clips, video_frames

        frames = synthetic_clips(self.max_frames or 240, 0)[0] if self.source == "synthetic" else \
            video_frames(self.source, self.fps)
        return itertools.islice(frames, self.max_frames) if self.max_frames else frames

    def _run(self) -> None:
        import torch

        from casa.captioning import CaptionSession
        from casa.processing.video import Frame

        frames = self.frames()  # a bad video or URL fails here, before any page waits on it
        while not self.started.wait(0.1):
            if self.stopping.is_set():
                return
        session, first_t = None, None
        for i, frame in enumerate(frames):
            if isinstance(frame, Frame):  # the video's own clock, as Assistant.stream reads it
                first_t = frame.t if first_t is None else first_t
                arrival, frame = frame.t - first_t, frame.image
            else:
                arrival = i / self.fps
            while self.clock.now() < arrival or self.paused:
                if self.stopping.is_set():
                    return
                time.sleep(0.02)
            with self.lock:
                config, prompt, restart, self.restart = self.config, self.prompt, self.restart, False
            if session is None or restart:
                session = CaptionSession(self.assistant, prompt, config, self.context, attention=True)
            with torch.no_grad():
                cap = session.step(frame, i, config)
            delay = self.clock.now() - arrival
            if not isinstance(frame, (bytes, str, Path)):
                buf = io.BytesIO()
                frame.convert("RGB").save(buf, "JPEG")
                self.frame_jpeg = buf.getvalue()
            else:
                self.frame_jpeg = frame if isinstance(frame, bytes) else Path(frame).read_bytes()
            self.publish({"type": "caption", "index": i, "t": round(arrival, 3), "text": cap.text.strip(),
                          "delay": round(delay, 3), "attention": cap.attention, "restarted": restart,
                          "kv_tokens": session.cache.text_kv_tokens(), "dropped": cap.dropped,
                          "settings": {"prompt": prompt, "temperature": config.temperature,
                                       "repetition_penalty": config.repetition_penalty}})
            if cap.text.strip():
                print(f"[{stamp(arrival)}|{delay:.2f}s] {cap.text.strip()}", flush=True)
        self.publish({"type": "end"})


# ---------------------------------------------------------------------------------- server
def video_src(source: str) -> tuple[str | None, str | None]:
    """-> (what the page's <video> plays, the local file /video serves), or (None, None): a
    source the browser cannot play (frames are shown as images instead)."""
    if source.startswith(("http://", "https://")):
        return source, None
    p = Path(source)
    if p.is_file() and p.suffix.lower() in (".mp4", ".webm", ".mov", ".mkv", ".ogv", ".m4v"):
        return "/video", str(p)
    return None, None


def build_app(captioner: Captioner, source: str, should_exit=lambda: False):
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    src, local = video_src(source)
    page = PAGE.read_text().replace("__BOOT__", json.dumps({"video": src, "source": source,
                                                            "settings": captioner.settings()}))

    async def index(request: Request):
        return HTMLResponse(page)

    async def video(request: Request):
        if local is None:
            return Response("no local video", status_code=404)
        return FileResponse(local)

    async def frame(request: Request):
        if captioner.frame_jpeg is None:
            return Response(status_code=204)
        return Response(captioner.frame_jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def state(request: Request):
        return JSONResponse({"settings": captioner.settings(), "error": captioner.error,
                             "events": captioner.since(-1)})

    async def control(request: Request):
        try:
            change = await request.json()
            if not isinstance(change, dict):
                raise ValueError(f"a control is a JSON object, got {type(change).__name__}")
            return JSONResponse(captioner.control(change))
        except ValueError as e:  # json.JSONDecodeError is one
            return JSONResponse({"error": str(e)}, status_code=400)

    async def events(request: Request):
        last = int(request.headers.get("last-event-id", -1))

        async def stream():
            nonlocal last
            while not should_exit() and not await request.is_disconnected():
                for e in captioner.since(last):
                    last = e["id"]
                    yield {"id": str(e["id"]), "data": json.dumps(e)}
                await asyncio.sleep(0.05)

        return EventSourceResponse(stream(), ping=5)

    routes = [Route("/", index), Route("/video", video), Route("/frame.jpg", frame), Route("/state", state),
              Route("/control", control, methods=["POST"]), Route("/events", events)]
    return Starlette(routes=routes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from casa.rebuild import add_checkpoint_arguments

    p = argparse.ArgumentParser(prog="python -m experiments.live", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    p.add_argument("--video", required=True, help="a video file, an http(s) URL, a frame folder, or 'synthetic'")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--fps", type=float, default=2.0, help="frame rate of the stream (training: 2)")
    p.add_argument("--frames", type=int, default=None, help="stop after N frames")
    add_generation_arguments(p)
    a = p.parse_args(argv)
    if a.fps <= 0 or (a.frames is not None and a.frames < 1) or a.max_new_tokens < 1 or not 0 < a.port < 65536:
        p.error(f"--fps ({a.fps}) must be > 0, --frames ({a.frames}) and --max-new-tokens ({a.max_new_tokens}) >= 1, "
                f"--port ({a.port}) in 1..65535")
    return a


def main(argv: list[str] | None = None) -> int:
    import torch
    import uvicorn

    from casa.assistant import CheckpointError, load
    from casa.processing.template import CAPTION_PROMPT

    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        assistant = load(a.ckpt, a.device, a.config, a.precision)
        prompt = CAPTION_PROMPT if a.prompt is None else a.prompt
        config = assistant.generation_config(**generation_overrides(a))
        context = context_policy(a, assistant, prompt)
    except (CheckpointError, ValueError) as e:
        if os.environ.get("CASA_TRACEBACK"):
            raise
        print(f"experiments.live: error: {e}", file=sys.stderr)
        return 2
    captioner = Captioner(assistant, a.video, a.fps, config, prompt, context, a.frames)
    server = uvicorn.Server(uvicorn.Config(build_app(captioner, a.video, lambda: server.should_exit), host=a.host,
                                           port=a.port, log_level="warning", timeout_graceful_shutdown=2))
    captioner.start()
    print(f"experiments.live: serving http://{a.host}:{a.port} (video: {a.video}); Ctrl-C stops", flush=True)
    try:
        server.run()  # returns on SIGINT / SIGTERM (uvicorn's handlers), after closing connections
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it captured once its shutdown is done: that shutdown was clean
    finally:
        captioner.stopping.set()
        captioner.join(timeout=10)
    print("experiments.live: stopped", flush=True)
    return 1 if server.started is False else 0


if __name__ == "__main__":
    sys.exit(main())
