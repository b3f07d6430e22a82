"""Suite `step`: one full training step of the demo model per fusion strategy (paper Table 1).

    python -m experiments.bench step [--quick] [--json] [--device cuda]

The model is the demo's (`experiments/configs/demo.yaml`: backbone, vision tower,
projector), the strategy each `experiments/configs/strategies/<name>.yaml` of the matrix
(`experiments.strategies`; CASA∨ as configured there, every 2nd of the 4 layers). A step is forward + backward +
`optimizer.step()` + `zero_grad()` with the optimiser the training uses
(`casa.train.optim.build_optimizer`: Adam, new / pretrained groups), on one packed batch
shared by every strategy, built by `casa.tiny.random_packed_batch`:

    demo_caps    16 samples x (one 16x16-patch image = 64 tokens, 32 text tokens):
                 T = 512 text and N = 1024 image tokens, the demo's two caps filled
    paper_ratio  16 samples x (five 64-token images in one window, 32 text tokens):
                 T = 512, N = 5120, the paper's 1:10 text:image caps (2048 / 20480)

Reported per strategy: median step time after warm-up (the first steps allocate Adam's
state; the strategies' steps are timed in turn, so a slow spell of the shared
machine hits them alike), peak extra memory of a step (activations, gradients,
temporaries; parameters and optimiser state excluded), tokens/s (text + image tokens of
the batch per second).
Table 1's ordering (insertion most expensive, CASA∨ cheapest) is checked among the
paper's four (insertion, cross_attention, casa_plus, casa_replace).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from experiments import strategies
from experiments.benchmarks import measure

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TABLE1 = ("insertion", "cross_attention", "casa_plus", "casa_replace")
LAYOUTS = {
    "demo_caps": dict(samples=16, images=1, side=16, text=32),
    "paper_ratio": dict(samples=16, images=5, side=16, text=32),
}
QUICK_LAYOUTS = {"demo_caps": dict(samples=2, images=1, side=4, text=8)}


def build_model(strategy: str, quick: bool):
    """The demo model with `strategy`, composed as `--config demo.yaml --config
    strategies/<strategy>.yaml` composes it, by the one `build_model`."""
    from experiments.strategies import build_model as build

    configs: list[Any] = [CONFIGS / "demo.yaml", strategy]
    if quick:  # a 2-layer, 32-wide model: the code path, not the numbers
        demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())["model"]["model"]["init_args"]
        b, v = demo["backbone"]["init_args"]["config"], demo["vision"]["init_args"]["config"]
        configs.append({"model": {"model": {"init_args": {
            "backbone": {"init_args": {"config": {**b, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}}},
            "vision": {"init_args": {"config": {**v, "out_hidden_size": 32}}}}}}})
    torch.manual_seed(0)
    return build(configs)


def make_batch(layout: dict[str, int], vocab_size: int):
    from casa.tiny import random_packed_batch

    side = layout["side"]
    sample = [("image", (side, side))] * layout["images"] + [("text", layout["text"])]
    return random_packed_batch([sample] * layout["samples"], vocab_size=vocab_size)


def prepare_strategy(strategy: str, batch, quick: bool, device: torch.device):
    """-> (a closure running one training step of the demo model with `strategy`, its row
    without timings); the first step, which allocates Adam's state, is already done."""
    from casa.train.optim import build_optimizer

    model = build_model(strategy, quick).to(device).train()
    opt = build_optimizer(model.parameter_groups(), lr_new=1e-3, lr_pretrained=1e-3)

    def step():
        loss = model(batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    mem = measure.peak_memory(step, device, rss=False)
    groups = model.parameter_groups()
    return step, {"strategy": strategy, "alloc_MiB": mem["alloc_bytes"] / measure.MiB,
                  "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                  "new_params_M": sum(p.numel() for _, p in groups["new"]) / 1e6}


def measure_layout(batch, quick: bool, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """Every strategy of the matrix on `batch`; step times taken in turn across strategies
    (the demo model is small enough to keep them all alive)."""
    steps, rows = {}, {}
    for strategy in strategies.names():
        steps[strategy], rows[strategy] = prepare_strategy(strategy, batch, quick, device)
    times = measure.time_interleaved(steps, device, repeats=repeats, warmup=1)
    tokens = batch.num_text_tokens + batch.num_image_tokens
    for strategy, t in times.items():
        rows[strategy].update(step_s=t["time_s"], step_wall_s=t["wall_s"], tokens_per_s=tokens / t["time_s"],
                              text_tokens_per_s=batch.num_text_tokens / t["time_s"])
    return [rows[s] for s in strategies.names()]


def ordering(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Table 1's claim on one metric: insertion the most expensive, CASA∨ the cheapest of the four."""
    four = sorted((r for r in rows if r["strategy"] in TABLE1), key=lambda r: r[key], reverse=True)
    order = [r["strategy"] for r in four]
    return {"order": " > ".join(order), "insertion_most_expensive": order[0] == "insertion",
            "casa_replace_cheapest": order[-1] == "casa_replace"}


def plot(results: dict[str, list[dict[str, Any]]], out_dir: str, tag: str) -> str:
    plt = measure.pyplot()
    metrics = (("step_s", "step time (s)", "%.3g"), ("alloc_MiB", "peak extra memory (MiB)", "%.0f"),
               ("tokens_per_s", "tokens / s", "{:,.0f}"))
    fig, axes = plt.subplots(len(results), 3, figsize=(14, 3.4 * len(results)), squeeze=False)
    for row_axes, (layout, rows) in zip(axes, results.items()):
        names = [r["strategy"] for r in rows]
        colors = ["tab:red" if n == "insertion" else "tab:green" if n.startswith("casa") else "tab:grey" for n in names]
        for ax, (key, label, fmt) in zip(row_axes, metrics):
            bars = ax.bar(range(len(rows)), [r[key] for r in rows], color=colors)
            ax.bar_label(bars, fmt=fmt, fontsize=7)
            ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=7)
            ax.set_title(f"{layout}: {label}", fontsize=9)
    fig.suptitle(f"One training step of the demo model per strategy ({tag})", fontsize=10)
    return measure.save_figure(fig, out_dir, "step")


@measure.cached_cpu_allocations()  # as CUDA's caching allocator: no page faults per step
def run(quick: bool, out_dir: str, device: str = "cpu") -> dict[str, Any]:
    dev = measure.resolve_device(device)
    layouts = QUICK_LAYOUTS if quick else LAYOUTS
    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    vocab = demo["model"]["model"]["init_args"]["backbone"]["init_args"]["config"]["vocab_size"]
    model = "experiments/configs/demo.yaml" + (" (quick: 2 layers, d=32)" if quick else "")
    meta = {"time_basis": measure.time_basis(dev), "model": model}
    result: dict[str, Any] = {"meta": measure.machine_info(dev) | meta}
    per_layout = {}
    for name, layout in layouts.items():
        batch = make_batch(layout, vocab).to(dev)
        rows = measure_layout(batch, quick, dev, repeats=2 if quick else 7)
        per_layout[name] = rows
        result[f"{name}_batch"] = {"text_tokens": batch.num_text_tokens, "image_tokens": batch.num_image_tokens,
                                   "samples": batch.num_samples, "windows": batch.num_windows}
        for key, label in (("step_s", "time"), ("alloc_MiB", "memory")):
            o = ordering(rows, key)
            result[f"{name}_table1_{label}_order"] = o["order"]
            result[f"{name}_table1_{label}_holds"] = o["insertion_most_expensive"] and o["casa_replace_cheapest"]
        result[f"{name}_rows"] = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    result["plots"] = [plot(per_layout, out_dir, f"{'quick, ' if quick else ''}{dev.type}, fp32")]
    return result
