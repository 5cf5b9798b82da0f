"""No import cycle inside ``adapters/mqtt``: the layers depend one way (codec <- publish <-
session <- registry <- channel <- connections <- adapter).

Every import statement counts, also those under ``if TYPE_CHECKING:`` and inside functions: a
cycle hidden from the interpreter is still two modules that cannot be understood (or changed)
one without the other. The parent package's ``__init__`` is not an edge of its submodules
(Python runs it first, but a submodule does not depend on what it re-exports).

Run it on any tree: ``python tests/mqtt/test_imports.py [path/to/adapters/mqtt]`` prints the
import graph and the cycles, and exits 1 if there is one.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "adapters.mqtt"
ROOT = Path(__file__).resolve().parents[2] / "adapters" / "mqtt"


def modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module under ``root``: dotted name -> file (a package is its ``__init__.py``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((package, *parts))] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package this module is in
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # `from package import submodule` imports the submodule, else the package
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a non-module c
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_the_mqtt_adapter() -> None:
    edges = graph()
    assert f"{PACKAGE}.channel" in edges  # the check sees the modules it is about
    assert cycles(edges) == [], "\n".join(
        f"{name} imports {', '.join(sorted(targets))}" for name, targets in sorted(edges.items())
    )


def test_the_check_finds_a_cycle(tmp_path: Path) -> None:
    """Three modules in a ring, one edge type-only, one a relative import: one cycle."""
    pkg = tmp_path / "mqtt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from adapters.mqtt.adapter import Adapter\n")
    (pkg / "adapter.py").write_text("from adapters.mqtt import connection\n")
    (pkg / "connection.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .ws import X\n"
    )
    (pkg / "ws.py").write_text("def f():\n    import adapters.mqtt.adapter\n")
    (pkg / "codec.py").write_text("import struct\n")
    found = cycles(graph(pkg))
    assert found == [[f"{PACKAGE}.adapter", f"{PACKAGE}.connection", f"{PACKAGE}.ws"]]


def test_the_check_sees_no_cycle_through_a_package_init(tmp_path: Path) -> None:
    """A submodule and the __init__ that re-exports it are not a cycle."""
    pkg = tmp_path / "mqtt"
    (pkg / "codec").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "codec" / "__init__.py").write_text("from adapters.mqtt.codec.packets import P\n")
    (pkg / "codec" / "packets.py").write_text("from adapters.mqtt.codec import reasons\n")
    (pkg / "codec" / "reasons.py").write_text("")
    assert cycles(graph(pkg)) == []


def main() -> int:
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    edges = graph(root)
    for name, targets in sorted(edges.items()):
        print(f"{name:32} -> {', '.join(sorted(t.removeprefix(PACKAGE + '.') for t in targets))}")
    found = cycles(edges)
    for component in found:
        print("cycle:", " <-> ".join(component))
    print("no import cycle" if not found else f"{len(found)} cycle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
