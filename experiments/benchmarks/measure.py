"""How the benchmarks measure: median wall time after warm-up, and peak memory.

Time: `time_call` runs `fn` `warmup` times unmeasured (first-call allocations, oneDNN
kernel selection, lazy optimiser state), then `repeats` times, and reports medians of
wall time and of process CPU time. Ratios use `time_s`: CPU time on CPU with one torch
thread (immune to waiting for a core on a shared machine), wall time otherwise; see
`time_basis`. On CUDA every call is bracketed by `torch.cuda.synchronize()`.

Memory: `peak_memory` reports the peak *extra* bytes of one call, over what was alive
before it (weights, inputs, caches built outside the call):

    device  "alloc_bytes"                                  "rss_bytes" (CPU only)
    cuda    torch.cuda.max_memory_allocated() - allocated   -
    cpu     running sum of the torch profiler's [memory]    VmHWM - VmRSS around the call,
            events (every allocation and free made by        after malloc_trim(0), with the
            torch's CPU allocator, in order)                 high-water mark reset through
                                                             /proc/self/clear_refs

Why two CPU numbers. `alloc_bytes` is what the paper reports ("total max memory
allocated", PyTorch profiler) and what CUDA's counter measures: the bytes tensors ask
for, deterministic and independent of the allocator. It does not see the allocator
itself: glibc rounds to pages, keeps freed chunks in its arenas and serves big blocks
with mmap. `rss_bytes` is what the process really took from the OS, allocator included.
A plain RSS reading would be wrong after the first case (freed memory stays in glibc's
arenas and is reused without raising RSS, and the high-water mark never goes down);
`malloc_trim(0)` hands the cached memory back first and the `clear_refs` write resets
the high-water mark to the current RSS, so each call is measured from a clean baseline
in the same process, without a subprocess per case. tracemalloc is no use here: it only
sees Python's allocator, not torch's. The two agree within a few percent on tensors of
a MiB or more (tests/test_bench.py); ratios in the docs use `alloc_bytes`, so that CPU
and GPU runs report the same quantity.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from callbacks.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

MiB = 2 ** 20


# ---------------------------------------------------------------------- device
def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu' / 'cuda' / 'cuda:1' -> torch.device, failing early when CUDA is not there."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r} must be 'cpu' or 'cuda[:i]'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: CUDA is not available on this machine")
    return dev


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- time
def time_basis(device: torch.device) -> str:
    """Which clock the ratios use: "cpu" (process CPU time) on CPU with one torch thread,
    "wall" otherwise.

    With one thread, the CPU time of a call is its compute time whatever else runs on the
    machine, while its wall time also counts the waits for a core (on this project's shared
    two-core machines wall times of the same call vary 2x between runs). With several
    threads CPU time would add the OpenMP spin-waits, and on CUDA the work is on the GPU:
    there the wall clock (with synchronisation) is the measure."""
    return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Time `fn()` after `warmup` unmeasured calls -> {"time_s" (median on the `time_basis`
    clock), "wall_s", "cpu_s" (medians), "min_wall_s", "repeats", "basis"}."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_call: repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    for _ in range(warmup):
        fn()
    synchronize(device)
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    basis = time_basis(device)
    out = {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "min_wall_s": min(wall),
           "repeats": repeats, "basis": basis}
    out["time_s"] = out["cpu_s"] if basis == "cpu" else out["wall_s"]
    return out


# ---------------------------------------------------------------------- memory
def _malloc_trim() -> bool:
    """Hand glibc's cached free memory back to the OS, so RSS starts from live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc: no RSS reading (it would not start clean)
        return False


def _profiler_peak(fn: Callable[[], Any]) -> int:
    """Peak of the running sum of torch's CPU allocation events during `fn()`."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the profiler warns about unrelated kineto settings
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def peak_memory(fn: Callable[[], Any], device: torch.device, rss: bool = True) -> dict[str, int]:
    """Peak extra memory of one call of `fn` (see the module docstring).

    -> {"alloc_bytes"} (+ {"rss_bytes"} on CPU when `rss`). One call gives both: the RSS
    high-water mark is read around the profiled call (the profiler's own bookkeeping is a
    few hundred bytes per op, negligible next to the tensors). Call it after `fn` has been
    warmed up, so one-time allocations (optimiser state, kernel caches) are not counted."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return {"alloc_bytes": int(torch.cuda.max_memory_allocated(device) - base),
                "reserved_bytes": int(torch.cuda.max_memory_reserved(device))}
    rss = rss and _malloc_trim() and reset_peak_rss()
    base = rss_bytes()
    out = {"alloc_bytes": int(_profiler_peak(fn))}
    if rss:
        out["rss_bytes"] = int(max(peak_rss_bytes() - base, 0))
    return out


def cache_cpu_allocations() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS, as CUDA's
    caching allocator does: no mmap for big blocks (M_MMAP_MAX=0) and no trimming of the
    heap top (M_TRIM_THRESHOLD max). Without it every tensor above glibc's mmap threshold
    (32 MiB at most) is a fresh mmap whose pages fault in on first touch, on every step:
    measured on this machine, 1.4 s of system time per CASA⊕ layer step out of 5, more for
    insertion, which allocates more. Process-wide and permanent; returns False off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 2 ** 31 - 1))  # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------- profile
def profile_table(fn: Callable[[], Any], device: torch.device, row_limit: int = 12, memory: bool = False) -> str:
    """torch.profiler table of one call: where the time goes (ops by self time), or with
    `memory` where the memory goes (ops and input shapes by bytes they allocate)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=acts, profile_memory=memory, record_shapes=memory) as prof:
            fn()
            synchronize(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    if memory:
        return prof.key_averages(group_by_input_shape=True).table(
            sort_by=f"self_{kind}_memory_usage", row_limit=row_limit, max_name_column_width=28,
            max_shapes_column_width=44)
    return prof.key_averages().table(sort_by=f"self_{kind}_time_total", row_limit=row_limit,
                                     max_name_column_width=48)


# ---------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a results table must name: machine, date, torch version, device."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"date": _dt.date.today().isoformat(), "cpu": cpu_model(), "cores": cores,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------- plots
def save_figure(fig, out_dir: str | Path, name: str) -> str:
    """Write `fig` as out_dir/name.png (Agg, no display needed) and close it -> the path."""
    import matplotlib.pyplot as plt

    path = Path(out_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not fig.legends:  # a figure-level legend keeps the space its suite made for it
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def pyplot():
    """matplotlib.pyplot on the Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
