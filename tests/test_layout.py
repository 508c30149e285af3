"""The layering of the source tree, checked on every run.

    kernels/  <-  tuning/  <-  workers/  <-  serve/, pipelines/

An arrow points from a package to what it may import. A new import that goes against it
(or closes a cycle between project modules) fails here, naming the file and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "tuning", "workers", "serve", "pipelines")
# package -> project packages it must never import
FORBIDDEN = {
    "kernels": {"tuning", "workers", "serve", "pipelines"},
    "tuning": {"workers", "serve", "pipelines"},
    "workers": {"serve", "pipelines"},
    "serve": {"pipelines"},
    "pipelines": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `path` imports (any scope: lazy imports inside functions count)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, modules) for m, p in modules.items()}


def test_no_import_goes_up_a_layer():
    bad = [
        f"{m} imports {dep}"
        for m, deps in graph().items()
        for dep in deps
        if dep.split(".")[0] in FORBIDDEN[m.split(".")[0]]
    ]
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_kernels_import_only_kernels():
    bad = [
        f"{m} imports {d}"
        for m, deps in graph().items()
        if m.startswith("kernels")
        for d in deps
        if not d.startswith("kernels")
    ]
    assert not bad, "\n".join(bad)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A cycle of module imports, as a path that ends where it starts; None when there is none.

    A package's `__init__` importing its own submodules is not a cycle between concepts
    (the submodule importing the package is), so package -> own-child edges are skipped.
    """
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_guard():
    """The checker itself: an upward import and a cycle in a made-up graph are found."""
    assert find_cycle({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}) == ["a.x", "a.y", "a.z", "a.x"]
    assert find_cycle({"a.x": {"a.y"}, "a.y": set()}) is None
    modules = project_modules()
    fake = ROOT / "tuning" / "_layout_probe.py"
    fake.write_text("from workers.eval import heldout_nll\n")
    try:
        assert "workers.eval" in imports_of(fake, {**modules, module_name(fake): fake})
    finally:
        fake.unlink()
