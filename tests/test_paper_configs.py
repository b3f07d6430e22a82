"""experiments/configs/paper/ against the paper (casa-paper: §4, App. B, Table 10), number by
number: each expected value below carries its citation, every number in the files carries
one in a comment, and CASA∨'s "every 4th" placement gives Helium's blocks. (That each file
parses and trains: tests/test_configs.py, on tiny overrides.)"""

import json
import re
from pathlib import Path

import pytest
import yaml

from casa.fusion import CASA
from casa.fusion.casa import fused_block_indices
from casa.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "experiments" / "configs" / "paper"
HELIUM = ["helium_casa_plus", "helium_casa_before", "helium_casa_replace", "helium_gated_cross_attention",
          "helium_insertion", "helium_qformer"]
QWEN = ["qwen2_5_vl_frozen_casa_plus", "video_stage", "live_captioning_stage"]


def load(name: str) -> dict:
    return yaml.safe_load((PAPER / f"{name}.yaml").read_text())


def get(cfg: dict, path: str):
    for key in path.split("."):
        cfg = cfg[key]
    return cfg


COMMON = {  # every paper config
    "model.lr_new": 1e-4,  # App. B.1 "Optimization"; Table 10 caption
    "model.lr_pretrained": 1e-5,  # idem
    "trainer.accumulate_grad_batches": 2,  # App. B.1 "Training schedule"; Table 10 caption
    "model.model.init_args.loss_reduction": "token",  # App. B.1: the standard cross-entropy on answers
}
FUSION = "model.model.init_args.fusion"
BACKBONE = "model.model.init_args.backbone.init_args"
VISION = "model.model.init_args.vision.init_args"
EXPECTED = {
    **{name: {"trainer.max_steps": 100_000,  # §4.1 "100k steps for Helium1"; Table 10
              f"{BACKBONE}.family": "helium", f"{VISION}.trainable_blocks": 4,  # §4.1 Backbones; Table 10
              "data.init_args.max_text_tokens": 2048, "data.init_args.max_image_tokens": 20480,  # §4.1; Table 10
              "data.init_args.max_pixels": 896 * 896}  # §4.1 R_max
       for name in HELIUM},
    "helium_insertion": {"trainer.max_steps": 100_000, f"{BACKBONE}.family": "helium", f"{VISION}.trainable_blocks": 4,
                         f"{FUSION}.class_path": "casa.fusion.Insertion",
                         "data.init_args.max_text_tokens": 1024, "data.init_args.max_image_tokens": 10240,  # Table 10 fn 1
                         "data.init_args.max_pixels": 672 * 672},  # §4.1: R_max 672^2 for insertion
    "qwen2_5_vl_frozen_casa_plus": {"trainer.max_steps": 65_000,  # Table 10 "Image training"
                                    f"{BACKBONE}.family": "qwen2_5_vl", f"{BACKBONE}.freeze": True,  # §4.1 (ii)
                                    f"{VISION}.trainable_blocks": 4,  # Table 10
                                    "data.init_args.max_text_tokens": 2048, "data.init_args.max_image_tokens": 20480,
                                    "data.init_args.max_pixels": 896 * 896},
    "video_stage": {"trainer.max_steps": 15_000,  # §4.1 "a further 15k for videos"; Table 10
                    f"{BACKBONE}.family": "qwen2_5_vl", f"{BACKBONE}.freeze": True,  # Table 10 "LLM ✗"
                    f"{VISION}.trainable_blocks": 0,  # §4.1: frozen on videos; Table 10
                    "model.init_from": "runs/qwen2_5_vl_frozen_casa_plus/checkpoints/last.ckpt",  # §4.3
                    "data.init_args.ratio": 0.75,  # App. B.1: image:video 3:1
                    "data.init_args.image.init_args.max_text_tokens": 3072,  # Table 10 "Image-video training"
                    "data.init_args.image.init_args.max_image_tokens": 46080,
                    "data.init_args.video.init_args.max_text_tokens": 3072,
                    "data.init_args.video.init_args.max_image_tokens": 46080,
                    "data.init_args.video.init_args.fps": 2.0,  # §4.1
                    "data.init_args.video.init_args.frame_max_pixels": 448 * 448,  # §4.1
                    "data.init_args.video.init_args.max_duration": 180.0,  # §4.1: 3 minutes
                    "data.init_args.video.init_args.min_duration": 10.0,  # App. B.1 "Video data"
                    "data.init_args.video.init_args.min_frames": 20,
                    "data.init_args.video.init_args.train_samples_per_row": 1},  # §4.1: no packing
    "live_captioning_stage": {"trainer.max_steps": 20_000,  # App. D; Table 10 "LiveCC training"
                              f"{BACKBONE}.family": "qwen2_5_vl", f"{BACKBONE}.freeze": True,  # Table 10
                              f"{VISION}.trainable_blocks": 0,  # Table 10
                              "model.init_from": "runs/video_stage/checkpoints/last.ckpt",  # §4.5; App. D
                              "data.init_args.image.class_path": "data.datamodule.VideoDataModule",
                              "data.init_args.image.init_args.layout": "caption",  # LiveCC (App. B.2 (iii))
                              "data.init_args.video.init_args.layout": "qa",  # LLaVA-Video-178K (App. D)
                              **{f"data.init_args.{s}.init_args.{k}": v for s in ("image", "video")
                                 for k, v in (("max_text_tokens", 3072), ("max_image_tokens", 30720),  # Table 10
                                              ("fps", 2.0), ("frame_max_pixels", 448 * 448))}},
}
for name in QWEN:  # CASA⊕ on the frozen Qwen2.5-VL (§4.3)
    EXPECTED[name].update({f"{FUSION}.class_path": "casa.fusion.CASA", f"{FUSION}.init_args.mode": "plus"})
EXPECTED["helium_casa_plus"][f"{FUSION}.init_args"] = {"mode": "plus"}  # §4.2 (ii)
EXPECTED["helium_casa_before"][f"{FUSION}.init_args"] = {"mode": "before"}  # §4.2 (iii)
EXPECTED["helium_casa_replace"][f"{FUSION}.init_args"] = {"mode": "replace", "placement": "every_k", "k": 4}  # §4.2 (i)
EXPECTED["helium_gated_cross_attention"][f"{FUSION}.init_args"] = {"placement": "parallel"}  # §4.4, §3.1
EXPECTED["helium_qformer"][f"{FUSION}.init_args"] = {"num_queries": 128, "depth": 1, "heads": 16,  # Table 6b
                                                     "form": "joint"}  # §4.4: one block over [images; queries]


def test_every_paper_config_is_checked():
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_configs_hold_the_papers_numbers(name):
    cfg = load(name)
    for path, want in {**COMMON, **EXPECTED[name]}.items():
        assert get(cfg, path) == want, f"{name}: {path} = {get(cfg, path)!r}, the paper says {want!r}"


def test_casa_replace_every_4th_layer_of_helium():
    """§4.2: CASA∨ "replaces every 4th self-attention layer": k = 4 from block 0 over Helium1-2B's
    28 layers (experiments/configs/shapes, checked against the paper's 352M CASA parameters)."""
    shapes = json.loads((ROOT / "experiments" / "configs" / "shapes" / "helium1_2b_qwen2_5_vl_3b.json").read_text())
    layers = shapes["backbone"]["num_hidden_layers"]
    k = get(load("helium_casa_replace"), f"{FUSION}.init_args.k")
    assert (layers, fused_block_indices("every_k", k, layers)) == (28, [0, 4, 8, 12, 16, 20, 24])
    model = tiny_model(CASA("replace", "every_k", k), num_layers=8)  # the strategy fuses what the rule says
    assert model.fusion.fused_layers() == [0, 4]
    assert [b.attention.form for b in model.backbone.layers] == ["replace", "none", "none", "none"] * 2
    assert tiny_model(CASA("replace", "every_k", k), num_layers=2).fusion.fused_layers() == [0]  # smoke runs


NUMBER = re.compile(r"(?<![\w.{/-])(\d+(?:\.\d+)?(?:e-?\d+)?)(?![\w}/.-])")
CITES = ("§", "Table", "App.", "Fig.", "not in the paper")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_number_cites_the_paper(name):
    """A line holding a number has a comment citing the paper (or saying it is not in it):
    its own, or the comment lines right above it. Paths and the usage line are not numbers."""
    lines = (PAPER / f"{name}.yaml").read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        code, _, comment = line.partition("#")
        code = re.sub(r"'[^']*'|\b(train|val|path|tokenizer|run_dir|init_from):\s*\S+", "", code)
        if not code.strip() or not NUMBER.search(code):
            continue
        above, j = [], i - 1
        while j >= 0 and lines[j].lstrip().startswith("#"):
            above.append(lines[j])
            j -= 1
        if not any(c in comment or any(c in a for a in above) for c in CITES):
            missing.append(f"line {i + 1}: {line.strip()}")
    assert not missing, f"{name}: numbers without a citation:\n" + "\n".join(missing)
