"""Inference from a checkpoint alone: chat, batch answers, live captioning.

    assistant = casa.assistant.load("runs/demo/checkpoints/last.ckpt")
    assistant.chat("What colour is the shape?", images=[img])          -> "red"
    for rec in assistant.stream(frames, fps=2): print(rec.text)         live captioning

`load` rebuilds model, tokenizer and chat template from the run config that
`experiments.fit` stores in every checkpoint (`checkpoint["casa_config"]`, YAML; read and
built by `casa.rebuild`), so a checkpoint file is all inference needs. Prompts and frames
go through the same processor as training (`casa.processing`).

Live captioning follows the "caption" layout the model was trained on (`data.video`): one
window per frame, each followed by an assistant turn with what is said at that frame (often
nothing, just the end token). Per frame the stream feeds ONE chunk -- the tail of the
previous turn, then the frame opening a new window and the tokens that open the assistant
turn -- and decodes the caption with the KV cache (`casa.cache`):

    helium:   <|user|> prompt [F0] <|end|><|assistant|> caption <|end|> <|user|> [F1] <|end|><|assistant|> ...
    chunk i:  [<|end|> <|user|>  |  F_i <|end|><|assistant|>]
               window i-1's tail |  opens window i
              (<|end|>: the last token generated for frame i-1, not fed yet; a caption cut at
              max_new_tokens is closed with its last token and an <|end|>)

The pieces are taken from the template itself (`CaptionLayout.from_template`), so any
template lays the stream out exactly as `ChatTemplate.encode` lays out a training sample.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
from PIL import Image

from casa.batch import PackedBatch
from casa.context_limit import ContextPolicy
from casa.captioning import CaptionLayout, FrameRecord, frame_chunk  # noqa: F401  (their public home was here)
from casa.checkpoint import CheckpointError
from casa.generation import GenerationConfig, generate, truncate_samples
from casa.inputs import ImageLike, InputError, to_image  # noqa: F401  (likewise)
from casa.memory import rss_bytes
from casa.processing.image import ImageError, patchify
from casa.processing.sample import Sample, build_sample_row
from casa.processing.template import CAPTION_PROMPT, ChatTemplate
from casa.processing.tokenizer import resolve_tokenizer
from casa.processing.video import Frame, VideoError, read_video
from casa.rebuild import HALF, DataSettings, build_model, read_checkpoint, resolve_precision

# ---------------------------------------------------------------------------------- loading
def load(ckpt_path: str | Path, device: str | torch.device = "cpu", config_files: list[str | Path] = (),
         precision: str = "run") -> "Assistant":
    """Rebuild model + tokenizer + chat template from a checkpoint written by `experiments.fit`
    (a file or FSDP2's directory; `config_files`: the run's YAML configs, for a checkpoint
    without `casa_config`), or from a Hugging Face export directory (`experiments.export`).

    precision: one of `PRECISIONS`; "run" (default) is the precision the run validated in
    (`run_precision`), so evaluating a checkpoint reproduces the metrics its validation logged."""
    from casa.hf.export import is_export_dir

    if is_export_dir(ckpt_path):
        return _load_export(ckpt_path, device, precision)
    ckpt, config = read_checkpoint(ckpt_path, config_files)
    try:
        model = build_model(config)  # parsed (and composed) by the fit CLI's parser
    except Exception as e:
        raise CheckpointError(f"{ckpt_path}: cannot rebuild the model from its run config ({type(e).__name__}: {e})") from None
    weights = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_path}: weights do not match the config's model: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    settings = DataSettings.from_config(config.get("data"))
    try:
        tokenizer = resolve_tokenizer(settings.tokenizer)
        template = ChatTemplate(settings.template, tokenizer)
    except Exception as e:
        raise CheckpointError(f"{ckpt_path}: cannot build tokenizer {settings.tokenizer!r} / template "
                              f"{settings.template!r} ({type(e).__name__}: {e})") from None
    return _assistant(model, tokenizer, template, settings, config, int(ckpt.get("global_step", 0)), precision, device)


def _load_export(path: str | Path, device, precision: str) -> "Assistant":
    """A Hugging Face export directory (`casa.hf`) -> Assistant: the model from its weights and
    config.json, the tokenizer saved beside them, pixel limits from its image processor."""
    from casa.hf.export import read_export

    try:
        model, tokenizer, hf_config, (min_pixels, max_pixels) = read_export(path)
        template = ChatTemplate(hf_config.template, tokenizer)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load this Hugging Face export ({type(e).__name__}: {e})") from None
    fields = {k: v for k, v in hf_config.inference.items() if k in DataSettings.__dataclass_fields__}
    settings = DataSettings(**{**fields, "min_pixels": min_pixels, "max_pixels": max_pixels})
    # the run config's parts that inference reads (run_precision takes a trainer precision as is)
    config = {"model": {"model": hf_config.model_spec}, "trainer": {"precision": hf_config.run_precision}}
    return _assistant(model, tokenizer, template, settings, config, 0, precision, device)


def _assistant(model, tokenizer, template, settings, config: dict, step: int, precision: str, device) -> "Assistant":
    """The loaded parts -> Assistant, on `device`, in `precision` (resolved against the run's)."""
    precision = resolve_precision(precision, config, model, device)
    model = model.to(device).eval()
    dtype = HALF[precision.split("-")[0]] if precision != "32" else None
    if precision.endswith("-true"):
        # parameters only, as FSDP2's MixedPrecisionPolicy(param_dtype=...) casts them: buffers
        # such as the rotary inverse frequencies stay fp32
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return Assistant(model, tokenizer, template, settings, config, step,
                     autocast_dtype=dtype if precision.endswith("-mixed") else None)


# ---------------------------------------------------------------------------------- helpers
def memory_bytes(device: torch.device) -> int:
    """CUDA: bytes allocated by tensors; CPU: process RSS (see docs/inference.md on what it includes)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return rss_bytes()


# ---------------------------------------------------------------------------------- assistant
class Assistant:
    """A loaded model with its tokenizer and template (build one with `load`)."""

    def __init__(self, model, tokenizer, template: ChatTemplate, settings: DataSettings, config: dict | None = None,
                 global_step: int = 0, autocast_dtype: torch.dtype | None = None):
        self.model, self.tokenizer, self.template, self.settings = model, tokenizer, template, settings
        self.config, self.global_step = config or {}, global_step
        self.stop_token_ids = tuple(template.stop_token_ids)
        self.autocast_dtype = autocast_dtype
        """Set: every generation runs under `torch.autocast` in this dtype (`precision="bf16-mixed"`)."""

    def _autocast(self):
        """The assistant's precision: autocast under `precision="bf16-mixed"`, else nothing."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _generate(self, *args, **kwargs) -> list[list[int]]:
        with self._autocast():
            return generate(self.model, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def inference_mask(self) -> str | None:
        return getattr(self.model.fusion, "inference_mask", None)

    def set_inference_mask(self, mask: str | None) -> None:
        """Table 8 masks in the CASA layers ("self", "rnd", "rnd_txt" or None): a mode of the
        model (`VisionLanguageModel.set_inference_mask`).

        The KV cache cannot honour them (the masked key's index is computed over the chunk's
        windows, not over the cached ones), so generation with a mask runs uncached."""
        self.model.set_inference_mask(mask)

    def generation_config(self, **overrides) -> GenerationConfig:
        """Greedy, stopping at the template's end token (uncached under an inference mask),
        unless overridden."""
        base = {"stop_token_ids": self.stop_token_ids, "use_cache": self.inference_mask is None}
        return GenerationConfig(**{**base, **overrides})

    def decode(self, tokens: list[int]) -> str:
        stop = set(self.stop_token_ids)
        return self.tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True)

    def pixels(self, image: ImageLike, max_pixels: int) -> tuple[torch.Tensor, list[int]]:
        """-> (pixel_values [P, 3*2*14*14], grid [1, h, w]) as in training (`casa.processing.image.patchify`)."""
        try:
            return patchify(to_image(image, max_pixels), max_pixels, self.settings.min_pixels)
        except ImageError as e:
            raise InputError(str(e)) from None

    def video_frames(self, source) -> list[Image.Image]:
        """A video file, URL or frame folder -> its frames sampled as in training (the run's
        fps, min_duration, min_frames, max_duration)."""
        s = self.settings
        try:
            # frames downscaled as decoded (to the size patchify would give them anyway): a long
            # 1080p clip never holds its frames at full size
            return [f.image for f in read_video(source, s.fps, s.min_duration, s.min_frames, s.max_duration,
                                                max_pixels=min(s.max_pixels, s.frame_max_pixels))]
        except VideoError as e:
            raise InputError(str(e)) from None

    # ------------------------------------------------------------------ chat
    def prompt(self, messages: list[dict], images: Iterable[ImageLike] = ()) -> PackedBatch:
        """messages (`data.format` style) -> the generation prompt of their next assistant turn.

        Image items carry their image as {"type": "image", "image": PIL | path | bytes}, or take
        the next one of `images`; {"type": "video", "frames": [...]} puts frames in one window,
        {"type": "video", "video": "clip.mp4"} the frames of a video sampled as in training."""
        pool = list(images)
        msgs, pixels, grids = [], [], []
        for m in messages:
            content = []
            for c in m["content"]:
                kind = c.get("type")
                if kind in ("image", "video"):
                    cap = self.settings.max_pixels if kind == "image" else min(self.settings.max_pixels,
                                                                               self.settings.frame_max_pixels)
                    items = [c["image"] if "image" in c else (pool.pop(0) if pool else None)] if kind == "image" \
                        else self.video_frames(c["video"]) if "video" in c else list(c.get("frames", []))
                    if any(x is None for x in items) or not items:
                        raise InputError(f"a {kind} item has no image (pass it inline or in images=)")
                    for x in items:
                        pv, grid = self.pixels(x, cap)
                        pixels.append(pv)
                        grids.append(grid)
                        content.append({"type": "image", "ref": f"img{len(grids) - 1}"})
                else:
                    content.append(c)
            msgs.append({"role": m["role"], "content": content})
        if pool:
            raise InputError(f"{len(pool)} image(s) in images= were not used by any image item of the messages")
        enc = self.template.encode(msgs + [{"role": "assistant", "content": [{"type": "text", "text": ""}]}])
        n = enc.prompt_len
        sample = Sample(enc.input_ids[:n], [False] * n, enc.image_positions, pixels, grids, {"key": "chat"})
        return build_sample_row(sample).to(self.device)

    @torch.no_grad()
    def chat(self, messages: list[dict] | str, images: Iterable[ImageLike] = (),
             config: GenerationConfig | None = None) -> str:
        """The assistant's next answer. `messages` is a conversation, or a question asked about
        `images` (user turn: the images, then the question). `config`: generation settings,
        e.g. `generation_config(temperature=0.7, top_k=20, seed=0)` (`casa.generation.GenerationConfig`)."""
        if isinstance(messages, str):
            imgs = list(images)
            messages = [{"role": "user", "content": [*({"type": "image", "image": x} for x in imgs),
                                                     {"type": "text", "text": messages}]}]
            images = ()
        out = self._generate(self.prompt(messages, images), config or self.generation_config())
        return self.decode(out[0])

    @torch.no_grad()
    def answer_batch(self, batch: PackedBatch, config: GenerationConfig | None = None) -> list[str]:
        """An evaluation batch (`meta[s]["prompt_len"]`) -> one generated answer per sample,
        as `CasaModule.validation_step` scores them."""
        prompts = truncate_samples(batch.to(self.device), [m["prompt_len"] for m in batch.meta],
                                   merge=self.model.vision.spatial_merge_size)
        return [self.decode(g) for g in self._generate(prompts, config or self.generation_config())]

    @torch.no_grad()
    def answer_loss(self, batch: PackedBatch) -> tuple[float, int]:
        """An evaluation batch -> (sum of the answer-token losses, answer tokens): teacher-forced,
        as `CasaModule.validation_step` computes `val/loss` (token-weighted over batches)."""
        with self._autocast():
            out = self.model(batch.to(self.device))
        return float(out.loss) * out.num_targets, out.num_targets

    @torch.no_grad()
    def answer_logprobs(self, batch: PackedBatch) -> list[tuple[float, bool]]:
        """An evaluation batch -> per sample (sum of the log-probabilities of its answer tokens,
        whether greedy decoding picks every one of them), teacher-forced: the likelihood that
        multiple choice ranks options by (`experiments.evaluate`, lmms-eval's `loglikelihood`).
        The answer tokens are the template's (`ChatTemplate.encode`): the end-of-turn token
        included, so an option scores as the whole answer, not as a prefix of a longer one."""
        batch = batch.to(self.device)
        with self._autocast():
            logits = self.model(batch).logits.float()  # [T, V]
        target = batch.labels != -100  # [T]; labels are pre-shifted: logits[p] predicts labels[p]
        labels = batch.labels.clamp(min=0)
        token_logp = torch.where(target, logits.log_softmax(-1).gather(-1, labels[:, None])[:, 0], 0.0)  # [T]
        greedy = (logits.argmax(-1) == labels) | ~target  # [T]
        cu = batch.sample_cu_seqlens.tolist()
        return [(float(token_logp[a:b].sum()), bool(greedy[a:b].all())) for a, b in zip(cu, cu[1:])]

    # ------------------------------------------------------------------ live captioning
    @torch.no_grad()
    def stream(self, frames: Iterable[ImageLike], fps: float = 2.0, config: GenerationConfig | None = None,
               prompt: str = CAPTION_PROMPT, wait: bool = True, generator: torch.Generator | None = None,
               context: ContextPolicy | None | bool = None, attention: bool = False) -> Iterator[FrameRecord]:
        """Live captioning: one record per frame, yielded as soon as its caption is written
        (`casa.captioning.CaptionSession`: the per-frame work, shared with the live web view).

        Frame i arrives at i / fps s, or, for a `casa.processing.video.Frame` (a decoded video),
        at its own timestamp from the first frame's: the video's clock. `wait=True` sleeps until
        then (a live source); with `wait=False` frames are processed back to back and `delay_s`
        is what a real-time run would have had: a frame starts when it arrives or when the
        previous one is done. `config`: generation settings (`generation_config(temperature=...,
        repetition_penalty=..., seed=...)`); `context`: the text KV cache's policy (default:
        at most max_position_embeddings tokens, the prompt and the recent past kept,
        `casa.context_limit.ContextPolicy`; False: unbounded, for growth benchmarks); `attention`: record the CASA layers' attention masses."""
        from casa.captioning import CaptionSession

        if fps <= 0:
            raise ValueError(f"fps={fps} must be > 0")
        session = CaptionSession(self, prompt, config, context, generator, attention)
        dev, done_at = self.device, 0.0
        t0 = time.perf_counter()
        first_t = None
        for i, frame in enumerate(frames):
            if isinstance(frame, Frame):  # a decoded video frame: its pts is its arrival
                first_t = frame.t if first_t is None else first_t
                arrival, frame = frame.t - first_t, frame.image
            else:
                arrival = i / fps
            if wait:
                time.sleep(max(0.0, t0 + arrival - time.perf_counter()))
            start = time.perf_counter()
            cap = session.step(frame, i)
            end = time.perf_counter()
            wall = end - start
            delay = (end - t0) - arrival if wait else max(arrival, done_at) + wall - arrival
            done_at = arrival + delay
            cache = session.cache
            yield FrameRecord(i, round(arrival, 3), cap.text, len(cap.tokens), cap.stopped, wall, delay,
                              cache.text_kv_tokens(), session.text_seen, session.image_seen, cache.window_kv_tokens(),
                              cache.nbytes(), memory_bytes(dev), cap.dropped, cap.attention)
