"""Suite `plan`: will a run config fit? Peak memory of one training step, traced, not run.

    python -m experiments.bench plan --config CONFIG [--config TRAINER] [--shapes SHAPES.json]
                                     [--gpus 8] [--gpu-memory 80GB] [--json]
                                     [--max-text-tokens T] [--max-image-tokens N] [--max-pixels P]
                                     [--search 3] [--frames F] [--steps S] [--mfu 0.4] [--gpu-tflops 989]
                                     [--tokens-per-turn K] [--image-size PX] [--dtype bfloat16]

The model is built from the configs (`casa.rebuild.build_model`, as training builds it) with
every tensor a FakeTensor: shapes and dtypes, no storage, so a 2B model costs no memory.
A config whose backbone or vision tower points at a local checkpoint (`path:`) is built from
that checkpoint's `config.json` when the directory exists, else from `--shapes` (a JSON file
of architecture numbers, experiments/configs/shapes/*.json) -- no weights are ever read.

The batch is the config's worst packed row: the data config's full `max_text_tokens` and
`max_image_tokens`, as images of `max_pixels` (the biggest the processor makes), all in one
window with all the text after them (the largest window a CASA / cross-attention layer sees).

The step is the run's (`RunSettings`): under `ModelParallelStrategy` the model is sharded as
`CasaModule.configure_model` shards it (`casa.train.module.shard_model`, FSDP2 with the
config's `fsdp_param_dtype`) over a fake process group of `--gpus` ranks and traced under
`FSDPMemTracker`; otherwise unsharded under `MemTracker`. Activation checkpointing as
configured; with `accumulate_grad_batches` > 1 two micro-batches (the first without gradient
sync). The peak is split into the trackers' categories (parameters, gradients, optimiser
state, activations, temporaries, FSDP's all-gather / reduce-scatter buffers) and by module
group (vision tower, fused blocks, SA blocks, head). See `tracing` for how the real model code
runs on fake tensors. When the peak exceeds `--gpu-memory`, `largest_fitting_caps` traces
smaller caps; `--frames` adds cached-generation memory per frame (`stream_memory`: a frame of
`--image-size` px and `--tokens-per-turn` decoded tokens, weights and cache in `--dtype`, and
the frame at which weights + cache exceed `--gpu-memory`); the
throughput estimate is `casa.flops`' count of the same batch at `--mfu`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from experiments.benchmarks import tracing

GiB = 2 ** 30
MiB = 2 ** 20


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


# ---------------------------------------------------------------------- run settings
@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What of the composed run config shapes one GPU's training step."""

    fsdp: bool
    """`trainer.strategy` is Lightning's ModelParallelStrategy: FSDP2 (`CasaModule.configure_model`)."""
    param_dtype: str | None
    """`model.fsdp_param_dtype` (FSDP2's compute dtype of the blocks; None: as stored)."""
    activation_checkpointing: bool
    accumulate: int
    """`trainer.accumulate_grad_batches`."""
    devices: int | None
    """`trainer.devices` x `trainer.num_nodes` when both are integers."""

    @staticmethod
    def of(config: dict) -> "RunSettings":
        module, trainer = config.get("model") or {}, config.get("trainer") or {}
        devices, nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
        return RunSettings(
            fsdp="ModelParallelStrategy" in str(trainer.get("strategy")),
            param_dtype=module.get("fsdp_param_dtype"),
            activation_checkpointing=bool(module.get("activation_checkpointing", False)),
            accumulate=int(trainer.get("accumulate_grad_batches") or 1),
            devices=devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else None)


def caps_override(text: int | None = None, image: int | None = None, pixels: int | None = None) -> dict:
    """-> a config override of the data config's packing caps (None: the config's own)."""
    caps = {k: v for k, v in (("max_text_tokens", text), ("max_image_tokens", image), ("max_pixels", pixels))
            if v is not None}
    for k, v in caps.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"plan: {k}={v!r} must be a positive integer")
    return {"data": {"init_args": caps}} if caps else {}


def predict(configs: list, shapes: str | Path | dict | None = None, batch_segments=None,
            gpus: int | None = None, fast: bool = True) -> dict[str, Any]:
    """Build the configs' model with fake tensors (FSDP2-sharded over a fake process group of
    `gpus` ranks when the trainer config asks for FSDP2), trace one training step on the
    worst-case batch -> `tracing.trace_step`'s dict + the batch, settings and FLOPs."""
    from casa.flops import training_flops
    from casa.train.optim import build_optimizer

    config = load_configs(configs)
    over = shapes_override(config, shapes)
    settings = RunSettings.of(config)
    world = gpus or settings.devices or 1
    mode = tracing.new_fake_mode()
    model_configs = [*configs, over] if over else list(configs)
    with (tracing.fake_process_group(world) if settings.fsdp else contextlib.nullcontext()) as mesh:
        model = tracing.build_fake_model(model_configs, mode, mesh, settings.param_dtype)
        module = config.get("model") or {}
        model.train()
        model.activation_checkpointing = settings.activation_checkpointing
        vision_args = ((config["model"]["model"].get("init_args") or {}).get("vision") or {}).get("init_args") or {}
        flash_vision = (vision_args.get("attn_implementation") == "flash_attention_2"
                        and tracing.use_flash_memory_model(model))
        tower = model.vision.tower.config
        segments = batch_segments or worst_case_layout(config, tower.patch_size, tower.spatial_merge_size)
        patch_dim = tower.in_channels * tower.temporal_patch_size * tower.patch_size ** 2
        batch = fake_batch(segments, model.backbone.config.vocab_size, patch_dim, mode)
        with mode:
            optimizer = build_optimizer(model.parameter_groups(), float(module.get("lr_new", 1e-4)),
                                        float(module.get("lr_pretrained", 1e-5)), float(module.get("weight_decay", 0.0)))
        flops = training_flops(model, batch)  # before the trace: a pure function of dims and layout
        out = tracing.trace_step(model, batch, optimizer, mode, settings.accumulate, fast)
        out["parameters_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)  # DTensor: global
        del model, optimizer
    tracing.release_fake_state()
    out["train_flops"] = int(flops)
    out["batch"] = {"text_tokens": batch.num_text_tokens, "image_tokens": int(batch.image_grid_thw.prod(-1).sum())
                    // tower.spatial_merge_size ** 2, "images": int(batch.image_grid_thw.shape[0]), "windows": 1}
    out["settings"] = {**dataclasses.asdict(settings), "world_size": world if settings.fsdp else 1}
    out["activation_checkpointing"] = settings.activation_checkpointing
    out["vision_attention"] = "flash-attn varlen memory model" if flash_vision else "as configured"
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


def isolated(fn, *args):
    """fn(*args) in a fresh process: one trace per process shares no fake state (the
    class-wide dispatch cache, a fake model's cycles) and returns its memory. The abort that
    first motivated it ("corrupted double-linked list", a second fake 2B model after an FSDP2
    trace) was the unsharded build's deep-copied fake modes (`tracing._deepcopy_keeps_fake_mode`),
    which crashed a fresh process too."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _total(configs: list, shapes, gpus: int | None) -> int:
    return predict(configs, shapes, gpus=gpus)["total"]


def largest_fitting_caps(configs: list, shapes, gpus: int | None, budget: int, first: dict,
                         probes: int = 3, tolerance: float = 0.03) -> dict[str, Any] | None:
    """When the config's caps do not fit: the largest text and image caps that do, both scaled
    by one factor (the config's ratio kept, as the paper shrank insertion's sequence), each
    candidate traced like the config itself. Secant steps on the traced peaks (memory grows
    about linearly with the caps), at most `probes` traces, stopping at a fitting candidate
    within `tolerance` of `budget`. -> {"max_text_tokens", "max_image_tokens", "scale",
    "peak_GiB", "probes"} of the largest traced candidate that fits (None if none did)."""
    from casa.rebuild import DataSettings

    data = DataSettings.from_config(load_configs(configs).get("data"))
    points = [(1.0, first["total"])]  # (scale, traced peak)
    best, tried = None, []
    for _ in range(probes):
        lo = max(((s, t) for s, t in points if t <= budget), default=(0.0, None), key=lambda p: p[0])
        hi = min(((s, t) for s, t in points if t > budget), key=lambda p: p[0])
        if lo[1] is None:  # nothing fits yet: the line through the origin and the smallest miss
            scale = hi[0] * budget / hi[1]
        else:
            scale = lo[0] + (hi[0] - lo[0]) * (budget - lo[1]) / (hi[1] - lo[1])
        scale *= 0.98  # aim just under the budget: a miss costs a probe
        text, image = max(1, int(data.max_text_tokens * scale)), max(1, int(data.max_image_tokens * scale))
        total = isolated(_total, [*configs, caps_override(text, image)], shapes, gpus)
        points.append((scale, total))
        tried.append({"scale": round(scale, 3), "max_text_tokens": text, "max_image_tokens": image,
                      "peak_GiB": round(total / GiB, 2), "fits": total <= budget})
        if total <= budget and (best is None or scale > best["scale"]):
            best = tried[-1]
        if total <= budget and total >= (1 - tolerance) * budget:
            break
    return None if best is None else {**best, "probes": tried}


STREAM_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""`--dtype` of the stream estimate: the inference precision (kyutai's benchmark runs bf16)."""


def stream_memory(configs: list, shapes, frames: int, traced: int = 3, tokens: int = 2, image_size: int | None = None,
                  budget: int | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Cached generation over a stream of frames (the paper's Fig. 5): the model (parameters
    in the run's precision) and its KV cache after each frame, on fake tensors. Frame i is
    one chunk (1 text token, its image in a new window, 1 text token) and `tokens` decoded
    tokens, as `Assistant.stream` feeds it, through the model's own cache
    (`casa.cache.KVCache.nbytes`). `traced` frames run; the cache grows by the same bytes every
    frame after the first (each frame appends the same tokens), so frame `frames` is the last
    traced one plus that growth. image_size: the frame's side in px (default: the data
    config's frame cap, as `Assistant.stream` caps a frame); dtype: of the weights and the
    cache ("bfloat16", "float16", "float32"; default: the run's precision, as `casa.assistant.load`
    restores it).

    budget (bytes, a GPU's memory): also the first frame (a turn of kyutai's benchmark: one
    frame + `tokens` tokens) after which weights + cache exceed it: where a session runs out
    of memory. The turn's own working set (one frame's prefill activations, attention without
    materialised scores on a GPU) is transient and below one frame's cache growth for
    insertion; kyutai's peak (max_memory_allocated) is weights + cache + it.
    -> {"per_frame_MiB", "weights_GiB", "at_frames_MiB": {frame: weights + cache},
        "out_of_memory_at_frame" (with budget; None: never, the cache does not grow), ...}."""
    from casa.assistant import frame_chunk
    from casa.cache import KVCache
    from casa.generation import text_chunk
    from casa.rebuild import HALF, DataSettings, run_precision

    if frames < 1 or traced < 2:
        raise ValueError(f"plan: --frames={frames} must be >= 1 (and traced={traced} >= 2)")
    if dtype is not None and dtype not in STREAM_DTYPES:
        raise ValueError(f"plan: --dtype={dtype!r} is not one of {list(STREAM_DTYPES)}")
    config = load_configs(configs)
    over = shapes_override(config, shapes)
    mode = tracing.new_fake_mode()
    model = tracing.build_fake_model([*configs, over] if over else list(configs), mode)
    precision = run_precision(config)
    if dtype is not None:
        precision, dtype = dtype, STREAM_DTYPES[dtype]
    else:
        dtype = HALF.get(precision.split("-")[0]) if precision.endswith("-true") else None
    with mode:
        if dtype is not None:  # `.data`, not `model.to`: swapping fake parameters fails (weakrefs)
            for p in model.parameters():
                p.data = p.data.to(dtype)
    model.eval()
    tower = model.vision.tower.config
    data = DataSettings.from_config(config.get("data"))
    frame_pixels = image_size ** 2 if image_size else min(data.max_pixels, data.frame_max_pixels)  # as Assistant.stream caps a frame
    merge = tower.spatial_merge_size
    side = max(merge, int(math.isqrt(frame_pixels) // tower.patch_size) // merge * merge)
    patch_dim = tower.in_channels * tower.temporal_patch_size * tower.patch_size ** 2
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cache, sizes = KVCache(1), []
    # the chunks' index tensors are made outside the fake mode (real), only the pixels are fake
    chunk = frame_chunk([1], [2], torch.zeros(side * side, 1), [[1, side, side]], merge=merge)
    with mode:
        chunk = dataclasses.replace(chunk, pixel_values=torch.empty(side * side, patch_dim, dtype=dtype or torch.float32))
    step = text_chunk([[3]], patch_dim=patch_dim)
    with torch.no_grad(), mode, tracing._real_indices_mode():
        for _ in range(min(traced, frames)):
            model.last_logits(chunk, cache=cache)
            for _ in range(tokens):
                model.last_logits(step, cache=cache, images_on_any_rank=False)
            sizes.append(cache.nbytes())
    del cache, model
    tracing.release_fake_state()
    growth = sizes[-1] - sizes[-2] if len(sizes) > 1 else 0
    at = lambda f: weights + (sizes[f - 1] if f <= len(sizes) else sizes[-1] + (f - len(sizes)) * growth)  # noqa: E731
    marks = sorted({1, 10, 100, frames} & set(range(1, frames + 1)))
    out = {"frame_px": side * tower.patch_size, "image_tokens_per_frame": side * side // tower.spatial_merge_size ** 2,
           "tokens_per_frame": tokens, "precision": precision, "weights_GiB": round(weights / GiB, 3),
           "per_frame_MiB": round(growth / MiB, 3), "cache_bytes_traced": sizes,
           "at_frames_MiB": {str(f): round(at(f) / MiB, 1) for f in marks}}
    if budget is not None:
        out["budget_GiB"] = round(budget / GiB, 2)
        out["out_of_memory_at_frame"] = out_of_memory_frame(weights, sizes, growth, budget)
    return out


def out_of_memory_frame(weights: int, sizes: list[int], growth: int, budget: int) -> int | None:
    """The first frame f (1-based) with weights + cache after f > budget, the cache growing by
    `growth` bytes per frame after the traced `sizes`; None if it never does (pure)."""
    for f, size in enumerate(sizes, 1):
        if weights + size > budget:
            return f
    if growth <= 0:
        return None
    return len(sizes) + (budget - weights - sizes[-1]) // growth + 1


MODES = {"none": "not sharded: one replica per GPU", "fsdp2": "FSDP2 (fully_shard per block), traced "
         "under FSDPMemTracker with a fake process group"}


def run(quick: bool, out_dir: str, config: list[str] | None = None, shapes: str | None = None, gpus: int | None = None,
        gpu_memory: str = "80GB", mfu: float = 0.4, gpu_tflops: float = H100_BF16_TFLOPS,
        max_text_tokens: int | None = None, max_image_tokens: int | None = None, max_pixels: int | None = None,
        frames: int | None = None, search: int = 3, steps: int | None = None, tokens_per_turn: int | None = None,
        image_size: int | None = None, dtype: str | None = None) -> dict[str, Any]:
    if not config:  # `bench all` plans the demo (tiny with --quick): the configs that build anywhere
        config = ["experiments/configs/demo.yaml"] + (["tests/configs/tiny.yaml"] if quick else [])
    if gpus is not None and gpus < 1:
        raise ValueError(f"plan: --gpus={gpus} must be >= 1")
    budget = parse_memory(gpu_memory)
    caps = caps_override(max_text_tokens, max_image_tokens, max_pixels)
    configs = [*config, caps] if caps else list(config)
    p = predict(configs, shapes, gpus=gpus)
    total, settings = p["total"], p["settings"]
    rows = [{"category": k, "GiB": round(v / GiB, 3), "MiB": round(v / MiB, 1)} for k, v in p["peak"].items()]
    groups = [{"module": k, "params_GiB": round(g["params"] / GiB, 3), "local_peak_GiB": round(g["local_peak"] / GiB, 3),
               "activations_GiB": round(g["activations_at_fw_peak"] / GiB, 3), "modules": g["modules"]}
              for k, g in p["groups"].items()]
    tokens = p["batch"]["text_tokens"] + p["batch"]["image_tokens"]
    speed = throughput(p["train_flops"], tokens, mfu, gpu_tflops)
    if steps:  # the run's optimizer steps: each is `accumulate` micro-batches per GPU
        speed["steps"] = steps
        speed["total_h"] = round(steps * settings["accumulate"] * speed["microbatch_s"] / 3600, 2)
    out = {"configs": [c if isinstance(c, str) else json.dumps(c) for c in configs], "shapes": shapes,
           "gpus": settings["world_size"], "gpu_memory_GiB": round(budget / GiB, 1),
           "sharding": MODES["fsdp2" if settings["fsdp"] else "none"], "param_dtype": settings["param_dtype"],
           "micro_batches_traced": p["micro_batches"], "accumulate_grad_batches": settings["accumulate"],
           "batch": p["batch"], "parameters_M": p["parameters_M"],
           "activation_checkpointing": p["activation_checkpointing"],
           "peak_GiB": round(total / GiB, 3), "fits": total <= budget, "throughput": speed,
           "peak": rows, "modules": groups}
    if total > budget and search > 0:
        out["largest_fitting_caps"] = largest_fitting_caps(configs, shapes, gpus, budget, p, probes=search)
    if frames:
        # a frame is a turn of kyutai's streaming benchmark: the frame, then tokens_per_turn tokens
        out["stream"] = isolated(stream_memory, configs, shapes, frames, 3, tokens_per_turn or 2, image_size, budget,
                                 dtype)
    return out
