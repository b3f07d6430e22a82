"""Tokenizer (offline char-level, save/reload) and chat templates (helium, qwen2_5_vl)."""

import string

import pytest

from casa.processing.template import ChatTemplate, encode
from casa.processing.tokenizer import resolve_tokenizer
from casa.processing.tokenizer import SPECIALS, build_tokenizer, load_tokenizer
from data.format import image, text
from tests.data_fixtures import conv


@pytest.fixture(scope="module")
def tok():
    return resolve_tokenizer("char")


def test_char_tokenizer_round_trips_and_reloads_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer(tmp_path / "tok")
    assert len(tok) < 128 + 16
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    s = "Hello, world! 0123 ~{}|\n\t" + string.ascii_letters
    ids = again(s, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(s) and again.decode(ids) == s and tok(s, add_special_tokens=False)["input_ids"] == ids
    for sp in SPECIALS:
        assert len(again(sp, add_special_tokens=False)["input_ids"]) == 1
    assert again.eos_token == "<|eos|>" and again.pad_token == "<|pad|>"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_helium_layout_targets_and_prompt(tok):
    msgs = [{"role": "system", "content": [text("Be brief.")]}, *conv(refs=("img0", "img1"))["messages"]]
    enc = encode(msgs, [4, 4], tok, "helium")
    expected = "<|system|>Be brief.<|end|><|user|>What colour?<|end|><|assistant|>red<|end|>"
    assert tok.decode(enc.input_ids) == expected
    # both images open a window right after <|user|>: no image tokens in the text
    assert enc.image_positions == [len(tok("<|system|>Be brief.<|end|><|user|>", add_special_tokens=False)["input_ids"])] * 2
    assert tok.decode([i for i, m in zip(enc.input_ids, enc.answer_mask) if m]) == "red<|end|>"
    assert tok.decode(enc.input_ids[:enc.prompt_len]).endswith("<|assistant|>") and enc.answer == "red"
    with pytest.raises(ValueError, match="1 image token counts for 2 images"):
        encode(msgs, [4], tok, "helium")


def test_multi_turn_targets_every_answer_and_prompt_is_before_the_last(tok):
    msgs = [{"role": "user", "content": [image("img0"), text("A?")]}, {"role": "assistant", "content": [text("x")]},
            {"role": "user", "content": [text("B?")]}, {"role": "assistant", "content": [text("yz")]}]
    enc = ChatTemplate("helium", tok).encode(msgs)
    assert tok.decode([i for i, m in zip(enc.input_ids, enc.answer_mask) if m]) == "x<|end|>yz<|end|>"
    assert tok.decode(enc.input_ids[enc.prompt_len:]) == "yz<|end|>" and enc.answer == "yz"


def test_qwen_template_with_our_specials_records_positions_at_vision_end(tok):
    enc = encode(conv(refs=("img0", "img1"))["messages"], [4, 4], tok, "qwen2_5_vl")
    assert tok.decode(enc.input_ids) == ("<|user|><|vision_start|><|vision_end|><|vision_start|><|vision_end|>"
                                         "What colour?<|end|><|assistant|>red<|end|>")
    vend, vstart = (tok.convert_tokens_to_ids(t) for t in ("<|vision_end|>", "<|vision_start|>"))
    assert [enc.input_ids[p] for p in enc.image_positions] == [vend, vend]
    assert all(enc.input_ids[p - 1] == vstart for p in enc.image_positions)


def test_qwen_native_layout_when_the_tokenizer_has_im_tokens(tmp_path):
    tok = build_tokenizer(tmp_path / "q")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tpl = ChatTemplate("qwen2_5_vl", tok)
    enc = tpl.encode(conv()["messages"])
    # Qwen2.5-VL's chat layout (its default system turn included) with the <|image_pad|> run left out
    assert tok.decode(enc.input_ids) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|vision_end|>What colour?<|im_end|>\n"
                                         "<|im_start|>assistant\nred<|im_end|>\n")
    assert tok.decode([i for i, m in zip(enc.input_ids, enc.answer_mask) if m]) == "red<|im_end|>"
    assert enc.input_ids[enc.image_positions[0]] == tok.convert_tokens_to_ids("<|vision_end|>")
    assert tpl.stop_token_ids == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_tokenizer_without_our_specials_uses_plain_markers_and_eos():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "</s>", *string.printable])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>")
    enc = encode(conv()["messages"], [4], tok, "helium")
    assert tok.decode(enc.input_ids) == "User: What colour?</s>\nAssistant: red</s>\n"
    assert tok.decode([i for i, m in zip(enc.input_ids, enc.answer_mask) if m]) == "red</s>"


def test_unknown_template_names_the_valid_ones(tok):
    with pytest.raises(ValueError, match=r"template='llava' is not one of \['helium', 'qwen2_5_vl'\]"):
        ChatTemplate("llava", tok)


# ------------------------------------------------------------------ Jinja parity
# Qwen2.5-VL-Instruct's chat template (Qwen/Qwen2.5-VL-3B-Instruct, chat_template.json), stored
# here so the test needs no download: the reference the qwen2_5_vl template must reproduce.
QWEN2_5_VL_JINJA = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": [image("img0"), text("What colour?")]}, {"role": "assistant", "content": [text("red")]}],
    [{"role": "system", "content": [text("Be brief.")]}, {"role": "user", "content": [text("A?"), image("a"), image("b")]},
     {"role": "assistant", "content": [text("x")]}, {"role": "user", "content": "B? 'quoted' \\ done"},
     {"role": "assistant", "content": "yz"}],
    [{"role": "user", "content": [text("no image"), text(" two texts")]}, {"role": "assistant", "content": [text("ok")]}],
]


def _qwen_tokenizer(tmp_path):
    tok = build_tokenizer(tmp_path / "q")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def _rendered_ids(tok, jinja: str, messages: list[dict], generation_prompt: bool) -> list[int]:
    """A Jinja chat template rendered by transformers (`apply_chat_template`), then tokenised."""
    msgs = messages[:-1] if generation_prompt else messages
    rendered = tok.apply_chat_template(msgs, chat_template=jinja, tokenize=False, add_generation_prompt=generation_prompt)
    return tok(rendered, add_special_tokens=False)["input_ids"]


def _our_ids(template: ChatTemplate, messages: list[dict], generation_prompt: bool) -> list[int]:
    """Our encoding with one <|image_pad|> per image (the generation prompt: before prompt_len)."""
    from casa.processing.template import IMAGE_PAD, Encoded

    enc = template.encode(messages)
    if generation_prompt:
        n = enc.prompt_len
        enc = Encoded(enc.input_ids[:n], enc.answer_mask[:n], [p for p in enc.image_positions if p <= n], n)
    return enc.with_placeholders(template.tok.convert_tokens_to_ids(IMAGE_PAD))


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_qwen_template_renders_what_qwen2_5_vl_instruct_jinja_renders(tmp_path, conversation, generation_prompt):
    """Token for token, with the default system turn and <|image_pad|> where each image goes."""
    tok = _qwen_tokenizer(tmp_path)
    messages = CONVERSATIONS[conversation]
    reference = _rendered_ids(tok, QWEN2_5_VL_JINJA, messages, generation_prompt)
    assert ("You are a helpful assistant." in tok.decode(reference)) == (messages[0]["role"] != "system")
    assert _our_ids(ChatTemplate("qwen2_5_vl", tok), messages, generation_prompt) == reference


@pytest.mark.parametrize("kind", ["helium", "qwen2_5_vl", "qwen2_5_vl_our_specials", "helium_plain"])
def test_jinja_of_every_template_layout_renders_its_encoding(tmp_path, kind):
    """`ChatTemplate.jinja()` (what the Hugging Face export writes as the tokenizer's chat
    template) renders, through transformers, exactly what `encode` produces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if kind == "helium_plain":  # a tokenizer without our specials: plain role markers and EOS
        vocab = {t: i for i, t in enumerate(["<unk>", "</s>", *string.printable])}
        core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        core.decoder = decoders.Fuse()
        tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>")
    else:
        tok = _qwen_tokenizer(tmp_path) if kind == "qwen2_5_vl" else build_tokenizer(tmp_path / "c")
    template = ChatTemplate(kind.split("_our")[0].replace("_plain", ""), tok)
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            got = _rendered_ids(tok, template.jinja(), messages, generation_prompt)
            if kind == "helium_plain":  # no <|image_pad|> token: images render as nothing
                assert got == template.encode(messages).input_ids[:None if not generation_prompt
                                                                  else template.encode(messages).prompt_len]
            else:
                assert got == _our_ids(template, messages, generation_prompt), (kind, messages)
