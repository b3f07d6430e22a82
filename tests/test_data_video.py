"""Video: frame sampling rules and the windows of both layouts."""

import pytest
import torch

from casa.processing.sample import Sample
from casa.processing.template import ChatTemplate
from casa.processing.tokenizer import resolve_tokenizer
from data.format import text
from data.packing import build_row
from data.video import expand_video, sample_frames


def test_two_fps_on_a_long_clip():
    ts = [i / 10 for i in range(1000)]  # 100 s stored at 10 fps
    idx = sample_frames(ts, fps=2.0)
    assert len(idx) == 200
    assert all(abs(ts[b] - ts[a] - 0.5) < 1e-9 for a, b in zip(idx, idx[1:]))


def test_short_clips_get_twenty_uniform_frames():
    short = sample_frames([i / 10 for i in range(60)])  # 6 s
    assert len(short) == 20 and short[0] == 0 and short[-1] == 59
    gaps = [b - a for a, b in zip(short, short[1:])]
    assert max(gaps) - min(gaps) <= 1
    assert sample_frames([0.0, 1.0, 2.0]) == [0, 1, 2]  # fewer stored frames than 20: all of them


def test_max_duration_caps_the_clip():
    ts = [i / 2 for i in range(2000)]  # 1000 s at 2 fps
    capped = sample_frames(ts, max_duration=180.0)
    assert len(capped) == 360 and ts[capped[-1]] == 179.5
    assert len(sample_frames(ts, max_duration=30.0)) == 60


def test_a_source_below_the_sampling_rate_keeps_each_frame_once():
    ts = [float(i) for i in range(30)]  # 1 fps, 30 s
    assert sample_frames(ts, fps=2.0) == list(range(30))
    with pytest.raises(ValueError, match="fps=0"):
        sample_frames(ts, fps=0)


def _windows(messages, tok):
    """-> (encoded, [(window text, image tokens in the window)])."""
    enc = ChatTemplate("helium", tok).encode(messages)
    n = len(enc.image_positions)
    row = build_row([Sample(enc.input_ids, enc.answer_mask, enc.image_positions, [torch.zeros(4, 1176)] * n,
                            [[1, 2, 2]] * n, {})])  # each frame: 1 image token
    cu = row.window_cu_seqlens_text.tolist()
    cu_i = row.window_cu_seqlens_image.tolist()
    return enc, [(tok.decode(enc.input_ids[a:b]), cu_i[k + 1] - cu_i[k]) for k, (a, b) in enumerate(zip(cu, cu[1:]))]


def test_qa_layout_is_one_window_of_all_frames_then_the_question_and_answer():
    tok = resolve_tokenizer("char")
    conv = {"messages": [{"role": "user", "content": [{"type": "video"}, text("Which way?")]},
                         {"role": "assistant", "content": [text("left")]}],
            "video": {"frames": ["f0", "f1", "f2"], "timestamps": [0, 0.5, 1.0], "layout": "qa"}}
    _, wins = _windows(expand_video(conv, ["f0", "f1", "f2"], [0, 0.5, 1.0]), tok)
    #   <|user|> | [F0 F1 F2] Which way?<|end|><|assistant|>left<|end|>
    assert wins == [("<|user|>", 0), ("Which way?<|end|><|assistant|>left<|end|>", 3)]
    del conv["messages"][0]["content"][0]  # no {"type": "video"} item: frames open the first user turn
    _, wins = _windows(expand_video(conv, ["f0", "f1"], [0, 0.5]), tok)
    assert wins == [("<|user|>", 0), ("Which way?<|end|><|assistant|>left<|end|>", 2)]


def test_caption_layout_is_one_window_per_frame_with_silence_as_an_empty_turn():
    tok = resolve_tokenizer("char")
    conv = {"messages": [], "video": {"frames": ["f0", "f1", "f2"], "timestamps": [0, 0.5, 1.0], "layout": "caption",
                                      "captions": [{"t": 0.6, "text": "it moves"}, {"t": 0.9, "text": "left"},
                                                   {"t": 7.0, "text": "after the cut"}]}}
    enc, wins = _windows(expand_video(conv, ["f0", "f1", "f2"], [0, 0.5, 1.0], prompt="Go.", end=2.0), tok)
    #   <|user|>Go. | [F0] <|end|><|assistant|><|end|><|user|> | [F1] ...it moves left... | [F2] ...<|end|>
    assert wins == [("<|user|>Go.", 0),
                    ("<|end|><|assistant|><|end|><|user|>", 1),
                    ("<|end|><|assistant|>it moves left<|end|><|user|>", 1),
                    ("<|end|><|assistant|><|end|>", 1)]
    # targets: the captions and every end token, including the silent turns
    assert tok.decode([i for i, m in zip(enc.input_ids, enc.answer_mask) if m]) == "<|end|>it moves left<|end|><|end|>"
