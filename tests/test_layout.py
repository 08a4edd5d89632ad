"""The layout is the architecture (docs/architecture.md): service imports run downward only, api/ui/worker →
jobs/serving → store → db → plumbing, with no cycle between modules, and peer_model never imports the service.

Read from the source (ast), not by importing: every import counts, function-level ones too, but not those under
``if TYPE_CHECKING:`` (annotations only: store/ names the ServiceContext that holds it).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import its own layer's modules and any layer below
LAYERS = [
    ("plumbing", ("service.errors", "service.logs", "service.keys", "service.settings")),
    ("db", ("service.db",)),
    ("metrics", ("service.metrics",)),  # reads the jobs table for its gauges
    ("store", ("service.store",)),
    ("context", ("service.context",)),  # settings + the database + the Store, built once per process
    ("jobs/serving", ("service.jobs", "service.serving")),
    ("entry points", ("service.api", "service.ui", "service.worker", "service.cli", "service.client")),
]
SIDE_BY_SIDE = [("service.jobs", "service.serving")]  # one layer, neither imports the other


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """Absolute names of the modules (or their packages) that ``path`` imports outside TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
               for statement in block.body for node in ast.walk(statement)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import module`
    return found


def graph(top: str) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (ROOT / top).rglob("*.py")}
    return {name: {m for m in runtime_imports(path) if m in modules and m != name} for name, path in modules.items()}


def layer(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_service_imports_run_downward():
    upward = []
    for module, imports in graph("service").items():
        if module == "service":
            continue
        for target in imports - {"service"}:
            if layer(target) > layer(module):
                upward.append(f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})")
            for a, b in SIDE_BY_SIDE:
                if (within(module, a) and within(target, b)) or (within(module, b) and within(target, a)):
                    upward.append(f"{module} imports {target}: {a} and {b} stand side by side")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles():
    for top in ("service", "peer_model"):
        edges = graph(top)
        cycles, state = [], {}

        def visit(module, path):
            state[module] = "open"
            for target in sorted(edges[module]):
                if state.get(target) == "open":
                    cycles.append(" → ".join(path[path.index(target):] + [target]))
                elif target not in state:
                    visit(target, path + [target])
            state[module] = "done"

        for module in sorted(edges):
            if module not in state:
                visit(module, [module])
        assert not cycles, "\n".join(cycles)


def test_peer_model_never_imports_the_service():
    offenders = [(m, sorted(t for t in runtime_imports(p) if within(t, "service")))
                 for p in (ROOT / "peer_model").rglob("*.py")
                 if any(within(t, "service") for t in runtime_imports(p)) for m in [module_name(p)]]
    assert not offenders, offenders
