"""Benchmark suites of `python -m experiments.bench SUITE`: one module per suite, each with
`run(quick: bool, out_dir: str, ...) -> dict`; `measure` holds the shared measuring helpers."""

SUITES = ("layer", "attention", "stream", "step", "data", "plan")
