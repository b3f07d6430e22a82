"""Tokenizers: the offline character-level tokenizer of the demo and tests, and loading a
real one (Helium, Qwen2.5-VL) from a local directory.

The character tokenizer covers printable ASCII plus the chat-template specials, so any
synthetic answer round-trips exactly; it is a genuine `PreTrainedTokenizerFast` saved with
`save_pretrained` and reloaded with `AutoTokenizer`, like any Hugging Face tokenizer.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

SPECIALS = ("<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
            "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
UNK = "<|unk|>"
CHAR_TOKENIZER = "char"
"""The `tokenizer:` spec of the built-in character tokenizer (any other spec is a local directory)."""


def build_tokenizer(out_dir: str | Path):
    """Write the character-level tokenizer to `out_dir` and return it (107 ids: 9 specials,
    <|unk|>, 97 printable ASCII characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {t: i for i, t in enumerate([*SPECIALS, UNK, *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # characters join back without separators
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>", unk_token=UNK)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return load_tokenizer(out)


def load_tokenizer(path: str | Path):
    """A tokenizer from a local directory (nothing is downloaded)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(p)!r} does not exist (build the demo one with "
                                "casa.processing.tokenizer.build_tokenizer, or point to a local save_pretrained directory)")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def resolve_tokenizer(spec: str):
    """"char" -> the built-in character tokenizer (built once per machine in the temp dir);
    anything else -> a local tokenizer directory (`load_tokenizer`)."""
    if spec != CHAR_TOKENIZER:
        return load_tokenizer(spec)
    d = Path(tempfile.gettempdir()) / f"casa-char-tokenizer-{os.getuid() if hasattr(os, 'getuid') else 0}"
    if not (d / "tokenizer.json").is_file():
        # build aside and rename: concurrent processes (test workers, ranks) never see a half-written dir
        tmp = Path(tempfile.mkdtemp(prefix="casa-char-tokenizer-build-"))
        build_tokenizer(tmp)
        try:
            os.rename(tmp, d)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(d)
