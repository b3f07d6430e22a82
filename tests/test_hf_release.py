"""The release (`experiments.export`, `casa.hf`) as a Hugging Face user meets it: remote code
that is casa's own and runs without casa, the auto classes, the processor, `generate()` and the
pipeline, each checked against casa's own processor and cached generation.

One export of the tiny config (fresh weights, a run directory with its metrics.json) serves
the module; the strategy matrix is checked in process with each strategy's model wrapped."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "experiments" / "configs" / "demo.yaml", ROOT / "tests" / "configs" / "tiny.yaml"]
QUESTION = "What colour is the shape?"


def _image(index: int = 3, size: int = 56):
    from PIL import Image

    from data.synth import make_one

    return Image.open(io.BytesIO(make_one(0, "test", "color", index, size)["img0.png"])).convert("RGB")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """-> {"dir": the export, "ckpt": its checkpoint, "config": the run config}."""
    import lightning

    from casa.rebuild import build_model
    from casa.train.cli import parse_run_config
    from experiments.export import main

    root = tmp_path_factory.mktemp("release")
    config = parse_run_config([str(c) for c in CONFIGS])
    torch.manual_seed(0)
    state = {f"model.{k}": v for k, v in build_model(config).state_dict().items()}
    (root / "run" / "checkpoints").mkdir(parents=True)
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": state, "casa_config": yaml.safe_dump(config), "global_step": 2,
                "pytorch-lightning_version": lightning.__version__}, ckpt)
    (root / "run" / "metrics.json").write_text(json.dumps({"metrics": {"val/loss": 4.25, "train/loss": 5.0}}))
    assert main(["--ckpt", str(ckpt), "--out", str(root / "hf")]) == 0
    return {"dir": root / "hf", "ckpt": ckpt, "config": config}


def _messages(n_images: int = 1, text: str = QUESTION):
    return [{"role": "user", "content": [*({"type": "image", "image": _image(3 + i)} for i in range(n_images)),
                                         {"type": "text", "text": text}]}]


# ------------------------------------------------------------------ remote code
def _import_lines(source: str) -> set[int]:
    lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def _without_imports(source: str) -> list[str]:
    skip = _import_lines(source)
    return [line for i, line in enumerate(source.splitlines(), 1) if i not in skip and "__import__(" not in line]


def test_remote_code_is_the_librarys_code(release):
    """Every .py of DIR but parts.py is a casa module's text with only its import lines changed,
    imports no casa, and DIR holds the modules the CASA⊕ model needs and no other strategy's."""
    from casa.hf.export import REMOTE_ENTRIES
    from casa.hf.source import flat_name, required_modules

    modules = {flat_name(m) + ".py": m for m in required_modules(
        REMOTE_ENTRIES + ["casa.model", "casa.backbone", "casa.vision", "casa.fusion.casa"])}
    files = {p.name for p in release["dir"].glob("*.py")}
    assert files == set(modules) | {"parts.py"}, files ^ (set(modules) | {"parts.py"})
    assert "casa_fusion_insertion.py" not in files and "casa_fusion_cross_attention.py" not in files
    for name, module in modules.items():
        library = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        copied = (release["dir"] / name).read_text()
        assert _without_imports(copied) == _without_imports(library), name
        for node in ast.walk(ast.parse(copied)):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert (node.module or "").split(".")[0] not in ("casa", "av", "flash_attn"), (name, node.module)
    parts = (release["dir"] / "parts.py").read_text()
    assert "from .casa_fusion_casa import CASA" in parts and "casa.fusion.CASA" in parts


SCRIPT = r'''
import json, sys, importlib.abc
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "casa" or name.startswith("casa."):
            raise ImportError(f"No module named {name!r} (blocked: the release must run without casa)")
sys.meta_path.insert(0, Blocker())
import torch
from PIL import Image
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                          AutoTokenizer, pipeline)
D = sys.argv[1]
out = {"config": type(AutoConfig.from_pretrained(D, trust_remote_code=True)).__name__}
for auto in (AutoModel, AutoModelForCausalLM):
    out[auto.__name__] = type(auto.from_pretrained(D, trust_remote_code=True)).__name__
model = AutoModelForImageTextToText.from_pretrained(D, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(D, trust_remote_code=True)
out["processor"] = type(processor).__name__
out["tokenizer"] = type(AutoTokenizer.from_pretrained(D)).__name__  # no trust prompt (stdin is closed)
image = Image.open(sys.argv[2])
messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": sys.argv[3]}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
with torch.no_grad():
    out["logits"] = list(model(**inputs).logits.shape)
    gen = model.generate(**inputs, max_new_tokens=6)
out["new_tokens"] = gen[0, inputs["input_ids"].shape[1]:].tolist()
pipe = pipeline("image-text-to-text", model=D, trust_remote_code=True)
answer = pipe(text=messages, max_new_tokens=6, return_full_text=False)
out["pipeline"] = answer[0]["generated_text"]
out["casa_modules"] = sorted(m for m in sys.modules if m == "casa" or m.startswith("casa."))
print("RESULT " + json.dumps(out))
'''


def test_export_runs_without_casa(release, tmp_path):
    """`python -I` (no PYTHONPATH, no cwd) with casa's import blocked: the auto classes, the
    processor, a plain AutoTokenizer, generate() and the pipeline; the tokens are casa's own
    cached generation's, the pipeline's answer their text."""
    from casa.assistant import load

    _image().save(tmp_path / "img.png")
    (tmp_path / "script.py").write_text(SCRIPT)
    done = subprocess.run([sys.executable, "-I", str(tmp_path / "script.py"), str(release["dir"]),
                           str(tmp_path / "img.png"), QUESTION], cwd=tmp_path, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=240, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                                      "HF_HOME": str(tmp_path / "hf_home")})
    # (a plain AutoTokenizer asks whether to trust DIR's AutoConfig; with stdin closed it goes on
    # without it, the prompt's text before the result: transformers 5.23 loads AutoConfig first)
    lines = [x.split("RESULT ", 1)[1] for x in done.stdout.splitlines() if "RESULT " in x]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    out = json.loads(lines[0])
    assert out["config"] == "CasaConfig" and out["processor"] == "CasaProcessor"
    assert out["AutoModel"] == out["AutoModelForCausalLM"] == "CasaForConditionalGeneration"
    assert out["casa_modules"] == [] and out["logits"][-1] == 160
    a = load(release["dir"])
    from PIL import Image

    prompt = a.prompt(_messages_from(Image.open(tmp_path / "img.png")))
    expected = a._generate(prompt, a.generation_config(max_new_tokens=6))[0]
    assert out["new_tokens"][:len(expected)] == expected
    assert out["pipeline"] == a.decode(expected)


def _messages_from(img):
    return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": QUESTION}]}]


def test_export_files_card_and_generation_config(release):
    d = release["dir"]
    config = json.loads((d / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM"}
    assert config["dtype"] == "float32" and isinstance(config["image_token_id"], int)
    from casa.assistant import load

    a = load(d)
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] in (a.stop_token_ids[0], list(a.stop_token_ids))
    assert a.tokenizer.convert_ids_to_tokens(a.stop_token_ids[0]) == "<|end|>"
    card = (d / "README.md").read_text()
    assert "casa.fusion.CASA" in card and '"mode": "plus"' in card and "| val/loss | 4.25 |" in card
    assert "train/loss" not in card and "max_pixels: 3136" in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    compile(snippet, "README.md", "exec")  # it runs in test_card_snippet_runs
    assert json.loads((d / "processor_config.json").read_text())["auto_map"]["AutoProcessor"] == \
        "processing_casa.CasaProcessor"


def test_card_snippet_runs(release, capsys):
    """The model card's usage snippet, as written, prints one answer."""
    card = (release["dir"] / "README.md").read_text()
    exec(compile(card.split("```python\n", 1)[1].split("```", 1)[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("[") and printed.endswith("]")


# ------------------------------------------------------------------ processor
def test_processor_gives_casas_tokens_and_pixels(release, tmp_path):
    """apply_chat_template (image: PIL, path, file URL; video: frames) and processor(text, images)
    give the ids (placeholders taken out) and pixels of casa's own prompt."""
    from transformers import AutoProcessor

    from casa.assistant import load

    a = load(release["dir"])
    processor = AutoProcessor.from_pretrained(str(release["dir"]), trust_remote_code=True)
    _image(4, 120).save(tmp_path / "b.png")
    frames = [_image(5 + i, 56) for i in range(3)]
    messages = [{"role": "user", "content": [{"type": "image", "image": _image(3)},
                                             {"type": "image", "image": str(tmp_path / "b.png")},
                                             {"type": "text", "text": "Compare."},
                                             {"type": "video", "video": frames},
                                             {"type": "image", "image": (tmp_path / "b.png").as_uri()},
                                             {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    casa_messages = [{"role": "user", "content": [c if c["type"] != "video" else {"type": "video", "frames": frames}
                                                  for c in messages[0]["content"]]}]
    casa_messages[0]["content"][4] = {"type": "image", "image": str(tmp_path / "b.png")}
    batch = a.prompt(casa_messages)
    cfg = json.loads((release["dir"] / "config.json").read_text())
    ids = inputs["input_ids"][0]
    text = ~torch.isin(ids, torch.tensor([cfg["image_token_id"], cfg["video_token_id"]]))
    assert ids[text].tolist() == batch.input_ids.tolist()
    assert (ids == cfg["video_token_id"]).sum() == 3 and (ids == cfg["image_token_id"]).sum() == 3
    # casa's batch holds the visuals in stream order: 2 images, 3 frames, 1 image
    grids = torch.cat([inputs["image_grid_thw"][:2], inputs["video_grid_thw"], inputs["image_grid_thw"][2:]])
    assert grids.tolist() == batch.image_grid_thw.tolist()
    n = [int(g.prod()) for g in inputs["image_grid_thw"]]
    pixels = torch.cat([inputs["pixel_values"][:n[0] + n[1]], inputs["pixel_values_videos"],
                        inputs["pixel_values"][n[0] + n[1]:]])
    torch.testing.assert_close(pixels, batch.pixel_values, rtol=0, atol=0)

    # the model puts the frames where their placeholders are: greedy tokens are casa's on `batch`
    from transformers import GenerationConfig as HFGenerationConfig

    from casa.generation import GenerationConfig, generate

    with torch.no_grad():
        out = _wrap(a.model, release).generate(**inputs, generation_config=HFGenerationConfig(
            max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0))
    assert out[0, ids.shape[0]:].tolist() == generate(a.model, batch, GenerationConfig(max_new_tokens=4))[0]

    text_only = processor.apply_chat_template(_messages(1), add_generation_prompt=True)
    assert text_only.count("<|image_pad|>") == 1
    direct = processor(text=[text_only], images=[_image(3)], return_tensors="pt")
    assert direct["input_ids"].tolist() == processor.apply_chat_template(
        _messages(1), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"].tolist()
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> placeholders but 2 images"):
        processor(text=[text_only], images=[_image(3), _image(4)])
    with pytest.raises(ValueError, match="placeholders but 0 images"):
        processor(text=[text_only])
    processor.save_pretrained(tmp_path / "p")
    again = type(processor).from_pretrained(tmp_path / "p")
    assert again.video_settings == processor.video_settings and again.pixel_limits == processor.pixel_limits


# ------------------------------------------------------------------ generate
def _wrap(model, release):
    from casa.hf.configuration_casa import CasaConfig
    from casa.hf.modeling_casa import CasaForConditionalGeneration

    config = CasaConfig.from_pretrained(str(release["dir"]))
    return CasaForConditionalGeneration(config, model=model.eval()).eval()


def _processor(release):
    from casa.hf.processing_casa import CasaProcessor

    return CasaProcessor.from_pretrained(str(release["dir"]))


def _strategies():
    from experiments.strategies import names

    return names()


@pytest.mark.parametrize("strategy", _strategies())
def test_greedy_generate_equals_casas_cached_generation(release, strategy):
    """Every strategy of the matrix: model.generate (one conversation, and a left-padded batch of
    two of different lengths and image counts) gives casa's cached generation's tokens."""
    from transformers import GenerationConfig as HFGenerationConfig

    from casa.assistant import load
    from casa.batch import collate_packed
    from casa.generation import GenerationConfig, generate
    from experiments.strategies import build_model

    torch.manual_seed(0)
    model = build_model([release["config"], strategy]).eval()
    hf, processor = _wrap(model, release), _processor(release)
    a = load(release["dir"])
    a.model = model
    conversations = [_messages(1), _messages(2, "Which one is bigger, the first or the second?")]
    n = 5
    greedy = HFGenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    casa_cfg = GenerationConfig(max_new_tokens=n)
    for batch_of in ([conversations[0]], conversations):
        inputs = processor.apply_chat_template(batch_of, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**inputs, generation_config=greedy)
        prompts = collate_packed([a.prompt(c) for c in batch_of])
        expected = generate(model, prompts, casa_cfg)
        assert out[:, inputs["input_ids"].shape[1]:].tolist() == expected, strategy


def test_generate_runs_one_token_per_step_and_takes_transformers_options(release):
    """The KV cache: after the prompt every forward gets one token per row. Sampling
    (temperature/top-k/top-p), repetition_penalty, no_repeat_ngram_size, stop_strings, a
    TextIteratorStreamer, return_dict_in_generate, num_return_sequences; beams are refused."""
    from transformers import AutoModelForImageTextToText, TextIteratorStreamer

    from casa.assistant import load
    from casa.generation import GenerationConfig, append_tokens

    model = AutoModelForImageTextToText.from_pretrained(str(release["dir"]), trust_remote_code=True).eval()
    processor = _processor(release)
    tok = processor.tokenizer
    inputs = processor.apply_chat_template(_messages(1), add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    L = inputs["input_ids"].shape[1]
    a = load(release["dir"])
    prompt = a.prompt(_messages(1))
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, eos_token_id=None, do_sample=False)
    hook.remove()
    assert seen == [L] + [1] * 5
    greedy = out[0, L:].tolist()
    with torch.no_grad():
        penalised = model.generate(**inputs, max_new_tokens=6, eos_token_id=None, repetition_penalty=3.0)
    assert penalised[0, L:].tolist() == a._generate(prompt, GenerationConfig(max_new_tokens=6, repetition_penalty=3.0))[0]
    with torch.no_grad():
        blocked = model.generate(**inputs, max_new_tokens=12, eos_token_id=None, no_repeat_ngram_size=2)[0].tolist()
    for i in range(L - 1, len(blocked) - 1):  # no generated token completes a bigram seen before
        assert (blocked[i], blocked[i + 1]) not in set(zip(blocked[:i], blocked[1:i + 1])), i
    stop = tok.decode(greedy[:2])
    with torch.no_grad():
        stopped = model.generate(**inputs, max_new_tokens=6, eos_token_id=None, stop_strings=[stop], tokenizer=tok)
    assert stopped[0, L:].tolist() == greedy[:2]
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    thread = threading.Thread(target=lambda: model.generate(**inputs, max_new_tokens=6, eos_token_id=None,
                                                            streamer=streamer))
    with torch.no_grad():
        thread.start()
        streamed = "".join(streamer)
        thread.join()
    assert streamed == tok.decode(greedy, skip_special_tokens=False)
    with torch.no_grad():
        rich = model.generate(**inputs, max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True,
                              output_scores=True)
    assert rich.sequences[0, L:].tolist() == greedy[:4] and len(rich.scores) == 4
    torch.manual_seed(0)
    with torch.no_grad():
        sampled = model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                                 eos_token_id=None, num_return_sequences=2)
    assert sampled.shape == (2, L + 6) and (sampled[:, :L] == inputs["input_ids"]).all()
    # a generated token with a placeholder's id is text (casa's loop feeds it as text too)
    image_id = model.config.image_token_id
    with torch.no_grad():
        first = model(**inputs, use_cache=True)
        step = model(input_ids=torch.tensor([[image_id]]), past_key_values=first.past_key_values).logits[0, -1]
    expected = a.model.last_logits(append_tokens(prompt, [[image_id]], merge=2))[0]
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="beam_search.*KV cache"):
        model.generate(**inputs, max_new_tokens=2, num_beams=2)


def test_attn_implementation_picks_casas_backend(release):
    """eager / sdpa / flash_attention_2 (through the strict flash-attn stand-in, bf16) build
    casa's backends, with the same greedy tokens; anything else is refused by name."""
    from casa.hf.modeling_casa import CasaForConditionalGeneration
    from tests.builders import flash_stand_in

    processor = _processor(release)
    inputs = processor.apply_chat_template(_messages(1), add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    outs = {}
    for name in ("eager", "sdpa"):
        m = CasaForConditionalGeneration.from_pretrained(str(release["dir"]), attn_implementation=name).eval()
        assert m.model.backbone.attn_backend == name
        with torch.no_grad():
            outs[name] = m.generate(**inputs, max_new_tokens=4, eos_token_id=None).tolist()
    assert outs["eager"] == outs["sdpa"]
    with flash_stand_in():
        m = CasaForConditionalGeneration.from_pretrained(str(release["dir"]), attn_implementation="flash_attention_2",
                                                         dtype=torch.bfloat16).eval()
        assert m.model.backbone.attn_backend == "flash"
        with torch.no_grad():
            flash = m.generate(**inputs, max_new_tokens=4, eos_token_id=None)
    assert flash.shape == (1, inputs["input_ids"].shape[1] + 4)
    with pytest.raises(ValueError, match="attn_implementation='flex_attention' is not one of"):
        CasaForConditionalGeneration.from_pretrained(str(release["dir"]), attn_implementation="flex_attention")


def test_forward_is_hf_shaped_and_save_pretrained_round_trips(release, tmp_path):
    """logits [B, L, V] of a left-padded batch: each row's text positions hold casa's logits of
    that conversation alone; the reloaded model's save_pretrained reloads to the same logits."""
    from transformers import AutoModelForImageTextToText

    from casa.assistant import load

    model = AutoModelForImageTextToText.from_pretrained(str(release["dir"]), trust_remote_code=True).eval()
    processor = _processor(release)
    conversations = [_messages(1), _messages(2, "Which one is bigger?")]
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    a = load(release["dir"])
    with torch.no_grad():
        logits = model(**inputs).logits
        for row, conv in enumerate(conversations):
            expected = a.model(a.prompt(conv)).logits
            text = model._text_columns(inputs["input_ids"][row:row + 1], inputs["attention_mask"][row:row + 1])[0]
            torch.testing.assert_close(logits[row, text], expected, rtol=1e-5, atol=1e-5)
            assert (logits[row, ~text] == 0).all()
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "again"), trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="image_grid_thw has 1 rows but input_ids hold 0 image placeholders"):
        model(input_ids=inputs["input_ids"][:1, -3:], pixel_values=inputs["pixel_values"][:16],
              image_grid_thw=inputs["image_grid_thw"][:1])
