"""Chat templates: conversation -> token ids, answer mask and image positions.

Image placeholder tokens are never put in the text: an image is recorded as the text index
it precedes, and the fusion strategy decides what to do with it (insert its tokens there,
or open a window there).

    helium      <|user|>{text; an image opens a window at its text position}<|end|>
                <|assistant|>{answer}<|end|>
    qwen2_5_vl  <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n   (unless the
                conversation opens with its own system turn)
                <|im_start|>user\\n<|vision_start|>[image]<|vision_end|>{text}<|im_end|>\\n
                <|im_start|>assistant\\n{answer}<|im_end|>\\n
                The image's position is the index of <|vision_end|> (the token it precedes):
                Qwen2.5-VL-Instruct's own chat template with its <|image_pad|> run taken out
                (tests/test_data_templates.py renders that Jinja template and compares). With a
                tokenizer without <|im_*|> tokens (the char tokenizer) the turns use our
                <|user|> ... <|end|> specials instead, without the default system turn.

A tokenizer that lacks the <|user|>/<|end|> specials (e.g. a stock Helium or Llama
tokenizer) gets plain-text role markers ("User: ", "Assistant: ") and its EOS as the end
token, so the template works with any Hugging Face tokenizer without resizing its vocabulary.

Targets (the answer mask) are the assistant answers and their end-of-turn token: the
model learns to answer and to stop, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

TEMPLATES = ("helium", "qwen2_5_vl")
OUR_TURNS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
PLAIN_TURNS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
"""The system turn Qwen2.5-VL-Instruct's chat template opens every conversation with when the
conversation has none."""
IMAGE_PAD = "<|image_pad|>"
"""What `render` / `jinja` write for an image (Qwen's placeholder; the char tokenizer has it too)."""
CAPTION_PROMPT = "Describe what happens."
"""The user prompt that opens a live-captioning conversation (`data.video`'s caption layout, and
`casa.assistant`'s stream)."""


@dataclass
class Encoded:
    input_ids: list[int]
    """[T] text token ids."""
    answer_mask: list[bool]
    """[T] True for target tokens (assistant answers and their end token)."""
    image_positions: list[int]
    """[I] text index each image precedes, in image order."""
    prompt_len: int
    """Tokens before the last assistant answer (the generation prompt at evaluation)."""
    answer: str = ""
    """Reference text of the last assistant answer."""

    def with_placeholders(self, placeholder_id: int) -> list[int]:
        """input_ids with `placeholder_id` inserted at each image position: the ids a Jinja
        rendering (`ChatTemplate.jinja`, Qwen's template) tokenises to, with one
        placeholder per image."""
        out, last = [], 0
        for p in self.image_positions:
            out += self.input_ids[last:p] + [placeholder_id]
            last = p
        return out + self.input_ids[last:]


class ChatTemplate:
    """Args:
        name: "helium" or "qwen2_5_vl".
        tokenizer: any Hugging Face tokenizer (text pieces are tokenised with
            add_special_tokens=False; special markers are looked up as single tokens).
    """

    def __init__(self, name: str, tokenizer):
        if name not in TEMPLATES:
            raise ValueError(f"template={name!r} is not one of {list(TEMPLATES)}")
        self.name, self.tok = name, tokenizer
        self.vocab = tokenizer.get_vocab()
        self.vision = name == "qwen2_5_vl"
        self.default_system: str | None = None
        """Text of the system turn opening a conversation that has none (Qwen's layout only)."""
        if self.vision and "<|im_start|>" in self.vocab and "<|im_end|>" in self.vocab:
            # Qwen's own layout: <|im_start|>role\n ... <|im_end|>\n
            self.turn_open = {r: ["<|im_start|>", f"{r}\n"] for r in OUR_TURNS}
            self.end_token, self.after_end = "<|im_end|>", ["\n"]
            self.default_system = QWEN_DEFAULT_SYSTEM
        elif all(t in self.vocab for t in (*OUR_TURNS.values(), "<|end|>")):
            self.turn_open = {r: [t] for r, t in OUR_TURNS.items()}
            self.end_token, self.after_end = "<|end|>", []
        elif tokenizer.eos_token is not None:
            self.turn_open = {r: [t] for r, t in PLAIN_TURNS.items()}
            self.end_token, self.after_end = tokenizer.eos_token, ["\n"]
        else:
            raise ValueError(f"template {name!r}: the tokenizer has neither the {list(OUR_TURNS.values())} + "
                             "'<|end|>' specials nor an eos_token to end turns with")
        if self.vision:
            for t in ("<|vision_start|>", "<|vision_end|>"):
                if t not in self.vocab:
                    raise ValueError(f"template 'qwen2_5_vl' needs the {t!r} token, which the tokenizer lacks")

    # ------------------------------------------------------------------ tokens
    def _ids(self, piece: str) -> list[int]:
        """A special token (single id) or a text piece (tokenised without BOS/EOS)."""
        if piece in self.vocab and piece.startswith("<|"):
            return [self.vocab[piece]]
        return self.tok(piece, add_special_tokens=False)["input_ids"] if piece else []

    def _pieces(self, pieces: list[str]) -> list[int]:
        return [i for p in pieces for i in self._ids(p)]

    @property
    def stop_token_ids(self) -> list[int]:
        return self._ids(self.end_token)

    def assistant_prefix(self) -> list[int]:
        """Tokens that open an assistant turn (what a generation prompt ends with)."""
        return self._pieces(self.turn_open["assistant"])

    # ------------------------------------------------------------------ encode
    def encode(self, messages: list[dict], image_token_counts: list[int] | None = None) -> Encoded:
        """messages: [{"role", "content": [{"type": "text"|"image", ...}]}] (videos already
        expanded into images by `data.video`) -> Encoded.

        `image_token_counts` (one per image, optional) only checks that the caller's images
        match the conversation: no template puts image placeholders in the text."""
        ids: list[int] = []
        mask: list[bool] = []
        positions: list[int] = []
        prompt_len, answer = 0, ""

        def add(tokens: list[int], target: bool) -> None:
            ids.extend(tokens)
            mask.extend([target] * len(tokens))

        if self.default_system is not None and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        for m in messages:
            role = m["role"]
            if isinstance(m["content"], str):  # the Hugging Face shorthand for one text item
                m = {**m, "content": [{"type": "text", "text": m["content"]}]}
            add(self._pieces(self.turn_open[role]), False)
            if role == "assistant":
                text = "".join(c.get("text", "") for c in m["content"] if c["type"] == "text")
                prompt_len, answer = len(ids), text
                add(self._ids(text), True)
                add(self._ids(self.end_token), True)  # learning to stop
                add(self._pieces(self.after_end), False)
                continue
            for c in m["content"]:
                if c["type"] == "text":
                    add(self._ids(c["text"]), False)
                elif c["type"] == "image":
                    if self.vision:
                        add(self._ids("<|vision_start|>"), False)
                        positions.append(len(ids))  # = index of <|vision_end|>
                        add(self._ids("<|vision_end|>"), False)
                    else:
                        positions.append(len(ids))
                else:
                    raise ValueError(f"content type {c['type']!r} cannot be encoded (expand videos with data.video first)")
            add(self._ids(self.end_token), False)
            add(self._pieces(self.after_end), False)
        if image_token_counts is not None and len(image_token_counts) != len(positions):
            raise ValueError(f"{len(image_token_counts)} image token counts for {len(positions)} images in the conversation")
        return Encoded(ids, mask, positions, prompt_len, answer)


    # ------------------------------------------------------------------ Jinja
    def jinja(self) -> str:
        """This template as a Hugging Face chat template (Jinja), for `tokenizer.chat_template`:
        `tokenizer.apply_chat_template(messages, add_generation_prompt=...)` renders the text
        whose tokens are `encode(messages).with_placeholders(<|image_pad|>)` (the generation
        prompt: the tokens before `prompt_len`). Images render as `<|image_pad|>` (inside
        <|vision_start|> ... <|vision_end|> for qwen2_5_vl), or as nothing with a tokenizer that
        lacks it; videos must be expanded into images first, as for `encode`."""
        def lit(s: str) -> str:  # a Jinja string literal
            return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"

        opens = {r: "".join(p) for r, p in self.turn_open.items()}
        pad = IMAGE_PAD if IMAGE_PAD in self.vocab else ""
        image = f"<|vision_start|>{pad}<|vision_end|>" if self.vision else pad
        close = self.end_token + "".join(self.after_end)
        system = ("" if self.default_system is None else
                  "{% if loop.first and message['role'] != 'system' %}{{ " + lit(opens["system"] + self.default_system + close)
                  + " }}{% endif %}")
        return ("{% set opens = {" + ", ".join(f"{lit(r)}: {lit(o)}" for r, o in opens.items()) + "} %}"
                "{% for message in messages %}" + system + "{{ opens[message['role']] }}"
                "{% if message['content'] is string %}{{ message['content'] }}"
                "{% else %}{% for content in message['content'] %}"
                "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{{ " + lit(image) + " }}"
                "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
                "{{ " + lit(close) + " }}{% endfor %}"
                "{% if add_generation_prompt %}{{ opens['assistant'] }}{% endif %}")


_CACHE: dict[tuple[str, int], ChatTemplate] = {}


def get_template(name: str, tokenizer) -> ChatTemplate:
    """The template `name` for `tokenizer` (cached per tokenizer object)."""
    key = (name, id(tokenizer))
    if key not in _CACHE or _CACHE[key].tok is not tokenizer:
        _CACHE[key] = ChatTemplate(name, tokenizer)
    return _CACHE[key]


def encode(messages: list[dict], image_token_counts: list[int], tokenizer, template: str = "helium") -> Encoded:
    """Functional form: `get_template(template, tokenizer).encode(messages, image_token_counts)`."""
    return get_template(template, tokenizer).encode(messages, image_token_counts)
