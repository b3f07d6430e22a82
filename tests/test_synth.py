"""The synthetic benchmark: determinism, manifest, format, and answers re-derived from pixels."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data.format import check_conversation
from data.synth import SPLITS, VERSION, ensure_synth, generate, main, make_one, parse_image_size, resolve_sizes
from data.synth_tasks import DEFAULT_SIZES, TASKS
from data.synth_tasks import reading as reading_task
from data.synth_tasks import ocr as ocr_task
from data.synth_tasks.render import BACKGROUND, INK, PAPER, font, nearest_color
from data.synth_tasks.video import FPS, MAX_FRAMES, MIN_FRAMES
from tests.data_fixtures import read_tar

N_CHECK = 40  # samples per task for the pixel checks (fast: each is a few ms)


def answer(conv: dict) -> str:
    return conv["messages"][-1]["content"][0]["text"]


def question(conv: dict) -> str:
    return next(c["text"] for c in conv["messages"][0]["content"] if c["type"] == "text")


def sample(task: str, i: int, size: int | None = None) -> tuple[dict, dict[str, bytes]]:
    group = TASKS[task][0]
    s = make_one(0, "test", task, i, DEFAULT_SIZES.get(group, 0) if size is None else size)
    return json.loads(s["json"]), {k: v for k, v in s.items() if not k.startswith("__") and k != "json"}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)  # [H, W, 3]


def foreground(a: np.ndarray, bg=BACKGROUND) -> np.ndarray:
    return np.abs(a - np.array(bg)).max(-1) > 40  # [H, W] bool


def components(mask: np.ndarray) -> int:
    """Number of 4-connected components (flood fill; the reference for the count task)."""
    seen = np.zeros_like(mask)
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        n += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return n


def ink(a: np.ndarray) -> np.ndarray:
    return a.max(-1) < 100  # text pixels: every palette and distractor colour has a channel >= 120


def text_template(s: str, fs: int) -> np.ndarray:
    """The ink mask of `s` rendered alone, cropped to its ink (translation-invariant at integer offsets)."""
    img = Image.new("RGB", (fs * (len(s) + 2), fs * 3), PAPER)
    ImageDraw.Draw(img).text((fs, fs), s, fill=INK, font=font(fs))
    m = ink(np.asarray(img).astype(int))
    ys, xs = np.nonzero(m)
    return m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def find_text(a: np.ndarray, s: str, fs: int) -> list[tuple[int, int]]:
    """Top-left (y, x) of every exact occurrence of `s`'s ink mask in image `a`."""
    t = text_template(s, fs)
    win = np.lib.stride_tricks.sliding_window_view(ink(a), t.shape)  # [H-h+1, W-w+1, h, w]
    return [tuple(p) for p in np.argwhere((win == t).all((-1, -2)))]


# ---------------------------------------------------------------------------------- shards
@pytest.fixture(scope="module")
def synth_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    kw = dict(train=24, val=8, test=8, shard_size=10, progress=False)
    return {name: (root / name, generate(root / name, seed=seed, **kw))
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}


def test_same_seed_same_bytes_different_seed_differs(synth_dirs):
    (a, ma), (b, _), (c, _) = synth_dirs["a"], synth_dirs["b"], synth_dirs["c"]
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert (a / "manifest.json").read_bytes() == (c / "manifest.json").read_bytes().replace(b'"seed": 1', b'"seed": 0')
    sa, sc = read_tar(a / ma["shards"]["train"][0]), read_tar(c / ma["shards"]["train"][0])
    assert sa.keys() == sc.keys()
    assert all(sa[k] != sc[k] for k in sa)  # every sample changes with the seed, keys do not


def test_manifest_matches_shards(synth_dirs):
    out, m = synth_dirs["a"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["version"] == VERSION and on_disk["seed"] == 0
    assert on_disk["tasks"] == {t: g for t, (g, _) in TASKS.items()}
    assert on_disk["image_size"] == DEFAULT_SIZES
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s for v in on_disk["shards"].values() for s in v)
    for split in SPLITS:
        seen = Counter()
        for shard in on_disk["shards"][split]:
            assert shard.startswith(f"{split}-")
            samples = read_tar(out / shard)
            assert len(samples) <= 10  # shard_size
            for key, files in samples.items():
                conv = json.loads(files["json"])
                assert key.startswith(f"{split}-{conv['task']}-")
                assert conv["group"] == TASKS[conv["task"]][0]
                seen[conv["task"]] += 1
        assert dict(seen) == {t: n for t, n in on_disk["counts"][split].items() if n}
        assert sum(on_disk["counts"][split].values()) == on_disk["splits"][split]


def test_every_sample_is_well_formed(synth_dirs):
    out, m = synth_dirs["a"]
    for shard in m["shards"]["train"]:
        for key, files in read_tar(out / shard).items():
            conv = json.loads(files["json"])
            check_conversation(conv, available={f.split(".")[0] for f in files if f != "json"})
            texts = [c["text"] for msg in conv["messages"] for c in msg["content"] if c["type"] == "text"]
            texts += [c["text"] for c in conv.get("video", {}).get("captions", [])]
            assert all(t.isascii() and t.strip() for t in texts), key
            if conv["messages"]:
                assert conv["messages"][-1]["role"] == "assistant" and len(answer(conv)) <= 40
            for field, data in files.items():
                if field != "json":
                    side = DEFAULT_SIZES[conv["group"]]
                    assert Image.open(io.BytesIO(data)).size == (side, side), (key, field)


def test_generate_removes_stale_shards_and_empty_splits(tmp_path):
    generate(tmp_path, train=30, val=5, test=5, tasks=["color"], shard_size=10, progress=False)
    m = generate(tmp_path, train=10, val=0, test=3, tasks=["color"], shard_size=10, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["test-000000.tar", "train-000000.tar"]
    assert m["shards"]["val"] == [] and m["counts"]["val"] == {"color": 0}
    assert not list(tmp_path.glob(".tmp-*"))


def test_ensure_synth_reuses_matching_manifest(tmp_path):
    kw = dict(train=6, val=2, test=2, tasks=["color", "count"], progress=False)
    ensure_synth(tmp_path, **kw)
    stamp = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    ensure_synth(tmp_path, **kw)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamp
    ensure_synth(tmp_path, **{**kw, "image_size": {"coarse": 112}})
    assert json.loads((tmp_path / "manifest.json").read_text())["image_size"]["coarse"] == 112
    (tmp_path / "train-000000.tar").unlink()  # a missing shard forces regeneration too
    ensure_synth(tmp_path, **{**kw, "image_size": {"coarse": 112}})
    assert (tmp_path / "train-000000.tar").is_file()


def test_bad_arguments_fail_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match="color"):
        generate(tmp_path, tasks=["colour"], progress=False)
    with pytest.raises(ValueError, match="reading"):
        resolve_sizes({"readng": 112})
    with pytest.raises(ValueError, match="image_size"):
        resolve_sizes(10)
    assert parse_image_size("coarse=112,video=84") == {"coarse": 112, "video": 84}
    assert resolve_sizes(84) == {g: 84 for g in DEFAULT_SIZES}


def test_cli_writes_requested_sizes(tmp_path, capsys):
    main(["--out", str(tmp_path), "--train", "4", "--val", "2", "--test", "2", "--tasks", "shape,word",
          "--image-size", "coarse=84", "--seed", "3"])
    assert "wrote 8 samples" in capsys.readouterr().out
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["seed"] == 3 and m["image_size"]["coarse"] == 84 and list(m["tasks"]) == ["shape", "word"]
    sizes = {json.loads(f["json"])["task"]: Image.open(io.BytesIO(f["img0.png"])).size
             for f in read_tar(tmp_path / "train-000000.tar").values()}
    assert sizes == {"shape": (84, 84), "word": (112, 112)}


# ---------------------------------------------------------------------------------- answers vs pixels
def test_color_answer_is_the_dominant_colour():
    for i in range(N_CHECK):
        conv, files = sample("color", i)
        a = pixels(files["img0.png"])
        fg = a[foreground(a)]
        assert len(fg) > 0.04 * a.shape[0] * a.shape[1]  # one big shape
        colours = Counter(nearest_color(p) for p in map(tuple, fg))
        assert colours.most_common(1)[0][0] == answer(conv) == nearest_color(fg.mean(0))
        assert question(conv) == "What colour is the shape?"


def test_count_answer_is_the_number_of_objects():
    answers = Counter()
    for i in range(N_CHECK):
        conv, files = sample("count", i)
        assert components(foreground(pixels(files["img0.png"]))) == int(answer(conv))
        answers[answer(conv)] += 1
    assert set(answers) == {"1", "2", "3", "4", "5"}


def test_shape_answer_matches_the_silhouette():
    """Classify by fill ratio of the bounding box and where the widest row is."""
    for i in range(N_CHECK):
        conv, files = sample("shape", i)
        m = foreground(pixels(files["img0.png"]))
        ys, xs = np.nonzero(m)
        box = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        fill = box.mean()
        widest = np.argmax(box.sum(1)) / (box.shape[0] - 1)  # 0 top .. 1 bottom
        if fill > 0.95:
            guess = "square"
        elif fill > 0.7:
            guess = "circle"
        else:
            guess = "triangle" if widest > 0.8 else "diamond"
        assert guess == answer(conv), (i, fill, widest)


def test_bar_value_answer_is_printed_above_its_bar():
    for i in range(N_CHECK):
        conv, files = sample("bar_value", i)
        a = pixels(files["img0.png"])
        size = a.shape[0]
        g = reading_task.bar_geometry(size)
        label = question(conv).split()[-1].rstrip("?")
        k = reading_task.BAR_LABELS.index(label)
        value = int(answer(conv))
        # the bar: coloured (neither paper nor ink) pixels in the middle column of its slot
        col = a[:, int(g["slot"] * (k + 0.5))]
        bar = (np.abs(col - np.array(PAPER)).max(-1) > 40) & (col.max(-1) >= 100)
        run = int(np.argmin(bar[g["base"]::-1]))  # coloured rows from the axis upwards (the digits' grey edges excluded)
        assert run == reading_task.bar_height(value, g) + 1  # a PIL rectangle covers both end rows
        # the printed value: found exactly, centred over that bar, right above it
        hits = [(y, x) for y, x in find_text(a, answer(conv), g["fs"]) if g["slot"] * k <= x < g["slot"] * (k + 1)]
        assert len(hits) == 1, (i, hits)
        assert find_text(a, label, g["fs"])  # the label under the axis


def test_table_value_answer_is_in_the_named_cell():
    for i in range(N_CHECK):
        conv, files = sample("table_value", i)
        a = pixels(files["img0.png"])
        q = question(conv)  # "What is in row y, column C?"
        row = reading_task.ROW_LABELS.index(q.split("row ")[1][0]) + 1
        col = reading_task.COL_LABELS.index(q.split("column ")[1][0]) + 1
        cell = a.shape[0] / (len(reading_task.COL_LABELS) + 1)
        hits = find_text(a, answer(conv), reading_task.font_size(a.shape[0]))
        inside = [(y, x) for y, x in hits if int(row * cell) <= y < (row + 1) * cell and int(col * cell) <= x < (col + 1) * cell]
        assert len(inside) == 1, (i, q, hits)


def test_word_answer_is_the_rendered_text():
    for i in range(N_CHECK):
        conv, files = sample("word", i)
        a = pixels(files["img0.png"])
        w = answer(conv)
        assert set(w) <= set(ocr_task.ALPHABET) and ocr_task.MIN_LEN <= len(w) <= ocr_task.MAX_LEN
        fs = ocr_task.font_size(a.shape[0])
        assert len(find_text(a, w, fs)) == 1
        t = text_template(w, fs)
        assert ink(a).sum() == t.sum()  # nothing else in the image is ink


# ---------------------------------------------------------------------------------- video
def frames_of(conv: dict, files: dict[str, bytes]) -> list[np.ndarray]:
    return [pixels(files[f"{ref}.jpg"]) for ref in conv["video"]["frames"]]


def check_timeline(conv: dict) -> None:
    v = conv["video"]
    n = len(v["frames"])
    assert MIN_FRAMES <= n <= MAX_FRAMES
    assert v["frames"] == [f"f{i:03d}" for i in range(n)]
    assert v["timestamps"] == [round(i / FPS, 3) for i in range(n)]


def test_video_direction_answer_matches_the_motion():
    for i in range(N_CHECK):
        conv, files = sample("video_direction", i)
        check_timeline(conv)
        assert conv["video"]["layout"] == "qa" and conv["messages"][0]["content"][0] == {"type": "video"}
        centres = np.array([np.argwhere(foreground(f)).mean(0) for f in frames_of(conv, files)])  # [F, (y, x)]
        dy, dx = centres[-1] - centres[0]
        expect = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert expect == answer(conv)
        along = centres[:, 1] * np.sign(dx) if abs(dx) > abs(dy) else centres[:, 0] * np.sign(dy)
        assert (np.diff(along) > -0.5).all()  # steady motion (steps of ~1.5 px can round to no visible move)


def touching(mask: np.ndarray) -> set[str]:
    return {side for side, edge in (("left", mask[:, 0]), ("right", mask[:, -1]), ("top", mask[0]),
                                    ("bottom", mask[-1])) if edge.any()}


def test_live_caption_events_are_frame_accurate():
    """Re-derive enter / bounce / leave from the pixels and compare with the transcript."""
    bounces = 0
    for i in range(N_CHECK):
        conv, files = sample("live_caption", i)
        check_timeline(conv)
        v = conv["video"]
        assert v["layout"] == "caption" and conv["messages"] == []
        masks = [foreground(f, BACKGROUND) for f in frames_of(conv, files)]
        visible = [bool(m.any()) for m in masks]
        enter = visible.index(True)
        leave = enter + visible[enter:].index(False)
        assert not any(visible[leave:]) and leave == len(masks) - 1  # the clip ends on the leave frame
        side = (touching(masks[enter]) & {"left", "right", "top", "bottom"})
        assert len(side) == 1, (i, side)
        side = side.pop()
        axis = 1 if side in ("left", "right") else 0
        sign = 1 if side in ("left", "top") else -1  # + = away from the entry edge
        pos = [sign * np.argwhere(masks[k]).mean(0)[axis] for k in range(enter, leave)]
        peak = int(np.argmax(pos))
        bounced = 0 < peak < len(pos) - 1
        events = [(enter, None), *([(enter + peak, "it bounces")] if bounced else []), (leave, None)]
        caps = v["captions"]
        assert [c["t"] for c in caps] == [v["timestamps"][k] for k, _ in events]
        full = masks[enter + 1]
        colour = nearest_color(frames_of(conv, files)[enter + 1][full].mean(0))
        assert caps[0]["text"].startswith(f"the {colour} ") and caps[0]["text"].endswith(f"enters from the {side}")
        exit_side = touching(masks[leave - 1]).pop()
        assert caps[-1]["text"] == f"it leaves on the {exit_side}"
        assert exit_side == (side if bounced else {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[side])
        if bounced:
            bounces += 1
            assert caps[1]["text"] == "it bounces"
            assert all(np.diff(pos[:peak + 1]) > 0) and all(np.diff(pos[peak:]) < 0)
            assert touching(masks[enter + peak]) == {"right" if side == "left" else "left" if side == "right"
                                                     else "bottom" if side == "top" else "top"}
        else:
            assert all(np.diff(pos) > 0)
    assert 0 < bounces < N_CHECK  # both kinds of clip occur


def test_arithmetic_is_text_only_and_its_answers_are_right():
    """The text group: no image file, no image content item, and the answer is the
    question's arithmetic (checked by evaluating it, not by a stored value)."""
    for i in range(N_CHECK):
        conv, files = sample("arithmetic", i, size=0)
        assert files == {} and conv["group"] == "text"
        assert all(c["type"] == "text" for m in conv["messages"] for c in m["content"])
        a, op, b = question(conv).removeprefix("What is ").removesuffix("?").split()
        want = int(a) + int(b) if op == "plus" else int(a) - int(b)
        assert answer(conv) == str(want) and want >= 0
