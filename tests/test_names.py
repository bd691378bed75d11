"""Private names stay private: no module of dataset_tools, pipelines or deit3_fast imports another module's
underscore name (or reaches it as `module._name`). A name two modules share is public in one of them; a helper one
module uses lives there. A private module (`commands/_common.py`) is shared within its own package only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dataset_tools", "pipelines", "deit3_fast")

# Left for the branches that fix them (issue 26, item 8), each as (importing file, module.name). An entry that no
# longer occurs fails the test: delete it with the fix, so the list only shrinks.
KNOWN: set[tuple[str, str]] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_module(dotted: str) -> bool:
    path = ROOT / dotted.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _package_of(file: Path) -> str:
    parts = file.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1])  # a package's __init__ belongs to that package, as any of its modules


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _crossings(file: Path) -> list[str]:
    """`module.name` for each private name `file` takes from another module of the project."""
    package = _package_of(file)
    found, modules = [], {}  # modules: local name -> project module it is bound to

    def module_used(dotted: str) -> None:
        # a private module (or a module inside one) is for its own package: `pkg._m` from within `pkg` only
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if _private(part) and not (package + ".").startswith(".".join(parts[:i]) + "."):
                found.append(".".join(parts[: i + 1]))
                return

    tree = ast.parse(file.read_text(), str(file))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    module_used(alias.name)
                    # `import a.b` binds `a`; `import a.b as m` binds `m` to a.b
                    modules[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else alias.name.split(".")[0]
                    )
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, package)
            if source.split(".")[0] not in PACKAGES:
                continue
            module_used(source)
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if _is_module(target):
                    module_used(target)
                    modules[alias.asname or alias.name] = target
                elif _private(alias.name):
                    found.append(target)
    for node in ast.walk(tree):  # after every import, wherever in the file: the names they bind
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and _private(node.attr)
        ):
            found.append(f"{modules[node.value.id]}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_name():
    crossings = {
        (str(f.relative_to(ROOT)), name)
        for pkg in PACKAGES
        for f in sorted((ROOT / pkg).rglob("*.py"))
        for name in _crossings(f)
    }
    assert sorted(crossings - KNOWN) == []
    assert sorted(KNOWN - crossings) == [], "fixed: delete these from KNOWN"


def test_the_scan_sees_each_form(tmp_path, monkeypatch):
    """The scan itself, on a made-up package: each way of reaching a private name is caught, the allowed ones are
    not."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    for rel in (
        "deit3_fast/__init__.py",
        "deit3_fast/a.py",
        "deit3_fast/sub/__init__.py",
        "deit3_fast/sub/_h.py",
        "deit3_fast/sub/b.py",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    user = tmp_path / "deit3_fast" / "sub" / "b.py"
    user.write_text(
        "from ..a import _x, y\nfrom .. import a\nimport deit3_fast.a as aa\nfrom ._h import z\n"
        "from . import _h\na._p\naa._q\n_h._r\nfrom os import _exit\n"
    )
    assert sorted(_crossings(user)) == ["deit3_fast.a._p", "deit3_fast.a._q", "deit3_fast.a._x", "deit3_fast.sub._h._r"]
    outsider = tmp_path / "deit3_fast" / "a.py"
    outsider.write_text("from .sub._h import z\nfrom .sub import _h\n")
    assert _crossings(outsider) == ["deit3_fast.sub._h", "deit3_fast.sub._h"]
