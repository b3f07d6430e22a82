"""Suite `stream`: the paper's Figs. 5-6, memory and wall time per frame of live captioning.

    python -m experiments.bench stream [--quick] [--json] [--threads N]
    python -m experiments.bench stream --turns 256 --tokens-per-turn 16 --image-size 896 [--ckpt CKPT | --backbone B]
        (kyutai's table: `experiments.benchmarks.turns`)

Setting: the demo-size model (`experiments/configs/demo.yaml`: 4 layers, d=128), untrained,
with each strategy in turn; a stream of synthetic moving-shape frames at `SIZE` px (64
image tokens per frame after the 2x2 merge) through `Assistant.stream`, the library's
live-captioning loop (one chunk per frame: previous turn's tail + frame + assistant
opening, then cached decoding). Every frame decodes exactly `CAPTION_TOKENS` tokens (no
stop token), so every strategy does the same text work and only the handling of images
differs. Every strategy of the matrix (`experiments.strategies`) runs, plus `VARIANTS` and
the control; the ones the figures discuss:

    casa_plus        CASA⊕: text-only SA cache; the CASA window cache holds one frame
    casa_replace     CASA∨ (every 2nd SA layer becomes CASA)
    cross_attention  CA: text-only SA cache; the CA cache holds one frame's image keys
    insertion        every frame's 64 image tokens enter the SA stream and its KV cache
    qformer_64       a Q-Former compresses each frame to 64 queries, then insertion
    text_lm          control: the same 4-layer LM writing the same transcript (the same
                     chunks' text tokens, the same 2 decoded tokens per frame) with no image
                     at all -- what any language model pays for its own growing transcript

Each strategy runs in its own process (same baseline, nothing left over from the previous
one) with the caller's torch threads (`--threads`; the documented runs use both cores:
the early frames, made of small ops, take as long with two threads as with one, while the
batched matmuls of the attention over a long KV cache split their KV heads over the
cores) and
`MALLOC_MMAP_THRESHOLD_=65536`, so that glibc hands freed tensor memory back to the OS and
RSS follows the live tensors (docs/../ENVIRONMENT.md: with it the profiler's allocation
peak matched RSS).

Memory, two numbers per frame:
    rss_bytes    process RSS: what the paper's Fig. 5 plots (GPU memory of the whole model).
                 Here most of it is the Python/torch runtime (~400 MiB), the analogue of the
                 paper's fixed cost of the 3B weights.
    state_bytes  weights + KV cache bytes (`KVCache.nbytes`): the tensors that persist from
                 frame to frame, without the runtime; it shows growth undiluted.
Time: `wall_s` of each frame (vision encoder, prefill of the frame chunk, decoding), twice:
    sequential   the per-frame series of that process (the plots). Frames 10-110 and the
                 last 100 run 10-20 s apart, so whatever the shared host does in between
                 lands in their ratio (0.86 to 1.19 for CASA⊕ over 11 runs).
    paired       for the runs of `FLAT`, a second process plays the same stream twice and
                 interleaves frames 10-110 of one copy with the last 100 of the other
                 (`measure_paired`): the ratio of the cost of being late in the stream,
                 free of host drift. The issue's time target is read off this one.

Ratios returned (names carry the frames they compare; full run = 600 frames, quick = 40):
    {s}_memory_frame{N}_vs_frame{R}       RSS at the last frame / at frame R (20; quick 5)
    {s}_state_bytes_frame{N}_vs_frame{R}  the same for weights + KV cache
    {s}_time_last{W}_vs_{A}to{B}          mean wall time of the last W frames / of frames A..B
                                          (last 100 vs 10..110; quick: last 10 vs 5..15)
    {s}_kv_tokens_final, {s}_kv_tokens_frame{R}   text (SA) KV cache tokens
    {s}_growth_ms                         mean ms/frame of the last W frames minus frames A..B
    {s}_rss_growth_mib                    RSS at the last frame minus at frame R
    {s}_growth_beyond_text_lm_ms          growth_ms minus the control's (text_lm) growth_ms
    {s}_time_paired_last{W}_vs_{A}to{B}   the time ratio, paired (runs of `FLAT` only)
    {s}_growth_paired_ms, {s}_growth_paired_beyond_text_lm_ms   the growths, paired
Target (issue 6): CASA's memory at frame 600 within 2% of frame 20, its time over the last
100 frames within 10% of frames 10-110; insertion's KV cache and time grow. The control
measures, in the same run, how much of any growth is the text transcript rather than images:
CASA⊕ and CA have the control's 4 SA layers, so their growth beyond it is what images cost
(CASA∨ has 2 SA layers, so the control's growth is about twice its transcript term).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from experiments import strategies

VARIANTS = {"qformer_64": ("qformer", {"num_queries": 64})}
"""Runs beyond the matrix: {run: (matrix strategy, init_args over its YAML's)}. The matrix's
Q-Former (4 queries) is sized for the demo's training images; a frame here has 64 tokens."""
CONTROL = "text_lm"
"""The control run: `insertion` without images is the plain LM (no fusion layer, no vision)."""
LABELS = {"casa_plus": "CASA⊕", "casa_replace": "CASA∨", "cross_attention": "CA", "insertion": "insertion",
          "qformer_64": "Q-Former (64) + insertion", CONTROL: "text-only LM (control)"}
"""Plot labels; any other strategy of the matrix is labelled by its name."""
RUNS = (*strategies.names(), *VARIANTS, CONTROL)
"""Every strategy of the matrix (`experiments.strategies`), the variants, then the control."""
FLAT = ("casa_plus", "casa_replace", "cross_attention", CONTROL)
"""The runs whose per-frame time is meant to stay flat (images out of the KV cache, and the
control): the issue's time target is about them, so their ratio is also measured paired
(`measure_paired`), free of host drift. Insertion grows 5x; it needs no drift correction."""
SIZE = 224
"""Frame side (px): 16 x 16 patches -> 64 image tokens per frame."""
CAPTION_TOKENS = 2
"""Decoded tokens per frame (with the turn's 4 template tokens: 6 text tokens per frame; the
paper's live captions are "typically only a few tokens long", most frames say nothing)."""
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


# ---------------------------------------------------------------------------------- one strategy
def build_assistant(strategy: str, size: int, device: str = "cpu"):
    """The demo model with `strategy`, random weights, and its char tokenizer / helium template."""
    import torch
    import yaml

    from casa.assistant import Assistant
    from casa.processing.template import ChatTemplate
    from casa.processing.tokenizer import resolve_tokenizer
    from casa.rebuild import DataSettings, build_model

    name, init_args = VARIANTS.get(strategy, ("insertion" if strategy == CONTROL else strategy, {}))
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["model"]["model"]["init_args"]["fusion"] = strategies.fusion_spec(name, **init_args)
    torch.manual_seed(0)
    model = build_model(config).eval()
    tok = resolve_tokenizer("char")
    settings = DataSettings(max_pixels=size * size, frame_max_pixels=size * size)
    return Assistant(model.to(device), tok, ChatTemplate("helium", tok), settings, config)


def measure_strategy(strategy: str, frames: int, size: int = SIZE, tokens: int = CAPTION_TOKENS,
                     device: str = "cpu") -> dict[str, Any]:
    """Stream `frames` frames through one strategy -> per-frame series (run in a fresh process)."""
    import torch

    assistant, start_stream = stream_setup(strategy, frames, size, tokens, device)
    weights = sum(p.numel() * p.element_size() for p in assistant.model.parameters())
    series: dict[str, list] = {"wall_s": [], "cpu_s": [], "rss_bytes": [], "state_bytes": [], "kv_bytes": [], "kv_tokens": [],
                               "window_kv_tokens": [], "delay_s": []}
    frames_iter = start_stream()
    while True:
        cpu = time.process_time()  # CPU time: robust to other processes sharing the cores
        rec = next(frames_iter, None)
        if rec is None:
            break
        series["cpu_s"].append(time.process_time() - cpu)
        series["wall_s"].append(rec.wall_s)
        series["rss_bytes"].append(rec.memory_bytes)
        series["state_bytes"].append(weights + rec.kv_bytes)
        series["kv_bytes"].append(rec.kv_bytes)
        series["kv_tokens"].append(rec.kv_tokens)
        series["window_kv_tokens"].append(rec.window_kv_tokens)
        series["delay_s"].append(rec.delay_s)
    return {"strategy": strategy, "frames": frames, "size": size, "caption_tokens": tokens, "weight_bytes": weights,
            "torch_threads": torch.get_num_threads(), **series}


def stream_setup(strategy: str, frames: int, size: int, tokens: int, device: str):
    """-> (the `Assistant` of `strategy`, a function that starts a live-captioning stream of
    the `frames`-frame synthetic clip: FrameRecords, the control's from its text only, every
    frame decoding exactly `tokens` tokens). Each call starts an independent stream (its own
    cache) over the same weights."""
    from casa.generation import GenerationConfig
    from experiments.stream import synthetic_clips

    assistant = build_assistant(strategy, size, device)
    clip, _ = synthetic_clips(frames, seed=0, size=size)
    cfg = GenerationConfig(max_new_tokens=tokens, stop_token_ids=())  # exactly `tokens` per frame

    def start():
        if strategy == CONTROL:
            return text_only_stream(assistant, len(clip), cfg)
        # context=False: the growth being measured is the point, so no cache trimming
        return assistant.stream(clip, fps=2.0, config=cfg, wait=False, context=False)

    return assistant, start


def measure_paired(strategy: str, frames: int, size: int = SIZE, tokens: int = CAPTION_TOKENS,
                   device: str = "cpu") -> dict[str, Any]:
    """Wall time of frames A..B and of the last W frames of a `frames`-frame stream, measured
    side by side instead of minutes apart.

    In the sequential run a strategy's frames A..B and its last W frames are ~10-20 s apart,
    and whatever the host does in between (another tenant on the shared cores, clock
    changes) lands in their ratio. Here two identical streams of the same model run in one
    process: `lead` first plays frames 1 .. frames - W alone (untimed), then its last W
    frames alternate with `trail`'s frames A..B, one frame each, the order swapped every
    pair. Both windows then see the same host, and what their ratio measures is the cost of
    being late in the stream: a longer transcript in the KV cache. The streams share the
    weights (read-only) and keep their own caches, as two `Assistant.stream` calls do."""
    import torch

    w = windows(frames)
    _, start_stream = stream_setup(strategy, frames, size, tokens, device)
    lead, trail = start_stream(), start_stream()
    for _ in range(frames - w["last"]):
        next(lead)
    for _ in range(w["a"] - 1):
        next(trail)
    timed: dict[str, dict[str, list]] = {"early": {"index": [], "wall_s": [], "kv_tokens": []},
                                         "late": {"index": [], "wall_s": [], "kv_tokens": []}}
    for k in range(w["b"] - w["a"] + 1):  # trail frame A + k; lead frame frames - W + 1 + k while k < W
        pair = [("early", trail)] + ([("late", lead)] if k < w["last"] else [])
        for name, records in (pair if k % 2 == 0 else pair[::-1]):
            rec = next(records)
            timed[name]["wall_s"].append(rec.wall_s)
            timed[name]["index"].append(rec.index)
            timed[name]["kv_tokens"].append(rec.kv_tokens)
    return {"strategy": strategy, "frames": frames, "size": size, "caption_tokens": tokens,
            "torch_threads": torch.get_num_threads(), **timed}


def text_only_stream(assistant, frames: int, cfg, fps: float = 2.0):
    """The control: `Assistant.stream`'s chunks and decoding with the frames left out.

    Chunk i holds exactly the text tokens of the live-captioning chunk (the previous turn's
    tail, then the tokens that follow the frame), so the SA layers see the same transcript
    and the same number of queries per frame; only the image and everything it costs (vision
    encoder, fusion layers, image keys) is absent. Yields `FrameRecord`s."""
    from casa.assistant import CaptionLayout, FrameRecord, memory_bytes
    from casa.cache import KVCache
    from casa.generation import generate, text_chunk

    layout = CaptionLayout.from_template(assistant.template)
    cache, pending, stop, dev = KVCache(1), list(layout.first_pre), set(cfg.stop_token_ids), assistant.device
    text_seen, done_at = 0, 0.0
    for i in range(frames):
        start = time.perf_counter()
        chunk = text_chunk([pending + layout.post], device=dev)
        text_seen += chunk.num_text_tokens
        out = generate(assistant.model, chunk, cfg, cache=cache)[0]
        text_seen += len(out) - 1
        pending = layout.close(out[-1], out[-1] in stop) + layout.pre
        wall = time.perf_counter() - start
        arrival = i / fps
        done_at = max(arrival, done_at) + wall
        yield FrameRecord(i, arrival, assistant.decode(out), len(out), out[-1] in stop, wall, done_at - arrival,
                          cache.text_kv_tokens(), text_seen, 0, cache.window_kv_tokens(), cache.nbytes(),
                          memory_bytes(dev))


def run_isolated(strategy: str, frames: int, size: int, tokens: int, device: str = "cpu", threads: int = 1,
                 paired: bool = False) -> dict[str, Any]:
    """`measure_strategy` (`measure_paired` if `paired`) in a subprocess with `threads` torch
    threads and mmap-backed large allocations."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "experiments.benchmarks.stream", "--worker", strategy, "--frames", str(frames),
           "--size", str(size), "--tokens", str(tokens), "--device", device, "--threads", str(threads),
           *(["--paired"] if paired else [])]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        what = "paired timing" if paired else "worker"
        raise RuntimeError(f"stream benchmark {what} {strategy!r} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- summary
def windows(frames: int) -> dict[str, int]:
    """Reference frame and time windows (1-based frame numbers as in the issue)."""
    if frames >= 200:
        return {"ref": 20, "last": 100, "a": 10, "b": 110}
    return {"ref": 5, "last": 10, "a": 5, "b": 15}


def summarize(results: dict[str, dict], frames: int, paired: dict[str, dict] | None = None) -> dict[str, Any]:
    w = windows(frames)
    out: dict[str, Any] = {}
    t = f"last{w['last']}_vs_{w['a']}to{w['b']}"
    for s, r in results.items():
        ref, n = w["ref"] - 1, frames - 1
        for name, key in (("time", "wall_s"), ("cpu_time", "cpu_s")):
            series = r[key]
            ratio = statistics.mean(series[-w["last"]:]) / statistics.mean(series[w["a"] - 1:w["b"]])
            out[f"{s}_{name}_last{w['last']}_vs_{w['a']}to{w['b']}"] = ratio
        out[f"{s}_memory_frame{frames}_vs_frame{w['ref']}"] = r["rss_bytes"][n] / r["rss_bytes"][ref]
        out[f"{s}_state_bytes_frame{frames}_vs_frame{w['ref']}"] = r["state_bytes"][n] / r["state_bytes"][ref]
        out[f"{s}_kv_tokens_frame{w['ref']}"] = r["kv_tokens"][ref]
        out[f"{s}_kv_tokens_final"] = r["kv_tokens"][n]
        out[f"{s}_kv_mib_final"] = r["kv_bytes"][n] / 2 ** 20
        out[f"{s}_rss_mib_final"] = r["rss_bytes"][n] / 2 ** 20
        out[f"{s}_ms_per_frame_{w['a']}to{w['b']}"] = 1000 * statistics.mean(r["wall_s"][w["a"] - 1:w["b"]])
        out[f"{s}_ms_per_frame_last{w['last']}"] = 1000 * statistics.mean(r["wall_s"][-w["last"]:])
        out[f"{s}_final_delay_s_at_2fps"] = r["delay_s"][n]
        out[f"{s}_growth_ms"] = out[f"{s}_ms_per_frame_last{w['last']}"] - out[f"{s}_ms_per_frame_{w['a']}to{w['b']}"]
        out[f"{s}_rss_growth_mib"] = (r["rss_bytes"][n] - r["rss_bytes"][ref]) / 2 ** 20
    for s, r in (paired or {}).items():
        early, late = (1000 * statistics.mean(r[k]["wall_s"]) for k in ("early", "late"))
        out[f"{s}_time_paired_{t}"] = late / early
        out[f"{s}_growth_paired_ms"] = late - early
    if CONTROL in results:
        for s in results:
            if s != CONTROL:
                out[f"{s}_growth_beyond_text_lm_ms"] = out[f"{s}_growth_ms"] - out[f"{CONTROL}_growth_ms"]
                out[f"{s}_rss_growth_beyond_text_lm_mib"] = out[f"{s}_rss_growth_mib"] - out[f"{CONTROL}_rss_growth_mib"]
            if s != CONTROL and f"{s}_growth_paired_ms" in out and f"{CONTROL}_growth_paired_ms" in out:
                out[f"{s}_growth_paired_beyond_text_lm_ms"] = (out[f"{s}_growth_paired_ms"]
                                                               - out[f"{CONTROL}_growth_paired_ms"])
    return out


def table_rows(summary: dict[str, Any], frames: int) -> list[dict[str, Any]]:
    """One row per strategy of the summary's main numbers (the bench dispatcher prints it as a table)."""
    w = windows(frames)
    t = f"last{w['last']}_vs_{w['a']}to{w['b']}"
    rows = []
    for s in RUNS:
        if f"{s}_kv_tokens_final" not in summary:
            continue
        rows.append({"strategy": LABELS.get(s, s), f"kv tokens @{w['ref']}": summary[f"{s}_kv_tokens_frame{w['ref']}"],
                     f"kv tokens @{frames}": summary[f"{s}_kv_tokens_final"],
                     f"RSS @{frames} / @{w['ref']}": round(summary[f"{s}_memory_frame{frames}_vs_frame{w['ref']}"], 4),
                     f"ms/frame {w['a']}-{w['b']}": round(summary[f"{s}_ms_per_frame_{w['a']}to{w['b']}"], 1),
                     f"ms/frame last {w['last']}": round(summary[f"{s}_ms_per_frame_last{w['last']}"], 1),
                     f"time {t}": round(summary[f"{s}_time_{t}"], 3),
                     f"time {t}, paired": (round(summary[f"{s}_time_paired_{t}"], 3)
                                           if f"{s}_time_paired_{t}" in summary else "-"),
                     f"CPU time {t}": round(summary[f"{s}_cpu_time_{t}"], 3),
                     "ms/frame growth": round(summary[f"{s}_growth_ms"], 2),
                     "ms/frame growth, paired": (round(summary[f"{s}_growth_paired_ms"], 2)
                                                 if f"{s}_growth_paired_ms" in summary else "-"),
                     "RSS growth (MiB)": round(summary[f"{s}_rss_growth_mib"], 2)})
    return rows


def plot(results: dict[str, dict], out_dir: str) -> dict[str, str]:
    from experiments.benchmarks import measure

    plt = measure.pyplot()
    paths = {}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s, r in results.items():
        x = range(1, len(r["wall_s"]) + 1)
        ax1.plot(x, [b / 2 ** 20 for b in r["rss_bytes"]], label=LABELS.get(s, s))
        ax2.plot(x, [b / 2 ** 20 for b in r["state_bytes"]], label=LABELS.get(s, s))
    ax1.set(title="process RSS (Fig. 5 analogue)", xlabel="frame", ylabel="MiB")
    ax2.set(title="weights + KV cache", xlabel="frame", ylabel="MiB", yscale="log")
    ax1.legend(fontsize=8)
    paths["memory"] = measure.save_figure(fig, out_dir, "stream_memory")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("wall_s", "cpu_s"), ("wall time per frame (Fig. 6 analogue)",
                                                           "CPU time per frame (this process)")):
        for s, r in results.items():
            ms = [1000 * t for t in r[key]]
            k = max(1, len(ms) // 30)
            smooth = [statistics.mean(ms[max(0, i - k + 1):i + 1]) for i in range(len(ms))]
            ax.plot(range(1, len(ms) + 1), smooth, label=LABELS.get(s, s))
        ax.set(title=f"{title}, running mean of {k}", xlabel="frame", ylabel="ms", yscale="log")
    axes[0].legend(fontsize=8)
    paths["time"] = measure.save_figure(fig, out_dir, "stream_time")
    return paths


def run_in_process(strategy: str, frames: int, size: int, tokens: int, device: str = "cpu", threads: int = 1,
                   paired: bool = False) -> dict[str, Any]:
    """`measure_strategy` (`measure_paired`) here, with `threads` threads (quick runs: no process
    start-up per strategy)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return (measure_paired if paired else measure_strategy)(strategy, frames, size, tokens, device)
    finally:
        torch.set_num_threads(before)


def run(quick: bool = False, out_dir: str = "docs/img", frames: int | None = None, size: int = SIZE,
        tokens: int = CAPTION_TOKENS, strategies: tuple[str, ...] = RUNS,
        isolate: bool | None = None, device: str = "cpu", threads: int | None = None,
        turns: int | None = None, tokens_per_turn: int | None = None, image_size: int | None = None,
        ckpt: str | None = None, backbone: str | None = None, layers: int | None = None) -> dict[str, Any]:
    """Figs. 5-6: every strategy streamed over `frames` frames (600; quick: 40) -> summary dict.

    Given any of `turns`, `tokens_per_turn`, `image_size`, `ckpt`, `backbone`, `layers`: kyutai's
    table instead (TTFT and decode tok/s first -> last turns, final KV cache, peak memory:
    `experiments.benchmarks.turns`).

    `isolate` (default: not quick) runs each strategy in its own process; the quick smoke
    run measures them one after the other in this process, so its RSS series share a baseline.
    The strategies of `FLAT` are then timed once more, paired (`measure_paired`).
    `threads`: torch threads of every measurement (default: this process's, which
    `python -m experiments.bench --threads N` sets; torch's own default is one per core)."""
    import torch

    from experiments.benchmarks import measure

    kyutai = dict(turns=turns, tokens_per_turn=tokens_per_turn, image_size=image_size, ckpt=ckpt, backbone=backbone,
                  layers=layers)
    if any(v is not None for v in kyutai.values()):
        from experiments.benchmarks import turns as kyutai_form

        if frames is not None:
            raise ValueError("stream: --frames is the figures' suite; kyutai's table counts --turns")
        if threads:
            torch.set_num_threads(threads)
        return kyutai_form.run(quick=quick, device=device, **kyutai)
    frames = frames or (40 if quick else 600)
    unknown = [s for s in strategies if s not in RUNS]
    if unknown or frames < 20:
        raise ValueError(f"strategies {unknown} not in {list(RUNS)}, or frames={frames} < 20")
    threads = threads or torch.get_num_threads()
    isolate = not quick if isolate is None else isolate
    start = time.perf_counter()
    measure_one = run_isolated if isolate else run_in_process
    dev = str(measure.resolve_device(device))
    results = {s: measure_one(s, frames, size, tokens, dev, threads) for s in strategies}
    paired = {s: measure_one(s, frames, size, tokens, dev, threads, paired=True) for s in strategies if s in FLAT}
    out = {"suite": "stream", "frames": frames, "isolated_processes": isolate, "frame_px": size,
           "image_tokens_per_frame": (size // 28) ** 2, "caption_tokens_per_frame": tokens,
           "machine": {**measure.machine_info(torch.device(dev)), "torch_threads": threads}}
    summary = summarize(results, frames, paired)
    out["strategies"] = table_rows(summary, frames)
    out.update(summary)
    out["figures"] = plot(results, out_dir)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=list(RUNS), help="internal: measure one strategy, print JSON")
    p.add_argument("--paired", action="store_true", help="internal: with --worker, the paired timing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--size", type=int, default=SIZE)
    p.add_argument("--tokens", type=int, default=CAPTION_TOKENS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", default="docs/img")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.worker:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        measure = measure_paired if a.paired else measure_strategy
        print(json.dumps(measure(a.worker, a.frames or 600, a.size, a.tokens, a.device)))
        return
    print(json.dumps(run(a.quick, a.out_dir, a.frames, a.size, a.tokens, device=a.device, threads=a.threads), indent=1))


if __name__ == "__main__":
    main()
