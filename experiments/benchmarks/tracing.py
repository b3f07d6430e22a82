"""Fake execution for `experiments.bench plan`: a model and a training step on FakeTensors.

    build_fake_model(configs, mode, world_size, param_dtype) -> model   (FSDP2-sharded if world_size > 1)
    trace_step(model, batch, optimizer, mode, accumulate) -> peak split, per module group

Every tensor that touches a parameter is a FakeTensor (shape, dtype, no storage), so a 2B
model's step costs no memory; torch's memory trackers (`MemTracker`, and `FSDPMemTracker` for
a model sharded with FSDP2 over a fake process group, as torchtitan's memory estimator does)
see every tensor the real model code creates.

Three things make the real code run on fake tensors:
- `_real_indices_mode`: host-side index bookkeeping (boundaries, masks, `.tolist()`) runs on
  real tensors, everything else stays fake;
- `_FlashVarlenMemory`: flash-attn's varlen kernel (the paper configs' vision tower), absent
  on CPU, as its memory (saved q, k, v, output, log-sum-exp);
- `_ActiveModulePeaks`: torch's trackers visit every module they have seen on every op to
  update per-module peaks (`_update_peak_stats`): O(ops x modules), two thirds of a 2B trace.
  It visits only the modules currently running, with the same result.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

CATEGORIES = {"Parameter": "parameters", "Gradient": "gradients", "Optstate": "optimizer_state",
              "Activation": "activations", "Temp": "temporaries", "Buffer": "buffers", "Other": "other"}
"""MemTracker's reference types -> the names this suite reports."""
FSDP_CATEGORIES = {"Sharded Param": "parameters", "Unsharded Param": "unsharded_parameters",
                   "Sharded Grad": "gradients", "Unsharded Grad": "unsharded_gradients",
                   "OptState": "optimizer_state", "Activation": "activations", "Temp": "temporaries",
                   "All Gather": "all_gather", "Reduce Scatter": "reduce_scatter", "Buffer": "buffers",
                   "Inputs": "inputs"}
"""FSDPMemTracker's reference types -> the names this suite reports (sharded: this rank's shard;
unsharded: the all-gathered copies of the blocks running, and the accumulated gradients)."""


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


def new_fake_mode():
    """A FakeTensorMode taking real inputs (the batch's index tensors). FakeTensorMode's
    dispatch cache is class-wide: entries a previous trace left (outputs of ops on its real
    index tensors, since freed) crashed the next model build in the same process (segfault in
    `_output_from_cache_entry`), so every trace starts with an empty cache. That crash and
    `release_fake_state`'s predate `_deepcopy_keeps_fake_mode`: the bug it fixes corrupted the
    heap wherever it next struck, most likely theirs too. The clearing stays as hygiene."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    FakeTensorMode.cache_clear()
    return FakeTensorMode(allow_non_fake_inputs=True)


def release_fake_state() -> None:
    """After a trace: drop the fake dispatch cache and collect the fake model's reference
    cycles. Without it a real forward later in the same process segfaulted (after a cached
    generation traced on fake tensors, `stream_memory`)."""
    import gc

    from torch._subclasses.fake_tensor import FakeTensorMode

    FakeTensorMode.cache_clear()
    gc.collect()


# ---------------------------------------------------------------------- trackers
class _ActiveModulePeaks:
    """Mixin over torch's MemTracker / FSDPMemTracker: `_update_peak_stats`, run after every
    op, walks `memory_tracking` (every module seen so far, a WeakIdKeyDictionary) to update the
    modules that are running (`_mod_tracker.parents`). Same update, but looked up from the
    running modules' names: per op O(depth) instead of O(modules)."""

    def _stats_by_fqn(self) -> dict:
        n = len(self.memory_tracking)  # entries are only added, or all cleared (reset_mod_stats)
        if getattr(self, "_by_fqn_len", None) != n:
            self._by_fqn = {s.mod_fqn: s for s in self.memory_tracking.values()}
            self._by_fqn_len = n
        return self._by_fqn

    def _update_peak_stats(self, peak_state) -> None:
        from copy import deepcopy

        from torch.distributed._tools.mem_tracker import _TOTAL_KEY

        curr_snap = self._curr_mem_snap
        by_fqn = self._stats_by_fqn()
        for fqn in self._mod_tracker.parents:
            mod_stats = by_fqn.get(fqn)
            if mod_stats is None or peak_state not in mod_stats.snapshots:
                continue
            for dev, dev_snap in curr_snap.items():
                if mod_stats.local_peak.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    mod_stats.local_peak[dev] = dev_snap[_TOTAL_KEY]
                    mod_stats.snapshots[peak_state][-1][dev] = deepcopy(dev_snap)
        for dev, dev_snap in curr_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = deepcopy(dev_snap)


def make_tracker(model, optimizer, fast: bool = True):
    """-> a MemTracker for a plain model, an FSDPMemTracker for an FSDP2-sharded one (with
    `_ActiveModulePeaks` unless `fast=False`: the stock tracker, for the test comparing them)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    sharded = isinstance(model, FSDPModule)
    base = FSDPMemTracker if sharded else MemTracker
    cls = type(f"Fast{base.__name__}", (_ActiveModulePeaks, base), {}) if fast else base
    tracker = cls(model, optimizer) if sharded else cls()
    if not sharded:
        skip_frozen(tracker, model)
        tracker.track_external(model, optimizer)
    return tracker


def skip_frozen(tracker, model) -> None:
    """MemTracker hooks every parameter's gradient, and torch refuses a hook on a frozen one
    (the paper configs freeze most of the vision tower): a frozen parameter gets a no-op
    handle instead, which the tracker's `_param_to_grad_hook_handles` check then skips. Before
    every `with tracker:` (leaving it clears the handles)."""
    for p in model.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())


class _NoHook:
    """A hook handle with nothing to remove (see `make_tracker`)."""

    def remove(self) -> None:
        pass


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A fake process group of `world_size` ranks (this process is rank 0; collectives do no
    communication) and its 1-D CPU device mesh, as torchtitan's memory estimator sets it up."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("plan: a process group is already initialised; the planner makes its own fake one")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- model and step
@contextlib.contextmanager
def _deepcopy_keeps_fake_mode():
    """A parameter made inside a FakeTensorMode is a FakeTensor (flagged `_is_param`), not an
    `nn.Parameter`, so `copy.deepcopy` of a module holding it (the fusion layers copy their
    block's attention, `casa.fusion.layers.WindowAttention`) takes `Tensor.__deepcopy__`, which
    deep-copies the tensor's `__dict__` and with it its `fake_mode`: every copied parameter got
    its own copy of the FakeTensorMode and its converter's tables. Tearing those copies down
    corrupted the heap ("corrupted double-linked list" or a segfault when the model was freed:
    every CASA⊕ build at the 2B shapes, ~6% of tiny stream estimates, later in the process).
    Inside this context a FakeTensorMode deep-copies to itself, as the tensors it owns must."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    had = "__deepcopy__" in vars(FakeTensorMode)
    previous = vars(FakeTensorMode).get("__deepcopy__")
    FakeTensorMode.__deepcopy__ = lambda self, memo: self
    try:
        yield
    finally:
        if had:
            FakeTensorMode.__deepcopy__ = previous
        else:
            del FakeTensorMode.__deepcopy__


def build_fake_model(configs: list, mode, mesh=None, param_dtype: str | None = None):
    """The configs' model with fake parameters. Unsharded (`mesh` None): built inside `mode`
    (initialising fake weights costs no memory and ~1 s at 2B). Sharded: built on the meta
    device, sharded as training shards it (`casa.train.module.shard_model`), then materialised
    as fake CPU shards (torchtitan's order: FSDP2's lazy init re-pads fake CPU shards and
    fails, "tensor's device must be `meta`")."""
    from casa.rebuild import build_model
    from casa.train.module import shard_model  # not inside `mode`: importing lightning there breaks it

    with mode:
        if mesh is None:
            with _deepcopy_keeps_fake_mode():
                return build_model(configs)
        with torch.device("meta"):
            model = build_model(configs)
        shard_model(model, mesh, param_dtype)
        model.to_empty(device="cpu")
    return model


def _zero_grads_and_step(model, optimizer) -> None:
    """One optimizer step on zero gradients: creates the optimizer's state (Adam: exp_avg,
    exp_avg_sq, step) through the optimizer's own code, without a forward and backward."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trace_step(model, batch, optimizer, mode, accumulate: int = 1, fast: bool = True) -> dict[str, Any]:
    """Trace one steady-state optimizer step inside `mode` (a FakeTensorMode): the optimizer's
    state exists (a first step on zero gradients makes it), then `min(accumulate, 2)`
    micro-batches (the second stands for every later one: it runs with the previous ones'
    gradients held; under FSDP2 the last reduce-scatters, the earlier ones keep unsharded
    gradients, as `CasaModule.training_step` sets it), the optimizer step and `zero_grad`.
    -> {"peak": {category: bytes}, "total", "start": what is live before the step,
        "after_backward": what is live before the optimizer step (gradients complete),
        "groups": per module group {params, grads, local_peak, activations_at_fw_peak}}."""
    from torch.distributed.fsdp import FSDPModule

    sharded = isinstance(model, FSDPModule)
    names = FSDP_CATEGORIES if sharded else CATEGORIES
    tracker = make_tracker(model, optimizer, fast)
    # the batch exists before the step (the loader made it): live at its start, as `inputs`/`other`
    inputs = tuple(batch._tensors().values())
    tracker.track_inputs(inputs) if sharded else tracker.track_external(*inputs)
    micro = min(max(accumulate, 1), 2)
    with mode, _real_indices_mode():
        with tracker:
            _zero_grads_and_step(model, optimizer)
        if not sharded:
            skip_frozen(tracker, model)
        with tracker:  # entering resets the peak: it is this step's
            start = next(iter(tracker.get_tracker_snapshot("current").values()))
            for i in range(micro):
                tracker.reset_mod_stats()  # the trackers refuse a root module's second forward otherwise
                if sharded:
                    model.set_requires_gradient_sync(i == micro - 1)
                (model(batch).loss / micro).backward()
            after_backward = next(iter(tracker.get_tracker_snapshot("current").values()))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    split = _split(peak, names)
    out = {"peak": split, "total": int(peak.get("Total", sum(split.values()))),
           "start": _split(start, names), "after_backward": _split(after_backward, names),
           "micro_batches": micro}
    groups = {}
    for name, mods in module_groups(model).items():
        params = [p for m in mods for p in m.parameters()]
        # FSDPMemTracker follows FSDP units only (vision blocks, decoder blocks, the root)
        stats = [tracker.memory_tracking[sub] for m in mods for sub in m.modules() if sub in tracker.memory_tracking]
        local = max((max(s.local_peak.values(), default=0) for s in stats), default=0)
        fw = [snap for s in stats for state, snaps in s.snapshots.items() if _key(state) in ("Peak-Forward", "Peak Forward")
              for snap in snaps]
        act = max((int(sum(v for k, v in next(iter(s.values())).items() if _key(k) == "Activation")) for s in fw),
                  default=0)
        groups[name] = {"modules": len(mods), "params": _local_bytes(params),
                        "grads": _local_bytes([p for p in params if p.requires_grad]), "local_peak": int(local),
                        "activations_at_fw_peak": act}
    out["groups"] = groups
    return out


def _key(k) -> str:
    return getattr(k, "value", k)  # FSDPMemTracker's keys are enums


def _split(snapshot: dict, names: dict[str, str]) -> dict[str, int]:
    """A tracker snapshot {reference type: bytes} -> {our category name: bytes}."""
    split = {name: 0 for name in names.values()}
    for k, v in snapshot.items():
        if _key(k) in names:
            split[names[_key(k)]] += int(v)
    return split


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


def _local_bytes(params) -> int:
    """Bytes this rank holds: a DTensor's local shard, a plain tensor whole."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in params)
