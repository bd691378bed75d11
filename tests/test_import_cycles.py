"""No import cycles among the project's own modules, counting function-level imports too: a cycle closed through an
import inside a function still ties the modules together (neither can be understood, tested or moved alone) and
breaks as soon as someone hoists the import. Imports under `if TYPE_CHECKING:` are annotations only and not counted.

The graph is read with `ast` from the source files (nothing is imported): an edge for every `import a.b` and
`from a import b` (to the module `a.b` where there is one, else to `a`), at any depth of the file.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGES = ("deit3_fast", "pipelines", "dataset_tools")


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """{module: the project's modules it imports}, module-level and function-level alike."""
    mods = _modules(root)

    def resolve(name: str) -> str | None:  # `a.b.C` (a name in module a.b) -> a.b
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]  # a submodule, else resolves to `base`
            else:
                continue
            for target in targets:
                found = resolve(target)
                # A module's own package: importing `a.b.c` runs `a.b` first anyway, not an edge of its own.
                if found and found != mod and not mod.startswith(found + "."):
                    edges[mod].add(found)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.add(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(component)
    return out


def _path(edges: dict[str, set[str]], component: set[str]) -> str:
    """One closed path through a cycle's modules, to say where it closes: a -> b -> ... -> a."""
    first = min(component)
    path, seen = [first], {first}
    while True:
        nxt = sorted(w for w in edges[path[-1]] if w in component)
        back = [w for w in nxt if w == first]
        if back and len(path) > 1:
            return " -> ".join(path + [first])
        fresh = [w for w in nxt if w not in seen]
        if not fresh:  # every way on goes back into the path: close it where it does
            w = nxt[0]
            return " -> ".join(path[path.index(w) :] + [w])
        path.append(fresh[0])
        seen.add(fresh[0])


def test_the_packages_have_no_import_cycles():
    edges = import_graph()
    found = cycles(edges)
    assert not found, "import cycles (function-level imports included):\n" + "\n".join(
        f"  {', '.join(sorted(c))}: {_path(edges, c)}" for c in found
    )


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    """The check itself: a cycle closed only inside a function, through a relative import, is found; one under
    TYPE_CHECKING is not."""
    pkg = tmp_path / "deit3_fast"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n")
    (pkg / "d.py").write_text("import deit3_fast.c\n")
    for other in PACKAGES[1:]:
        (tmp_path / other).mkdir()
    edges = import_graph(tmp_path)
    assert edges["deit3_fast.b"] == {"deit3_fast.a"} and edges["deit3_fast.c"] == set()
    assert edges["deit3_fast.d"] == {"deit3_fast.c"}
    assert cycles(edges) == [{"deit3_fast.a", "deit3_fast.b"}]
    assert _path(edges, {"deit3_fast.a", "deit3_fast.b"}) == "deit3_fast.a -> deit3_fast.b -> deit3_fast.a"
