"""Suite `attention`: `casa.attention.varlen_attention` per backend against the dense reference.

    python -m experiments.bench attention [--quick] [--json] [--device cuda]

The CASA layout of a packed row: W windows, each with N image tokens and 50 text tokens
(paper Table 11); the queries are the text tokens, the keys `[image_w | text_w]`, causal
(bottom-right). q [50 W, H, D], k, v [W (N + 50), Hkv, D]; H=8, Hkv=4, D=64, fp32.
Sweep: W in 1..64, N in 64..4096 (quick: a 2 x 2 corner). Forward (no grad) and
forward + backward, for every backend that can run here (`check_backend` gives the
reason for the others: flash needs CUDA, flex has no backward on CPU).

Scores computed: dense computes every query against every key, Tq x Tk = W^2 * 50 (N+50);
a per-segment backend only its own windows, W * 50 (N+50): W times fewer. The
FLOP-proportional ideal of a backend is dense's time scaled by that ratio,

    ideal = t_dense * scores_backend / scores_dense,   ratio_vs_ideal = t_backend / ideal

(below 1: the backend's cost per score is lower than dense's). Dense's score matrix is
[H, Tq, Tk]; cases where it would exceed `DENSE_BUDGET` elements are not run, and their
ideal uses dense's cost per score measured on the largest case that ran ("extrapolated").
Target: the per-segment `sdpa` path within 1.5x of the ideal, and its memory linear (or
better) in the window size: the log-log slope of peak memory against N.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from experiments.benchmarks import measure

TEXT_PER_WINDOW = 50
HEADS, KV_HEADS, HEAD_DIM = 8, 4, 64
DENSE_BUDGET = 2 ** 25
"""Largest [H, Tq, Tk] score tensor the dense-materialising paths (dense; flex without
torch.compile on CPU) are run with: 128 MiB in fp32, about 0.5 GiB at their peak."""
TARGET = 1.5

FULL = dict(windows=(1, 4, 16, 64), image_tokens=(64, 256, 1024, 4096), repeats=3)
QUICK = dict(windows=(1, 4), image_tokens=(16, 64), repeats=2)


def make_case(W: int, N: int, device: torch.device, grad: bool, seed: int = 0):
    """-> q, k, v, cu_q, cu_k of W windows of [N image | 50 text] keys and 50 text queries."""
    g = torch.Generator().manual_seed(seed)
    Tq, Tk = W * TEXT_PER_WINDOW, W * (N + TEXT_PER_WINDOW)
    q = torch.randn(Tq, HEADS, HEAD_DIM, generator=g).to(device).requires_grad_(grad)  # [Tq, H, D]
    k = torch.randn(Tk, KV_HEADS, HEAD_DIM, generator=g).to(device).requires_grad_(grad)  # [Tk, Hkv, D]
    v = torch.randn(Tk, KV_HEADS, HEAD_DIM, generator=g).to(device).requires_grad_(grad)
    cu_q = (torch.arange(W + 1) * TEXT_PER_WINDOW).to(device=device, dtype=torch.int32)  # [W+1]
    cu_k = (torch.arange(W + 1) * (N + TEXT_PER_WINDOW)).to(device=device, dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def call(backend: str, case, grad: bool):
    """-> a closure: one forward (no grad), or forward + backward with the grads dropped."""
    from casa.attention import varlen_attention

    q, k, v, cu_q, cu_k = case

    def forward():
        with torch.no_grad():
            varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend=backend)

    def forward_backward():
        varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend=backend).sum().backward()
        for t in (q, k, v):
            t.grad = None

    return forward_backward if grad else forward


def why_skipped(backend: str, device: torch.device, grad: bool, dense_elems: int) -> str | None:
    from casa.attention import check_backend

    try:
        check_backend(backend, device, grad)
    except ValueError as e:
        return str(e).split(" (", 1)[1].split(")", 1)[0] if " (" in str(e) else str(e)
    materialises = backend == "dense" or (backend == "flex" and device.type == "cpu")
    if materialises and dense_elems > DENSE_BUDGET:
        return f"materialises [H, Tq, Tk] scores: {dense_elems / 2 ** 20:.0f}M > budget {DENSE_BUDGET / 2 ** 20:.0f}M"
    return None


def sweep(cfg: dict[str, Any], device: torch.device) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from casa.attention import BACKENDS

    rows, skipped = [], []
    for grad in (False, True):
        for W in cfg["windows"]:
            for N in cfg["image_tokens"]:
                Tq, Tk = W * TEXT_PER_WINDOW, W * (N + TEXT_PER_WINDOW)
                dense_elems = HEADS * Tq * Tk
                case = make_case(W, N, device, grad)
                for backend in BACKENDS:
                    why = why_skipped(backend, device, grad, dense_elems)
                    pass_ = "fwd+bwd" if grad else "fwd"
                    if why is not None:
                        skipped.append({"backend": backend, "pass": pass_, "case": f"W={W} N={N}", "reason": why})
                        continue
                    fn = call(backend, case, grad)
                    fn()  # warm-up
                    mem = measure.peak_memory(fn, device, rss=False)
                    t = measure.time_call(fn, device, repeats=cfg["repeats"], warmup=0)
                    per_segment = backend != "dense" and not (backend == "flex" and device.type == "cpu")
                    rows.append({
                        "backend": backend, "pass": pass_, "windows": W, "image_tokens": N, "queries": Tq, "keys": Tk,
                        "scores": HEADS * (Tq * (N + TEXT_PER_WINDOW) if per_segment else Tq * Tk),
                        "dense_scores": dense_elems, "time_s": t["time_s"], "wall_s": t["wall_s"],
                        "alloc_MiB": mem["alloc_bytes"] / measure.MiB,
                    })
                del case
    return rows, skipped


def group_skipped(skipped: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (backend, pass, reason kind) with the cases it covers."""
    groups: dict[tuple, dict[str, Any]] = {}
    for s in skipped:
        kind = s["reason"].split(":")[0]  # budget reasons differ by size only
        g = groups.setdefault((s["backend"], s["pass"], kind), {"backend": s["backend"], "pass": s["pass"],
                                                                 "reason": s["reason"], "cases": []})
        g["cases"].append(s["case"])
    out = []
    for g in groups.values():
        if len(g["cases"]) > 1 and "budget" in g["reason"]:
            g["reason"] = g["reason"].split(":")[0] + f": more than the budget of {DENSE_BUDGET / 2 ** 20:.0f}M"
        out.append(g | {"cases": " ".join(g["cases"]) if len(g["cases"]) < 4 else f"{len(g['cases'])} cases"})
    return out


def add_ideal(rows: list[dict[str, Any]]) -> None:
    """ideal_s and ratio_vs_ideal for every row (module docstring)."""
    for pass_ in ("fwd", "fwd+bwd"):
        dense = {(r["windows"], r["image_tokens"]): r for r in rows if r["backend"] == "dense" and r["pass"] == pass_}
        if not dense:
            continue
        largest = max(dense.values(), key=lambda r: r["dense_scores"])
        per_score = largest["time_s"] / largest["dense_scores"]
        for r in rows:
            if r["pass"] != pass_:
                continue
            d = dense.get((r["windows"], r["image_tokens"]))
            r["ideal_s"] = (d["time_s"] / d["dense_scores"] if d else per_score) * r["scores"]
            r["ratio_vs_ideal"] = r["time_s"] / r["ideal_s"]
            r["dense"] = "measured" if d else "extrapolated"


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x (1 = linear, 2 = quadratic)."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


def memory_slopes(rows: list[dict[str, Any]], backend: str, pass_: str) -> dict[str, float]:
    """Log-log slope of peak memory against image tokens per window (at the largest W with
    2+ points), and against W (at the largest N with 2+ points)."""
    pts = [r for r in rows if r["backend"] == backend and r["pass"] == pass_]
    out = {}
    for along, fixed in (("image_tokens", "windows"), ("windows", "image_tokens")):
        groups: dict[int, list] = {}
        for r in pts:
            groups.setdefault(r[fixed], []).append(r)
        usable = [v for k, v in sorted(groups.items()) if len(v) >= 2]
        if usable:
            g = usable[-1]
            # N + 50 keys per window: the window size the memory should be linear in
            xs = [r[along] + (TEXT_PER_WINDOW if along == "image_tokens" else 0) for r in g]
            key = f"{backend}_{pass_.replace('+', '_')}_memory_slope_vs_{along}"
            out[key] = loglog_slope(xs, [r["alloc_MiB"] for r in g])
    return out


def _legend(fig, axes) -> None:
    """One legend for both panels (the forward panel has flex, the backward one has not)."""
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), fontsize=7, ncol=1, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.87, 0.94))  # room for the legend and the suptitle


def plot(rows: list[dict[str, Any]], out_dir: str, tag: str) -> list[str]:
    plt = measure.pyplot()
    paths = []
    colors = {"dense": "tab:red", "sdpa": "tab:blue", "eager": "tab:green", "flex": "tab:purple", "flash": "tab:orange"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, pass_ in zip(axes, ("fwd", "fwd+bwd")):
        for backend in colors:
            pts = sorted((r for r in rows if r["backend"] == backend and r["pass"] == pass_ and "ratio_vs_ideal" in r),
                         key=lambda r: (r["image_tokens"], r["windows"]))
            if backend == "dense" or not pts:
                continue
            for N in sorted({r["image_tokens"] for r in pts}):
                line = [r for r in pts if r["image_tokens"] == N]
                ax.plot([r["windows"] for r in line], [r["ratio_vs_ideal"] for r in line], marker="o",
                        color=colors[backend], alpha=0.35 + 0.65 * (N / max(r["image_tokens"] for r in pts)),
                        label=f"{backend} N={N}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(TARGET, color="tab:red", lw=0.8, ls="--", label=f"target {TARGET}x")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("windows W")
        ax.set_title(f"{pass_}: time / FLOP-proportional ideal")
    axes[0].set_ylabel("time / (t_dense x scores / dense scores)")
    _legend(fig, axes)
    fig.suptitle(f"varlen_attention vs dense, 50 text queries + N image keys per window ({tag})", fontsize=10)
    paths.append(measure.save_figure(fig, out_dir, "attention_ratio"))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, pass_ in zip(axes, ("fwd", "fwd+bwd")):
        for backend in colors:
            pts = [r for r in rows if r["backend"] == backend and r["pass"] == pass_]
            for W in sorted({r["windows"] for r in pts}):
                line = sorted((r for r in pts if r["windows"] == W), key=lambda r: r["image_tokens"])
                if len(line) < 2:
                    continue
                ax.plot([r["image_tokens"] + TEXT_PER_WINDOW for r in line], [max(r["alloc_MiB"], 1e-3) for r in line],
                        marker="o", color=colors[backend], ls="--" if backend == "dense" else "-",
                        alpha=0.35 + 0.65 * W / max(r["windows"] for r in pts), label=f"{backend} W={W}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("keys per window (N + 50)")
        ax.set_title(f"{pass_}: peak extra memory (MiB)")
    _legend(fig, axes)
    fig.suptitle(f"varlen_attention peak memory ({tag})", fontsize=10)
    paths.append(measure.save_figure(fig, out_dir, "attention_memory"))
    return paths


@measure.cached_cpu_allocations()  # as CUDA's caching allocator: no page faults per step
def run(quick: bool, out_dir: str, device: str = "cpu") -> dict[str, Any]:
    dev = measure.resolve_device(device)
    cfg = QUICK if quick else FULL
    rows, skipped = sweep(cfg, dev)
    add_ideal(rows)
    result: dict[str, Any] = {"meta": measure.machine_info(dev) | {
        "dtype": "float32", "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "text_per_window": TEXT_PER_WINDOW, "windows": list(cfg["windows"]), "image_tokens": list(cfg["image_tokens"]),
        "dense_budget_scores": DENSE_BUDGET, "time_basis": measure.time_basis(dev)}}
    for backend in ("sdpa", "eager", "flex", "flash"):
        for pass_ in ("fwd", "fwd+bwd"):
            ratios = [r["ratio_vs_ideal"] for r in rows if r["backend"] == backend and r["pass"] == pass_
                      and "ratio_vs_ideal" in r]
            if ratios:
                key = f"{backend}_{pass_.replace('+', '_')}"
                result[f"{key}_max_ratio_vs_ideal"] = round(max(ratios), 3)
                result[f"{key}_median_ratio_vs_ideal"] = round(sorted(ratios)[len(ratios) // 2], 3)
            result.update({k: round(v, 3) for k, v in memory_slopes(rows, backend, pass_).items()})
    for pass_ in ("fwd", "fwd+bwd"):
        result.update({k: round(v, 3) for k, v in memory_slopes(rows, "dense", pass_).items()})
    sdpa_max = max(result.get("sdpa_fwd_max_ratio_vs_ideal", math.inf),
                   result.get("sdpa_fwd_bwd_max_ratio_vs_ideal", math.inf))
    slopes = [v for k, v in result.items() if k.startswith("sdpa_") and k.endswith("slope_vs_image_tokens")]
    result["targets"] = {f"sdpa within {TARGET}x of ideal": sdpa_max <= TARGET,
                         "sdpa memory at most linear in window size": bool(slopes) and max(slopes) <= 1.1}
    if not result["targets"][f"sdpa within {TARGET}x of ideal"]:
        # where the time goes in the worst sdpa case (docs/benchmarks.md)
        worst = max((r for r in rows if r["backend"] == "sdpa" and "ratio_vs_ideal" in r),
                    key=lambda r: r["ratio_vs_ideal"])
        grad = worst["pass"] == "fwd+bwd"
        fn = call("sdpa", make_case(worst["windows"], worst["image_tokens"], dev, grad), grad)
        result["profile_worst_sdpa_case"] = (f"sdpa {worst['pass']} W={worst['windows']} N={worst['image_tokens']}: "
                                             f"{worst['ratio_vs_ideal']:.2f}x ideal\n"
                                             + measure.profile_table(fn, dev, row_limit=10))
    result["rows"] = [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    result["skipped"] = group_skipped(skipped)
    result["plots"] = plot(rows, out_dir, f"{'quick, ' if quick else ''}{dev.type}, fp32")
    return result
