"""The dependency rule, read from the source: the core (`relay/`) never imports an adapter
(`sinks/`); adapters import the core's public port (`relay.sink`) and nothing else of it; and
no module imports itself back through others (no cycles), counting every import, those under
TYPE_CHECKING and inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("relay", "sinks")
PORT = "relay.sink"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it, as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from relay import plugins` imports the module relay.plugins.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {
        _module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


GRAPH = _graph()


def test_the_graph_is_read() -> None:
    assert "relay.app" in GRAPH and "sinks.kafka" in GRAPH
    assert "relay.sink" in GRAPH["sinks.kafka"]
    assert "sinks.mqtt.loop" in GRAPH["sinks.mqtt.sink"]


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("relay")))
def test_the_core_imports_no_adapter(module: str) -> None:
    assert not {m for m in GRAPH[module] if m.split(".")[0] == "sinks"}


def _adapter(module: str) -> str:
    """sinks.mqtt.loop -> sinks.mqtt: the adapter (module or package) a module belongs to."""
    return ".".join(module.split(".")[:2])


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("sinks.")))
def test_adapters_import_only_the_port(module: str) -> None:
    core = {m for m in GRAPH[module] if m.split(".")[0] == "relay"}
    assert core <= {PORT, "relay"}, f"{module} reaches past the port: {sorted(core - {PORT})}"
    others = {m for m in GRAPH[module] if m.startswith("sinks") and _adapter(m) != _adapter(module)}
    assert not others, f"adapters stand alone: {module} imports {sorted(others)}"


def test_no_import_cycles() -> None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycle = [*stack[stack.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
