"""How the benchmarks measure: median time after warm-up, and peak memory.

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
for, deterministic and independent of the allocator, so CPU and GPU runs report the
same quantity; the ratios use it. `rss_bytes` is what the process took from the OS,
allocator included (page rounding, fragmentation of glibc's heap, its bookkeeping), the
CPU analogue of CUDA's reserved memory. A plain RSS reading would be wrong after the
first case: freed memory stays in glibc's arenas and is reused without raising RSS, and
the high-water mark never goes down. `malloc_trim(0)` hands the cached memory back first
and the `clear_refs` write resets the high-water mark, so each call is measured from a
clean baseline in the same process, with no subprocess per case. tracemalloc is no use
here: it only sees Python's allocator, not torch's. On a known allocation pattern the two
agree (tests/test_bench.py); on the big cases RSS is higher by the heap's fragmentation.

Allocator: the torch suites run inside `cached_cpu_allocations`, which makes glibc keep
freed blocks for reuse, as CUDA's caching allocator does, instead of mmap-ing and
page-faulting every big tensor anew on every step.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

from casa.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

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


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """-> (wall, process CPU) seconds of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - w0, time.process_time() - c0


def _summary(wall: list[float], cpu: list[float], device: torch.device) -> dict[str, Any]:
    basis = time_basis(device)
    out = {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "min_wall_s": min(wall),
           "repeats": len(wall), "basis": basis}
    out["time_s"] = out["cpu_s"] if basis == "cpu" else out["wall_s"]
    return out


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Time `fn()` after `warmup` unmeasured calls -> {"time_s" (median on the `time_basis`
    clock), "wall_s", "cpu_s" (medians), "min_wall_s", "repeats", "basis"}."""
    return time_interleaved({"fn": fn}, device, repeats, warmup)["fn"]


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 5,
                     warmup: int = 1) -> dict[str, dict[str, Any]]:
    """`time_call` for several functions, their repeats taken in turn (a, b, c, a, b, c, ...)
    so that a slow spell of the machine hits them all alike -> {name: timing}."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_interleaved: repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_timed(fn, device))
    return {name: _summary([w for w, _ in s], [c for _, c in s], device) for name, s in samples.items()}


# ---------------------------------------------------------------------- memory
def _malloc_trim() -> bool:
    """Hand glibc's cached free memory back to the OS, so RSS starts from live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc: no RSS reading (it would not start clean)
        return False


@contextmanager
def _quiet_fd2():
    """Silence file descriptor 2: kineto prints a line to stderr from C++ at every profiler
    start and stop, which no logging setting reaches."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def profiled(fn: Callable[[], Any], device: torch.device, **kwargs):
    """Run `fn()` under torch.profiler (CPU, + CUDA on a GPU) -> the profile. Only the
    profiler's own start and stop are silenced, not `fn`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts, **kwargs)
    with warnings.catch_warnings(), _quiet_fd2():
        warnings.simplefilter("ignore")  # the profiler warns about unrelated kineto settings
        prof.start()
    try:
        fn()
        synchronize(device)
    finally:
        with warnings.catch_warnings(), _quiet_fd2():
            warnings.simplefilter("ignore")
            prof.stop()
    return prof


def _profiler_peak(fn: Callable[[], Any]) -> int:
    """Peak of the running sum of torch's CPU allocation events during `fn()` (read from
    `kineto_results`, the raw events behind `key_averages`, which only keeps per-op totals)."""
    prof = profiled(fn, torch.device("cpu"), profile_memory=True)
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


@contextmanager
def cached_cpu_allocations():
    """Inside: glibc keeps freed memory for reuse instead of returning it to the OS, as
    CUDA's caching allocator does: no mmap for big blocks (M_MMAP_MAX=0), no trimming of
    the heap top (M_TRIM_THRESHOLD max). Without it every tensor above glibc's mmap
    threshold is a fresh mmap whose pages fault in on first touch, on every step: measured
    here, 1.4 s of system time in a 5 s CASA⊕ layer step, and more for insertion, which
    allocates more. On exit big blocks are mmap-ed again (threshold left at its 128 KiB
    default), so freed tensors go back to the OS and RSS follows live memory. No-op off glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    try:
        yield
    finally:
        _malloc_trim()
        mallopt(M_MMAP_MAX, 65536)  # glibc's defaults
        mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        mallopt(M_TRIM_THRESHOLD, 128 * 1024)


# ---------------------------------------------------------------------- profile
def profile_table(fn: Callable[[], Any], device: torch.device, row_limit: int = 12, memory: bool = False) -> str:
    """torch.profiler table of one call: where the time goes (ops by self time), or with
    `memory` where the memory goes (ops and input shapes by bytes they allocate)."""
    prof = profiled(fn, device, profile_memory=memory, record_shapes=memory)
    kind = "cuda" if device.type == "cuda" else "cpu"
    if memory:
        return prof.key_averages(group_by_input_shape=True).table(
            sort_by=f"self_{kind}_memory_usage", row_limit=row_limit, max_name_column_width=28,
            max_shapes_column_width=44)
    return prof.key_averages().table(sort_by=f"self_{kind}_time_total", row_limit=row_limit,
                                     max_name_column_width=48)


# ---------------------------------------------------------------------- flops
def _register_cpu_flash_flops() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels, not the CPU flash kernel: same formulas."""
    from torch.utils import flop_counter as fc

    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd not in fc.flop_registry:
        fc.register_flop_formula(fwd)(
            lambda q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_flop_count(q, k, v))
    if bwd not in fc.flop_registry:
        fc.register_flop_formula(bwd)(
            lambda g, q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_backward_flop_count(g, q, k, v))


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of `fn` (matmuls and attention, forward and
    backward; elementwise work is not counted): the FLOP-proportional floor of its time."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_flash_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


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
