"""CasaProcessor: conversations and images -> the inputs of CasaForConditionalGeneration.

A transformers `ProcessorMixin` (image processor + tokenizer + chat template, saved with
`save_pretrained`, loaded by `AutoProcessor.from_pretrained(DIR, trust_remote_code=True)`).
Copied into every export with the casa modules it uses (`casa.hf.source`): pixels come from
casa's own preprocessing (`casa.processing.image.patchify`, `casa.processing.video.read_video`,
the run's pixel limits and frame sampling), so a prompt gets the tokens and pixels casa's
training and `casa.assistant` give it.

    processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=True, return_tensors="pt")
    processor(text=["<|user|><|image_pad|>What colour?<|end|><|assistant|>"], images=[img])

The text holds one `<|image_pad|>` per image and one `<|video_pad|>` per video; a video's
placeholder becomes one per sampled frame (joined as the template joins consecutive images).
Output, as Qwen2.5-VL's processor: input_ids / attention_mask [B, L] (left padding),
pixel_values [P, 3*2*14*14] and image_grid_thw [I, 3], pixel_values_videos and video_grid_thw
(one row per frame: casa encodes each frame as an image).
"""

from __future__ import annotations

import urllib.request
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from casa.inputs import to_image
from casa.processing.image import MIN_PIXELS, patchify
from casa.processing.video import read_video

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VIDEO_DEFAULTS = {"fps": 2.0, "min_duration": 10.0, "min_frames": 20, "max_duration": 180.0,
                  "frame_max_pixels": 448 * 448}
"""Frame sampling (`casa.rebuild.DataSettings`' fields); an export writes its run's values."""


class CasaProcessor(ProcessorMixin):
    """Args:
        image_processor: a Qwen2VLImageProcessor(Pil) whose size holds the run's pixel limits
            (shortest_edge = min_pixels, longest_edge = max_pixels).
        tokenizer: the run's tokenizer (with `<|image_pad|>` and `<|video_pad|>`).
        chat_template: the run's template as Jinja (`casa.processing.template.ChatTemplate.jinja`).
        video_settings: frame sampling and the frames' pixel cap (`VIDEO_DEFAULTS` keys)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None,
                 video_settings: dict[str, Any] | None = None):
        unknown = set(video_settings or {}) - set(VIDEO_DEFAULTS)
        if unknown:
            raise ValueError(f"video_settings has unknown keys {sorted(unknown)}; valid: {sorted(VIDEO_DEFAULTS)}")
        self.video_settings = {**VIDEO_DEFAULTS, **(video_settings or {})}
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # ------------------------------------------------------------------ pixels
    @property
    def pixel_limits(self) -> tuple[int, int]:
        size = self.image_processor.size
        return int(size.get("shortest_edge", MIN_PIXELS)), int(size["longest_edge"])

    def _image(self, x: Any, cap: int) -> Image.Image:
        """PIL image, path, file/http URL, encoded bytes or HxWx3 array -> RGB image, decoded
        as `casa.inputs.to_image` decodes it (large JPEGs at reduced scale up to `cap`); a URL
        is fetched first (the processor's one addition to what casa's chat accepts)."""
        if isinstance(x, str) and x.split("://", 1)[0] in ("http", "https", "file"):
            with urllib.request.urlopen(x, timeout=60) as r:  # noqa: S310 (the caller's own URL)
                return to_image(r.read(), cap)
        return to_image(x, cap)

    def _pixels(self, items: list, cap: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Images -> (pixel_values [P, 3*2*14*14], grid_thw [n, 3]) as casa's `patchify`."""
        if not items:
            return None, None
        min_pixels, _ = self.pixel_limits
        out = [patchify(self._image(x, cap), cap, min_pixels) for x in items]
        return torch.cat([pv for pv, _ in out]), torch.tensor([g for _, g in out], dtype=torch.long)

    def video_frames(self, video: Any) -> list:
        """A video file, URL or frame folder (sampled as the run trained: fps, min_duration,
        min_frames, max_duration), or a list of frames as they are."""
        if isinstance(video, (list, tuple)):
            if not video:
                raise ValueError("a video given as frames needs at least one frame")
            return list(video)
        s = self.video_settings
        cap = min(self.pixel_limits[1], int(s["frame_max_pixels"]))  # downscaled as decoded, as casa.assistant does
        return [f.image for f in read_video(video, s["fps"], s["min_duration"], s["min_frames"], s["max_duration"],
                                            max_pixels=cap)]

    # ------------------------------------------------------------------ text
    def _frame_separator(self) -> str:
        """What the template writes between two consecutive images' placeholders (helium: "",
        qwen2_5_vl: "<|vision_end|><|vision_start|>"): a video's frames are joined with it."""
        two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]
        text = self.tokenizer.apply_chat_template(two, tokenize=False, chat_template=self.chat_template)
        first = text.index(IMAGE_PAD) + len(IMAGE_PAD)
        return text[first:text.index(IMAGE_PAD, first)]

    def __call__(self, images=None, text=None, videos=None, return_tensors: str | None = "pt",
                 padding: bool | str = True, padding_side: str = "left", **kwargs) -> BatchFeature:
        """text: a string or a list of them (one per row), with one `<|image_pad|>` per image and
        one `<|video_pad|>` per video, in order; images: a list of images (or one list per row,
        flattened in order); videos: a list of videos (file, URL, frame folder or frame list).
        A placeholder count that differs from the images / videos given is an error."""
        if text is None:
            raise ValueError("CasaProcessor needs text= (with one <|image_pad|> per image)")
        texts = [text] if isinstance(text, str) else list(text)
        flat = [x for row in images for x in row] if images and isinstance(images[0], (list, tuple)) \
            else ([] if images is None else [images] if not isinstance(images, (list, tuple)) else list(images))
        videos = [] if videos is None else list(videos)
        n_img, n_vid = sum(t.count(IMAGE_PAD) for t in texts), sum(t.count(VIDEO_PAD) for t in texts)
        if n_img != len(flat):
            raise ValueError(f"text holds {n_img} {IMAGE_PAD} placeholders but {len(flat)} images were given: "
                             "each image needs one placeholder (apply_chat_template writes them)")
        if n_vid != len(videos):
            raise ValueError(f"text holds {n_vid} {VIDEO_PAD} placeholders but {len(videos)} videos were given")
        frames = [self.video_frames(v) for v in videos]
        if frames:
            sep, k, expanded = self._frame_separator(), 0, []
            for t in texts:
                pieces = t.split(VIDEO_PAD)
                out = pieces[0]
                for p in pieces[1:]:
                    out += sep.join([VIDEO_PAD] * len(frames[k])) + p
                    k += 1
                expanded.append(out)
            texts = expanded
        min_pixels, max_pixels = self.pixel_limits
        data = dict(self.tokenizer(texts, add_special_tokens=False, padding=padding, padding_side=padding_side,
                                   return_tensors=return_tensors))
        pv, grid = self._pixels(flat, max_pixels)
        if pv is not None:
            data.update(pixel_values=pv, image_grid_thw=grid)
        pvv, vgrid = self._pixels([f for fs in frames for f in fs],
                                  min(max_pixels, int(self.video_settings["frame_max_pixels"])))
        if pvv is not None:
            data.update(pixel_values_videos=pvv, video_grid_thw=vgrid)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def apply_chat_template(self, conversation, chat_template: str | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = False, return_dict: bool = False, return_tensors: str | None = None,
                            padding: bool | str = True, **kwargs):
        """conversation: messages (or a list of conversations, one per row) whose content items
        are {"type": "text", "text"}, {"type": "image", "image" | "url" | "path": PIL | path |
        URL | bytes} and {"type": "video", "video": path | URL | frame folder | [frames]}.
        tokenize=False -> the text(s), one placeholder per image / video; else the ids, and with
        return_dict=True the processor's full output (`__call__`)."""
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        texts, images, videos = [], [], []
        for messages in conversations:
            rendered = []
            kinds = []  # image or video, per visual item in order
            for m in messages:
                content = m["content"]
                if isinstance(content, str):
                    rendered.append(m)
                    continue
                items = []
                for c in content:
                    kind = c.get("type")
                    if kind in ("image", "image_url") or (kind is None and "image" in c):
                        source = next((c[k] for k in ("image", "url", "path", "image_url") if k in c), None)
                        if isinstance(source, dict):  # OpenAI style {"image_url": {"url": ...}}
                            source = source.get("url")
                        if source is None and tokenize:
                            raise ValueError("an image item has no image (give it as {'type': 'image', 'image': ...})")
                        images.append(source)
                        kinds.append("image")
                        items.append({"type": "image"})
                    elif kind == "video":
                        source = next((c[k] for k in ("video", "frames", "url", "path") if k in c), None)
                        if source is None and tokenize:
                            raise ValueError("a video item has no video (give it as {'type': 'video', 'video': ...})")
                        videos.append(source)
                        kinds.append("video")
                        items.append({"type": "image"})  # rendered as an image, its placeholder swapped below
                    else:
                        items.append(c)
                rendered.append({**m, "content": items})
            text = self.tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      chat_template=chat_template or self.chat_template)
            pieces = text.split(IMAGE_PAD)
            if len(pieces) - 1 != len(kinds):
                raise ValueError(f"the chat template wrote {len(pieces) - 1} {IMAGE_PAD} for {len(kinds)} images/videos")
            text = pieces[0] + "".join((IMAGE_PAD if k == "image" else VIDEO_PAD) + p for k, p in zip(kinds, pieces[1:]))
            texts.append(text)
        if not tokenize:
            return texts if batched else texts[0]
        out = self(images=images, text=texts, videos=videos, return_tensors=return_tensors, padding=padding)
        return out if return_dict else out["input_ids"]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Generated ids [B, n] -> their text (what the image-text-to-text pipeline returns)."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]
