"""`python -m experiments.bench plan`: the traced peak of a training step, checked against
the peak the profiler measures on the real step (as `experiments.bench layer` measures)."""

from __future__ import annotations

import json

import pytest
import torch

from experiments import bench, strategies
from experiments.benchmarks import measure, plan, tracing

TINY = ["experiments/configs/demo.yaml", "tests/configs/tiny.yaml"]


@pytest.mark.parametrize("name", ["insertion", "casa_plus"])
def test_traced_peak_matches_the_measured_step_within_5_percent(name):
    """Per strategy: the planner's prediction (peak over what is live at the step's start,
    fake tensors only) equals the profiler's allocation peak of the same real step (after a
    warm-up step, so Adam's state exists in both) within 5%."""
    _check_traced_peak(TINY + [str(strategies.strategy(name).path)], name)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["tiny", "demo"])
@pytest.mark.parametrize("name", strategies.names())
def test_every_strategy_of_the_matrix_is_traced_within_5_percent(name, base):
    """The same check over the whole strategy matrix, on the tiny and on the demo config
    (`make test-all`; about 10-20 s each)."""
    _check_traced_peak((TINY if base == "tiny" else TINY[:1]) + [str(strategies.strategy(name).path)], name)


ADAM_BOUND = {"model": {"model": {"init_args": {"backbone": {"init_args": {"config": dict(
    vocab_size=16384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)}}}}},
    "data": {"init_args": {"max_text_tokens": 8, "max_image_tokens": 4}}}
"""Many parameters, few activations: the tiny model with a 16,384-row embedding and head (4 MiB
each, most of the parameters) on a 12-token batch."""


def test_adams_step_sets_the_peak_of_a_many_parameter_few_token_step():
    """Where Adam's step, not the backward, sets the peak (measured: without `opt.step()` the
    real step's peak is below 60 % of it): its update's temporaries (sqrt(exp_avg_sq) and the
    denominator, each the size of the parameter being updated) come on top of every gradient.
    The traced peak matches the measured one within 5 %, which it cannot if
    `tracing.trace_step` leaves `optimizer.step()` out of its traced block."""
    configs = TINY + [str(strategies.strategy("insertion").path), ADAM_BOUND]
    run = _check_traced_peak(configs, "insertion")
    head = run["model"].backbone.lm_head.weight
    after_backward = sum(run["predicted"]["after_backward"].values())
    assert run["predicted"]["total"] - after_backward >= head.numel() * head.element_size()  # the step's own peak

    def without_update():
        run["model"](run["batch"]).loss.backward()
        run["opt"].zero_grad(set_to_none=True)

    without = measure.peak_memory(without_update, torch.device("cpu"), rss=False)["alloc_bytes"]
    assert without < 0.6 * run["measured"], (without, run["measured"])


def _check_traced_peak(configs: list, name: str) -> dict:
    from casa.rebuild import build_model
    from casa.tiny import random_packed_batch
    from casa.train.optim import build_optimizer

    predicted = plan.predict(configs)
    extra = predicted["total"] - sum(predicted["start"].values())

    torch.manual_seed(0)
    model = build_model(configs).train()
    batch = random_packed_batch([plan.worst_case_layout(plan.load_configs(configs))], vocab_size=160)
    opt = build_optimizer(model.parameter_groups(), 1e-4, 1e-5)

    def step():
        model(batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    measured = measure.peak_memory(step, torch.device("cpu"), rss=False)["alloc_bytes"]
    assert abs(extra - measured) <= 0.05 * measured, (name, extra, measured)
    # the split adds up, and what the step holds at rest is what the model and Adam hold
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert predicted["start"]["parameters"] == params
    assert predicted["start"]["optimizer_state"] >= 2 * params  # exp_avg, exp_avg_sq (+ step counters)
    assert predicted["total"] == sum(predicted["peak"].values())
    return {"predicted": predicted, "measured": measured, "model": model, "batch": batch, "opt": opt}


def test_worst_case_layout_fills_the_caps():
    layout = plan.worst_case_layout({"data": {"init_args": {"max_text_tokens": 2048, "max_image_tokens": 20480,
                                                            "max_pixels": 802816}}})
    images = [s for s in layout if s[0] == "image"]
    assert images == [("image", (64, 64))] * 20 and layout[-1] == ("text", 2048)  # 896 px = 64 patches
    odd = plan.worst_case_layout({"data": {"init_args": {"max_text_tokens": 8, "max_image_tokens": 20,
                                                         "max_pixels": 3136}}})
    assert odd == [("image", (4, 4))] * 5 + [("text", 8)]  # 56 px: 4 x 4 patches = 4 tokens, 5 images


def test_missing_checkpoint_without_shapes_names_the_field():
    config = plan.load_configs(["experiments/configs/paper/helium_casa_plus.yaml"])
    with pytest.raises(ValueError, match=r"backbone.init_args.path='checkpoints/helium-1-2b'.*--shapes"):
        plan.shapes_override(config, None)


def test_gpu_memory_sizes():
    assert plan.parse_memory("80GB") == 80 * 2 ** 30 and plan.parse_memory("512MiB") == 512 * 2 ** 20
    with pytest.raises(ValueError, match="--gpu-memory='lots'"):
        plan.parse_memory("lots")


def test_cli_prints_one_json_object_with_the_split(tmp_path, capsys):
    assert bench.main(["plan", "--config", TINY[0], "--config", TINY[1], "--gpu-memory", "1MB", "--json", "--search", "0",
                       "--out-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    cats = {r["category"] for r in out["peak"]}
    assert {"parameters", "gradients", "optimizer_state", "activations", "temporaries"} <= cats
    assert {r["module"] for r in out["modules"]} == {"vision tower", "fused blocks", "SA blocks", "head"}
    assert out["fits"] is False and out["batch"] == {"text_tokens": 256, "image_tokens": 256, "images": 64,
                                                     "windows": 1}


def test_a_frozen_vision_tower_is_traced():
    """MemTracker hooks every parameter's gradient and torch refuses a hook on a frozen one:
    the paper configs freeze most of the tower (`trainable_blocks: 4`)."""
    frozen = {"model": {"model": {"init_args": {"vision": {"init_args": {"freeze": True, "trainable_blocks": 1}}}}}}
    out = plan.predict(TINY + [frozen])
    tower = out["groups"]["vision tower"]
    assert 0 < tower["grads"] < tower["params"]


def test_flash_vision_is_traced_as_one_varlen_call(monkeypatch):
    """A config asking for flash-attn in the tower (the paper's) is built with sdpa and traced
    through the varlen memory model, one call per block, not a Python loop per window."""
    calls = []
    original = tracing._FlashVarlenMemory.apply
    monkeypatch.setattr(tracing._FlashVarlenMemory, "apply", lambda *a: calls.append(a[0].shape) or original(*a))
    flash = {"model": {"model": {"init_args": {"vision": {"init_args": {"attn_implementation": "flash_attention_2"}}}}}}
    out = plan.predict(TINY + [flash])
    assert out["vision_attention"] == "flash-attn varlen memory model"
    assert len(calls) == 2  # 2 blocks, one traced micro-batch; q: [1, heads, all patches, head_dim]
    assert calls[0][2] == 64 * 16


def test_throughput_is_the_analytic_count_of_the_traced_batch(tmp_path, capsys):
    """The planner's FLOPs are casa.flops' count of the same model and worst-case batch, built
    for real here; step time and tokens/s follow at the assumed MFU."""
    from casa.flops import training_flops
    from casa.rebuild import build_model
    from casa.tiny import random_packed_batch

    configs = TINY + [str(strategies.strategy("casa_plus").path)]
    predicted = plan.predict(configs)
    model = build_model(configs).train()
    batch = random_packed_batch([plan.worst_case_layout(plan.load_configs(configs))], vocab_size=160)
    assert predicted["train_flops"] == training_flops(model, batch) > 0
    t = plan.throughput(predicted["train_flops"], 512, mfu=0.5, gpu_tflops=100.0)
    assert t["microbatch_s"] == pytest.approx(predicted["train_flops"] / 50e12, rel=1e-3)
    assert t["tokens_per_s_per_gpu"] == pytest.approx(512 / t["microbatch_s"], rel=1e-3)
    with pytest.raises(ValueError, match="--mfu=0"):
        plan.throughput(1, 1, mfu=0, gpu_tflops=1.0)


def test_without_a_config_the_demo_is_planned(tmp_path):
    """`python -m experiments.bench all` runs every suite without options: `plan` then plans
    the demo config (its caps: 512 text, 1024 image tokens) instead of failing."""
    out = plan.run(quick=False, out_dir=str(tmp_path))
    assert out["configs"] == ["experiments/configs/demo.yaml"]
    assert out["batch"]["text_tokens"] == 512 and out["batch"]["image_tokens"] == 1024 and out["fits"]


FSDP2 = {"trainer": {"strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"},
                     "accumulate_grad_batches": 2},
         "model": {"activation_checkpointing": True, "fsdp_param_dtype": "bfloat16"}}
"""The H100 recipe's training settings (trainer/fsdp2_h100.yaml) on the tiny model."""


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor: its local shard's)."""
    seen = {}
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        st = local.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _sharded_step(rank: int, init: str, configs: list, out) -> None:
    """One rank of the real run: the tiny model sharded as training shards it, bf16 compute,
    activation checkpointing, two accumulated micro-batches (the first without gradient sync,
    as CasaModule.training_step), Adam; one step to create Adam's state, then the measured one.
    Rank 0 saves the bytes it holds: parameter shards, gradient shards, Adam's state."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from casa.rebuild import build_model
    from casa.tiny import random_packed_batch
    from casa.train.module import shard_model
    from casa.train.optim import build_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = build_model(configs).train()
        model.activation_checkpointing = True
        shard_model(model, init_device_mesh("cpu", (2,)), "bfloat16")
        opt = build_optimizer(model.parameter_groups(), 1e-4, 1e-5)
        batch = random_packed_batch([plan.worst_case_layout(plan.load_configs(configs))], vocab_size=160)
        sizes = {}
        for step in range(2):
            for i in range(2):
                model.set_requires_gradient_sync(i == 1)
                (model(batch).loss / 2).backward()
            sizes["gradients"] = _storage_bytes([p.grad for p in model.parameters() if p.grad is not None])
            opt.step()
            opt.zero_grad(set_to_none=True)
        sizes["parameters"] = _storage_bytes(list(model.parameters()))
        sizes["optimizer_state"] = _storage_bytes([v for s in opt.state.values() for v in s.values()
                                                   if isinstance(v, torch.Tensor)])
        if rank == 0:
            torch.save(sizes, out)
        dist.barrier()  # both ranks done with every collective before either tears gloo down
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp2_prediction_holds_the_real_shard_sizes(tmp_path):
    """Under FSDP2 on 2 gloo processes (bf16 compute, fp32 reduction, activation checkpointing,
    gradient accumulation), the planner's per-rank parameters, gradients (after the backward)
    and Adam state (traced with a fake process group of 2) are the bytes rank 0 really holds."""
    configs = TINY + [str(strategies.strategy("casa_plus").path), FSDP2]
    predicted = plan.predict(configs, gpus=2)
    assert predicted["settings"]["fsdp"] and predicted["settings"]["world_size"] == 2
    assert predicted["micro_batches"] == 2
    out = tmp_path / "sizes.pt"
    torch.multiprocessing.spawn(_sharded_step, args=(f"file://{tmp_path / 'pg'}", configs, out), nprocs=2)
    real = torch.load(out)
    assert predicted["start"]["parameters"] == real["parameters"]
    assert predicted["start"]["optimizer_state"] == real["optimizer_state"]
    assert predicted["after_backward"]["gradients"] == real["gradients"]
    # half the replica's parameters each (up to dim-0 padding)
    from casa.rebuild import build_model

    whole = sum(p.numel() * p.element_size() for p in build_model(configs).parameters())
    assert 0.45 * whole < real["parameters"] < 0.6 * whole


def test_fast_tracker_gives_the_stock_trackers_numbers():
    """`_ActiveModulePeaks` (per-module peaks looked up from the running modules) against
    torch's own MemTracker on the same step: the same peak, split and per-group peaks."""
    configs = TINY + [str(strategies.strategy("casa_plus").path)]
    fast, stock = plan.predict(configs, fast=True), plan.predict(configs, fast=False)
    assert fast["peak"] == stock["peak"] and fast["groups"] == stock["groups"]
    assert fast["groups"]["fused blocks"]["local_peak"] > 0


def test_largest_fitting_caps_are_traced_and_fit():
    """A budget between the traced peaks at half and at full caps: the search returns caps
    below the config's whose own trace fits, and the config's caps do not."""
    configs = TINY + [str(strategies.strategy("casa_plus").path)]
    full = plan.predict(configs)["total"]
    half = plan.predict(configs + [plan.caps_override(128, 128)])["total"]
    budget = (full + half) // 2
    out = plan.run(quick=False, out_dir="", config=configs, gpu_memory=f"{budget / 2 ** 20}MB", search=3)
    assert out["fits"] is False
    best = out["largest_fitting_caps"]
    assert 128 <= best["max_text_tokens"] < 256 and 128 <= best["max_image_tokens"] < 256
    again = plan.predict(configs + [plan.caps_override(best["max_text_tokens"], best["max_image_tokens"])])["total"]
    assert again <= plan.parse_memory(f"{budget / 2 ** 20}MB") < full


@pytest.mark.parametrize("name", ["casa_plus", "cross_attention"])
def test_a_fake_model_with_copied_layers_has_one_fake_mode(name):
    """The fusion layers deep-copy their block's attention; built fake, the copies' parameters
    must belong to the one FakeTensorMode, not to deep copies of it, whose teardown corrupted
    the heap (`tracing._deepcopy_keeps_fake_mode`). Outside the build, deepcopy is torch's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = tracing.new_fake_mode()
    model = tracing.build_fake_model(TINY + [str(strategies.strategy(name).path)], mode)
    params = list(model.parameters())
    assert len({id(p.fake_mode) for p in params}) == 1 and params[0].fake_mode is mode
    assert "__deepcopy__" not in vars(FakeTensorMode)
    del model, params
    tracing.release_fake_state()


@pytest.mark.parametrize("name", ["casa_plus", "insertion"])
def test_stream_memory_is_the_real_cache_after_f_frames(name):
    """The planner's weights + KV cache after F frames (3 traced on fake tensors, then the
    per-frame growth) equal the real model's after F real frames through the same chunks."""
    from casa.assistant import frame_chunk
    from casa.cache import KVCache
    from casa.generation import text_chunk
    from casa.rebuild import build_model

    configs = TINY + [str(strategies.strategy(name).path)]
    frames = 6
    # in a fresh process, as the CLI runs it (`plan.isolated`)
    out = plan.isolated(plan.stream_memory, configs, None, frames)
    model = build_model(configs).eval()
    side = out["frame_px"] // 14
    cache = KVCache(1)
    with torch.no_grad():
        for _ in range(frames):
            model.last_logits(frame_chunk([1], [2], torch.randn(side * side, 1176), [[1, side, side]]), cache=cache)
            for _ in range(2):
                model.last_logits(text_chunk([[3]]), cache=cache, images_on_any_rank=False)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert out["at_frames_MiB"][str(frames)] == round((weights + cache.nbytes()) / 2 ** 20, 1)
    assert out["per_frame_MiB"] > 0


def test_out_of_memory_frame_is_the_first_frame_over_budget():
    """Weights 10 + a cache of 5 bytes per frame: over 40 bytes first after frame 7 (10 + 35);
    a budget the traced frames already exceed; a cache that does not grow never runs out."""
    assert plan.out_of_memory_frame(10, [5, 10, 15], 5, 40) == 7
    assert plan.out_of_memory_frame(10, [5, 10, 15], 5, 45) == 8  # 10 + 35 == 45 still fits
    assert plan.out_of_memory_frame(10, [5, 10, 15], 5, 22) == 3
    assert plan.out_of_memory_frame(10, [5, 5, 5], 0, 40) is None
