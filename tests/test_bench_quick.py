"""The benchmark: `scripts/bench.py --quick` runs end to end, and its page is the run's own figures.

No timing asserts: the figures and their targets are the benchmark's business
(docs/benchmarks.md). The quick run keeps the script from rotting; the rest shows that
every number on the page comes from the run's JSON: the report's prose holds no digit of
its own, and the committed page is exactly what its committed figures render to.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import skip_or_fail_in_ci

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"
REPORT = ROOT / "scripts" / "bench_report.py"
PAGE = ROOT / "docs" / "benchmarks.md"
FIGURES = PAGE.with_suffix(".json")
# The only numbers the report's code may write itself: unit conversions (s, min, %, ms, KiB) and indexes.
UNIT_CONSTANTS = {0, 1, 60, 100, 1000, 1024}
NO_DIGITS_EXCEPT = {"utf-8"}


def load(path: Path) -> ModuleType:
    """A script as a module (registered first: dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(f"agent_core_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def committed_figures() -> dict:
    return json.loads(FIGURES.read_text(encoding="utf-8"))


def literals(tree: ast.AST):
    """Every string and number the code writes, leaving out docstrings and f-string format specs."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is not None:
            skip.add(id(node.body[0].value))
        if isinstance(node, ast.FormattedValue) and node.format_spec is not None:
            skip |= {id(n) for n in ast.walk(node.format_spec)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in skip:
            yield node


def test_the_report_prose_holds_no_number_of_its_own():
    # Given the report's code
    tree = ast.parse(REPORT.read_text(encoding="utf-8"))
    # Then no string it writes has a digit, and the numbers it uses are unit conversions
    found = [(n.lineno, n.value) for n in literals(tree)
             if isinstance(n.value, str) and re.search(r"\d", n.value) and n.value not in NO_DIGITS_EXCEPT]
    assert not found, f"digits in the report's prose (they must come from the figures): {found}"
    numbers = [(n.lineno, n.value) for n in literals(tree)
               if isinstance(n.value, (int, float)) and not isinstance(n.value, bool)
               and n.value not in UNIT_CONSTANTS]
    assert not numbers, f"numbers of the report's own (put them in the figures): {numbers}"


def test_the_committed_page_is_its_committed_figures_rendered():
    report = load(REPORT)
    figures = committed_figures()
    # When the committed figures are rendered again
    text = report.render(figures)
    # Then that is the committed page, byte for byte, with both engines measured and every row there
    assert text == PAGE.read_text(encoding="utf-8"), "docs/benchmarks.md is not docs/benchmarks.json rendered"
    assert all(figures["engines"][e]["measured"] for e in report.ENGINES), figures["engines"]
    capacities = [c["capacity"] for c in figures["scaling"]]
    for key in report.metric_keys(capacities):
        assert f"| `{key}` |" in text, f"no row for {key}"
    assert "not measured" not in text


def test_every_figure_moves_the_page():
    # Given the committed figures, and the same with every measured sample changed
    report = load(REPORT)
    figures = committed_figures()
    moved = copy.deepcopy(figures)
    for engine in moved["overhead"].values():
        engine["daemon"] = [v * 1.37 for v in engine["daemon"]]
        engine["bare"] = [v * 0.71 for v in engine["bare"]]
    moved["drain"]["makespan"] *= 1.37
    moved["copy"]["copy"] = [v * 1.37 for v in moved["copy"]["copy"]]
    moved["multi"]["two"]["makespan"] *= 1.37
    moved["multi"]["two"]["engines"][1]["tasks"] += 1
    # When both are rendered
    before, after = report.render(figures), report.render(moved)
    # Then every line that quotes those figures changed with them
    for key in ("overhead.docker.daemon", "overhead.docker.ratio", "overhead.podman.bare", "drain.makespan",
                "copy.copy", "copy.ratio", "multi.two", "multi.ratio"):
        line = next(line for line in before.splitlines() if f"`{key}`" in line)
        assert line not in after, f"{key} did not follow the figures: {line}"
    analysis = lambda text: text.split("## Analysis", 1)[1].split("**Podman beside Docker.**")[0]  # noqa: E731
    assert analysis(before) != analysis(after)
    for paragraph in ("**Copy mode.**", "**Two engines.**"):
        quoted = lambda text: next(p for p in text.split("\n\n") if p.startswith(paragraph))  # noqa: E731
        assert quoted(before) != quoted(after), f"{paragraph} did not follow the figures"


def test_a_dispatch_over_capacity_or_an_unused_engine_is_a_miss():
    # Given the committed figures, once with an engine over its capacity and once with one left unused
    report = load(REPORT)
    figures = committed_figures()
    row = lambda f: next(r for r in report.rows(f) if r.key == "multi.two")  # noqa: E731
    assert row(figures).ok, row(figures)
    over, unused = copy.deepcopy(figures), copy.deepcopy(figures)
    engine = over["multi"]["two"]["engines"][0]
    engine["peak_running"] = engine["capacity"] + 1
    unused["multi"]["two"]["engines"][1]["tasks"] = 0
    # Then each is a miss
    assert row(over).verdict == "MISS" and row(unused).verdict == "MISS"


def test_an_engine_that_was_not_measured_is_said_so_without_figures():
    # Given figures where Podman could not be reached
    report = load(REPORT)
    figures = committed_figures()
    figures["engines"]["podman"] = {"measured": False, "reason": "podman_env.sh failed: no podman here"}
    del figures["overhead"]["podman"]
    # When they are rendered
    text = report.render(figures)
    # Then the page says why, has its Podman rows without numbers, and no Podman comparison
    assert "**Podman**: not measured in this run: podman_env.sh failed: no podman here" in text
    for key in ("overhead.podman.daemon", "overhead.podman.bare", "overhead.podman.ratio"):
        row = next(line for line in text.splitlines() if f"`{key}`" in line)
        assert "not measured" in row and not re.search(r"\d", row.replace(key, "")), row
    assert "**Podman beside Docker.**" not in text
    assert "Podman was not measured in this run (podman_env.sh failed: no podman here)." in text


@pytest.mark.docker
@pytest.mark.timeout(400)
def test_quick_benchmark_runs_and_reports_every_metric(docker_engine, tmp_path):
    if os.geteuid() != 0:  # its multi-engine drain starts a private dockerd (tests/private_engine.py)
        skip_or_fail_in_ci("the quick benchmark's second engine needs root")
    bench = load(BENCH)
    report = load(REPORT)
    doc_before = bench.DOC.stat().st_mtime_ns if bench.DOC.exists() else None
    page = tmp_path / "benchmarks.md"
    # When the quick benchmark runs with its report sent elsewhere
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(page)], cwd=ROOT,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=380)
    # Then it succeeds, and both the table and the page have a line for every metric
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    text = page.read_text(encoding="utf-8")
    for key in bench.metric_keys(bench.QUICK):
        assert re.search(rf"^{re.escape(key)}\s", proc.stdout, re.MULTILINE), f"no table line for {key}"
        assert f"| `{key}` |" in text, f"no report row for {key}"
    assert "## Machine" in text and "--quick" in text
    # and the page is its figures rendered, Podman said to be left out (the quick default)
    figures = json.loads(page.with_suffix(".json").read_text(encoding="utf-8"))
    assert report.render(figures) == text
    assert not figures["engines"]["podman"]["measured"] and "not measured in this run" in text
    # and the committed report was left alone
    assert (bench.DOC.stat().st_mtime_ns if bench.DOC.exists() else None) == doc_before
