"""The package's layers, read from its source (nothing is imported, nothing is run).

    module/  the networks and likelihoods: the standard library, torch and numpy only
    train/   the training loop: module/ and the standard library, torch, numpy, tqdm
    data/    AnnData validation, loading and write-back
    model/   the OmicVAE class, where data/, module/ and train/ meet; private inside
    tl/ pl/ cli.py datasets/   on top, through model/'s public names only

Every import statement counts, wherever it stands: at module level, inside a function, or under
``if TYPE_CHECKING:`` (a cycle that only type checkers follow is still a cycle for a reader).
``from omicvae_sc.x import y`` imports the submodule ``omicvae_sc.x.y`` when there is one and
``omicvae_sc.x`` (its ``__init__``) otherwise; relative imports are resolved. Importing
``a.b.c`` is an edge to ``a.b.c`` alone: the implicit import of the parent packages is left
out, so a package ``__init__`` importing its own submodules is no cycle, while a submodule that
imports its package's ``__init__`` back is one.
"""

from __future__ import annotations

import ast
import itertools
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "omicvae_sc"
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding omicvae_sc/


@dataclass(frozen=True)
class Import:
    """One imported thing: ``target`` is the module it resolves to (within the scanned package,
    or the top-level name of an outside one); ``name`` is the name taken from it in a
    ``from ... import name`` that is not a submodule (else ``None``)."""

    source: str  # the importing module, dotted
    target: str
    name: str | None
    file: Path
    line: int

    def where(self, root: Path) -> str:
        return f"{self.file.relative_to(root).as_posix()}:{self.line}"


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file of ``root/package``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_package(module: str, modules: dict[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def _resolve_from(module: str, node: ast.ImportFrom, modules: dict[str, Path]) -> str:
    """The absolute module a ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if _is_package(module, modules) else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(dotted: str, package: str) -> str:
    """The module an absolute dotted name names: itself within the package (a name that is no
    module of it stays as written and makes no edge), the top-level name outside it."""
    return dotted if dotted.split(".")[0] == package else dotted.split(".")[0]


def imports(root: Path, package: str) -> list[Import]:
    """Every import in every source file of ``root/package`` (see the module docstring)."""
    modules = module_files(root, package)
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _known(alias.name, package)
                    found.append(Import(module, target, None, path, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(module, node, modules)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if alias.name != "*" and sub in modules:
                        found.append(Import(module, sub, None, path, node.lineno))
                    else:
                        name = None if alias.name == "*" else alias.name
                        found.append(Import(module, _known(base, package), name, path,
                                            node.lineno))
    return found


def import_graph(found: Iterable[Import], modules: Iterable[str]) -> dict[str, dict[str, Import]]:
    """module -> {imported module of the package -> the first import making that edge}."""
    graph: dict[str, dict[str, Import]] = {module: {} for module in modules}
    for imp in found:
        if imp.target in graph and imp.target != imp.source:
            graph[imp.source].setdefault(imp.target, imp)
    return graph


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's components (iterative), each sorted; only those with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def _one_cycle(component: list[str], graph: dict[str, dict[str, Import]]) -> list[str]:
    """A shortest cycle through the component's first module, as [m0, m1, ..., m0]."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, {})):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")  # pragma: no cover


def find_cycles(root: Path, package: str) -> list[str]:
    """One line per group of mutually importing modules: the group, then one cycle through it
    with the file:line of each import on it."""
    graph = import_graph(imports(root, package), module_files(root, package))
    report = []
    for component in _strongly_connected(graph):
        cycle = _one_cycle(component, graph)
        steps = " -> ".join(f"{b} ({graph[a][b].where(root)})"
                            for a, b in itertools.pairwise(cycle))
        edges = "; ".join(f"{a} -> {b} ({imp.where(root)})" for a in component
                          for b, imp in sorted(graph[a].items()) if b in component)
        report.append(f"{{{', '.join(component)}}}: {cycle[0]} -> {steps}\n"
                      f"    all imports within: {edges}")
    return report


def _inside(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def _offenders(found: Iterable[Import], rule) -> list[str]:
    lines = sorted({f"{imp.where(SOURCE_ROOT)}: {imp.source} imports "
                    f"{imp.target}{'.' + imp.name if imp.name else ''}"
                    for imp in found if rule(imp)})
    return lines


def _package_imports() -> list[Import]:
    return imports(SOURCE_ROOT, PACKAGE)


# ------------------------------------------------------------------ the finder, on a toy package
def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_cycle_finder_sees_function_level_relative_and_type_checking_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg import a\nfrom pkg.sub import _x\n",
        "pkg/a.py": "def f():\n    from . import b\n",                        # a -> b
        "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from pkg.a import f\n",                               # b -> a
        "pkg/c.py": "import pkg.a\nimport numpy\n",                            # c -> a only
        "pkg/sub/__init__.py": "from ._x import g\n",                          # fine
        "pkg/sub/_x.py": "from ..c import numpy\n",                            # _x -> c
    })
    assert find_cycles(tmp_path, "pkg") == [
        "{pkg.a, pkg.b}: pkg.a -> pkg.b (pkg/a.py:2) -> pkg.a (pkg/b.py:3)\n"
        "    all imports within: pkg.a -> pkg.b (pkg/a.py:2); pkg.b -> pkg.a (pkg/b.py:3)"]
    graph = import_graph(imports(tmp_path, "pkg"), module_files(tmp_path, "pkg"))
    assert set(graph["pkg.sub._x"]) == {"pkg.c"}
    assert set(graph["pkg.sub"]) == {"pkg.sub._x"}
    assert set(graph["pkg"]) == {"pkg.a", "pkg.sub._x"}


def test_a_submodule_importing_its_package_back_is_a_cycle(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.sub import thing\n",
        "pkg/sub/__init__.py": "from pkg.sub._x import thing\n",
        "pkg/sub/_x.py": "def thing():\n    from pkg.sub import other\n",  # the __init__ back
    })
    assert find_cycles(tmp_path, "pkg")[0].startswith(
        "{pkg.sub, pkg.sub._x}: pkg.sub -> pkg.sub._x (pkg/sub/__init__.py:1) -> pkg.sub "
        "(pkg/sub/_x.py:2)\n")
    (tmp_path / "pkg/sub/_x.py").write_text("def thing():\n    pass\n")
    assert find_cycles(tmp_path, "pkg") == []


# ------------------------------------------------------------------------------ the package
def test_no_import_cycles():
    """No two modules of the package import each other, directly or through others."""
    cycles = find_cycles(SOURCE_ROOT, PACKAGE)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_module_and_train_use_no_data_libraries():
    """module/ imports the standard library, torch and numpy, and nothing else from outside the
    package. train/ imports none of anndata, scanpy, pandas, scipy (today it takes torch,
    numpy and tqdm besides the standard library). Both are about tensors, not AnnData."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    data_libraries = {"anndata", "scanpy", "pandas", "scipy"}

    def bad(imp: Import) -> bool:
        if imp.target.split(".")[0] == PACKAGE:
            return False
        if _inside(imp.source, f"{PACKAGE}.module"):
            return imp.target not in stdlib | {"torch", "numpy"}
        return _inside(imp.source, f"{PACKAGE}.train") and imp.target in data_libraries

    offenders = _offenders(_package_imports(), bad)
    assert not offenders, "outside libraries below model/:\n" + "\n".join(offenders)


def test_nothing_outside_model_imports_its_private_names():
    """Outside omicvae_sc/model/ (in the package; tests and benchmarks are not checked), no
    ``from omicvae_sc.model._x import ...``, ``import omicvae_sc.model._x`` or
    ``from omicvae_sc.model import _name``: model/ offers its public names only."""
    model = f"{PACKAGE}.model"

    def bad(imp: Import) -> bool:
        if _inside(imp.source, model) or not _inside(imp.target, model):
            return False
        private_module = any(part.startswith("_")
                             for part in imp.target[len(model):].split(".") if part)
        return private_module or (imp.name or "").startswith("_")

    offenders = _offenders(_package_imports(), bad)
    assert not offenders, "private names of model/ imported from outside:\n" + \
        "\n".join(offenders)


LAYERS = {  # layer -> the layers it must not import
    "module": ("data", "model", "tl", "pl", "train"),
    "train": ("data", "model", "tl", "pl"),  # train/ builds on module/
    "model": ("tl", "pl", "cli"),
}


def test_lower_layers_do_not_import_higher_ones():
    """module/ imports nothing from data/, model/, tl/, pl/, train/; train/ nothing from data/,
    model/, tl/, pl/ (module/ it may); model/ nothing from tl/, pl/ or cli."""

    def bad(imp: Import) -> bool:
        return any(_inside(imp.source, f"{PACKAGE}.{layer}")
                   and any(_inside(imp.target, f"{PACKAGE}.{above}") for above in forbidden)
                   for layer, forbidden in LAYERS.items())

    offenders = _offenders(_package_imports(), bad)
    assert not offenders, "imports against the layering:\n" + "\n".join(offenders)
