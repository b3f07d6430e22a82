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
    # Qwen2.5-VL's chat layout with the <|image_pad|> run left out
    assert tok.decode(enc.input_ids) == ("<|im_start|>user\n<|vision_start|><|vision_end|>What colour?<|im_end|>\n"
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
