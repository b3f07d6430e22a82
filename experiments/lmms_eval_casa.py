"""The `casa` model of lmms-eval (0.7.x): any checkpoint of this codebase, scored by lmms-eval.

    python -m lmms_eval --model casa --model_args pretrained=CKPT[,device=cuda,precision=run,batch_size=8] \\
        --tasks docvqa_val,chartqa,... [--include_path experiments/lmms_tasks]

lmms-eval finds it through the `lmms_eval.models` entry point (pyproject.toml), which returns
`manifest()`. The checkpoint is loaded by `casa.assistant.load`. Every request becomes a
conversation in the shard format (`data.format`): the task's visuals, then its prompt, in one
user turn; the conversation goes through the processor `experiments.evaluate` uses
(`sample_processor`: template, pixel limits, frame sampling), so a sample lmms-eval asks about
is laid out token for token as our evaluation lays out the same sample in a shard. Requests are
packed `batch_size` at a time into one `PackedBatch` row (`data.packing.build_row`).

Visuals (what a task's `doc_to_visual` returns), one list per request:
    PIL image                           an image (several: a multi-image prompt, in order)
    path to an image file               an image
    path to a video file (.mp4, ...)    a video, decoded with PyAV (frames + timestamps)
    path to a folder of frames          a video (`data.converters` frames layout, meta.json fps)
A video is sampled like training (`data.video.sample_frames`: the run's fps, min/max duration).

generate_until: greedy unless `temperature` > 0 (with `do_sample`); `max_new_tokens`; the
answer is cut before the first `until` string (decoding itself stops at the template's
end-of-turn token or the budget).

loglikelihood: the continuation becomes the assistant's answer, and the result is
(-log p(answer | prompt), greedy?) from `Assistant.answer_logprobs`, as the `text` of a
`GenerationResult` (lmms-eval 0.7.3 stringifies a bare tuple before scoring it). The NEGATIVE
log-likelihood: lmms-eval's multiple_choice scoring takes the argmin over options, since its
own models return their loss (lmms_eval/api/task.py, "we just use the argmin here").
The answer's end-of-turn token is part of it (an option is scored as the whole answer), and
leading whitespace of the continuation (lmms-eval's default `target_delimiter`, " ") is dropped:
in a chat template the answer starts its own turn.
"""

from __future__ import annotations

import io
import json
import warnings
from collections import defaultdict
from pathlib import Path

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")
GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams",
                   "repetition_penalty")
PLACEHOLDER_ANSWER = "."
"""The assistant turn of a generation request: the processor needs one; generation starts
before it (`meta["prompt_len"]`), so it is never read."""


def manifest() -> ModelManifest:
    """The `lmms_eval.models` entry point: model id `casa`."""
    return ModelManifest(model_id="casa", simple_class_path=f"{__name__}.Casa")


def decode_video(path: Path) -> tuple[list[Image.Image], list[float]]:
    """A video file -> (RGB frames, timestamps in s), every frame (PyAV)."""
    import av

    frames, times = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            frames.append(frame.to_image())
            times.append(round(float(frame.time if frame.time is not None else len(times) / float(stream.average_rate)), 3))
    if not frames:
        raise ValueError(f"{path}: no video frame decoded")
    return frames, times


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")  # lossless: the processor sees the task's pixels
    return buf.getvalue()


def conversation(context: str, visuals: list, answer: str, fps: float) -> tuple[dict, dict[str, bytes]]:
    """A request -> (conversation, files) in the shard format: user [visuals..., context],
    assistant [answer]. `fps`: frame rate of a frames folder without meta.json."""
    from data.converters import Skip, load_frames
    from data.format import image, text

    content, files, video = [], {}, None
    for v in visuals or []:
        if isinstance(v, (str, Path)) and Path(v).is_dir():
            kind = "frames"
        elif isinstance(v, (str, Path)) and Path(v).suffix.lower() in VIDEO_SUFFIXES:
            kind = "video_file"
        elif isinstance(v, Image.Image) or (isinstance(v, (str, Path)) and Path(v).suffix.lower() in IMAGE_SUFFIXES):
            kind = "image"
        else:
            raise ValueError(f"casa: cannot use a visual {str(v)[:80]!r} ({type(v).__name__}): expected a PIL image, "
                             f"an image file {IMAGE_SUFFIXES}, a video file {VIDEO_SUFFIXES} or a folder of frames")
        if kind == "image":
            ref = f"img{len(files)}"
            files[f"{ref}.png"] = png(v if isinstance(v, Image.Image) else Image.open(v))
            content.append(image(ref))
            continue
        if video is not None:
            raise ValueError("casa: one video per request (the shard format holds one)")
        if kind == "frames":
            try:
                frame_files, refs, times, _ = load_frames(Path(v), fps)
            except Skip as e:
                raise ValueError(f"casa: frames folder {v}: {e}") from None
        else:
            imgs, times = decode_video(Path(v))
            refs = [f"v{i:06d}" for i in range(len(imgs))]
            frame_files = {f"{r}.png": png(im) for r, im in zip(refs, imgs)}
        files.update(frame_files)
        video = {"frames": refs, "timestamps": times, "layout": "qa"}
        content.append({"type": "video"})
    messages = [{"role": "user", "content": [*content, text(context)]},
                {"role": "assistant", "content": [text(answer)]}]
    return {"messages": messages, **({"video": video} if video else {})}, files


def cut_at_stop(text: str, until: list[str]) -> str:
    """The answer before the first occurrence of any stop string."""
    for s in until:
        if s:
            text = text.split(s, 1)[0]
    return text


class Casa(lmms):
    """lmms-eval model over `casa.assistant.Assistant` (see the module doc).

    Args:
        pretrained: a checkpoint (`casa.assistant.load`).
        device: "cpu", "cuda", "cuda:1", ...
        batch_size: requests packed into one batch row.
        precision: `casa.assistant.load`'s precision ("run": the run's validation precision).
        max_new_tokens: the answer budget when a task does not set one.
        max_batch_size: accepted for lmms-eval's CLI (its "auto" batch size), unused.
    """

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 8,
                 precision: str = "run", max_new_tokens: int | str = 48, max_batch_size: int | None = None) -> None:
        super().__init__()
        from casa.assistant import load
        from experiments.evaluate import sample_processor

        try:
            self.batch_size = int(batch_size)
            self.max_new_tokens = int(max_new_tokens)
        except ValueError:
            raise ValueError(f"casa: batch_size={batch_size!r} and max_new_tokens={max_new_tokens!r} must be integers "
                             "(lmms-eval's batch_size 'auto' is not supported)") from None
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"casa: batch_size={self.batch_size} and max_new_tokens={self.max_new_tokens} must be >= 1")
        self.assistant = load(pretrained, device or "cpu", precision=precision)
        self.processor = sample_processor(self.assistant)

    # ------------------------------------------------------------------ requests -> samples
    def _sample(self, request: Instance, context: str, answer: str):
        """A request -> `Sample` (the processor of `experiments.evaluate`)."""
        from data.dataset import SkipSample
        from data.format import make_sample

        doc_to_visual, doc_id, task, split = request.args[2:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        conv, files = conversation(context, visuals, answer, self.assistant.settings.fps)
        try:
            return self.processor(make_sample(f"{task}-{split}-{doc_id}", conv, files))
        except SkipSample as e:
            raise ValueError(f"casa: request {task}/{split}/{doc_id} cannot be encoded: {e}") from None

    def _batches(self, indices: list[int]):
        for i in range(0, len(indices), self.batch_size):
            yield indices[i:i + self.batch_size]

    def generation_config(self, gen_kwargs: dict):
        """lmms-eval generation kwargs -> (GenerationConfig, stop strings)."""
        unknown = sorted(set(gen_kwargs) - set(GENERATION_KEYS))
        if unknown:
            warnings.warn(f"casa: generation kwargs {unknown} are ignored (used: {list(GENERATION_KEYS)})")
        if int(gen_kwargs.get("num_beams") or 1) != 1:
            raise ValueError(f"casa: num_beams={gen_kwargs['num_beams']} is not supported (greedy or sampling only)")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature") or 0.0) if sample or "do_sample" not in gen_kwargs else 0.0
        cfg = self.assistant.generation_config(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens), temperature=temperature,
            top_p=float(gen_kwargs.get("top_p") or 1.0), repetition_penalty=float(gen_kwargs.get("repetition_penalty") or 1.0))
        return cfg, until

    # ------------------------------------------------------------------ lmms-eval API
    def generate_until(self, requests: list[Instance]) -> list[str]:
        from data.packing import build_row

        out: list[str | None] = [None] * len(requests)
        by_kwargs = defaultdict(list)  # one generation config per batch
        for i, r in enumerate(requests):
            by_kwargs[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        for key, indices in by_kwargs.items():
            cfg, until = self.generation_config(json.loads(key))
            for chunk in self._batches(indices):
                batch = build_row([self._sample(requests[i], requests[i].args[0], PLACEHOLDER_ANSWER) for i in chunk])
                for i, answer in zip(chunk, self.assistant.answer_batch(batch, cfg)):
                    out[i] = cut_at_stop(answer, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], out[i])
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """-> per request GenerationResult(text=(-log p(continuation | context), greedy?))."""
        from data.packing import build_row

        out: list[GenerationResult] = []
        for chunk in self._batches(list(range(len(requests)))):
            samples = [self._sample(requests[i], requests[i].args[0], requests[i].args[1].lstrip()) for i in chunk]
            # wrapped: lmms-eval 0.7.3's evaluator turns any other non-string response into its str()
            # (api/instance.py, unwrap_generation_output), and multiple_choice cannot unpack "(12.3, False)"
            out += [GenerationResult((-logp, greedy)) for logp, greedy in self.assistant.answer_logprobs(build_row(samples))]
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("casa: multi-round generation is not implemented (generate_until and "
                                  "loglikelihood are)")
