"""Benchmarks: the measuring helpers against known allocations, every suite's --quick smoke
run (keys present, values finite and positive; no timing assertions), the dispatcher."""

from __future__ import annotations

import json
import math

import pytest
import torch

from experiments import bench, strategies
from experiments.benchmarks import measure

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    # two OpenMP threads on two cores shared with other jobs wait on each other: 1 is faster here
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------------- measure
def test_peak_memory_sees_a_known_allocation_pattern():
    mib = 2 ** 20

    def fn():
        a = torch.ones(16 * mib // 4)  # 16 MiB
        b = torch.ones(8 * mib // 4)  # 8 MiB, both alive: peak 24 MiB
        del a
        c = torch.ones(4 * mib // 4)  # 12 MiB alive now, below the peak
        return float(b[0] + c[0])

    fn()
    m = measure.peak_memory(fn, CPU)
    assert m["alloc_bytes"] == pytest.approx(24 * mib, rel=0.01)
    # RSS sees the same peak through the allocator (page rounding, arena bookkeeping)
    assert m["rss_bytes"] == pytest.approx(24 * mib, rel=0.25)


def test_peak_memory_excludes_what_was_alive_before():
    keep = torch.ones(32 * 2 ** 20 // 4)
    m = measure.peak_memory(lambda: keep.sum(), CPU)
    assert m["alloc_bytes"] < 2 ** 20


def test_time_call_reports_the_median_after_warmup():
    calls = []
    t = measure.time_call(lambda: calls.append(1), CPU, repeats=3, warmup=2)
    assert len(calls) == 5 and t["repeats"] == 3
    assert 0 <= t["min_wall_s"] <= t["wall_s"] and t["cpu_s"] >= 0
    assert t["basis"] == "cpu" and t["time_s"] == t["cpu_s"]  # one thread on CPU (the fixture)
    with pytest.raises(ValueError, match="repeats"):
        measure.time_call(lambda: None, CPU, repeats=0)


def test_resolve_device_fails_early():
    with pytest.raises(ValueError, match="must be 'cpu' or 'cuda"):
        measure.resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            measure.resolve_device("cuda")


def test_machine_info_names_the_machine():
    info = measure.machine_info(CPU)
    assert {"date", "cpu", "cores", "torch", "device"} <= set(info)


# ---------------------------------------------------------------------- suites
def _check_pngs(result, tmp_path):
    assert result["plots"]
    for p in result["plots"]:
        assert p.startswith(str(tmp_path)) and p.endswith(".png")
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_layer_quick(tmp_path):
    from experiments.benchmarks import layer

    r = layer.run(quick=True, out_dir=str(tmp_path))
    for s in ("casa_plus", "casa_replace", "cross_attention"):
        for phase in ("train", "infer"):
            for metric in ("memory", "time"):
                assert _positive(r[f"{s}_vs_insertion_{phase}_{metric}"]), (s, phase, metric)
        assert _positive(r[f"{s}_vs_insertion_train_flops"]), s
    assert [row["strategy"] for row in r["rows"]] == strategies.names()  # the whole matrix
    for row in r["rows"]:
        for k in ("train_time_s", "train_alloc_MiB", "infer_time_s", "infer_alloc_MiB"):
            assert _positive(row[k]), (row["strategy"], k)
    # the point of CASA: the layer's stream holds text only, images are keys
    ins = next(row for row in r["rows"] if row["strategy"] == "insertion")
    casa = next(row for row in r["rows"] if row["strategy"] == "casa_plus")
    assert ins["stream_tokens"] == casa["stream_tokens"] + casa["image_keys"]
    # each ratio is its definition, CASA / insertion, on the printed rows (rounded to 4 decimals)
    rows = {row["strategy"]: row for row in r["rows"]}
    for s in ("casa_plus", "casa_replace", "cross_attention"):
        for phase, metric, col in (("train", "memory", "train_alloc_MiB"), ("train", "time", "train_time_s"),
                                   ("infer", "memory", "infer_alloc_MiB"), ("infer", "time", "infer_time_s"),
                                   ("train", "flops", "train_GFLOP")):
            a, b = rows[s][col], rows["insertion"][col]
            assert r[f"{s}_vs_insertion_{phase}_{metric}"] == pytest.approx(
                a / b, rel=5e-5 / a + 5e-5 / b, abs=5e-5), (s, phase, metric)
    # each target is its printed ratio against the paper's (rounding can only flip a tie)
    for claim, holds in r["targets"].items():
        key, bound = claim.split(" <= ")
        if abs(r[key] - float(bound)) > 1e-4:
            assert holds is (r[key] <= float(bound)), claim
    assert len(r["targets"]) == sum(1 for (_, phase, _) in layer.PAPER if phase == "train")
    _check_pngs(r, tmp_path)


def test_layer_rejects_unknown_options(tmp_path):
    from experiments.benchmarks import layer

    with pytest.raises(ValueError, match="backbone='gpt2'"):
        layer.run(quick=True, out_dir=str(tmp_path), backbone="gpt2")
    with pytest.raises(ValueError, match="dtype='float64'"):
        layer.run(quick=True, out_dir=str(tmp_path), dtype="float64")


def test_attention_quick(tmp_path):
    from experiments.benchmarks import attention

    r = attention.run(quick=True, out_dir=str(tmp_path))
    for k in ("sdpa_fwd_max_ratio_vs_ideal", "sdpa_fwd_bwd_max_ratio_vs_ideal", "eager_fwd_bwd_max_ratio_vs_ideal",
              "flex_fwd_max_ratio_vs_ideal"):
        assert _positive(r[k]), k
    assert math.isfinite(r["sdpa_fwd_bwd_memory_slope_vs_image_tokens"])
    for row in r["rows"]:
        assert _positive(row["time_s"]) and row["alloc_MiB"] >= 0 and _positive(row["ratio_vs_ideal"])
        # the ratio's definition, on the printed numbers (rounded to 5 decimals)
        t, ideal = row["time_s"], row["ideal_s"]
        assert row["ratio_vs_ideal"] == pytest.approx(t / ideal, rel=5e-6 / t + 5e-6 / ideal, abs=5e-6)
    # the summary and the target are the rows' maxima
    sdpa_max = 0.0
    for backend, pass_ in (("sdpa", "fwd"), ("sdpa", "fwd+bwd"), ("eager", "fwd+bwd")):
        ratios = [row["ratio_vs_ideal"] for row in r["rows"] if row["backend"] == backend and row["pass"] == pass_]
        top = r[f"{backend}_{pass_.replace('+', '_')}_max_ratio_vs_ideal"]
        assert top == pytest.approx(max(ratios), abs=1e-3), (backend, pass_)
        sdpa_max = max(sdpa_max, top) if backend == "sdpa" else sdpa_max
    assert r["targets"][f"sdpa within {attention.TARGET}x of ideal"] is (sdpa_max <= attention.TARGET)
    # backends that cannot run here are listed with the reason check_backend gives
    reasons = {(s["backend"], s["pass"]): s["reason"] for s in r["skipped"]}
    assert "no backward on CPU" in reasons[("flex", "fwd+bwd")]
    assert "CUDA" in reasons[("flash", "fwd")]
    _check_pngs(r, tmp_path)


def test_step_quick(tmp_path):
    from experiments.benchmarks import step

    r = step.run(quick=True, out_dir=str(tmp_path))
    assert [row["strategy"] for row in r["demo_caps_rows"]] == strategies.names()  # the whole matrix
    for row in r["demo_caps_rows"]:
        for k in ("step_s", "alloc_MiB", "tokens_per_s", "params_M"):
            assert _positive(row[k]), (row["strategy"], k)
    # Table 1's claim, recomputed from the printed rows: the order sorts them by the metric,
    # and the claim holds exactly when insertion heads it and CASA∨ closes it
    by_name = {row["strategy"]: row for row in r["demo_caps_rows"]}
    for label, key in (("time", "step_s"), ("memory", "alloc_MiB")):
        order = r[f"demo_caps_table1_{label}_order"].split(" > ")
        assert sorted(order) == sorted(step.TABLE1), label
        values = [by_name[s][key] for s in order]  # rounded in the rows; rounding keeps the order
        assert values == sorted(values, reverse=True), (label, order, values)
        assert r[f"demo_caps_table1_{label}_holds"] is (order[0] == "insertion" and order[-1] == "casa_replace"), label
    _check_pngs(r, tmp_path)


def test_data_quick(tmp_path):
    from experiments.benchmarks import data

    r = data.run(quick=True, out_dir=str(tmp_path))
    for cfg in data.CONFIGS:
        assert _positive(r[f"{cfg}_samples_per_s"])
        assert 0 < r[f"{cfg}_fill_text"] <= 1 and 0 <= r[f"{cfg}_fill_image"] <= 1
    # the video demo's shards, made by the converters: read at the demo's settings, then trained on
    (shards,) = r["video_shards"]
    assert shards["skipped"] == 0 and shards["frames_per_row"] >= 20 and shards["samples_per_row"] >= 1
    assert _positive(r["video_shards_rows_per_s"]) and _positive(r["video_shards_demo_steps_per_s"])
    assert r["video_shards_x_consumption"] == pytest.approx(r["video_shards_rows_per_s"]
                                                            / r["video_shards_demo_steps_per_s"], rel=0.01)
    _check_pngs(r, tmp_path)


# ---------------------------------------------------------------------- dispatcher
def test_dispatcher_prints_one_json_object_per_suite(tmp_path, capsys):
    assert bench.main(["data", "--quick", "--json", "--out-dir", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["suite"] == "data" and _positive(obj["demo_samples_per_s"])


def test_dispatcher_prints_tables_for_humans(tmp_path, capsys):
    assert bench.main(["data", "--quick", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bench data" in out and "fill_text" in out


def test_unknown_suite_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        bench.main(["nope"])
    err = capsys.readouterr().err
    assert "unknown suite 'nope'" in err
    for name in ("layer", "attention", "stream", "step", "data"):
        assert name in err


def test_option_a_suite_does_not_take_is_refused(tmp_path, capsys):
    assert bench.main(["data", "--quick", "--backbone", "helium", "--out-dir", str(tmp_path)]) == 2
    assert "does not take --backbone" in capsys.readouterr().err


def test_every_listed_suite_exists_and_takes_quick_and_out_dir():
    """`SUITES` is what `all` runs and what the usage error lists: every name in it is a module
    with `run(quick, out_dir, ...)`, so no listed suite is reported missing at run time."""
    import inspect

    for name in bench.SUITES:
        params = inspect.signature(bench.load_suite(name).run).parameters
        assert list(params)[:2] == ["quick", "out_dir"], name


def test_a_suite_with_a_missing_dependency_raises(monkeypatch):
    """Only the suite's own module being absent is "not available"; a suite that exists but
    cannot import one of its dependencies is a real error, raised with the missing name."""
    import importlib

    def import_module(name):
        raise ModuleNotFoundError("No module named 'flash_attn'", name="flash_attn")

    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(ModuleNotFoundError, match="flash_attn"):
        bench.load_suite("attention")


def test_stream_in_kyutais_form_quick():
    """`bench stream --turns`: kyutai's columns per strategy, and the caches the strategies
    must have after the session: insertion's text cache holds every frame's image tokens on top
    of what CASA's holds; CASA's window cache holds the last frame's; CASA-Shared has CASA⊕'s
    caches and the backbone's parameter count (no new weights)."""
    from experiments.benchmarks import turns

    r = turns.run(quick=True, strategies=("insertion", "casa_plus", "casa_shared"))
    assert r["form"] == "kyutai" and r["turns"] == 10 and not r["isolated_processes"]
    rows = {row["strategy"]: row for row in r["rows"]}
    for row in rows.values():
        for k in ("ttft_ms_first", "ttft_ms_last", "tok_s_first", "tok_s_last", "peak_MiB", "params_M"):
            assert _positive(row[k]), (row["strategy"], k)
    per_frame = r["image_tokens_per_frame"]
    assert rows["insertion"]["final_kv_tokens"] == rows["casa_plus"]["final_kv_tokens"] + r["turns"] * per_frame
    assert rows["insertion"]["window_kv_tokens"] == 0
    assert rows["casa_plus"]["window_kv_tokens"] > per_frame  # the last frame + its window's text
    assert {k: rows["casa_shared"][k] for k in ("final_kv_tokens", "window_kv_tokens")} == \
        {k: rows["casa_plus"][k] for k in ("final_kv_tokens", "window_kv_tokens")}
    assert rows["casa_shared"]["params_M"] == rows["insertion"]["params_M"] < rows["casa_plus"]["params_M"]
    assert rows["casa_shared"]["new_decoder_params_M"] == 0 < rows["casa_plus"]["new_decoder_params_M"]
    series = r["series"]["casa_plus"]
    assert len(series) == r["turns"] and all(_positive(t["ttft_s"]) and _positive(t["decode_s"]) for t in series)
    assert [t["kv_tokens"] for t in series] == sorted(t["kv_tokens"] for t in series)  # the transcript grows
    assert {"target_casa_plus_ttft_last_vs_first<=1.05", "insertion_ttft_growth"} <= set(r)


def test_stream_kyutai_options_are_checked():
    from experiments.benchmarks import turns

    with pytest.raises(ValueError, match="--ckpt and --backbone are exclusive"):
        turns.run(ckpt="x.ckpt", backbone="helium")
    with pytest.raises(ValueError, match=r"strategies \['casa'\] are not among"):
        turns.run(quick=True, strategies=("casa",))
    with pytest.raises(ValueError, match="tokens_per_turn=1 must be >= 2"):
        turns.measure("casa_plus", turns=10, tokens_per_turn=1, image_size=56, quick=True)
    with pytest.raises(ValueError, match="--frames is the figures' suite"):
        bench.load_suite("stream").run(quick=True, frames=40, turns=10)


def test_stream_in_kyutais_form_runs_a_checkpoint(tmp_path):
    """`--ckpt`: the checkpoint's own model (here a CASA-Shared one) is the one row."""
    import lightning
    import yaml

    from casa.rebuild import build_model
    from experiments.benchmarks import plan, turns

    config = plan.load_configs(["experiments/configs/demo.yaml", "tests/configs/tiny.yaml",
                                str(strategies.strategy("casa_shared").path)])
    torch.manual_seed(0)
    model = build_model(config)
    ckpt = tmp_path / "shared.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "casa_config": yaml.safe_dump(config), "global_step": 2,
                "pytorch-lightning_version": lightning.__version__}, ckpt)
    r = turns.run(quick=True, ckpt=str(ckpt))
    (row,) = r["rows"]
    assert row["strategy"] == "CASAShared" and r["ckpt"] == str(ckpt) and r["backbone"] is None
    assert row["params_M"] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    assert row["window_kv_tokens"] > r["image_tokens_per_frame"]
