"""No import circle among agent_core's modules, counting every import: at module level, inside a
function (a late import only hides a circle until that function runs) and under `if TYPE_CHECKING:`
(a circle in the types is one in the design)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "agent_core"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports() -> dict[str, set[str]]:
    """Module -> the agent_core modules it imports anywhere in its source (dotted names)."""
    paths = list(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        name = module_name(path)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0 and node.module, f"{name}: a relative import, which this check cannot follow"
                # `from agent_core import x` imports the module agent_core.x when there is one
                deps.update(f"{node.module}.{a.name}" for a in node.names)
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = (deps & modules) - {name, "agent_core"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(node: str, stack: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in stack:
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, stack + [dep])
        done.add(node)

    for module in sorted(graph):
        visit(module, [module])
    return found


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_agent_core_has_no_import_circle():
    graph = module_imports()
    assert {"agent_core.client", "agent_core.scheduler", "agent_core.devserver.routes"} <= set(graph)
    assert "agent_core.daemon" in graph["agent_core.cli"]  # imports inside functions are seen
    assert cycles(graph) == []


def test_metrics_knows_none_of_the_modules_that_hand_it_their_figures():
    # the old circle: client -> metrics -> scheduler/runner -> client; metrics is injected now
    assert module_imports()["agent_core.metrics"].isdisjoint(
        {"agent_core.client", "agent_core.scheduler", "agent_core.runner", "agent_core.daemon"})


def test_only_the_executor_package_names_an_engine_implementation():
    # everything else types against `Backend` and gets one from `open_backend`
    named = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if p.parent.name != "executor" and re.search(r"\bDocker(Backend|Executor)\b", p.read_text("utf-8")))
    assert named == []
