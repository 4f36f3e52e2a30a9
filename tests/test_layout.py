"""The package's import graph, read from the source with ``ast`` (nothing is imported; function
bodies count, as lazy imports run too).

Three rules, each able to fail (run ``python tests/test_layout.py`` to print what breaks them):
- no import circle, neither among modules nor among the packages of ``core``;
- every arrow points down the layer order :data:`LAYERS` (and ``core`` never imports a host);
- no private name (leading underscore) is imported from another module, by ``from m import _x``
  or as ``m._x`` on an imported module;
and every import of the package's own modules names one that exists.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package `weightsmith`
PKG = "weightsmith"
SKIP_DIRS = {"tests", "docs", "web", "example_workflows", "build", "dist", "__pycache__"}

# The layer order of core, lowest first: a module may import from its own layer's package or from any
# lower layer, never from a higher one, and never from another package of its own layer. The most
# specific prefix decides a module's package.
LAYERS = [
    ("base", ["weightsmith.core"]),  # core's own modules: I/O, naming, edits
    ("solvers and world", ["weightsmith.core.erase", "weightsmith.core.merge", "weightsmith.core.world"]),
    ("world training", ["weightsmith.core.world.training"]),
    ("attacks", ["weightsmith.core.attack"]),  # white-box attacks on edits (docs/robustness.md)
    ("lab", ["weightsmith.core.lab"]),  # benches, sweeps, demo, references
    ("command line", ["weightsmith.core.cli"]),  # the entry point dispatches to all
]
# the packages core must never import (the hosts' glue, and the hosts themselves)
HOSTS = (
    "weightsmith.nodes",
    "weightsmith.a1111_extension",
    "weightsmith.scripts",
    "comfy",
    "modules",
    "gradio",
    "folder_paths",
)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package: dotted name -> file (tests, docs and assets are not modules)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if rel.parts[0] in SKIP_DIRS or any(p.startswith(".") or p in SKIP_DIRS for p in rel.parts[:-1]):
            continue
        if any(not (root / Path(*rel.parts[:i]) / "__init__.py").exists() for i in range(1, len(rel.parts))):
            continue  # not inside a package
        parts = [PKG, *rel.parts[:-1]] + ([] if rel.name == "__init__.py" else [rel.stem])
        out[".".join(parts)] = f
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def imports(name: str, path: Path, files: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every import in the module, resolved to the
    package's modules where they are ours (``from . import api`` -> the submodule ``api``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = name if _is_package(name, files) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub, None, node.lineno) if sub in files else (mod, a.name, node.lineno))
    return out


def private_attributes(path: Path, files: dict[str, Path]) -> list[tuple[str, int]]:
    """``m._x`` where ``m`` is bound to one of the package's modules by an import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {a.asname for a in node.names if a.asname and a.name in files}
        elif isinstance(node, ast.ImportFrom):
            bound |= {
                a.asname or a.name for a in node.names if (node.module or "").split(".")[0] in ("", PKG) or node.level
            }
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and _private(node.attr)
        ):
            out.append((f"{node.value.id}.{node.attr}", node.lineno))
    return out


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _private(n: str) -> bool:
    return n.startswith("_") and not (n.startswith("__") and n.endswith("__"))


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer index, package prefix) of a core module (None outside core)."""
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    return best


def graph(files: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported module of the package: first line}."""
    g: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        g[name] = {}
        for mod, _, line in imports(name, path, files):
            if mod in files and mod != name:
                g[name].setdefault(mod, line)
    return g


def circles(g: dict[str, set[str] | dict]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def module_circles(files) -> list[list[str]]:
    return circles(graph(files))


def package_circles(files) -> list[list[str]]:
    """Circles among core's packages as :data:`LAYERS` names them (a package's modules taken together;
    ``weightsmith.core.cli``, the entry point, counts as a package of its own)."""
    pg: dict[str, set[str]] = {}
    for a, targets in graph(files).items():
        if layer_of(a) is None:
            continue
        pa = layer_of(a)[1]
        for b in targets:
            if layer_of(b) is not None and layer_of(b)[1] != pa:
                pg.setdefault(pa, set()).add(layer_of(b)[1])
    return circles(pg)


def back_pointing(files) -> list[str]:
    """Imports of core that point up the layer order, sideways to another package of the same
    layer, or out to a host."""
    bad = []
    for name, path in files.items():
        here = layer_of(name)
        if here is None:
            continue
        for mod, _, line in imports(name, path, files):
            where = f"{_where(files[name])}:{line} {name} -> {mod}"
            if mod.startswith(HOSTS) or mod in HOSTS:
                bad.append(f"{where} (core imports a host)")
                continue
            there = layer_of(mod)
            if there is None:
                continue
            if there[0] > here[0]:
                bad.append(f"{where} (up: {LAYERS[here[0]][0]} -> {LAYERS[there[0]][0]})")
            elif there[0] == here[0] and there[1] != here[1]:
                bad.append(f"{where} (sideways within {LAYERS[here[0]][0]})")
    return list(dict.fromkeys(bad))


def private_imports(files) -> list[str]:
    bad = []
    for name, path in files.items():
        for mod, n, line in imports(name, path, files):
            if n and _private(n) and mod in files and mod != name:
                bad.append(f"{_where(path)}:{line} imports {n} from {mod}")
        for attr, line in private_attributes(path, files):
            bad.append(f"{_where(path)}:{line} uses {attr}")
    return bad


def test_the_package_is_found():
    files = module_files()
    assert f"{PKG}.core.erase.pipeline" in files and f"{PKG}.core.cli" in files
    assert all(layer_of(m) for m in files if m.startswith(f"{PKG}.core."))


def unresolved(files) -> list[str]:
    """Imports that name no module of the package (a module moved, its imports not)."""
    bad = []
    for name, path in files.items():
        for mod, _, line in imports(name, path, files):
            if mod.startswith(PKG + ".") and mod not in files:
                bad.append(f"{_where(path)}:{line} {mod}")
    return bad


def test_every_import_of_the_package_resolves():
    assert unresolved(module_files()) == []


def test_no_import_circle():
    files = module_files()
    assert module_circles(files) == []
    assert package_circles(files) == []


def test_every_import_points_down():
    assert back_pointing(module_files()) == []


def test_no_private_name_crosses_a_module():
    assert private_imports(module_files()) == []


def test_the_rules_catch_a_planted_violation(tmp_path):
    """The checks above fail on a tree that breaks them (a copy of two modules and a planted edit)."""
    import shutil

    root = tmp_path / "weightsmith"
    for rel in (
        "__init__.py",
        "core/__init__.py",
        "core/errors.py",
        "core/erase/__init__.py",
        "core/erase/options.py",
        "core/lab/__init__.py",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        src = ROOT / rel
        shutil.copy(src, root / rel) if src.exists() else (root / rel).write_text("")
    (root / "core/errors.py").write_text(
        (root / "core/errors.py").read_text() + "\n\ndef _hidden():\n    from .erase import options  # noqa\n"
    )
    (root / "core/lab/x.py").write_text(
        "from ..errors import _hidden\nfrom ...nodes import glue\nfrom .moved_away import y\n"
    )
    files = module_files(root)
    assert module_circles(files)  # errors -> erase.options -> errors
    assert any("up: base -> solvers" in b for b in back_pointing(files))
    assert any("core imports a host" in b for b in back_pointing(files))
    assert any("_hidden" in b for b in private_imports(files))
    assert any("weightsmith.core.lab.moved_away" in b for b in unresolved(files))


if __name__ == "__main__":
    fs = module_files()
    for title, found in (
        ("module circles", module_circles(fs)),
        ("package circles", package_circles(fs)),
        ("back-pointing imports", back_pointing(fs)),
        ("private names across modules", private_imports(fs)),
        ("unresolved imports", unresolved(fs)),
    ):
        print(f"{title}: {len(found)}")
        for x in found:
            print(f"  {x}")


def test_every_package_is_listed_for_installation():
    """pyproject's explicit ``packages`` list names every package folder (a missing one installs
    fine in editable mode and is absent from a wheel)."""
    tomllib = __import__("pytest").importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    files = module_files()
    packages = {name for name in files if _is_package(name, files)}
    assert packages == listed, {"not listed": sorted(packages - listed), "not a package": sorted(listed - packages)}
