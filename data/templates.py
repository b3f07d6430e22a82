"""Chat templates: conversation -> token ids, answer mask and image positions.

Image placeholder tokens are never put in the text: an image is recorded as the text index
it precedes, and the fusion strategy decides what to do with it (insert its tokens there,
or open a window there).

    helium      <|user|>{text, images open windows here}<|end|><|assistant|>{answer}<|end|>
    qwen2_5_vl  <|im_start|>user\\n<|vision_start|>[image]<|vision_end|>{text}<|im_end|>\\n
                <|im_start|>assistant\\n{answer}<|im_end|>\\n
                (with the demo tokenizer, which has no <|im_*|> tokens: <|user|>/<|end|> markers)

Targets (the answer mask) are the assistant answers and their end-of-turn token: the
model learns to answer and to stop, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TEMPLATES = ("helium", "qwen2_5_vl")


@dataclass
class Encoded:
    input_ids: list[int]
    answer_mask: list[bool]
    image_positions: list[int]
    """Text index each image precedes, in image order."""
    prompt_len: int
    """Tokens before the last assistant answer (the generation prompt at evaluation)."""
    answer: str
    """Reference text of the last assistant answer."""
    extra: dict = field(default_factory=dict)


class ChatTemplate:
    """Args:
        name: "helium" or "qwen2_5_vl".
        tokenizer: any Hugging Face tokenizer.
    """

    def __init__(self, name: str, tokenizer):
        if name not in TEMPLATES:
            raise ValueError(f"template={name!r} is not one of {list(TEMPLATES)}")
        self.name = name
        self.tok = tokenizer
        vocab = tokenizer.get_vocab()
        qwen_native = name == "qwen2_5_vl" and "<|im_start|>" in vocab
        if qwen_native:
            self.turn_open = {r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")}
            self.turn_close = "<|im_end|>\n"
            self.end_token = "<|im_end|>"
        else:
            self.turn_open = {r: f"<|{r}|>" for r in ("system", "user", "assistant")}
            self.turn_close = "<|end|>"
            self.end_token = "<|end|>"
        self.vision = name == "qwen2_5_vl"
        for t in (self.end_token, *self.turn_open.values()) if not qwen_native else (self.end_token,):
            if t not in vocab:
                raise ValueError(f"tokenizer has no {t!r} token required by template {name!r}")

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.tok.convert_tokens_to_ids(self.end_token)]

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def assistant_prefix(self) -> list[int]:
        """Tokens that open an assistant turn (what a prompt ends with)."""
        return self._ids(self.turn_open["assistant"])

    def encode(self, messages: list[dict]) -> Encoded:
        """messages: [{"role", "content": [{"type": "text"|"image", ...}]}] (videos already
        expanded into images by `data.video`)."""
        ids: list[int] = []
        mask: list[bool] = []
        positions: list[int] = []
        prompt_len, answer = 0, ""

        def add(tokens: list[int], target: bool) -> None:
            ids.extend(tokens)
            mask.extend([target] * len(tokens))

        for m in messages:
            role = m["role"]
            add(self._ids(self.turn_open[role]), False)
            if role == "assistant":
                text = "".join(c.get("text", "") for c in m["content"] if c["type"] == "text")
                prompt_len, answer = len(ids), text
                add(self._ids(text), True)
                add(self._ids(self.end_token), True)
                rest = self.turn_close[len(self.end_token):]
                add(self._ids(rest), False)
                continue
            for c in m["content"]:
                if c["type"] == "text":
                    add(self._ids(c["text"]), False)
                elif c["type"] == "image":
                    if self.vision:
                        add(self._ids("<|vision_start|>"), False)
                        positions.append(len(ids))
                        add(self._ids("<|vision_end|>"), False)
                    else:
                        positions.append(len(ids))
            add(self._ids(self.turn_close), False)
        return Encoded(ids, mask, positions, prompt_len, answer)
