"""The package's layers import downward only: no import cycle among its modules (imports inside
functions and under ``TYPE_CHECKING`` count too) and no module imports another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tvlang"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(module imported, name imported from it or "", line) for every tvlang import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            if not base.startswith("tvlang"):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    found.append((submodule, "", node.lineno))
                else:
                    found.append((base, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tvlang"):
                    found.append((alias.name, "", node.lineno))
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    modules = _modules()
    private = [
        f"{name}:{line} imports {imported}.{what}"
        for name, path in modules.items()
        for imported, what, line in _imports(name, path, modules)
        if what.startswith("_") and not what.startswith("__") and imported != name
    ]
    assert private == []


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {
        name: {m for m, _, _ in _imports(name, path, modules) if m in modules and m != name}
        for name, path in modules.items()
    }
    # a package's __init__ may re-export what its submodules define (they never import it back)
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}

    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_the_checks_see_imports() -> None:
    """The graph is not empty by accident: the API imports the planner, the CLI the API (lazily)."""
    modules = _modules()
    api = {m for m, _, _ in _imports("tvlang.api", modules["tvlang.api"], modules)}
    cli = {m for m, _, _ in _imports("tvlang.cli", modules["tvlang.cli"], modules)}
    assert "tvlang.plan" in api and "tvlang.api" in cli


# The package's layers, bottom first.  A module may import its own layer (without a cycle) or
# any layer below it, never one above.  ``ops`` is the table of the language's operations, read
# by the IR, the lowering, the planner and the kernels alike; the GPU backend plugs into the
# executor (``tvlang.executor``, the one loop over tasks, passes and chunks) beside the CPU
# backend (``tvlang.runtime``), so it sits with the execution layer.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation",
        (
            "tvlang.version",
            "tvlang.errors",
            "tvlang.source",
            "tvlang.dtypes",
            "tvlang.options",
            "tvlang.cache",
            "tvlang.chunks",
        ),
    ),
    # the AST, the grammar's text and the parse cache: what a cached parse needs, without Lark
    ("syntax tree", ("tvlang.syntax.ast", "tvlang.syntax.grammar", "tvlang.syntax.cached")),
    (
        "language",
        (
            "tvlang.syntax",
            "tvlang.ir",
            "tvlang.ops",
            "tvlang.layermap",
            "tvlang.context",
            "tvlang.check",
            "tvlang.passes",
            "tvlang.hub",
        ),
    ),
    ("lowering", ("tvlang.lowering",)),
    ("planning", ("tvlang.plan",)),
    ("kernels", ("tvlang.numerics", "tvlang.codegen", "tvlang.backends")),
    ("io", ("tvlang.io",)),
    (
        "execution",
        (
            "tvlang.executor",
            "tvlang.backends.gpu",
            "tvlang.backends.device",
            "tvlang.runtime",
            "tvlang.executors",
        ),
    ),
    ("api", ("tvlang.driver", "tvlang.api", "tvlang.synth", "tvlang.demo")),
    (
        "front-ends",
        (
            "tvlang",
            "tvlang.cli",
            "tvlang.config",
            "tvlang.mergekit",
            "tvlang.fields",
            "tvlang.job",
            "tvlang.tuning",
            "tvlang.harness",
            "tvlang.__main__",
        ),
    ),
)


def _layer(module: str) -> int | None:
    """The layer of ``module``: the one whose most specific prefix names it."""
    best: tuple[int, int] | None = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[1]
            ):
                best = (i, len(prefix))
    return None if best is None else best[0]


def test_every_module_has_a_layer_and_imports_downward() -> None:
    modules = _modules()
    assert [m for m in modules if _layer(m) is None] == []
    upward = sorted(
        {
            f"{name} ({LAYERS[_layer(name) or 0][0]}) imports {imported} ({LAYERS[_layer(imported) or 0][0]})"
            for name, path in modules.items()
            for imported, _, _ in _imports(name, path, modules)
            if imported in modules and (_layer(imported) or 0) > (_layer(name) or 0)
        }
    )
    assert upward == []
