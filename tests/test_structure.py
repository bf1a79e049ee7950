"""The package's shape: no import cycles, imports at the top, short functions, and the
protocol documented as the code has it (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

from pbkd_mpi.mpi.protocol import Tag

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pbkd_mpi"
# Imported inside functions on purpose (docs/architecture.md, "Imports"): TensorFlow and
# Keras (start-up cost; log settings first), matplotlib (its backend is chosen first),
# mpi4py (importing it starts MPI), resource (Unix only, its absence handled).
LAZY = {"keras", "tensorflow", "matplotlib", "mpi4py", "resource"}
# cli.py imports the one command it runs, after TensorFlow's settings (same section).
LAZY_PACKAGE_IMPORTS = {"pbkd_mpi/cli.py"}
MAX_FUNCTION_LINES = 80


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path, ast.parse(path.read_text())


def _imported(module: str, path: Path, node) -> list[str]:
    """The package's modules an import statement names (a name imported from a package
    counts as its module when it is one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("pbkd_mpi")]
    if node.level:
        base = module.split(".")[:len(module.split(".")) - node.level
                                   + (path.name == "__init__.py")]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("pbkd_mpi"):
        return []
    out = [target]
    for alias in node.names:
        candidate = f"{target}.{alias.name}"
        relative = Path(*candidate.split("."))
        if (REPO / relative.with_suffix(".py")).exists() or (REPO / relative).is_dir():
            out.append(candidate)
    return out


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_import_cycle():
    graph = {}
    for module, path, tree in _modules():
        graph[module] = {target for node in ast.walk(tree)
                         if isinstance(node, (ast.Import, ast.ImportFrom))
                         for target in _imported(module, path, node)} - {module}
    state, cycles = {}, []

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_are_at_the_top():
    inside = []
    for module, path, tree in _modules():
        relative = str(path.relative_to(REPO))
        for function in _functions(tree):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] if not node.level else [f"relative {node.module}"]
                else:
                    continue
                for name in names:
                    if name.split(".")[0] in LAZY:
                        continue
                    if name.startswith("pbkd_mpi.commands") and relative in LAZY_PACKAGE_IMPORTS:
                        continue
                    inside.append(f"{relative}:{node.lineno} {name} in {function.name}")
    assert not inside, "imports inside functions:\n" + "\n".join(inside)


def test_functions_are_short():
    long = [f"{path.relative_to(REPO)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1})"
            for _, path, tree in _modules() for f in _functions(tree)
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_run_reads_on_one_screen():
    from pbkd_mpi import pipeline

    tree = ast.parse(Path(pipeline.__file__).read_text())
    (coordinate,) = [f for f in _functions(tree) if f.name == "coordinate"]
    assert coordinate.end_lineno - coordinate.lineno + 1 <= 80


def test_every_protocol_tag_is_documented():
    documented = (REPO / "docs" / "architecture.md").read_text()
    missing = [tag.name for tag in Tag if f"`{tag.name}`" not in documented]
    assert not missing, f"tags missing from docs/architecture.md: {missing}"


def test_every_module_is_in_the_layout():
    """The tree in docs/architecture.md lists every module, each in its folder."""
    documented = (REPO / "docs" / "architecture.md").read_text()
    section = documented[documented.index("## Where things are"):]
    tree = section.split("```")[1].splitlines()
    listed, folder = set(), ""
    for line in tree:
        name = line.strip().split(" ")[0]
        if name.endswith("/") and line.startswith("  ") and not line.startswith("    "):
            folder = name
        elif name.endswith(".py"):
            listed.add((folder if line.startswith("    ") else "") + name)
    actual = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
              if path.name != "__init__.py"}
    assert actual == listed, (f"missing from the layout: {sorted(actual - listed)}; "
                              f"listed but gone: {sorted(listed - actual)}")
