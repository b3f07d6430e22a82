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

generate_until_multi_round: the same per round; a round's prompt comes from the task's
`doc_to_text(..., round_idx=, previous_output=)`, the answer is the list of the rounds' answers.

Image size: `max_pixels` / `min_pixels` in model_args (default: the run's), checked.

Several processes (`accelerate launch -m lmms_eval ...` or `torchrun --nproc_per_node N -m lmms_eval ...`):
lmms-eval's evaluator hands each rank every N-th document and gathers the results on rank 0;
the model reports its rank and world size and runs on its rank's device (`Casa._init_distributed`).

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

MIN_TOKEN_PIXELS = 28 * 28
"""The smallest image pixel range bound: one visual token (a 2x2 merge of 14-px patches)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")
GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams",
                   "repetition_penalty")
MAX_ROUNDS = 32
"""`generate_until_multi_round`: the default bound on rounds (a task that never says done fails, not hangs)."""
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


def pixel_range(max_pixels, min_pixels, run_max: int, run_min: int) -> tuple[int, int]:
    """The `max_pixels` / `min_pixels` model_args (None: the run's) -> (max, min), checked."""
    from casa.processing.image import FACTOR, MAX_DECODE_PIXELS

    got = {"max_pixels": run_max, "min_pixels": run_min}  # the run's were checked when it trained
    for name, value in (("max_pixels", max_pixels), ("min_pixels", min_pixels)):
        if value is None or value == "":
            continue
        try:
            got[name] = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"casa: model_args {name}={value!r} must be an integer number of pixels "
                             f"in [{MIN_TOKEN_PIXELS}, {MAX_DECODE_PIXELS}]") from None
        if not MIN_TOKEN_PIXELS <= got[name] <= MAX_DECODE_PIXELS:
            raise ValueError(f"casa: model_args {name}={got[name]} is out of range: valid [{MIN_TOKEN_PIXELS}, "
                             f"{MAX_DECODE_PIXELS}] ({FACTOR}x{FACTOR}, one visual token, to the decode limit)")
    if got["min_pixels"] > got["max_pixels"]:
        raise ValueError(f"casa: model_args min_pixels={got['min_pixels']} must be <= max_pixels={got['max_pixels']}"
                         f" (valid: {MIN_TOKEN_PIXELS} <= min_pixels <= max_pixels <= {MAX_DECODE_PIXELS})")
    return got["max_pixels"], got["min_pixels"]


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
        max_pixels / min_pixels: the image pixel range (default: the run's), an image outside is
            resized into it, aspect ratio kept; video frames use min(max_pixels, the run's
            frame_max_pixels). Valid: MIN_TOKEN_PIXELS <= min_pixels <= max_pixels <= MAX_DECODE_PIXELS.
        max_rounds: the most rounds `generate_until_multi_round` runs for one request.
    """

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 8,
                 precision: str = "run", max_new_tokens: int | str = 48, max_batch_size: int | None = None,
                 max_pixels: int | str | None = None, min_pixels: int | str | None = None,
                 max_rounds: int | str = MAX_ROUNDS) -> None:
        super().__init__()
        from casa.assistant import load
        from experiments.evaluate import sample_processor

        try:
            self.batch_size = int(batch_size)
            self.max_new_tokens = int(max_new_tokens)
            self.max_rounds = int(max_rounds)
        except ValueError:
            raise ValueError(f"casa: batch_size={batch_size!r}, max_new_tokens={max_new_tokens!r} and "
                             f"max_rounds={max_rounds!r} must be integers (lmms-eval's batch_size 'auto' is not "
                             "supported)") from None
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.max_rounds < 1:
            raise ValueError(f"casa: batch_size={self.batch_size}, max_new_tokens={self.max_new_tokens} and "
                             f"max_rounds={self.max_rounds} must be >= 1")
        self._init_distributed(device)
        self.assistant = load(pretrained, str(self._device), precision=precision)
        self.processor = sample_processor(self.assistant)
        # the image pixel range: the run's unless overridden (frames stay capped by the run's frame_max_pixels)
        self.processor.max_pixels, self.processor.min_pixels = pixel_range(
            max_pixels, min_pixels, self.processor.max_pixels, self.processor.min_pixels)

    def _init_distributed(self, device: str | None) -> None:
        """Rank, world size and device, as lmms-eval's own models set them. Under `accelerate launch`
        or `torchrun`, lmms-eval's evaluator gives each rank every world_size-th document
        (`Task.build_all_requests(rank=, world_size=)`), gathers the per-rank results on rank 0
        and gathers request counts with `lm.accelerator` on `lm.device`: the model answers only
        the requests it is handed, on its own device (cuda:LOCAL_RANK when several ranks share
        a node; gloo on CPU)."""
        import torch
        from accelerate import Accelerator

        cpu = device is None or str(device).startswith("cpu")  # the default stays CPU, as before
        self.accelerator = Accelerator(cpu=cpu)
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if cpu:
            self._device = torch.device("cpu")
        elif self._world_size > 1 and str(device) == "cuda":
            self._device = torch.device(f"cuda:{self.accelerator.local_process_index}")  # one GPU per rank
        else:
            self._device = torch.device(device)

    @property
    def device(self):
        return self._device

    # ------------------------------------------------------------------ requests -> samples
    def _sample(self, request: Instance, context: str, answer: str):
        """A generate_until / loglikelihood request -> `Sample`."""
        doc_to_visual, doc_id, task, split = request.args[2:6]
        return self._encode((task, split, doc_id), context, doc_to_visual(self.task_dict[task][split][doc_id]), answer)

    def _encode(self, doc: tuple, context: str, visuals: list | None, answer: str):
        """(task, split, doc_id), a prompt and its visuals -> `Sample` (the processor of `experiments.evaluate`)."""
        from data.dataset import SkipSample
        from data.format import make_sample

        task, split, doc_id = doc
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

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Multi-round requests (args: context, generation kwargs, doc_to_visual, doc_to_text, doc_id,
        task, split) -> per request its answers, one per round. Round 0 is the context and the
        document's visuals; after each round the task's `doc_to_text(doc, previous_output=[answers so
        far], round_idx=, previous_round_info=)` returns (visuals, context, done, answers,
        round_info): the next round's prompt (a new conversation, as lmms-eval's own models run
        it), or done. Requests still running are generated together, `batch_size` at a time."""
        from data.packing import build_row

        out: list[list[str] | None] = [None] * len(requests)
        by_kwargs = defaultdict(list)
        for i, r in enumerate(requests):
            by_kwargs[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        for key, indices in by_kwargs.items():
            cfg, until = self.generation_config(json.loads(key))
            for chunk in self._batches(indices):
                docs = {i: self.task_dict[requests[i].args[5]][requests[i].args[6]][requests[i].args[4]] for i in chunk}
                prompts = {i: (requests[i].args[2](docs[i]), requests[i].args[0]) for i in chunk}
                answers: dict[int, list[str]] = {i: [] for i in chunk}
                info: dict = dict.fromkeys(chunk)
                active, round_idx = list(chunk), 0
                while active:
                    if round_idx == self.max_rounds:
                        raise ValueError(f"casa: requests {[requests[i].args[4:] for i in active]} still run after "
                                         f"max_rounds={self.max_rounds} rounds (a model_args option)")
                    batch = build_row([self._encode(requests[i].args[5:7] + requests[i].args[4:5], prompts[i][1],
                                                    prompts[i][0], PLACEHOLDER_ANSWER) for i in active])
                    for i, answer in zip(active, self.assistant.answer_batch(batch, cfg)):
                        answers[i].append(cut_at_stop(answer, until))
                    round_idx += 1
                    still = []
                    for i in active:
                        visuals, context, done, answers[i], info[i] = requests[i].args[3](
                            docs[i], previous_output=list(answers[i]), round_idx=round_idx, previous_round_info=info[i])
                        answers[i] = list(answers[i])
                        if not done:
                            prompts[i] = (visuals, context)
                            still.append(i)
                    active = still
                for i in chunk:  # a list of str: lmms-eval passes it on as the rounds' answers
                    out[i] = answers[i]
                    self.cache_hook.add_partial("generate_until_multi_round", requests[i].args[:2], out[i])
        return out
