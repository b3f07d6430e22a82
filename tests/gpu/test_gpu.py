"""The GPU lane: the real CUDA kernels and the H100 recipe's pieces on one GPU.

    make test-gpu          (tests/gpu/run.py: a one-line skip without CUDA, else these tests + a table)

Needs the CUDA build of torch and, for the flash checks, `pip install -e ".[cuda]"`
(flash-attn); without flash-attn those checks are skipped with that reason and the rest run.
Every check is a function of `tests/gpu/checks.py`; tests/gpu/test_lane_on_cpu.py runs the
same functions on CPU in the default suite.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.gpu import checks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")]

FLASH = importlib.util.find_spec("flash_attn") is not None
needs_flash = pytest.mark.skipif(not FLASH, reason='flash-attn is not installed (pip install -e ".[cuda]")')
# every layout with the GQA heads, and the CASA windows at Helium-1 2B's heads (16 over 8, D = 128)
CASES = [(layout, "gqa") for layout in checks.LAYOUTS] + [("casa_windows", "helium")]
IDS = [f"{layout}-{heads}" for layout, heads in CASES]


@needs_flash
@pytest.mark.parametrize("layout, heads", CASES, ids=IDS)
def test_flash_attn_varlen_func_matches_dense(layout, heads, record_property):
    from flash_attn import flash_attn_varlen_func

    record_property("result", checks.check_attention(checks.flash_varlen_kernel(flash_attn_varlen_func), layout,
                                                     heads, torch.bfloat16, "cuda"))


@needs_flash
@pytest.mark.parametrize("layout, heads", CASES, ids=IDS)
def test_flash_backend_matches_dense(layout, heads, record_property):
    """casa's `flash` backend: the same kernel through `varlen_attention`'s plumbing."""
    record_property("result", checks.check_attention(checks.varlen_kernel("flash"), layout, heads, torch.bfloat16,
                                                     "cuda"))


@needs_flash
def test_flash_attn_with_kvcache_matches_dense(record_property):
    import flash_attn

    if not hasattr(flash_attn, "flash_attn_with_kvcache"):
        pytest.skip(f"flash-attn {flash_attn.__version__} has no flash_attn_with_kvcache")
    record_property("result", checks.check_kvcache(flash_attn.flash_attn_with_kvcache, torch.bfloat16, "cuda"))


@pytest.mark.parametrize("layout, heads", CASES, ids=IDS)
def test_compiled_flex_matches_dense(layout, heads, record_property):
    """casa's `flex` backend, which on CUDA runs `torch.compile(flex_attention)`."""
    record_property("result", checks.check_attention(checks.varlen_kernel("flex"), layout, heads, torch.bfloat16,
                                                     "cuda"))


def test_fsdp2_bf16_training_step(tmp_path, record_property):
    backend = "flash" if FLASH else "sdpa"
    record_property("result", checks.fsdp2_step(tmp_path, "gpu", backend, "bfloat16"))


@needs_flash
def test_host_syncs_per_step_do_not_grow_with_layers(record_property):
    record_property("result", checks.check_syncs_per_step(
        lambda n: checks.tiny_train_step(n, "flash", "cuda", torch.bfloat16), checks.count_cuda_syncs))


def test_casa_plus_layer_peak_memory(record_property):
    torch.cuda.empty_cache()
    record_property("result", checks.layer_peak_memory("cuda", torch.bfloat16))
