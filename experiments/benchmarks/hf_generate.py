"""generate() through transformers vs casa's own generation, on the demo-sized model.

    python -m experiments.benchmarks.hf_generate [--tokens 64] [--repeats 9] [--batch 1]

The demo config's model (random weights: speed does not depend on them), one 112x112 image
and a question per conversation, greedy, no stop token so both write exactly --tokens tokens.
casa: `casa.generation.generate` on the `casa.assistant` prompt; transformers:
`CasaForConditionalGeneration.generate(**processor.apply_chat_template(...))` with the same
weights. Runs alternate (casa, hf, casa, hf, ...) so that the machine's drift hits both; the
median wall time of each and their ratio are printed as a Markdown table row."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.hf_generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--batch", type=int, default=1, help="conversations per call (left-padded for transformers)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from PIL import Image
    from transformers import GenerationConfig as HFGenerationConfig

    from casa.assistant import Assistant
    from casa.batch import collate_packed
    from casa.generation import GenerationConfig, generate
    from casa.hf.configuration_casa import CasaConfig
    from casa.hf.modeling_casa import CasaForConditionalGeneration
    from casa.hf.processing_casa import CasaProcessor
    from casa.processing.template import ChatTemplate
    from casa.processing.tokenizer import build_tokenizer
    from casa.rebuild import DataSettings, build_model
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    model = build_model(ROOT / "experiments" / "configs" / "demo.yaml").eval()
    tokenizer = build_tokenizer(Path(tempfile.mkdtemp()) / "tok")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|video_pad|>"]}, replace_extra_special_tokens=False)
    settings = DataSettings(max_pixels=112 * 112, frame_max_pixels=56 * 56)
    template = ChatTemplate("helium", tokenizer)
    assistant = Assistant(model, tokenizer, template, settings)
    config = CasaConfig(model_spec={}, image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"), vocab_size=160)
    hf = CasaForConditionalGeneration(config, model=model).eval()
    processor = CasaProcessor(Qwen2VLImageProcessorPil(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels),
                              tokenizer, chat_template=template.jinja())
    colours = ["red", "green", "blue", "yellow"]
    conversations = [[{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (112, 112), colours[i % 4])},
        {"type": "text", "text": "What colour is the shape?" + " Answer in one word." * (i % 2)}]}]
        for i in range(a.batch)]
    prompts = collate_packed([assistant.prompt(c) for c in conversations])
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    casa_cfg = GenerationConfig(max_new_tokens=a.tokens)
    hf_cfg = HFGenerationConfig(max_new_tokens=a.tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    def run_casa():
        return generate(model, prompts, casa_cfg)

    def run_hf():
        return hf.generate(**inputs, generation_config=hf_cfg)[:, inputs["input_ids"].shape[1]:].tolist()

    with torch.no_grad():
        assert run_casa() == run_hf(), "the two paths generated different tokens"
        times: dict[str, list[float]] = {"casa": [], "hf": []}
        for _ in range(a.repeats):
            for name, fn in (("casa", run_casa), ("hf", run_hf)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    casa_s, hf_s = statistics.median(times["casa"]), statistics.median(times["hf"])
    print("| batch | new tokens | casa generate (s) | transformers generate() (s) | ratio | per token: casa / hf (ms) |")
    print("|---|---|---|---|---|---|")
    print(f"| {a.batch} | {a.tokens} | {casa_s:.3f} | {hf_s:.3f} | {hf_s / casa_s:.3f} | "
          f"{1000 * casa_s / a.tokens:.2f} / {1000 * hf_s / a.tokens:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
