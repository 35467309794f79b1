"""Data flows one way: videos -> stage1_extract -> store -> stage2_temporal; no package imports amflow/;
``foundation`` (configs, formats, devices, the cluster, the features contract) is the ground floor under all.

Every import of every module is read from its source (``ast``), function-level and type-checking-only
imports included, so a lazy import cannot hide a dependency.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("foundation", "stage1_extract", "stage2_temporal", "store")
# package -> the project packages it must never import
FORBIDDEN = {
    "foundation": {"store", "stage1_extract", "stage2_temporal", "amflow"},
    "store": {"stage1_extract", "stage2_temporal", "amflow"},
    "stage1_extract": {"stage2_temporal", "amflow"},
    "stage2_temporal": {"amflow"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT, type_checking: bool = True) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    skipped: set[int] = set()
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}  # `from store import writer`
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "store"
    pkg.mkdir()
    (pkg / "x.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import stage2_temporal.training.train\n"
        "def f():\n    from . import writer\n    import amflow.cli\n"
    )
    found = imports(pkg / "x.py", tmp_path)
    assert {"stage2_temporal.training.train", "store.writer", "amflow.cli", "typing"} <= found
    assert "stage2_temporal.training.train" not in imports(pkg / "x.py", tmp_path, type_checking=False)


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_downstream(package):
    found = modules(package)
    assert len(found) > 3, f"{package}: no modules found under {ROOT}"
    violations = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in found
        for name in sorted(imports(path))
        if name.split(".")[0] in FORBIDDEN[package]
    ]
    assert not violations, "\n".join(violations)


def import_circle(package: str, root: Path = ROOT) -> list[str] | None:
    """A cycle among the run-time imports of ``package``'s modules (``if TYPE_CHECKING`` aside), or None."""
    paths = sorted((root / package).rglob("*.py"))
    graph = {module_name(p, root): set() for p in paths}
    for path in paths:
        name = module_name(path, root)
        graph[name] = {n for n in imports(path, root, type_checking=False) if n in graph} - {name}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*trail, node, nxt]
            if nxt not in state and (found := visit(nxt, [*trail, node])):
                return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_the_store_has_no_import_circle():
    assert import_circle("store") is None


def test_the_circle_search_finds_a_lazy_circle(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "a.py").write_text("from store.b import x\n")
    (tmp_path / "store" / "b.py").write_text("def x():\n    from store import a\n")
    (tmp_path / "store" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import store.a\n"
    )
    assert import_circle("store", tmp_path) == ["store.a", "store.b", "store.a"]


def test_one_out_of_core_reader():
    """The RAM is read in one place (store.budget), and both out-of-core readers read shards through
    store.shards and size selections through store.budget."""
    readers = {p for pkg in PACKAGES for p in modules(pkg) if "psutil" in imports(p)}
    assert readers == {ROOT / "store" / "budget.py"}
    for reader in ("store/dataset.py", "stage2_temporal/training/stream.py"):
        found = imports(ROOT / reader)
        assert {"store.shards.ShardCache", "store.shards.read_shard_arrays"} <= found, reader
        assert any(name.startswith("store.budget.") for name in found), reader
