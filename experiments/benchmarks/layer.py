"""Suite `layer`: the paper's Table 11, one decoder layer, token insertion vs CASA and CA.

    python -m experiments.bench layer [--quick] [--json] [--device cuda] [--dtype float32]
                                      [--backbone helium|helium_preview|qwen2_5_vl]

Setting (paper App. C.2): one packed row of 10 samples, each 1024 image tokens followed
by 50 text tokens, through one decoder layer at the widths of the paper's Helium-1 2B
backbone (d=2048, FFN 8192, 16 query / 8 key-value heads of 128; `BACKBONES` says how
they were checked), in bf16 as on the paper's H100s. The layer is the library's own
`casa.blocks.DecoderBlock`, rewritten by the real strategy (`fusion.attach`) and fed by
the strategy's real `prepare`. Every strategy of the matrix (`experiments.strategies`:
one YAML each in experiments/configs/strategies/) is measured; the paper's four are

    insertion        SA + FFN over all 10 x 1074 tokens (image tokens in the stream)
    casa_plus        SA + FFN over the 500 text tokens, + a CASA layer (CASA⊕)
    casa_replace     the block's SA runs as CASA, FFN over text (CASA∨, no new weights)
    cross_attention  SA + FFN over text, + a CA layer (CA)

Training = forward + backward of the block (inputs and weights require grad: the block
is mid-stack, so its inputs get gradients too); the window index and RoPE tables are
built once outside the timed call, as they are shared by every layer of a model.
Inference = auto-regressive generation of the whole text of the row with the KV cache,
the 10 samples decoded together: one prefill chunk (each sample's image and first text
token), then 49 steps of one token per sample, through `VisionLanguageModel.hidden_states`
(the library's cached path, per-chunk glue included).

Reported: median time and peak extra memory (`measure.py`), and CASA / insertion ratios
(below 1 = CASA cheaper). Paper: training memory -74% (0.26) for CASA⊕ and CASA∨, time
-84% (0.16) and -89% (0.11); inference memory -14%, time +6% (CASA⊕) and -33% (CASA∨).
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
from typing import Any

import torch

from experiments import strategies
from experiments.benchmarks import measure

LABELS = {"insertion": "insertion", "casa_plus": "CASA⊕", "casa_replace": "CASA∨", "cross_attention": "CA"}
"""Plot labels of the paper's names; any other strategy of the matrix is labelled by its name."""
PAPER = {  # Table 11, CASA / insertion
    ("casa_plus", "train", "memory"): 0.26, ("casa_plus", "train", "time"): 0.16,
    ("casa_replace", "train", "memory"): 0.26, ("casa_replace", "train", "time"): 0.11,
    ("casa_plus", "infer", "memory"): 0.86, ("casa_plus", "infer", "time"): 1.06,
    ("casa_replace", "infer", "memory"): 0.86, ("casa_replace", "infer", "time"): 0.67,
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclasses.dataclass
class Setting:
    samples: int
    image_tokens: int
    text_tokens: int
    widths: dict[str, Any]
    """Fields overriding the backbone widths (quick: a tiny model; empty: the real widths)."""
    train_repeats: int
    infer_repeats: int


FULL = Setting(samples=10, image_tokens=1024, text_tokens=50, widths={}, train_repeats=3, infer_repeats=2)
QUICK = Setting(samples=2, image_tokens=64, text_tokens=6,
                widths=dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4,
                            head_dim=16), train_repeats=2, infer_repeats=1)


BACKBONES = {
    # Helium-1 2B: 28 layers of d=2048, 16 query / 8 key-value heads of 128, FFN 8192. A CASA
    # layer per block then adds 28 x (2 x 2048^2 + 2 x 2048 x 1024) = 352M parameters, the
    # paper's own count (§3.2, "352M-680M extra training parameters").
    "helium": ("helium", dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=16, num_key_value_heads=8,
                              head_dim=128, rms_norm_eps=1e-8)),
    # Helium-1 preview 2B (transformers' HeliumConfig defaults): d=2560, 20 heads, no GQA
    "helium_preview": ("helium", dict(hidden_size=2560, intermediate_size=7040, num_attention_heads=20,
                                      num_key_value_heads=20, head_dim=128, rms_norm_eps=1e-8)),
    # the text model of Qwen2.5-VL-3B, the paper's other backbone (2 key/value heads)
    "qwen2_5_vl": ("qwen2", dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                                 num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-6)),
}
"""Backbone widths of the paper's two 2-3B backbones, run through the family's HF modules."""


def widths(backbone: str, s: Setting) -> tuple[str, dict[str, Any]]:
    if backbone not in BACKBONES:
        raise ValueError(f"layer: backbone={backbone!r} is not one of {list(BACKBONES)}")
    family, w = BACKBONES[backbone]
    return family, {**w, **s.widths}


def build_model(name: str, s: Setting, dtype: torch.dtype, device: torch.device, backbone: str = "helium"):
    """A one-layer `VisionLanguageModel` with strategy `name` (its YAML in the matrix) at the
    widths of `backbone`, built by the one `build_model`. The vision tower is a tiny stand-in
    that never runs: image embeddings are given directly."""
    from casa.vision import tiny_vision_config
    from experiments.strategies import build_model as build

    family, config = widths(backbone, s)
    # embeddings are never measured: a small vocabulary keeps them out of the way
    config = {**config, "num_hidden_layers": 1, "vocab_size": 256, "tie_word_embeddings": False,
              "max_position_embeddings": 4096}
    base = {"model": {"model": {"class_path": "casa.model.VisionLanguageModel", "init_args": {
        "backbone": {"class_path": "casa.backbone.Backbone", "init_args": {"family": family, "config": config}},
        "vision": {"class_path": "casa.vision.VisionEncoder",
                   "init_args": {"config": tiny_vision_config(config["hidden_size"])}},
        "projector": "identity"}}}}
    # the one layer is the fused one: block selection (CASA's `k`, CA's `every`) set to every block
    accepted = inspect.signature(strategies.fusion_class(name)).parameters
    one_layer = {"model": {"model": {"init_args": {"fusion": {"init_args": {
        k: 1 for k in ("k", "every") if k in accepted}}}}}}
    torch.manual_seed(0)
    return build([base, name, one_layer]).to(device=device, dtype=dtype)


def packed_row(s: Setting, prefill_text: int | None = None):
    """`samples` samples of [image (image_tokens) | text (text_tokens)]; pixels are dropped (the
    benchmark feeds image embeddings directly)."""
    from casa.tiny import random_packed_batch

    side = int(round((4 * s.image_tokens) ** 0.5))  # h = w patches, h*w/4 tokens
    if side * side != 4 * s.image_tokens:
        raise ValueError(f"image_tokens={s.image_tokens} must be a square number of 2x2-merged patches")
    text = s.text_tokens if prefill_text is None else prefill_text
    batch = random_packed_batch([[("image", (side, side)), ("text", text)]] * s.samples, vocab_size=256, patch_dim=1)
    return dataclasses.replace(batch, pixel_values=batch.pixel_values[:0])


def train_case(model, s: Setting, device: torch.device):
    """-> a closure running forward + backward of the one block, grads dropped after."""
    batch = packed_row(s).to(device)
    d = model.backbone.hidden_size
    dtype = model.backbone.embed_tokens.weight.dtype
    g = torch.Generator().manual_seed(0)
    text = torch.randn(batch.num_text_tokens, d, generator=g).to(device, dtype)
    image = torch.randn(batch.num_image_tokens, d, generator=g).to(device, dtype)
    with torch.no_grad():
        stream, images, ctx = model.fusion.prepare(batch, text, image, model.backbone)
    x = stream.detach().requires_grad_(True)  # [L, d]: L = T + N for insertion, T otherwise
    im = images.detach().requires_grad_(images.shape[0] > 0)  # [N, d] or [0, d]
    grad = torch.randn(x.shape, generator=g).to(device, dtype)
    block = model.backbone.layers[0]
    params = [p for p in block.parameters() if p.requires_grad]

    def step():
        out, _ = block(x, im, ctx)
        out.backward(grad)
        for t in params + [x, im]:
            t.grad = None

    return step, {"stream_tokens": int(x.shape[0]), "image_keys": int(im.shape[0])}


def infer_case(model, s: Setting, device: torch.device):
    """-> a closure generating the whole text of the row token by token with the KV cache."""
    from casa.cache import KVCache
    from casa.generation import text_chunk

    prefill = packed_row(s, prefill_text=1).to(device)
    d = model.backbone.hidden_size
    dtype = model.backbone.embed_tokens.weight.dtype
    image = torch.randn(prefill.num_image_tokens, d, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    steps = [text_chunk([[t % 256] for t in range(i, i + s.samples)], device=device) for i in range(s.text_tokens - 1)]

    @torch.no_grad()
    def generate():
        cache = KVCache(s.samples)
        model.hidden_states(prefill, image_embeds=image, cache=cache)
        for chunk in steps:
            model.hidden_states(chunk, cache=cache)

    return generate


def measure_strategy(name: str, s: Setting, dtype: torch.dtype, device: torch.device, backbone: str,
                     profile: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """-> the strategy's row, and (with `profile`) profiler tables of its training step."""
    model = build_model(name, s, dtype, device, backbone)
    new = sum(p.numel() for n, p in model.backbone.named_parameters() if n not in model.backbone.pretrained_names)
    row: dict[str, Any] = {"strategy": name, "label": LABELS.get(name, name), "new_params_M": round(new / 1e6, 2)}
    step, shape = train_case(model, s, device)
    row.update(shape)
    step()  # warm-up: kernel selection, first-touch allocations
    m = measure.peak_memory(step, device)
    t = measure.time_call(step, device, repeats=s.train_repeats, warmup=0)
    row.update(train_time_s=t["time_s"], train_wall_s=t["wall_s"], train_alloc_MiB=m["alloc_bytes"] / measure.MiB,
               train_rss_MiB=m.get("rss_bytes", 0) / measure.MiB, train_GFLOP=measure.count_flops(step) / 1e9)
    tables = {}
    if profile:
        tables[f"profile_{name}_train_time"] = measure.profile_table(step, device, row_limit=15)
        tables[f"profile_{name}_train_memory"] = measure.profile_table(step, device, row_limit=15, memory=True)
    del step
    model.eval()
    gen = infer_case(model, s, device)
    gen()
    m = measure.peak_memory(gen, device)
    t = measure.time_call(gen, device, repeats=s.infer_repeats, warmup=0)
    row.update(infer_time_s=t["time_s"], infer_wall_s=t["wall_s"], infer_alloc_MiB=m["alloc_bytes"] / measure.MiB,
               infer_rss_MiB=m.get("rss_bytes", 0) / measure.MiB)
    del gen, model
    gc.collect()
    return row, tables


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """{"<strategy>_vs_insertion_<train|infer>_<memory|time>": CASA / insertion}, and the
    training FLOP ratio `<strategy>_vs_insertion_train_flops`."""
    base = next(r for r in rows if r["strategy"] == "insertion")
    out = {}
    for r in rows:
        if r["strategy"] == "insertion":
            continue
        for phase in ("train", "infer"):
            out[f"{r['strategy']}_vs_insertion_{phase}_memory"] = r[f"{phase}_alloc_MiB"] / base[f"{phase}_alloc_MiB"]
            out[f"{r['strategy']}_vs_insertion_{phase}_time"] = r[f"{phase}_time_s"] / base[f"{phase}_time_s"]
        # the time ratio if time were proportional to matmul + attention FLOPs
        out[f"{r['strategy']}_vs_insertion_train_flops"] = r["train_GFLOP"] / base["train_GFLOP"]
    return out


def plot(rows: list[dict[str, Any]], ratio: dict[str, float], out_dir: str, s: Setting, tag: str, backbone: str) -> str:
    plt = measure.pyplot()
    others = [r["strategy"] for r in rows if r["strategy"] != "insertion"]
    panels = [("train", "memory"), ("train", "time"), ("infer", "memory"), ("infer", "time")]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6), sharey=True)
    for ax, (phase, metric) in zip(axes, panels):
        vals = [ratio[f"{s_}_vs_insertion_{phase}_{metric}"] for s_ in others]
        bars = ax.bar([LABELS.get(s_, s_) for s_ in others], vals, color="tab:blue", label="measured")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        paper = [PAPER.get((s_, phase, metric)) for s_ in others]
        xs = [i for i, p in enumerate(paper) if p is not None]
        ax.scatter(xs, [paper[i] for i in xs], marker="_", s=600, color="tab:red", zorder=3, label="paper Table 11")
        if (phase, metric) == ("train", "time"):
            ax.scatter(range(len(others)), [ratio[f"{s_}_vs_insertion_train_flops"] for s_ in others], marker="x",
                       color="black", zorder=3, label="FLOP ratio")
            ax.legend(fontsize=7, loc="upper left")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{'training' if phase == 'train' else 'inference'} {metric}")
        ax.tick_params(axis="x", labelsize=8)
    axes[0].set_ylabel("CASA / insertion (below 1 = cheaper)")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"One decoder layer, {s.samples} x ({s.image_tokens} image + {s.text_tokens} text) tokens ({tag})",
                 fontsize=10)
    return measure.save_figure(fig, out_dir, f"layer_ratios_{backbone}")


@measure.cached_cpu_allocations()  # as CUDA's caching allocator: no page faults per step
def run(quick: bool, out_dir: str, device: str = "cpu", dtype: str = "bfloat16", backbone: str = "helium"
        ) -> dict[str, Any]:
    dev = measure.resolve_device(device)
    if dtype not in DTYPES:
        raise ValueError(f"layer: dtype={dtype!r} is not one of {list(DTYPES)}")
    s = QUICK if quick else FULL
    family, w = widths(backbone, s)
    rows, profiles = [], {}
    for name in strategies.names():  # CASA⊕'s step profiled: where its time and memory go (docs/benchmarks.md)
        row, tables = measure_strategy(name, s, DTYPES[dtype], dev, backbone, profile=name == "casa_plus")
        rows.append(row)
        profiles.update(tables)
    ratio = ratios(rows)
    tag = f"{backbone} widths{' (quick)' if quick else ''}, {dtype}, {dev.type}"
    meta = {"time_basis": measure.time_basis(dev), "dtype": dtype, "backbone": backbone, "family": family,
            "samples": s.samples, "image_tokens": s.image_tokens, "text_tokens": s.text_tokens, **w}
    result: dict[str, Any] = {
        "meta": measure.machine_info(dev) | meta,
        **{k: round(v, 4) for k, v in ratio.items()},
        "rows": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
        "paper": {f"{s_}_vs_insertion_{p}_{m}": v for (s_, p, m), v in PAPER.items()},
        # the targets: the paper's training ratios, matched or beaten
        "targets": {f"{s_}_vs_insertion_train_{m} <= {v}": ratio[f"{s_}_vs_insertion_train_{m}"] <= v
                    for (s_, p, m), v in PAPER.items() if p == "train"},
    }
    result["plots"] = [plot(rows, ratio, out_dir, s, tag, backbone)]
    result.update(profiles)
    return result
