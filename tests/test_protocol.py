"""The small-scale protocol (issue 16 B, docs/reproduction.md): the new synthetic tasks, the
cached pretraining stages, saving a backbone, per-task losses and held-out text perplexity,
the protocol's fit configs (learning-rate rule, freezing) and its grids."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from casa.backbone import Backbone
from casa.tiny import tiny_backbone_config
from data.synth import make_one
from data.synth_tasks import DEFAULT_SIZES, TASKS, describe, detail
from data.synth_tasks.render import COLORS, INK, textsize

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "experiments" / "configs" / "protocol"


def _sample(task: str, i: int) -> tuple[dict, np.ndarray | None]:
    s = make_one(0, "test", task, i, DEFAULT_SIZES.get(TASKS[task][0], 0))
    conv = json.loads(s["json"])
    img = np.asarray(Image.open(io.BytesIO(s["img0.png"])).convert("RGB")).astype(int) if "img0.png" in s else None
    return conv, img


def _answer(conv: dict) -> str:
    return conv["messages"][-1]["content"][0]["text"]


# ---------------------------------------------------------------------------- tasks
def test_spot_color_answer_is_the_small_marker():
    """The answer colour covers exactly the marker (side x side px, drawn unjittered, on top),
    which is a small fraction of the image; the big shapes are other colours."""
    side = round(112 * detail.MARKER)
    for i in range(30):
        conv, img = _sample("spot_color", i)
        exact = (img == np.array(COLORS[_answer(conv)])).all(-1)  # [H, W]
        ys, xs = np.nonzero(exact)
        assert exact.sum() == side * side, (i, exact.sum())
        assert ys.max() - ys.min() + 1 == side and xs.max() - xs.min() + 1 == side
        # the big shapes hold most of the coloured pixels: a pooled view is dominated by them
        coloured = (np.abs(img - np.array((24, 24, 24))).max(-1) > 40).sum()
        assert exact.sum() < 0.1 * coloured


def test_read_number_prints_its_answer_small():
    for i in range(30):
        conv, img = _sample("read_number", i)
        value = _answer(conv)
        assert len(value) == 2 and value.isdigit()
        ink = (img == np.array(INK)).all(-1)  # only the number is drawn in pure ink
        ys, xs = np.nonzero(ink)
        w, h = textsize(value, detail.font_size(112))
        assert xs.max() - xs.min() + 1 <= w and ys.max() - ys.min() + 1 <= h  # glyphs inside the text box
        assert ink.any() and w < 112 / 3  # printed small: under a third of the width


def test_describe_tasks_are_text_with_and_without_an_unrelated_image():
    for i in range(20):
        conv, img = _sample("describe", i)
        assert img is None and len(_answer(conv)) <= 40
        conv2, img2 = _sample("describe_after_image", i)
        assert img2 is not None and conv2["messages"][0]["content"][0]["type"] == "image"
        assert len(_answer(conv2)) <= 40
        words = _answer(conv2).split()
        assert words[0] in COLORS and words[-2] in COLORS  # the grammar of `describe.sentence`
    assert TASKS["describe"][0] == TASKS["describe_after_image"][0] == "lm"


# ---------------------------------------------------------------------------- backbone save
def test_backbone_save_pretrained_round_trips_without_fusion_layers(tmp_path):
    from casa.fusion import CASA
    from casa.tiny import tiny_model

    model = tiny_model(CASA("plus"), hidden_size=32, num_layers=2)  # CASA layers live inside the blocks
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.backbone.save_pretrained(tmp_path / "lm")
    loaded = Backbone(model.backbone.family, path=str(tmp_path / "lm"))
    assert set(dict(loaded.named_parameters())) == set(model.backbone.pretrained_names)
    ids, pos, cu = torch.randint(0, 100, (12,)), torch.arange(12), torch.tensor([0, 12])
    plain = Backbone(model.backbone.family, config=dict(model.backbone.config.to_dict()))
    plain.load_state_dict({k: v for k, v in model.backbone.state_dict().items() if k in plain.state_dict()})
    torch.testing.assert_close(loaded(ids, pos, cu), plain(ids, pos, cu), rtol=0, atol=0)


# ---------------------------------------------------------------------------- losses
def test_answer_loss_per_sample_matches_a_per_sample_cross_entropy():
    from casa.model import answer_loss_per_sample

    torch.manual_seed(0)
    logits, labels = torch.randn(10, 7), torch.randint(0, 7, (10,))
    labels[[0, 3, 4, 9]] = -100
    cu = torch.tensor([0, 4, 6, 10])
    sums, counts = answer_loss_per_sample(logits, labels, cu)
    for s in range(3):
        a, b = int(cu[s]), int(cu[s + 1])
        keep = labels[a:b] != -100
        ref = F.cross_entropy(logits[a:b][keep], labels[a:b][keep], reduction="sum")
        torch.testing.assert_close(sums[s], ref)
        assert counts[s] == keep.sum()


def test_grouped_loss_is_the_token_weighted_mean_per_key():
    from casa.train.metrics import GroupedLoss

    g = GroupedLoss()
    g.update(["a", "b", "a"], torch.tensor([3.0, 1.0, 5.0]), torch.tensor([2, 1, 6]))
    g.update(["b"], torch.tensor([9.0]), torch.tensor([0]))  # no answer token: nothing added
    out = g.compute()
    assert out["a"]["loss"] == pytest.approx(8.0 / 8) and out["b"]["loss"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------- the stage cache
def test_stage_cache_reuses_rebuilds_and_never_keeps_a_half_built_entry(tmp_path):
    from experiments.pretrain import run_stage

    calls = []

    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "weights").write_text("w")
        return {"value": len(calls)}

    e1, r1, built1 = run_stage(tmp_path, "lm", {"steps": 3}, build, force=False, log=lambda *_: None)
    e2, r2, built2 = run_stage(tmp_path, "lm", {"steps": 3}, build, force=False, log=lambda *_: None)
    assert built1 and not built2 and e1 == e2 and r2["value"] == 1 and len(calls) == 1
    e3, _, built3 = run_stage(tmp_path, "lm", {"steps": 4}, build, force=False, log=lambda *_: None)
    assert built3 and e3 != e1 and (e3 / "weights").is_file()
    _, r4, built4 = run_stage(tmp_path, "lm", {"steps": 3}, build, force=True, log=lambda *_: None)
    assert built4 and r4["value"] == 3

    def broken(tmp: Path) -> dict:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "vlm", {"x": 1}, broken, force=False, log=lambda *_: None)
    assert not list(tmp_path.glob("vlm-*"))  # no entry a later run would take as complete


def _tiny_spec(root: Path):
    from experiments.pretrain import load_spec

    spec = load_spec(PROTOCOL / "pretrain.yaml")
    return dataclasses.replace(
        spec, out=str(root / "pretrained"), cache=str(root / "cache"),
        synth=dataclasses.replace(spec.synth, out=str(root / "synth"), train=24, val=8, test=0),
        heldout=dataclasses.replace(spec.heldout, out=str(root / "heldout"), val=4, test=0),
        lm=dataclasses.replace(spec.lm, config=tiny_backbone_config("llama", hidden_size=64, num_layers=4),
                               corpus_samples=240, heldout_samples=24, steps=40, warmup_steps=2, decay_steps=5,
                               row_tokens=256),
        vlm=dataclasses.replace(spec.vlm, overrides={"trainer.max_steps": 2}))


def test_pretrain_chains_stage_hashes_and_links_the_current_entries(tmp_path, monkeypatch):
    """A changed LM section rebuilds the LM and the VLM trained from it; a changed VLM
    section rebuilds the VLM only; the same config rebuilds nothing. (Stage bodies faked.)"""
    import experiments.pretrain as pt

    built = []
    monkeypatch.setattr(pt, "train_lm", lambda spec, out, log=print: built.append("lm") or {"steps": spec.steps})
    monkeypatch.setattr(pt, "train_vlm", lambda spec, lm, out, log=print: built.append(("vlm", lm.name)) or {})
    spec = _tiny_spec(tmp_path)
    e1 = pt.pretrain(spec, log=lambda *_: None)
    assert built == ["lm", ("vlm", e1["lm"].name)]
    assert (tmp_path / "pretrained" / "lm").resolve() == e1["lm"].resolve()
    pt.pretrain(spec, log=lambda *_: None)
    assert len(built) == 2
    e3 = pt.pretrain(dataclasses.replace(spec, lm=dataclasses.replace(spec.lm, steps=41)), log=lambda *_: None)
    assert built[2:] == ["lm", ("vlm", e3["lm"].name)] and e3["vlm"] != e1["vlm"]
    e4 = pt.pretrain(dataclasses.replace(spec, vlm=dataclasses.replace(spec.vlm, overrides={"trainer.max_steps": 3})),
                     log=lambda *_: None)
    assert built[4:] == [("vlm", e1["lm"].name)] and e4["lm"] == e1["lm"]
    assert (tmp_path / "pretrained" / "vlm").resolve() == e4["vlm"].resolve()


def test_corpus_drops_images_and_is_apart_from_the_benchmark_splits():
    from casa.processing.template import ChatTemplate
    from casa.processing.tokenizer import resolve_tokenizer
    from experiments.pretrain import corpus, corpus_conversation

    conv, _ = _sample("color", 0)
    text = corpus_conversation(conv)
    assert [c["type"] for m in text for c in m["content"]] == ["text", "text"]
    template = ChatTemplate("helium", resolve_tokenizer("char"))
    seqs = corpus(["describe"], 50, 0, "pretrain", template)
    # sample j is drawn from the "pretrain" split's own stream: the same sentences as that
    # stream gives, not the val split's
    own = [describe.describe(random.Random(f"0/pretrain/describe/{j}"), 0)[0] for j in range(50)]
    val = [json.loads(make_one(0, "val", "describe", j, 0)["json"]) for j in range(50)]
    assert seqs == [template.encode(c["messages"]).input_ids for c in own]
    assert seqs != [template.encode(c["messages"]).input_ids for c in val]


def test_lm_stage_learns_the_corpus_and_saves_what_backbone_path_loads(tmp_path):
    from casa.processing.template import ChatTemplate
    from casa.processing.tokenizer import resolve_tokenizer
    from experiments.pretrain import corpus, lm_loss, pack_rows, train_lm

    spec = _tiny_spec(tmp_path).lm
    report = train_lm(spec, tmp_path / "lm", log=lambda *_: None)
    assert report["heldout_loss"] < math.log(160) - 1.0  # far below a uniform guess over the vocabulary
    loaded = Backbone("llama", path=str(tmp_path / "lm"))
    template = ChatTemplate("helium", resolve_tokenizer("char"))
    rows = pack_rows(corpus(spec.corpus_tasks, spec.heldout_samples, spec.seed, "pretrain_val", template), spec.row_tokens)
    n = [sum(len(s) - 1 for s in r) for r in rows]
    with torch.no_grad():
        val = sum(lm_loss(loaded, r).item() * k for r, k in zip(rows, n)) / sum(n)
    assert val == pytest.approx(report["heldout_loss"], rel=1e-5)  # the saved weights are the trained ones


# ---------------------------------------------------------------------------- fit configs
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny stand-ins of the pretrained parts (LM trained a few steps; a random tower saved as
    a VisionEncoder directory) and tiny protocol data."""
    from casa.vision import VisionEncoder
    from data.synth import ensure_synth
    from experiments.pretrain import train_lm

    root = tmp_path_factory.mktemp("protocol")
    spec = _tiny_spec(root)
    ensure_synth(spec.synth.out, 0, 24, 8, 0, spec.synth.tasks, progress=False)
    ensure_synth(spec.heldout.out, 0, 0, 4, 0, spec.heldout.tasks, progress=False)
    train_lm(dataclasses.replace(spec.lm, steps=2, warmup_steps=1, decay_steps=1), root / "lm", log=lambda *_: None)
    torch.manual_seed(0)
    VisionEncoder(config={"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64,
                          "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 112,
                          "fullatt_block_indexes": [1], "in_channels": 3}).save_pretrained(root / "vlm" / "vision")
    train_lm(dataclasses.replace(spec.lm, steps=2, warmup_steps=1, decay_steps=1, seed=1), root / "vlm" / "lm", log=lambda *_: None)
    return root, spec


def _fit(pretrained, run_dir: Path, *configs: str, extra: tuple[str, ...] = ()):
    from experiments.fit import main

    root, spec = pretrained
    args = []
    for c in ("base.yaml", "fusion.yaml", *configs):
        args += ["--config", str(c if "/" in c else PROTOCOL / c)]
    args += ["--data.init_args.train", spec.synth.out,
             "--data.init_args.val", f"{{{spec.heldout.out},{spec.synth.out}}}/val-*.tar",
             "--data.init_args.num_workers", "0", "--data.init_args.val_rows_samples", "4",
             "--model.model.init_args.vision.init_args.path", str(root / "vlm" / "vision"),
             "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--run_dir", str(run_dir), *extra]
    return main(args)


def test_protocol_fusion_run_trains_at_the_paper_lr_rule_and_reports_text_perplexity(pretrained, tmp_path, monkeypatch):
    root, _ = pretrained
    monkeypatch.setattr(sys, "argv", ["experiments.fit"])
    cli = _fit(pretrained, tmp_path / "run", extra=("--model.model.init_args.backbone.init_args.path", str(root / "lm")))
    model = cli.model.model
    lrs = {g["name"]: g["lr"] for g in cli.trainer.optimizers[0].param_groups}
    assert lrs == {"new": pytest.approx(1e-3), "pretrained": pytest.approx(1e-4)}  # the paper's 10x rule
    groups = {k: {n for n, _ in v} for k, v in model.parameter_groups().items()}
    backbone_loaded = {f"backbone.{n}" for n in model.backbone.pretrained_names}
    assert backbone_loaded <= groups["pretrained"]  # the pretrained LM at the low rate
    assert any(".fusion_attn." in n for n in groups["new"]) and all(n.startswith(("projector.", "backbone.", "fusion."))
                                                                   for n in groups["new"])
    vision = {n for n in groups["pretrained"] if n.startswith("vision.")}
    assert vision and all(".blocks.1." in n or ".merger." in n for n in vision)  # the tower's tail only
    assert not any(p.requires_grad for p in model.vision.tower.blocks[0].parameters())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    for task in ("describe", "describe_after_image"):
        assert metrics[f"val_ppl/{task}"] == pytest.approx(math.exp(metrics[f"val_task/{task}/loss"]), rel=1e-4)
    assert "val_task/color/loss" in metrics and "val_ppl/color" not in metrics
    assert not any(k.startswith("val_group/lm/") for k in metrics)  # held-out text is never scored by generation
    assert any(k.startswith("val_group/") for k in metrics)  # the benchmark is


def test_table3_adapts_the_frozen_pretrained_vlm_with_new_casa_layers_only(pretrained, tmp_path, monkeypatch):
    root, _ = pretrained
    monkeypatch.setattr(sys, "argv", ["experiments.fit"])
    cli = _fit(pretrained, tmp_path / "run", "table3.yaml",
               extra=("--model.model.init_args.backbone.init_args.path", str(root / "vlm" / "lm")))
    model = cli.model.model
    groups = {k: {n for n, _ in v} for k, v in model.parameter_groups().items()}
    assert not any(n.startswith("backbone.") for n in groups["pretrained"])  # the VLM's LM is frozen
    assert groups["new"] and all(".fusion_attn." in n or n.startswith("fusion.") for n in groups["new"])
    assert all(n.startswith("vision.") for n in groups["pretrained"])
    assert model.projector.kind == "identity"  # the VLM's own merger maps the tower into its LM


# ---------------------------------------------------------------------------- grids
@pytest.mark.parametrize("name,runs", [("protocol_table6a", 18), ("protocol_table6b", 9), ("protocol_table7", 18),
                                       ("protocol_table8", 12)])
def test_protocol_grids_have_three_seeds_on_the_protocol_configs(name, runs):
    from experiments.grid_spec import load_grid

    grid = load_grid(ROOT / "experiments" / "grids" / f"{name}.yaml")
    assert grid.aggregate == "seed" and len(dict(grid.axes)["seed"]) >= 3
    assert len(grid.runs()) == runs
    assert [str(b) for b in grid.base][:2] == ["experiments/configs/protocol/base.yaml",
                                              "experiments/configs/protocol/fusion.yaml"]


@pytest.mark.slow
def test_pretrain_command_builds_both_stages_once(tmp_path, monkeypatch):
    """The one command, end to end at tiny size: the LM stage, the insertion-VLM stage through
    `experiments.fit`, the links the protocol configs read; a second run trains nothing."""
    import experiments.pretrain as pt

    monkeypatch.chdir(ROOT)
    spec = _tiny_spec(tmp_path)
    spec = dataclasses.replace(spec, vlm=dataclasses.replace(spec.vlm, overrides={
        "trainer.max_steps": 2, "trainer.val_check_interval": 2, "data.init_args.num_workers": 0,
        "data.init_args.train": spec.synth.out, "data.init_args.val": f"{{{spec.heldout.out},{spec.synth.out}}}/val-*.tar",
        "model.model.init_args.vision.init_args.config.out_hidden_size": 64}))
    entries = pt.pretrain(spec, log=lambda *_: None)
    from casa.vision import VisionEncoder

    out = tmp_path / "pretrained"
    Backbone("llama", path=str(out / "lm"))
    Backbone("llama", path=str(out / "vlm" / "lm"))
    VisionEncoder(path=str(out / "vlm" / "vision"))
    logs = []
    assert pt.pretrain(spec, log=logs.append) == entries
    assert [line for line in logs if "cached" in line] == [f"lm: cached at {entries['lm']}", f"vlm: cached at {entries['vlm']}"]


def test_require_pretrained_refuses_a_random_lm_at_the_pretrained_rate(tmp_path):
    """The confound of issue 16: a random-initialised LM trained at lr_pretrained."""
    from casa.fusion import CASA
    from casa.tiny import tiny_model
    from casa.train.module import CasaModule
    from casa.train.optim import random_init_in_pretrained

    model = tiny_model(CASA("plus"), hidden_size=32, num_layers=2)
    module = CasaModule(model, require_pretrained=True)
    with pytest.raises(ValueError, match=r"require_pretrained=True .*backbone\.lm\.model"):
        module.configure_optimizers()
    groups = model.parameter_groups()
    assert random_init_in_pretrained(groups, ()) == []
    bad = random_init_in_pretrained(groups, ("backbone.", "vision."))
    assert bad and all(n.startswith(("backbone.", "vision.")) for n in bad)
    assert not any(".fusion_attn." in n for n in bad)  # new layers are in the new group, never flagged
    model.backbone.save_pretrained(tmp_path / "lm")
    loaded = Backbone(model.backbone.family, path=str(tmp_path / "lm"))
    assert loaded.loaded and not model.backbone.loaded and not model.vision.loaded
