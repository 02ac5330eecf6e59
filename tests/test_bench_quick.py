"""`scripts/bench.py --quick` runs end to end and prints every figure.

No timing asserts: the figures and their targets are the benchmark's business
(docs/benchmarks.md); this only keeps the script from rotting.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"


def load_bench():
    """The script as a module, for its list of metrics (registered first: dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location("agent_core_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(400)
def test_quick_benchmark_runs_and_reports_every_metric(docker_engine, tmp_path):
    bench = load_bench()
    doc_before = bench.DOC.stat().st_mtime_ns if bench.DOC.exists() else None
    report = tmp_path / "benchmarks.md"
    # When the quick benchmark runs with its report sent elsewhere
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(report)], cwd=ROOT,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=380)
    # Then it succeeds, and both the table and the report have a line for every metric
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    text = report.read_text(encoding="utf-8")
    for key in bench.metric_keys(bench.QUICK):
        assert re.search(rf"^{re.escape(key)}\s", proc.stdout, re.MULTILINE), f"no table line for {key}"
        assert f"| `{key}` |" in text, f"no report row for {key}"
    assert "## Machine" in text and "--quick" in text
    # and the committed report was left alone
    assert (bench.DOC.stat().st_mtime_ns if bench.DOC.exists() else None) == doc_before
