"""Suite `stream` in kyutai's form: time-to-first-token and decode speed over a long session.

    python -m experiments.bench stream --turns 256 --tokens-per-turn 16 --image-size 896
                                       [--ckpt CKPT | --backbone helium] [--layers L] [--json]

kyutai's streaming table (github.com/kyutai-labs/casa, README "Streaming Inference Speed",
scripts/speed_bench_streaming.py): a live-captioning session at batch size 1 with one KV
cache; every turn appends one frame and greedily decodes exactly `tokens_per_turn` tokens.
Per turn:

    ttft        encoding the frame (vision tower + projector) + prefill of the turn's chunk,
                up to the first token's logits (the chunk: the previous turn's closing tokens,
                the frame, the tokens that open the assistant turn: `casa.assistant`'s layout)
    decode      the other tokens_per_turn - 1 steps, one token each -> tok/s
    kv tokens   the text (SA) cache after the turn (insertion: image tokens too); the window
                cache (CASA / CA: the current frame's image keys + its text) separately

Reported per strategy, as kyutai does: the mean TTFT and tok/s over the first and the last
10 % of the turns, their ratios (last / first), the final KV cache and the peak memory. On
CUDA the phases are timed with CUDA events and the peak is `torch.cuda.max_memory_allocated`;
on CPU with the process clock (CPU time with one torch thread, the wall clock otherwise:
`measure.time_basis`) and the peak is the process's peak RSS (VmHWM), which is why each
strategy runs in its own process (`--quick`: in this process, the high-water mark reset
between strategies). A discarded 2-turn session first warms the kernels up.

Models. `--ckpt`: the checkpoint's model, strategy and template (one row). Otherwise the
strategies of `STRATEGIES` at the widths of `--backbone` (`layer.BACKBONES`: Helium-1 2B by
default), random weights, the char tokenizer and Helium template of the demo. On CUDA the
full depth and the Qwen2.5-VL-3B vision tower of experiments/configs/shapes/; on CPU a
shallower model (`CPU_SIZES`) and the tiny tower (the tower costs every strategy the same per
frame; the 896 px tower alone would take seconds per frame here). The ratios are what count
on CPU: they say whether a strategy's turn gets slower as the session grows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STRATEGIES = ("insertion", "qformer", "cross_attention", "casa_plus", "casa_shared", "casa_replace")
"""kyutai's comparison: insertion (Helium1-VL-2B), a compressing Q-Former, CA, CASA⊕ (CASA-
Helium1-VL-2B), CASA-Shared⊕ (-Shared) and CASA∨."""
QFORMER_RATIO = 16
"""The Q-Former compresses a frame 16x (`qformer_queries`): the paper's Q = 64 queries for a
1024-token (896 px) image. The matrix's Q-Former (4 queries) is sized for the demo's images."""
LABELS = {"insertion": "insertion", "qformer": "Q-Former (N/16 queries) + insertion", "cross_attention": "CA",
          "casa_plus": "CASA⊕", "casa_shared": "CASA-Shared⊕", "casa_replace": "CASA∨"}
KYUTAI = [  # README of github.com/kyutai-labs/casa, 256-turn session, one H100 80GB, bf16, 896 px
    {"model": "Helium1-VL-2B (insertion)", "ttft_ms": (80, 459), "tok_s": (89.5, 20.1), "kv": 266_773, "peak_GiB": 34.2},
    {"model": "CASA-Helium1-VL-2B", "ttft_ms": (64, 64), "tok_s": (59.2, 58.9), "kv": 4_629, "peak_GiB": 6.4},
    {"model": "CASA-Helium1-VL-2B-Shared", "ttft_ms": (65, 65), "tok_s": (59.0, 59.1), "kv": 4_629, "peak_GiB": 5.7},
]
"""kyutai's numbers, for the side-by-side table (docs/benchmarks.md)."""
CPU_SIZES = {"num_hidden_layers": 2, "intermediate_size": 2048}
"""The CPU runs keep the backbone's attention (Helium: d = 2048, 16 query / 8 key-value heads
of 128: what the KV cache and the attention over it cost) with two blocks (CASA∨, every 2nd
block, keeps one SA block) and an FFN of 2048 instead of 8192 (it costs every strategy the
same per token and turn; at 8192 a 256-turn session takes ~2 CPU-minutes per strategy here)."""
WARMUP_TURNS = 2
QUICK = {"turns": 10, "tokens_per_turn": 3, "image_size": 112, "widths": dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)}
"""The tests' smoke run: tiny widths, 16 image tokens per frame."""


# ---------------------------------------------------------------------------------- the model
def qformer_queries(image_size: int) -> int:
    """Q-Former queries for frames of `image_size` px: N / 16 of the frame's N tokens, 1 to 64."""
    return max(1, min(64, (image_size // 28) ** 2 // QFORMER_RATIO))


def build_assistant(strategy: str, backbone: str, layers: int | None, device: str, quick: bool = False,
                    image_size: int = 896):
    """The `Assistant` of `strategy` at `backbone`'s widths, random weights (seed 0)."""
    import torch
    import yaml

    from casa.assistant import Assistant
    from casa.processing.template import ChatTemplate
    from casa.processing.tokenizer import resolve_tokenizer
    from casa.rebuild import DataSettings, build_model
    from casa.vision import tiny_vision_config
    from experiments import strategies
    from experiments.benchmarks.layer import BACKBONES
    from experiments.benchmarks.stream import DEMO_CONFIG

    if backbone not in BACKBONES:
        raise ValueError(f"stream: backbone={backbone!r} is not one of {list(BACKBONES)}")
    family, widths = BACKBONES[backbone]
    cuda = device.startswith("cuda")
    shapes = json.loads((Path(__file__).resolve().parents[1] / "configs" / "shapes"
                         / "helium1_2b_qwen2_5_vl_3b.json").read_text())
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    init = config["model"]["model"]["init_args"]
    sizes = {"num_hidden_layers": shapes["backbone"]["num_hidden_layers"]} if cuda else CPU_SIZES
    lm = {**init["backbone"]["init_args"]["config"], **widths, **sizes, **(QUICK["widths"] if quick else {}),
          "max_position_embeddings": 1 << 20}
    if layers:
        lm["num_hidden_layers"] = layers
    elif quick:
        lm["num_hidden_layers"] = CPU_SIZES["num_hidden_layers"]
    init["backbone"]["init_args"] = {"family": family, "config": lm}
    vision = ({**shapes["vision"], "out_hidden_size": lm["hidden_size"]} if cuda and not quick
              else tiny_vision_config(lm["hidden_size"]))
    init["vision"]["init_args"]["config"] = vision
    init_args = {"num_queries": qformer_queries(image_size)} if strategy == "qformer" else {}
    init["fusion"] = strategies.fusion_spec(strategy, **init_args)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(config).eval().to(device=device, dtype=dtype)
    tok = resolve_tokenizer("char")
    return Assistant(model, tok, ChatTemplate("helium", tok), DataSettings(), config)


def load_checkpoint(ckpt: str, device: str):
    from casa.assistant import load

    return load(ckpt, device)


# ---------------------------------------------------------------------------------- a session
def session(assistant, turns: int, tokens_per_turn: int, image_size: int, seed: int = 0) -> list[dict[str, Any]]:
    """One live-captioning session of `turns` turns (a frame, then exactly `tokens_per_turn`
    greedy tokens each) -> one record per turn: ttft_s, decode_s (and their CPU times),
    kv_tokens, window_kv_tokens."""
    import numpy as np
    import torch
    from PIL import Image

    from casa.assistant import CaptionLayout, frame_chunk
    from casa.cache import KVCache
    from casa.generation import text_chunk

    model, dev = assistant.model, assistant.device
    clock = _Clock(dev)
    layout = CaptionLayout.from_template(assistant.template)
    rng = np.random.default_rng(seed)
    cache, pending, out = KVCache(1), list(layout.first_pre), []
    merge = model.vision.spatial_merge_size
    with torch.no_grad(), assistant._autocast():
        for _ in range(turns):
            frame = Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8), mode="RGB")
            clock.start()
            pv, grid = assistant.pixels(frame, image_size * image_size)
            chunk = frame_chunk(pending, layout.post, pv.to(dev), [grid], merge=merge)
            token = int(model.last_logits(chunk, cache=cache).argmax(-1)[0])  # .item(): waits for the device
            clock.lap()
            for _ in range(tokens_per_turn - 1):
                step = text_chunk([[token]], device=dev)
                token = int(model.last_logits(step, cache=cache, images_on_any_rank=False).argmax(-1)[0])
            (ttft, ttft_cpu), (decode, decode_cpu) = clock.stop()
            # cut at tokens_per_turn: the last token is fed with the next chunk, with the turn's end
            pending = layout.close(token, False) + layout.pre
            out.append({"ttft_s": ttft, "ttft_cpu_s": ttft_cpu, "decode_s": decode, "decode_cpu_s": decode_cpu,
                        "kv_tokens": cache.text_kv_tokens(), "window_kv_tokens": cache.window_kv_tokens()})
    return out


class _Clock:
    """Two phases of a turn: CUDA events on a GPU (no sync inside the turn), else perf_counter
    and the process CPU time."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if self.cuda else None

    def start(self) -> None:
        if self.cuda:
            self.events[0].record()
        self.t = [(time.perf_counter(), time.process_time())]

    def lap(self) -> None:
        if self.cuda:
            self.events[1].record()
        self.t.append((time.perf_counter(), time.process_time()))

    def stop(self) -> list[tuple[float, float]]:
        """-> [(wall, cpu) of phase 1, (wall, cpu) of phase 2] in seconds (CUDA: event times, cpu = wall)."""
        if self.cuda:
            self.events[2].record()
            self.events[2].synchronize()
            a, b = self.events[0].elapsed_time(self.events[1]) / 1e3, self.events[1].elapsed_time(self.events[2]) / 1e3
            return [(a, a), (b, b)]
        self.t.append((time.perf_counter(), time.process_time()))
        return [(self.t[i + 1][0] - self.t[i][0], self.t[i + 1][1] - self.t[i][1]) for i in range(2)]


# ---------------------------------------------------------------------------------- one strategy
def measure(strategy: str | None, turns: int, tokens_per_turn: int, image_size: int, backbone: str = "helium",
            layers: int | None = None, ckpt: str | None = None, device: str = "cpu", quick: bool = False
            ) -> dict[str, Any]:
    """One strategy's session (or the checkpoint's) -> its summary row and per-turn series."""
    import torch

    from casa.memory import peak_rss_bytes, reset_peak_rss
    from experiments.benchmarks import measure as m

    if tokens_per_turn < 2 or turns < 10:
        raise ValueError(f"stream: tokens_per_turn={tokens_per_turn} must be >= 2 (a decode phase) and "
                         f"turns={turns} >= 10 (first and last 10 % of the turns)")
    dev = m.resolve_device(device)
    reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if ckpt:
        assistant = load_checkpoint(ckpt, str(dev))
    else:
        assistant = build_assistant(strategy, backbone, layers, str(dev), quick, image_size)
    model = assistant.model
    session(assistant, WARMUP_TURNS, tokens_per_turn, image_size, seed=1)
    series = session(assistant, turns, tokens_per_turn, image_size)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss_bytes()
    basis = m.time_basis(dev)
    key = "" if basis == "wall" else "_cpu"
    n = max(1, turns // 10)
    first, last = series[:n], series[-n:]

    def mean(rows, k):
        return sum(r[k] for r in rows) / len(rows)

    ttft = (1e3 * mean(first, f"ttft{key}_s"), 1e3 * mean(last, f"ttft{key}_s"))
    tok_s = ((tokens_per_turn - 1) / mean(first, f"decode{key}_s"), (tokens_per_turn - 1) / mean(last, f"decode{key}_s"))
    params = sum(p.numel() for p in model.parameters())
    pretrained = {f"backbone.{n}" for n in model.backbone.pretrained_names}
    new = sum(p.numel() for n_, p in model.backbone.named_parameters() if f"backbone.{n_}" not in pretrained)
    name = strategy or type(model.fusion).__name__
    row = {"strategy": name, "label": LABELS.get(name, name), "params_M": round(params / 1e6, 2),
           "new_decoder_params_M": round(new / 1e6, 2),
           "ttft_ms_first": round(ttft[0], 2), "ttft_ms_last": round(ttft[1], 2),
           "ttft_last_vs_first": round(ttft[1] / ttft[0], 3),
           "tok_s_first": round(tok_s[0], 2), "tok_s_last": round(tok_s[1], 2),
           "tok_s_last_vs_first": round(tok_s[1] / tok_s[0], 3),
           "final_kv_tokens": series[-1]["kv_tokens"], "window_kv_tokens": series[-1]["window_kv_tokens"],
           "peak_MiB": round(peak / m.MiB, 1), "peak_kind": "max_memory_allocated" if dev.type == "cuda" else "peak RSS"}
    return {"row": row, "series": series, "time_basis": basis, "layers": len(model.backbone.layers),
            "hidden_size": model.backbone.hidden_size, "torch_threads": torch.get_num_threads()}


def run_isolated(strategy: str, **kw) -> dict[str, Any]:
    """`measure` in a fresh process (its own peak RSS); mmap-backed large allocations, so that
    freed tensors go back to the OS as in the other stream suite."""
    import torch

    threads = torch.get_num_threads()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "experiments.benchmarks.turns", "--worker", strategy, "--threads", str(threads),
           "--kw", json.dumps(kw)]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"stream (turns) worker {strategy!r} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- the suite
def run(quick: bool = False, turns: int | None = None, tokens_per_turn: int | None = None,
        image_size: int | None = None, ckpt: str | None = None, backbone: str | None = None,
        layers: int | None = None, device: str = "cpu", strategies: tuple[str, ...] = STRATEGIES,
        isolate: bool | None = None) -> dict[str, Any]:
    """kyutai's table for every strategy of `strategies` (or the one of `ckpt`) -> summary dict."""
    import torch

    from experiments.benchmarks import measure as m

    if ckpt and backbone:
        raise ValueError("stream: --ckpt and --backbone are exclusive (a checkpoint has its own backbone)")
    unknown = [s for s in strategies if s not in LABELS]
    if unknown:
        raise ValueError(f"stream: strategies {unknown} are not among {list(LABELS)}")
    turns = turns or (QUICK["turns"] if quick else 256)
    tokens_per_turn = tokens_per_turn or (QUICK["tokens_per_turn"] if quick else 16)
    image_size = image_size or (QUICK["image_size"] if quick else 896)
    isolate = not quick if isolate is None else isolate
    kw = dict(turns=turns, tokens_per_turn=tokens_per_turn, image_size=image_size, backbone=backbone or "helium",
              layers=layers, ckpt=ckpt, device=device, quick=quick)
    start = time.perf_counter()
    results = {}
    for s in ([None] if ckpt else strategies):
        results[s] = run_isolated(s, **kw) if isolate else measure(s, **kw)
    rows = [r["row"] for r in results.values()]
    by = {r["strategy"]: r for r in rows}
    one = next(iter(results.values()))
    out: dict[str, Any] = {
        "form": "kyutai", "turns": turns, "tokens_per_turn": tokens_per_turn, "image_size": image_size,
        "image_tokens_per_frame": (image_size // 28) ** 2, "qformer_queries": qformer_queries(image_size),
        "backbone": None if ckpt else kw["backbone"], "ckpt": ckpt,
        "layers": one["layers"], "hidden_size": one["hidden_size"], "isolated_processes": isolate,
        "time_basis": one["time_basis"], "machine": {**m.machine_info(torch.device(device)),
                                                     "torch_threads": one["torch_threads"]},
        "rows": rows, "kyutai_256_turns": [{**k, "ttft_ms": f"{k['ttft_ms'][0]} → {k['ttft_ms'][1]}",
                                            "tok_s": f"{k['tok_s'][0]} → {k['tok_s'][1]}"} for k in KYUTAI]}
    for s in ("casa_plus", "casa_shared", "casa_replace"):
        if s in by:  # the targets: TTFT last/first <= 1.05, decode tok/s within 5 %
            out[f"target_{s}_ttft_last_vs_first<=1.05"] = by[s]["ttft_last_vs_first"] <= 1.05
            out[f"target_{s}_tok_s_within_5%"] = abs(by[s]["tok_s_last_vs_first"] - 1) <= 0.05
    if "insertion" in by:
        out["insertion_ttft_growth"] = by["insertion"]["ttft_last_vs_first"]
        out["insertion_decode_slowdown"] = round(1 / by["insertion"]["tok_s_last_vs_first"], 3)
    out["series"] = {str(s): r["series"] for s, r in results.items()} if quick else "omitted (--quick keeps them)"
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.turns", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", required=True, choices=[*LABELS, "None"], help="internal: measure one strategy")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kw", required=True, help="internal: `measure`'s keyword arguments, JSON")
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps(measure(None if a.worker == "None" else a.worker, **json.loads(a.kw))))


if __name__ == "__main__":
    main()
