"""The GPU lane's table: one row per `gpu` test (check / result / time), printed after the run.

A test states its result with `record_property("result", "...")`; a skipped test shows its
reason, a failed one the first line of its error. Only `gpu`-marked tests are listed, so the
default suite (which deselects them) prints nothing here."""

from __future__ import annotations

import pytest

_ROWS: list[tuple[str, str, str, float]] = []  # (check, outcome, result, seconds)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # marked on the report's user_properties (not `report.keywords`, which also holds the
    # directory name "gpu"), so that it also reaches an xdist controller
    outcome = yield
    if item.get_closest_marker("gpu") is not None:
        outcome.get_result().user_properties.append(("gpu_lane", True))


def pytest_runtest_logreport(report):
    if not dict(report.user_properties).get("gpu_lane"):
        return
    # one row per test: its call phase, or the phase that skipped or failed it
    if report.when == "call" or (report.when == "setup" and not report.passed) or (
            report.when == "teardown" and report.failed):
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            result = reason.removeprefix("Skipped: ")
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            result = (crash.message if crash else str(report.longrepr)).strip().splitlines()[0]
        else:
            result = dict(report.user_properties).get("result", "")
        _ROWS.append((report.nodeid.split("::", 1)[-1].removeprefix("test_"), report.outcome, result, report.duration))


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    import io
    import shutil

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="GPU lane")
    for name, justify in (("check", "left"), ("outcome", "left"), ("result", "left"), ("time", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    style = {"passed": "green", "failed": "bold red", "skipped": "yellow"}
    for check, outcome, result, seconds in _ROWS:
        # escaped: test ids ("[casa_windows-gqa]") and results (".[cuda]") look like rich markup
        table.add_row(escape(check), f"[{style[outcome]}]{outcome}[/]", escape(result), f"{seconds:.1f} s")
    text = io.StringIO()
    Console(file=text, width=max(shutil.get_terminal_size().columns, 120)).print(table)
    terminalreporter.write(text.getvalue())
