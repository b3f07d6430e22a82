"""Chat templates: conversation -> token ids, answer mask and image positions.

Image placeholder tokens are never put in the text: an image is recorded as the text index
it precedes, and the fusion strategy decides what to do with it (insert its tokens there,
or open a window there).

    helium      <|user|>{text; an image opens a window at its text position}<|end|>
                <|assistant|>{answer}<|end|>
    qwen2_5_vl  <|im_start|>user\\n<|vision_start|>[image]<|vision_end|>{text}<|im_end|>\\n
                <|im_start|>assistant\\n{answer}<|im_end|>\\n
                The image's position is the index of <|vision_end|> (the token it precedes);
                with a tokenizer without <|im_*|> tokens (the char tokenizer) the turns use
                our <|user|> ... <|end|> specials instead.

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
        if self.vision and "<|im_start|>" in self.vocab and "<|im_end|>" in self.vocab:
            # Qwen's own layout: <|im_start|>role\n ... <|im_end|>\n
            self.turn_open = {r: ["<|im_start|>", f"{r}\n"] for r in OUR_TURNS}
            self.end_token, self.after_end = "<|im_end|>", ["\n"]
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

        for m in messages:
            role = m["role"]
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
