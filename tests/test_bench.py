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
    assert isinstance(r["demo_caps_table1_time_holds"], bool)
    assert set(r["demo_caps_table1_memory_order"].split(" > ")) == set(step.TABLE1)
    _check_pngs(r, tmp_path)


def test_data_quick(tmp_path):
    from experiments.benchmarks import data

    r = data.run(quick=True, out_dir=str(tmp_path))
    for cfg in data.CONFIGS:
        assert _positive(r[f"{cfg}_samples_per_s"])
        assert 0 < r[f"{cfg}_fill_text"] <= 1 and 0 <= r[f"{cfg}_fill_image"] <= 1
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


def test_a_suite_whose_module_is_missing_is_reported_not_raised(tmp_path, capsys, monkeypatch):
    # how `stream` behaved before experiments/benchmarks/stream.py existed
    monkeypatch.setattr(bench, "SUITES", bench.SUITES + ("ghost",))
    assert bench.main(["ghost", "--quick", "--json", "--out-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "suite 'ghost' is not available: experiments/benchmarks/ghost.py does not exist yet" in captured.err
