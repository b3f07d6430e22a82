"""Inference from a checkpoint: the Python API against the training pipeline, the evaluate
and stream CLIs, bad input, and the streaming benchmark.

One tiny CASA⊕ checkpoint is trained for two steps (module fixture); an insertion
checkpoint is written from the same run config with the fusion swapped (untrained: only
its cache behaviour is tested). CLIs run in-process with one torch thread (the tiny
model's ops are too small for more; `main` restores the thread count)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import fit_demo_tiny, tiny_synth

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "configs" / "demo.yaml"
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """-> {"synth", "casa", "insertion", "no_config", "root"}: the data and checkpoint paths."""
    root = tmp_path_factory.mktemp("inference")
    synth = tiny_synth(root)
    casa = fit_demo_tiny(root, synth)
    ckpt = torch.load(casa, map_location="cpu", weights_only=True)
    # insertion: the same run config with another fusion strategy, weights of a fresh build
    from casa.rebuild import build_model

    config = yaml.safe_load(ckpt["casa_config"])
    config["model"]["model"]["init_args"]["fusion"] = {"class_path": "casa.fusion.Insertion"}
    torch.manual_seed(0)
    model = build_model(config)
    insertion = root / "insertion.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "casa_config": yaml.safe_dump(config)}, insertion)
    no_config = root / "no_config.ckpt"
    torch.save({k: v for k, v in ckpt.items() if k != "casa_config"}, no_config)
    return {"root": root, "synth": synth, "casa": casa, "insertion": insertion, "no_config": no_config}


def live_caption_raw(index: int = 0, split: str = "test") -> dict:
    """A raw webdataset sample of the synthetic live_caption task (as the shards hold it)."""
    from data.synth import make_one

    return make_one(0, split, "live_caption", index, 56)


# ---------------------------------------------------------------------------------- API
def test_chat_prompt_is_the_training_prompt_and_answers_round_trip(run):
    """chat() builds exactly the prompt the data pipeline builds for evaluation, and answers
    what `answer_batch` (validation's truncate + generate + decode) answers for it."""
    from PIL import Image

    from casa.assistant import load
    from casa.generation import truncate_samples
    from data.dataset import SampleProcessor
    from data.packing import build_row
    from data.synth import make_one

    a = load(run["casa"])
    raw = make_one(0, "test", "color", 3, 56)
    conv = json.loads(raw["json"])
    question = conv["messages"][0]["content"][1]["text"]
    sample = SampleProcessor(a.template, a.settings.max_pixels, a.settings.min_pixels)(raw)
    batch = build_row([sample])
    ref = truncate_samples(batch, [sample.meta["prompt_len"]])
    img = Image.open(io.BytesIO(raw["img0.png"]))
    got = a.prompt([{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": question}]}])
    assert got.input_ids.tolist() == ref.input_ids.tolist()
    assert got.image_text_position.tolist() == ref.image_text_position.tolist()
    torch.testing.assert_close(got.pixel_values, ref.pixel_values)
    cfg = a.generation_config(max_new_tokens=6)
    answer = a.chat(question, images=[img], config=cfg)
    assert isinstance(answer, str)
    assert answer == a.answer_batch(batch, cfg)[0]
    assert a.chat(question, images=[raw["img0.png"]], config=cfg) == answer  # bytes work like a PIL image


def test_caption_layout_reproduces_the_training_encoding():
    """Streaming's chunks, with the reference captions teacher-forced, concatenate into the
    token stream (and image positions) the training pipeline encodes for the clip."""
    from casa.assistant import CaptionLayout
    from casa.processing.template import ChatTemplate
    from casa.processing.tokenizer import resolve_tokenizer
    from data.dataset import SampleProcessor, VideoOptions
    from data.video import expand_video, sample_frames

    tok = resolve_tokenizer("char")
    template = ChatTemplate("helium", tok)
    sample = SampleProcessor(template, 3136, 3136, VideoOptions(frame_max_pixels=3136))(live_caption_raw(1))
    layout = CaptionLayout.from_template(template)
    conv = json.loads(live_caption_raw(1)["json"])
    v = conv["video"]
    keep = sample_frames(v["timestamps"])  # the frames training keeps, and what is said at each
    said = [m["content"][0]["text"] for m in expand_video(conv, [v["frames"][i] for i in keep],
                                                          [v["timestamps"][i] for i in keep]) if m["role"] == "assistant"]
    ids, positions, pending = [], [], layout.first_pre
    for text in said:
        ids += pending
        positions.append(len(ids))
        caption = tok(text, add_special_tokens=False)["input_ids"] + layout.end
        ids += layout.post + caption[:-1]  # the last generated token is fed with the next chunk
        pending = layout.close(caption[-1], stopped=True) + layout.pre
    ids += pending[:len(pending) - len(layout.pre)]  # the last turn's closing tokens
    assert ids == sample.input_ids
    assert positions == sample.image_positions


@pytest.mark.parametrize("fusion", ["casa", "insertion"])
def test_stream_chunks_equal_a_full_forward(fusion):
    """Frame chunks through the KV cache give the logits of one forward over the whole stream."""
    from casa.assistant import frame_chunk
    from casa.cache import KVCache
    from casa.fusion import CASA, Insertion
    from casa.generation import text_chunk
    from casa.tiny import random_packed_batch, tiny_model

    model = tiny_model(CASA("plus") if fusion == "casa" else Insertion()).eval()
    # text 0..3 | frame A | text 4..8 | frame B | text 9..11
    full = random_packed_batch([[("text", 4), ("image", (2, 2)), ("text", 5), ("image", (2, 4)), ("text", 3)]], seed=3)
    ids = full.input_ids.tolist()
    cache = KVCache(1)
    with torch.no_grad():
        ref = model(full).logits  # [12, V]
        got = [model.backbone.head(model.hidden_states(
            frame_chunk(ids[:4], ids[4:6], full.pixel_values[:4], full.image_grid_thw[:1]), cache=cache))]
        for p in (6, 7):
            got.append(model.backbone.head(model.hidden_states(text_chunk([[ids[p]]]), cache=cache)))
        got.append(model.backbone.head(model.hidden_states(
            frame_chunk(ids[8:9], ids[9:12], full.pixel_values[4:], full.image_grid_thw[1:]), cache=cache)))
    torch.testing.assert_close(torch.cat(got), ref, atol=1e-4, rtol=1e-4)


def test_mask_changes_casa_answers_and_is_refused_elsewhere(run):
    from casa.assistant import load
    from data.dataset import SampleProcessor
    from data.packing import build_row
    from data.synth import make_one

    a = load(run["casa"])
    proc = SampleProcessor(a.template, a.settings.max_pixels, a.settings.min_pixels)
    batch = build_row([proc(make_one(0, "test", t, 0, 56)) for t in ("color", "shape", "count")])
    with torch.no_grad():
        plain = a.model(batch).logits
        for mask in ("self", "rnd", "rnd_txt"):
            a.set_inference_mask(mask)
            assert a.generation_config().use_cache is False  # the cache cannot apply Table 8 masks
            assert not torch.allclose(a.model(batch).logits, plain), mask
        a.set_inference_mask(None)
        torch.testing.assert_close(a.model(batch).logits, plain)
    with pytest.raises(ValueError, match="CASA"):
        load(run["insertion"]).set_inference_mask("self")


def test_checkpoint_without_config_loads_with_its_yaml_configs(run, tmp_path):
    from casa.assistant import load
    from casa.checkpoint import CheckpointError
    from casa.train.cli import parse_run_config

    a, b = load(run["casa"]), load(run["no_config"], config_files=[DEMO, TINY])
    assert type(b.model.fusion) is type(a.model.fusion) and b.settings == a.settings
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), name
    # composition is the fit CLI's: a strategy YAML with another class_path replaces the fusion whole
    # (CASA's `mode` does not leak into QFormer), and the parser fills in every default
    qformer = ROOT / "experiments" / "configs" / "strategies" / "qformer.yaml"
    fusion = parse_run_config([DEMO, TINY, qformer])["model"]["model"]["init_args"]["fusion"]
    assert fusion["class_path"] == "casa.fusion.QFormer" and "mode" not in fusion["init_args"]
    assert yaml.safe_load(qformer.read_text())["model"]["model"]["init_args"]["fusion"]["init_args"].items() \
        <= fusion["init_args"].items()
    # an invalid value is the parser's error, naming the field and the choices
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    template: chatml\n")
    with pytest.raises(CheckpointError, match=r"(?s)template.*chatml"):
        load(run["no_config"], config_files=[DEMO, TINY, bad])


def test_reading_a_run_config_does_not_seed_the_callers_generators():
    """Parsing builds nothing and leaves the RNG alone (the stored config has seed_everything: 0)."""
    from casa.train.cli import parse_run_config

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    config = parse_run_config([DEMO, TINY])
    assert config["seed_everything"] == 0 and torch.equal(torch.rand(3), expected)


# Every class a checkpoint written before the package layering (issue 15, step 1) names: the
# class paths in the `casa_config` that experiments.fit stored at that commit (demo + tiny
# configs). The LightningModule itself is never named (fit passes the class), and nothing
# in a checkpoint is a pickled class, so moving casa.module -> casa.train.module (and the
# processor into casa.processing) cannot break one.
OLD_CHECKPOINT_CLASS_PATHS = [
    "callbacks.attention_maps.AttentionMaps", "callbacks.gates.GateMonitor", "callbacks.memory.MemoryMonitor",
    "callbacks.throughput.TokenThroughput", "casa.backbone.Backbone", "casa.fusion.CASA",
    "casa.model.VisionLanguageModel", "casa.vision.VisionEncoder", "data.datamodule.VideoDataModule",
]


def _class_paths(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["class_path"]] if isinstance(node.get("class_path"), str) else []) + [
            p for v in node.values() for p in _class_paths(v)]
    return [p for v in node for p in _class_paths(v)] if isinstance(node, list) else []


def test_checkpoints_name_no_moved_module_and_old_ones_still_load(run):
    import importlib

    from casa.assistant import load

    # weights_only: plain tensors and containers, no pickled class whose module could move
    ckpt = torch.load(run["casa"], map_location="cpu", weights_only=True)
    # the model hyperparameter is its spec (class_path + init_args), not a pickled module
    assert ckpt["hparams_name"] == "kwargs" and ckpt["hyper_parameters"]["model"]["class_path"] == "casa.model.VisionLanguageModel"
    stored = _class_paths(yaml.safe_load(ckpt["casa_config"]))
    assert "casa.model.VisionLanguageModel" in stored
    for path in sorted(set(stored) | set(OLD_CHECKPOINT_CLASS_PATHS)):
        module, _, name = path.rpartition(".")
        if module == "callbacks":  # Lightning's short form (callbacks.ModelCheckpoint)
            continue
        assert hasattr(importlib.import_module(module), name), f"{path} (named by a checkpoint) does not resolve"
    # a checkpoint written before the move: the same file without the keys Lightning adds, its
    # config as that commit stored it (the classes above); it rebuilds to the same weights
    old = run["root"] / "old_layout.ckpt"
    torch.save({k: ckpt[k] for k in ("state_dict", "casa_config", "global_step")}, old)
    a, b = load(run["casa"]), load(old)
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------- CLIs
def test_evaluate_json(run, capsys, monkeypatch):
    from casa.assistant import Assistant
    from experiments.evaluate import main

    args = ["--ckpt", str(run["casa"]), "--data", str(run["synth"]), "--json", "--max-samples", "5",
            "--max-new-tokens", "4", "--threads", "1"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"tasks", "groups", "loss", "chance"}
    # the teacher-forced answer loss of the 5 samples: a cross-entropy over their answer tokens
    assert out["loss"]["answer_tokens"] > 5 and 0.0 < out["loss"]["answer_loss"] < 20.0
    assert {"color", "shape", "count", "video_direction", "live_caption"} <= set(out["tasks"])
    assert "live_caption_stream" in out["tasks"] and {"coarse", "video"} == set(out["groups"])
    for values in [*out["tasks"].values(), *out["groups"].values()]:
        # no options: no choice metrics; closed answer sets (colour, count, direction): teacher-forced accuracy
        assert set(values) - {"answer_set_accuracy"} == {"exact_match", "relaxed_accuracy", "anls", "vqa_accuracy"}
        assert all(0.0 <= v <= 1.0 for v in values.values())
    seen = []  # --mask reaches the CASA layers and generation runs uncached
    answer_batch = Assistant.answer_batch
    monkeypatch.setattr(Assistant, "answer_batch", lambda self, batch, cfg: (
        seen.append((self.model.fusion.inference_mask, cfg.use_cache)) or answer_batch(self, batch, cfg)))
    assert main(args + ["--mask", "rnd_txt"]) == 0
    masked = json.loads(capsys.readouterr().out)
    assert set(masked["tasks"]) == set(out["tasks"]) - {"live_caption_stream", "live_caption_stream_other_clip"}  # streaming needs the cache
    assert seen and set(seen) == {("rnd_txt", False)}


def stream_json(ckpt: Path, out: Path, capsys, frames: int = 6) -> dict:
    from experiments.stream import main

    assert main(["--ckpt", str(ckpt), "--video", "synthetic", "--frames", str(frames), "--no-wait", "--json",
                 "--srt", str(out), "--max-new-tokens", "3", "--threads", "1"]) == 0
    return json.loads(capsys.readouterr().out)


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    def sec(s: str) -> float:
        h, m, rest = s.split(":")
        return int(h) * 3600 + int(m) * 60 + float(rest.replace(",", "."))

    cues = []
    for block in [b for b in text.strip().split("\n\n") if b.strip()]:
        num, times, *lines = block.split("\n")
        m = re.fullmatch(r"(\d\d:\d\d:\d\d,\d\d\d) --> (\d\d:\d\d:\d\d,\d\d\d)", times)
        assert num.isdigit() and m and lines, block
        cues.append((sec(m[1]), sec(m[2]), "\n".join(lines)))
    return cues


def test_stream_json_srt_and_kv_cache_growth(run, capsys):
    casa = stream_json(run["casa"], run["root"] / "casa.srt", capsys)
    ins = stream_json(run["insertion"], run["root"] / "ins.srt", capsys)
    for out in (casa, ins):
        frames = out["frames"]
        assert [f["index"] for f in frames] == list(range(6))
        for f in frames:
            assert {"index", "t", "text", "wall_s", "delay_s", "new_tokens", "kv_tokens", "memory_bytes"} <= set(f)
            assert 1 <= f["new_tokens"] <= 3 and f["wall_s"] > 0 and f["memory_bytes"] > 0
        assert [f["t"] for f in frames] == [i / 2 for i in range(6)]
        parse_srt(Path(out["srt"]).read_text())
    # CASA: the text KV cache holds text only; insertion: text + every frame's image tokens
    assert [f["kv_tokens"] for f in casa["frames"]] == [f["text_tokens"] for f in casa["frames"]]
    assert [f["kv_tokens"] for f in ins["frames"]] == [f["text_tokens"] + f["image_tokens"] for f in ins["frames"]]
    assert ins["frames"][-1]["image_tokens"] == 6 * ins["frames"][0]["image_tokens"] > 0
    assert max(f["window_kv_tokens"] for f in casa["frames"]) <= casa["frames"][0]["image_tokens"] + 3 + 4


def test_srt_cues_follow_the_captions():
    from experiments.stream import to_srt

    recs = [{"t": i / 2, "text": t} for i, t in enumerate(["", "the red circle enters from the left", "", "", "it bounces"])]
    assert parse_srt(to_srt(recs, fps=2.0)) == [(0.5, 2.0, "the red circle enters from the left"),
                                                (2.0, 5.0, "it bounces")]
    assert to_srt([{"t": 0.0, "text": ""}], fps=2.0) == ""


# ---------------------------------------------------------------------------------- bad input
def bad_inputs(run) -> list[tuple[str, list[str], str]]:
    from PIL import Image

    root = run["root"]
    (root / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (root / "broken.gif").write_bytes(b"GIF89a not really")
    frames = root / "frames"
    frames.mkdir(exist_ok=True)
    for i in range(3):
        Image.new("RGB", (64, 64) if i == 2 else (56, 56), (i * 40, 0, 0)).save(frames / f"{i:06d}.png")
    stream = ["experiments.stream", "--no-wait", "--frames", "4", "--srt", str(root / "bad.srt")]
    evaluate = ["experiments.evaluate", "--json", "--max-samples", "2"]
    return [
        ("missing checkpoint", [*stream, "--ckpt", str(root / "nope.ckpt"), "--video", "synthetic"], "does not exist"),
        ("no casa_config", [*stream, "--ckpt", str(run["no_config"]), "--video", "synthetic"], "casa_config"),
        ("video file", [*stream, "--ckpt", str(run["casa"]), "--video", str(root / "clip.mp4")], "cannot open as a video"),
        ("undecodable", [*stream, "--ckpt", str(run["casa"]), "--video", str(root / "broken.gif")], "cannot be decoded"),
        ("frame size", [*stream, "--ckpt", str(run["casa"]), "--video", str(frames)], "frame 2 is 64x64"),
        ("eval missing ckpt", [*evaluate, "--ckpt", str(root / "nope.ckpt"), "--data", str(run["synth"])], "does not exist"),
        ("eval no data", [*evaluate, "--ckpt", str(run["casa"]), "--data", str(root / "nodata")], "no shard matches"),
        ("eval mask", [*evaluate, "--ckpt", str(run["insertion"]), "--data", str(run["synth"]), "--mask", "self"], "CASA"),
    ]


def test_bad_input_is_one_message_and_exit_code_2(run, capsys, monkeypatch):
    import importlib

    monkeypatch.delenv("CASA_TRACEBACK", raising=False)
    for name, (module, *args), needle in bad_inputs(run):
        assert importlib.import_module(module).main(args) == 2, name
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and err.count("error:") == 1, (name, err)


def test_bad_input_from_the_command_line(run):
    """As a user runs it: a subprocess, nothing but the message on stderr."""
    r = subprocess.run([sys.executable, "-m", "experiments.stream", "--ckpt", str(run["no_config"]),
                        "--video", "synthetic"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "casa_config" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------- benchmark
def test_stream_benchmark_quick(tmp_path):
    from experiments.benchmarks.stream import CONTROL, FLAT, RUNS, run

    out = run(quick=True, out_dir=str(tmp_path))
    assert out["frames"] == 40
    assert [row["strategy"] for row in out["strategies"]][-1] == "text-only LM (control)"
    for s in RUNS:
        for key in (f"{s}_memory_frame40_vs_frame5", f"{s}_state_bytes_frame40_vs_frame5", f"{s}_time_last10_vs_5to15",
                    f"{s}_kv_tokens_final", f"{s}_kv_tokens_frame5"):
            assert key in out, key
    assert Path(out["figures"]["memory"]).is_file() and Path(out["figures"]["time"]).is_file()
    # images stay out of CASA/CA's text cache and accumulate in insertion's
    assert out["casa_plus_kv_tokens_final"] == out["cross_attention_kv_tokens_final"]
    per_frame = out["image_tokens_per_frame"]
    assert out["insertion_kv_tokens_final"] == out["casa_plus_kv_tokens_final"] + 40 * per_frame
    assert out["qformer_64_kv_tokens_final"] == out["casa_plus_kv_tokens_final"] + 40 * 64
    # the control writes CASA's transcript, token for token, and no images
    assert out[f"{CONTROL}_kv_tokens_final"] == out["casa_plus_kv_tokens_final"]
    assert out[f"{CONTROL}_kv_tokens_frame5"] == out["casa_plus_kv_tokens_frame5"]
    for s in RUNS:
        assert f"{s}_growth_ms" in out and f"{s}_rss_growth_mib" in out
        if s != CONTROL:
            growth, ctl = out[f"{s}_growth_ms"], out[f"{CONTROL}_growth_ms"]
            assert out[f"{s}_growth_beyond_text_lm_ms"] == pytest.approx(growth - ctl)
    # the flat runs are timed a second time, paired; insertion's growth needs no drift correction
    for s in RUNS:
        assert (f"{s}_time_paired_last10_vs_5to15" in out) == (s in FLAT), s
    for s in FLAT:
        if s != CONTROL:
            growth, ctl = out[f"{s}_growth_paired_ms"], out[f"{CONTROL}_growth_paired_ms"]
            assert out[f"{s}_growth_paired_beyond_text_lm_ms"] == pytest.approx(growth - ctl)


@pytest.mark.parametrize("strategy", ["casa_plus", "text_lm"])
def test_paired_timing_measures_the_streams_own_frames(strategy):
    """The paired windows are frames A..B and the last W frames of the very stream the
    sequential run measures (same captions, so the same KV cache at each of those frames),
    interleaved one by one."""
    from experiments.benchmarks.stream import measure_paired, measure_strategy, windows

    frames, w = 40, windows(40)
    seq = measure_strategy(strategy, frames)
    paired = measure_paired(strategy, frames)
    assert paired["early"]["index"] == list(range(w["a"] - 1, w["b"]))
    assert paired["late"]["index"] == list(range(frames - w["last"], frames))
    for name in ("early", "late"):
        assert paired[name]["kv_tokens"] == [seq["kv_tokens"][i] for i in paired[name]["index"]], name
        assert all(t > 0 for t in paired[name]["wall_s"])
    assert paired["late"]["kv_tokens"][0] > paired["early"]["kv_tokens"][-1]  # late frames read a longer cache
