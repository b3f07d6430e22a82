"""The Hugging Face export (`experiments.export`, `casa.hf`): the directory reloads through
transformers (remote code) and through `casa.assistant.load` with the checkpoint's outputs.

One tiny CASA⊕ run is trained for two steps (module fixture); CASA∨, cross-attention and
insertion checkpoints are written from its run config with the fusion swapped (fresh
weights); the trainer configs' checkpoints (ddp: bf16 autocast; FSDP2: a DCP directory, bf16
parameters) are written from it with the trainer swapped, in one process."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import fit_demo_tiny, tiny_synth

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "configs" / "demo.yaml"
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
TRAINERS = ROOT / "experiments" / "configs" / "trainer"
FUSIONS = {
    "casa_plus": {"class_path": "casa.fusion.CASA", "init_args": {"mode": "plus"}},
    "casa_replace": {"class_path": "casa.fusion.CASA", "init_args": {"mode": "replace"}},
    "cross_attention": {"class_path": "casa.fusion.CrossAttention", "init_args": {"placement": "parallel"}},
    "insertion": {"class_path": "casa.fusion.Insertion"},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """-> {"root", "synth", "casa_plus": trained checkpoint, "config": its run config (TensorBoard
    logs in root/run/tb)}."""
    root = tmp_path_factory.mktemp("export")
    synth = tiny_synth(root)
    tensorboard = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": str(root / "run"), "name": "tb", "version": ""}}
    ckpt = fit_demo_tiny(root, synth, logger=json.dumps(tensorboard))
    config = yaml.safe_load(torch.load(ckpt, map_location="cpu", weights_only=True)["casa_config"])
    return {"root": root, "synth": synth, "casa_plus": ckpt, "config": config}


def _write_checkpoint(path: Path, config: dict, directory: bool = False) -> Path:
    """A checkpoint of `config`'s model with fresh weights: a file, or a DCP directory laid out
    as ModelParallelStrategy writes it (shards + .metadata + meta.pt)."""
    from casa.rebuild import build_model

    torch.manual_seed(0)
    state = {f"model.{k}": v for k, v in build_model(config).state_dict().items()}
    import lightning

    meta = {"casa_config": yaml.safe_dump(config), "global_step": 2, "pytorch-lightning_version": lightning.__version__}
    if not directory:
        torch.save({"state_dict": state, **meta}, path)
        return path
    import torch.distributed.checkpoint as dcp

    from casa.checkpoint import LIGHTNING_METADATA

    dcp.save({"state_dict": state}, checkpoint_id=path, no_dist=True)
    torch.save(meta, path / LIGHTNING_METADATA)
    return path


def _checkpoint(run: dict, fusion: str) -> Path:
    if fusion == "casa_plus":
        return run["casa_plus"]
    config = json.loads(json.dumps(run["config"]))
    config["model"]["model"]["init_args"]["fusion"] = FUSIONS[fusion]
    return _write_checkpoint(run["root"] / f"{fusion}.ckpt", config)


def _prompt_batch(assistant, question: str = "What colour is the shape?"):
    from data.synth import make_one

    raw = make_one(0, "test", "color", 3, 56)
    img = raw["img0.png"]
    return assistant.prompt([{"role": "user", "content": [{"type": "image", "image": img},
                                                          {"type": "text", "text": question}]}]), img


def _export(ckpt: Path, out: Path) -> Path:
    from experiments.export import main

    assert main(["--ckpt", str(ckpt), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_export_reloads_with_the_checkpoints_logits_and_generations(run, fusion, tmp_path):
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    from casa.assistant import load

    ckpt = _checkpoint(run, fusion)
    out = _export(ckpt, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "configuration_casa.py", "modeling_casa.py"} <= names, names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "casa" and cfg["fusion"]["class_path"] == FUSIONS[fusion]["class_path"]
    assert FUSIONS[fusion].get("init_args", {}).items() <= (cfg["fusion"].get("init_args") or {}).items()
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_casa.CasaForConditionalGeneration"
    backbone = cfg["model_spec"]["init_args"]["backbone"]["init_args"]
    assert backbone["config"]["hidden_size"] == 64 and backbone["path"] is None

    reference = load(ckpt)
    batch, img = _prompt_batch(reference)
    with torch.no_grad():
        expected_logits = reference.model(batch).logits
    gen = reference.generation_config(max_new_tokens=6)
    expected = reference._generate(batch, gen)

    remote = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(remote).__module__.startswith("transformers_modules")  # DIR's own remote code ran
    processor = AutoProcessor.from_pretrained(str(out), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What colour is the shape?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    text = inputs["input_ids"][0] != cfg["image_token_id"]
    with torch.no_grad():
        torch.testing.assert_close(remote(**inputs).logits[0, text], expected_logits, rtol=0, atol=0)
        new = remote.generate(**inputs, max_new_tokens=6)[0, inputs["input_ids"].shape[1]:].tolist()
    assert new[:len(expected[0])] == expected[0]  # then padding, once the end-of-turn token was generated
    assert all(t == remote.generation_config.pad_token_id for t in new[len(expected[0]):])

    exported = load(out)
    assert exported.chat("What colour is the shape?", images=[img], config=gen) == \
        reference.chat("What colour is the shape?", images=[img], config=gen)
    assert exported.settings == reference.settings and exported.template.name == reference.template.name

    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = reference.template.encode(messages + [{"role": "assistant", "content": [{"type": "text", "text": ""}]}])
    ids = enc.with_placeholders(tok.convert_tokens_to_ids("<|image_pad|>"))[:enc.prompt_len + 1]
    assert tok(text, add_special_tokens=False)["input_ids"] == ids


def test_exported_image_processor_has_the_runs_pixel_limits(run, tmp_path):
    """DIR's preprocessor config, loaded by transformers, gives the pixels inference uses."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from casa.assistant import load
    from data.synth import make_one

    out = _export(run["casa_plus"], tmp_path / "hf")
    a = load(out)
    processor = AutoImageProcessor.from_pretrained(str(out))
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (a.settings.min_pixels, a.settings.max_pixels)
    assert a.settings.max_pixels == run["config"]["data"]["init_args"]["max_pixels"]
    img = Image.open(io.BytesIO(make_one(0, "test", "color", 1, 120)["img0.png"]))
    ref = processor(images=[img], return_tensors="pt")
    pv, grid = a.pixels(img, a.settings.max_pixels)
    assert grid == ref["image_grid_thw"][0].tolist()
    torch.testing.assert_close(pv, ref["pixel_values"].float())


@pytest.mark.parametrize("trainer", ["cpu.yaml", "ddp.yaml", "fsdp2_h100.yaml"])
def test_export_of_every_trainer_configs_checkpoint(run, trainer, tmp_path):
    """cpu/ddp write a file, FSDP2 a DCP directory; the run's precision (ddp: bf16 autocast,
    FSDP2: bf16 parameters) is recorded and applied again: the export answers as the checkpoint."""
    from casa.assistant import load

    config = json.loads(json.dumps(run["config"]))
    over = yaml.safe_load((TRAINERS / trainer).read_text())
    config["trainer"].update(over["trainer"])
    config["model"].update({k: v for k, v in (over.get("model") or {}).items() if k != "model"})
    directory = trainer.startswith("fsdp2")
    path = tmp_path / "last.ckpt"
    if directory:
        path.mkdir()
    ckpt = _write_checkpoint(path, config, directory=directory)
    out = _export(ckpt, tmp_path / "hf")
    reference, exported = load(ckpt), load(out)
    assert exported.autocast_dtype == reference.autocast_dtype
    assert [p.dtype for p in exported.model.parameters()] == [p.dtype for p in reference.model.parameters()]
    expected = {"cpu.yaml": (None, torch.float32), "ddp.yaml": (torch.bfloat16, torch.float32),
                "fsdp2_h100.yaml": (None, torch.bfloat16)}[trainer]
    assert (reference.autocast_dtype, next(reference.model.backbone.parameters()).dtype) == expected
    batch, _ = _prompt_batch(reference)
    with torch.no_grad(), reference._autocast():
        expected_logits = reference.model(batch).logits
    with torch.no_grad(), exported._autocast():
        torch.testing.assert_close(exported.model(batch).logits, expected_logits, rtol=0, atol=0)
    gen = reference.generation_config(max_new_tokens=4)
    assert exported._generate(batch, gen) == reference._generate(batch, gen)


def test_export_names_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    from experiments.export import main

    assert main(["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "nope.ckpt" in err and not (tmp_path / "hf").exists()


# ------------------------------------------------------------------ Lightning's own loading path
def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_load_from_checkpoint_rebuilds_the_model_from_its_hyperparameters(run, tmp_path):
    """CasaModule.load_from_checkpoint(path) alone: the fit CLI stores the model's spec in the
    hyperparameters; an older checkpoint (no spec there) and FSDP2's directory load too."""
    from casa.assistant import load
    from casa.train.module import CasaModule

    ckpt = torch.load(run["casa_plus"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["model"]["init_args"]["fusion"]["class_path"] == "casa.fusion.CASA"
    reference = load(run["casa_plus"], precision="32").model
    module = CasaModule.load_from_checkpoint(run["casa_plus"])
    _same_weights(module.model, reference)
    assert module.hparams.lr_new == run["config"]["model"]["lr_new"] and module.hparams.init_from is None

    old = tmp_path / "old.ckpt"  # as written before the spec was a hyperparameter
    torch.save({**ckpt, "hyper_parameters": {k: v for k, v in ckpt["hyper_parameters"].items()
                                             if k not in ("model", "_instantiator")}}, old)
    _same_weights(CasaModule.load_from_checkpoint(old).model, reference)

    config = json.loads(json.dumps(run["config"]))
    config["model"]["model"]["init_args"]["fusion"] = FUSIONS["insertion"]
    (tmp_path / "dcp").mkdir()
    directory = _write_checkpoint(tmp_path / "dcp", config, directory=True)
    loaded = CasaModule.load_from_checkpoint(directory)
    assert type(loaded.model.fusion).__name__ == "Insertion"
    _same_weights(loaded.model, load(directory, precision="32").model)


def test_tensorboard_hparams_show_the_model_config(run):
    """The run's TensorBoard HParams session holds the model's spec (flattened by Lightning)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run["root"] / "run" / "tb"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model/init_args/fusion/class_path"].string_value == "casa.fusion.CASA"
    assert hparams["model/init_args/fusion/init_args/mode"].string_value == "plus"
    assert hparams["model/init_args/backbone/init_args/config/hidden_size"].number_value == 64
    assert hparams["lr_new"].number_value == run["config"]["model"]["lr_new"]


def test_data_settings_defaults_are_the_datamodules():
    """DataSettings' own defaults (direct construction) equal VideoDataModule's signature."""
    import inspect
    from dataclasses import fields

    from casa.rebuild import DataSettings
    from data.datamodule import VideoDataModule

    signature = inspect.signature(VideoDataModule.__init__).parameters
    for f in fields(DataSettings):
        assert f.default == signature[f.name].default, f.name


def test_a_run_from_a_pretrained_backbone_path_exports_its_architecture(run, tmp_path):
    """A backbone given by `path:` (a local save_pretrained checkpoint) is exported by its
    architecture: the export rebuilds without that directory, with the same outputs."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from casa.hf.export import self_contained_spec
    from casa.rebuild import build_model

    backbone = run["config"]["model"]["model"]["init_args"]["backbone"]["init_args"]
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**backbone["config"])).save_pretrained(tmp_path / "llama")
    config = json.loads(json.dumps(run["config"]))
    config["model"]["model"]["init_args"]["backbone"]["init_args"].update(path=str(tmp_path / "llama"), config=None)
    torch.manual_seed(1)
    model = build_model(config).eval()
    spec = self_contained_spec(config["model"]["model"], model)
    assert spec["init_args"]["backbone"]["init_args"]["path"] is None
    assert spec["init_args"]["backbone"]["init_args"]["config"]["hidden_size"] == backbone["config"]["hidden_size"]
    shutil.rmtree(tmp_path / "llama")
    rebuilt = build_model({"model": {"model": spec}}).eval()
    rebuilt.load_state_dict(model.state_dict())
    from casa.tiny import random_packed_batch

    batch = random_packed_batch([[("text", 5), ("image", (4, 4)), ("text", 7)]], vocab_size=160)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batch).logits, model(batch).logits, rtol=0, atol=0)


def test_evaluate_scores_the_export_as_the_checkpoint(run, tmp_path, capsys):
    """`experiments.evaluate --ckpt DIR` (what the lmms-eval model loads too: casa.assistant.load)
    gives the checkpoint's JSON, answer loss included."""
    from experiments.evaluate import main as evaluate

    out = _export(run["casa_plus"], tmp_path / "hf")
    results = []
    for ckpt in (run["casa_plus"], out):
        capsys.readouterr()
        assert evaluate(["--ckpt", str(ckpt), "--data", str(run["synth"]), "--max-samples", "4", "--max-new-tokens", "3",
                         "--no-stream", "--json", "--threads", "1"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] and results[0]["loss"]["answer_tokens"] > 0


def test_an_export_that_fails_midway_keeps_the_previous_one_whole(run, tmp_path, monkeypatch):
    """The export directory is built aside and renamed into place: a full disk while writing
    the model card (the last file) of another model's export leaves the earlier export exactly
    as it was (written in place, its config and weights would already be the new model's), and
    no partial directory beside it."""
    import errno

    import casa.hf.card

    out = _export(run["casa_plus"], tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(casa.hf.card, "model_card", full_disk)
    from experiments.export import main

    with pytest.raises((OSError, SystemExit)):
        main(["--ckpt", str(_checkpoint(run, "insertion")), "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
