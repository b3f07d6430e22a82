"""Suite `plan`: will a run config fit? Peak memory of one training step, traced, not run.

    python -m experiments.bench plan --config CONFIG [--config TRAINER] [--shapes SHAPES.json]
                                     [--gpus 8] [--gpu-memory 80GB] [--json]

The model is built from the configs (`casa.rebuild.build_model`, as training builds it) with
every tensor a FakeTensor: shapes and dtypes, no storage, so a 2B model costs no memory.
A config whose backbone or vision tower points at a local checkpoint (`path:`) is built from
that checkpoint's `config.json` when the directory exists, else from `--shapes` (a JSON file
of architecture numbers, experiments/configs/shapes/*.json) -- no weights are ever read.

The batch is the config's worst packed row: the data config's full `max_text_tokens` and
`max_image_tokens`, as images of `max_pixels` (the biggest the processor makes), all in one
window with all the text after them (the largest window a CASA / cross-attention layer sees).

One training step (forward, backward, Adam step, gradients dropped) is traced twice under
`torch.distributed._tools.mem_tracker.MemTracker`; the second (steady-state: optimiser state
exists) gives the peak, split by MemTracker's categories (parameters, gradients, optimiser
state, activations, temporaries) and by module group (vision tower, fused blocks, SA blocks,
head). The numbers come from the real model code: the tracker sees every tensor it creates.

Data-dependent host reads (`.tolist()`, boolean masks) cannot run on fake tensors: `RealIndices`
runs every op whose inputs are all real (the batch's small index tensors) for real, so index
bookkeeping stays real while everything that touches a parameter is fake.

Not modelled yet (see docs/benchmarks.md "plan"): FSDP2 sharding (FSDPMemTracker with a fake
process group), so `--gpus` divides nothing; the CLI says so in its output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

CATEGORIES = {"Parameter": "parameters", "Gradient": "gradients", "Optstate": "optimizer_state",
              "Activation": "activations", "Temp": "temporaries", "Buffer": "buffers", "Other": "other"}
"""MemTracker's reference types -> the names this suite reports."""
GiB = 2 ** 30
MiB = 2 ** 20


# ---------------------------------------------------------------------- fake execution
def _real_indices_mode():
    """A TorchDispatchMode (entered inside a FakeTensorMode) that runs for real every op whose
    tensor inputs are all real, and every factory op making a non-float tensor (index ranges):
    the host-side index bookkeeping of packing (window boundaries, masks) then stays real and
    readable; ops touching a fake tensor stay fake. A boolean mask indexing a fake tensor is
    turned into real indices first (FakeTensor cannot know how many elements a mask keeps)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
    from torch.utils._pytree import tree_leaves

    aten = torch.ops.aten
    indexing = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._unsafe_index_put.default}

    class RealIndices(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            if any(isinstance(x, FakeTensor) for x in tensors):
                if func in indexing:
                    with _disable_current_modes():
                        idx = []
                        for i in args[1]:
                            real_mask = (isinstance(i, torch.Tensor) and not isinstance(i, FakeTensor)
                                         and i.dtype in (torch.bool, torch.uint8))
                            idx.extend(i.nonzero(as_tuple=True) if real_mask else [i])
                    args = (args[0], idx, *args[2:])
                return func(*args, **kwargs)
            if not tensors:  # a factory: fake if it makes floats (activations), real for indices
                out = func(*args, **kwargs)
                if any(isinstance(o, torch.Tensor) and o.is_floating_point() for o in tree_leaves(out)):
                    return out
            with _disable_current_modes():
                return func(*args, **kwargs)

    return RealIndices()


class _FlashVarlenMemory(torch.autograd.Function):
    """The memory of flash-attn's varlen kernel, which the paper configs ask the vision tower
    for (`attn_implementation: flash_attention_2`) and which does not exist on CPU: the output,
    with q, k, v, the output and the fp32 log-sum-exp saved for backward, which returns
    dq, dk, dv. Values are never read (the tensors are fake)."""

    @staticmethod
    def forward(ctx, q, k, v):  # [1, H, L, D] each
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])  # [1, L, H, D]
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)  # [1, H, L]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


PLAN_FLASH = "plan_flash_varlen"
"""Registered attention implementation of `_FlashVarlenMemory`: "flash" in its name makes
the Qwen2.5-VL tower take its varlen (one call) path instead of a Python loop per window."""


def _plan_flash(module, query, key, value, attention_mask=None, **kwargs):
    return _FlashVarlenMemory.apply(query, key, value), None


def use_flash_memory_model(model) -> bool:
    """Give the vision tower `_FlashVarlenMemory` when its config asks for flash attention
    (replaced by sdpa to build on CPU) -> whether it did."""
    from transformers import AttentionInterface

    AttentionInterface.register(PLAN_FLASH, _plan_flash)
    configs = {id(m.config): m.config for m in model.vision.tower.modules() if hasattr(m, "config")}
    for c in configs.values():
        c._attn_implementation = PLAN_FLASH
    return True


# ---------------------------------------------------------------------- configs
def load_configs(configs: list[str | Path | dict]) -> dict:
    """The composed run config, parsed by the fit CLI's own parser (`--config` composition)."""
    from casa.train.cli import parse_run_config

    return parse_run_config(configs)


def shapes_override(config: dict, shapes: str | Path | dict | None) -> dict:
    """-> a config override replacing each `path:` (a local checkpoint) of the backbone and the
    vision tower by architecture numbers: the checkpoint's own config.json when it exists,
    else `shapes` {"backbone": {...}, "vision": {...}}; ValueError naming the field otherwise."""
    if shapes is not None and not isinstance(shapes, dict):
        shapes = json.loads(Path(shapes).read_text())
    shapes = {k: v for k, v in (shapes or {}).items() if not k.startswith("_")}
    init = ((config.get("model") or {}).get("model") or {}).get("init_args") or {}
    over: dict = {}
    for part in ("backbone", "vision"):
        args = (init.get(part) or {}).get("init_args") or {}
        path = args.get("path")
        if path is None and part not in shapes:
            if part == "vision" and args.get("attn_implementation") == "flash_attention_2":
                over[part] = {"init_args": {"attn_implementation": "sdpa"}}  # built on CPU; see predict
            continue
        cfg = shapes.get(part)
        local = Path(path) / "config.json" if path else None
        if cfg is None and local is not None and local.is_file():
            cfg = json.loads(local.read_text())
            cfg = cfg.get("vision_config", cfg) if part == "vision" else cfg.get("text_config", cfg)
        if cfg is None:
            raise ValueError(f"plan: model.model.init_args.{part}.init_args.path={path!r} has no config.json here; "
                             f"pass --shapes with a {part!r} entry (experiments/configs/shapes/*.json)")
        if part == "vision":
            from casa.vision import _config_fields

            cfg = {k: v for k, v in cfg.items() if k in _config_fields()}
        extra = {"attn_backend": "sdpa"} if part == "backbone" else {"attn_implementation": "sdpa"}
        over[part] = {"init_args": {"path": None, "config": cfg, **extra}}
    return {"model": {"model": {"init_args": over}}} if over else {}


# ---------------------------------------------------------------------- batch
def worst_case_layout(config: dict, patch_size: int = 14, merge: int = 2) -> list[tuple[str, Any]]:
    """The config's worst packed row as `casa.tiny.random_packed_batch` segments: images of
    `max_pixels` (square, whole merged patches) until `max_image_tokens` is reached (the last
    one smaller if needed), then `max_text_tokens` of text, one sample, one window."""
    from casa.rebuild import DataSettings

    data = DataSettings.from_config(config.get("data"))
    side = max(merge, int(math.isqrt(data.max_pixels) // patch_size) // merge * merge)
    per_image = side * side // merge ** 2
    segments: list[tuple[str, Any]] = []
    left = data.max_image_tokens
    while left >= per_image:
        segments.append(("image", (side, side)))
        left -= per_image
    rest = int(math.isqrt(left))  # a last, smaller square image with the remaining tokens
    if rest:
        segments.append(("image", (rest * merge, rest * merge)))
    return segments + [("text", data.max_text_tokens)]


def fake_batch(segments, vocab_size: int, patch_dim: int, mode):
    """A PackedBatch of `segments` whose index tensors are real and whose pixels are fake."""
    from casa.tiny import random_packed_batch

    batch = random_packed_batch([segments], vocab_size=vocab_size, patch_dim=1)
    with mode:
        pixels = torch.empty(batch.pixel_values.shape[0], patch_dim)
    return dataclasses.replace(batch, pixel_values=pixels)


# ---------------------------------------------------------------------- tracing
def module_groups(model) -> dict[str, list[torch.nn.Module]]:
    """{"vision tower", "fused blocks", "SA blocks", "head"} -> their modules. A fused block
    is a decoder block holding parameters the checkpoint does not have (a CASA / CA layer)."""
    bb = model.backbone
    prefix = {id(m): n for n, m in bb.named_modules()}
    fused, plain = [], []
    for block in bb.layers:
        name = prefix[id(block)]
        new = any(f"{name}.{n}" not in bb.pretrained_names for n, _ in block.named_parameters())
        (fused if new else plain).append(block)
    return {"vision tower": [model.vision], "fused blocks": fused, "SA blocks": plain, "head": [bb.lm_head]}


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


class _NoHook:
    """A hook handle with nothing to remove (see `trace_step`)."""

    def remove(self) -> None:
        pass


def trace_step(model, batch, optimizer, mode) -> dict[str, Any]:
    """Trace two training steps under MemTracker inside `mode` (a FakeTensorMode) -> the second
    step's peak {category: bytes}, its `total`, the state live at its start (`start`), and
    per module group {params, grads, local_peak} bytes."""
    from torch.distributed._tools.mem_tracker import MemTracker, _ModState

    tracker = MemTracker()
    # MemTracker hooks every parameter's gradient, and torch refuses a hook on a frozen one (the
    # paper configs freeze most of the vision tower): a frozen parameter gets a no-op handle
    # instead, which the tracker's `_param_to_grad_hook_handles` check then skips.
    for p in model.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    tracker.track_external(model, optimizer)
    with mode, _real_indices_mode(), tracker:
        for i in range(2):  # the first step creates Adam's state: the second is the steady state
            if i == 1:
                tracker.reset_mod_stats()
                start = next(iter(tracker.get_tracker_snapshot("current").values()))
            model(batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    split = {name: int(peak.get(key, 0)) for key, name in CATEGORIES.items()}
    out = {"peak": split, "total": int(peak.get("Total", sum(split.values()))),
           "start": {name: int(start.get(key, 0)) for key, name in CATEGORIES.items()}}
    groups = {}
    for name, mods in module_groups(model).items():
        params = [p for m in mods for p in m.parameters()]
        stats = [tracker.memory_tracking[m] for m in mods if m in tracker.memory_tracking]
        local = max((max(s.local_peak.values(), default=0) for s in stats), default=0)
        fw = [snap for s in stats for snap in s.snapshots.get(_ModState.PEAK_FW, [])]
        groups[name] = {"modules": len(mods), "params": _bytes(params),
                        "grads": _bytes([p for p in params if p.requires_grad]), "local_peak": int(local),
                        "activations_at_fw_peak": max((int(next(iter(s.values())).get("Activation", 0))
                                                       for s in fw), default=0)}
    out["groups"] = groups
    return out


def predict(configs: list, shapes: str | Path | dict | None = None, batch_segments=None) -> dict[str, Any]:
    """Build the configs' model with fake tensors, trace one step on the worst-case batch ->
    `trace_step`'s dict + {"batch": the layout, "config": settings used}."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from casa.rebuild import build_model
    from casa.train.optim import build_optimizer

    config = load_configs(configs)
    over = shapes_override(config, shapes)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = build_model([*configs, over] if over else list(configs))
    module = (config.get("model") or {})
    model.train()
    model.activation_checkpointing = bool(module.get("activation_checkpointing", False))
    vision_args = ((config["model"]["model"].get("init_args") or {}).get("vision") or {}).get("init_args") or {}
    flash_vision = vision_args.get("attn_implementation") == "flash_attention_2" and use_flash_memory_model(model)
    tower = model.vision.tower.config
    segments = batch_segments or worst_case_layout(config, tower.patch_size, tower.spatial_merge_size)
    patch_dim = tower.in_channels * tower.temporal_patch_size * tower.patch_size ** 2
    batch = fake_batch(segments, model.backbone.config.vocab_size, patch_dim, mode)
    optimizer = build_optimizer(model.parameter_groups(), float(module.get("lr_new", 1e-4)),
                                float(module.get("lr_pretrained", 1e-5)), float(module.get("weight_decay", 0.0)))
    from casa.flops import training_flops

    flops = training_flops(model, batch)  # before the trace: a pure function of dims and layout
    out = trace_step(model, batch, optimizer, mode)
    out["train_flops"] = int(flops)
    out["batch"] = {"text_tokens": batch.num_text_tokens, "image_tokens": int(batch.image_grid_thw.prod(-1).sum())
                    // tower.spatial_merge_size ** 2, "images": int(batch.image_grid_thw.shape[0]), "windows": 1}
    out["activation_checkpointing"] = model.activation_checkpointing
    out["vision_attention"] = "flash-attn varlen memory model" if flash_vision else "as configured"
    out["parameters_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    return out


def parse_memory(text: str) -> int:
    """"80GB" / "80GiB" / "512MB" -> bytes (GB and GiB both read as GiB: GPU memory is quoted so)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"plan: --gpu-memory={text!r} is not a size like 80GB, 40GiB or 512MB")
    unit = (m.group(2) or "GB").upper().replace("I", "")
    return int(float(m.group(1)) * 2 ** {"KB": 10, "MB": 20, "GB": 30, "TB": 40}[unit])


H100_BF16_TFLOPS = 989.0
"""H100 SXM dense bf16 peak (NVIDIA's datasheet; 1979 is with 2:4 sparsity): `--gpu-tflops`' default."""


def throughput(flops: int, tokens: int, mfu: float, gpu_tflops: float) -> dict[str, float]:
    """One GPU's packed row of `tokens` tokens costing `flops` (forward + backward, casa.flops),
    at `mfu` of a `gpu_tflops` peak -> predicted seconds per micro-batch and tokens/s per GPU."""
    if not 0 < mfu <= 1 or gpu_tflops <= 0:
        raise ValueError(f"plan: --mfu={mfu} must be in (0, 1] and --gpu-tflops={gpu_tflops} > 0")
    seconds = flops / (mfu * gpu_tflops * 1e12)
    return {"train_TFLOP": round(flops / 1e12, 3), "mfu": mfu, "gpu_tflops": gpu_tflops,
            "microbatch_s": float(f"{seconds:.4g}"),
            "tokens_per_s_per_gpu": float(f"{tokens / seconds:.4g}")}


def run(quick: bool, out_dir: str, config: list[str] | None = None, shapes: str | None = None, gpus: int = 8,
        gpu_memory: str = "80GB", mfu: float = 0.4, gpu_tflops: float = H100_BF16_TFLOPS) -> dict[str, Any]:
    if not config:  # `bench all` plans the demo (tiny with --quick): the configs that build anywhere
        config = ["experiments/configs/demo.yaml"] + (["tests/configs/tiny.yaml"] if quick else [])
    if gpus < 1:
        raise ValueError(f"plan: --gpus={gpus} must be >= 1")
    budget = parse_memory(gpu_memory)
    p = predict(config, shapes)
    total = p["total"]
    rows = [{"category": k, "GiB": round(v / GiB, 3), "MiB": round(v / MiB, 1)} for k, v in p["peak"].items()]
    groups = [{"module": k, "params_GiB": round(g["params"] / GiB, 3), "local_peak_GiB": round(g["local_peak"] / GiB, 3),
               "activations_GiB": round(g["activations_at_fw_peak"] / GiB, 3), "modules": g["modules"]}
              for k, g in p["groups"].items()]
    return {"configs": config, "shapes": shapes, "gpus": gpus, "gpu_memory_GiB": round(budget / GiB, 1),
            "batch": p["batch"], "parameters_M": p["parameters_M"],
            "activation_checkpointing": p["activation_checkpointing"],
            "peak_GiB": round(total / GiB, 3), "fits": total <= budget,
            "sharding": "none traced: per-process peak of one unsharded replica (FSDP2 not modelled yet)",
            "throughput": throughput(p["train_flops"], p["batch"]["text_tokens"] + p["batch"]["image_tokens"],
                                     mfu, gpu_tflops),
            "peak": rows, "modules": groups}
