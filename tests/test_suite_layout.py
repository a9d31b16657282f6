"""The test suite's own layout: a test file never imports another test file (a fixture imported from one
would silently apply, autouse, in the other), and each fixture is defined once (shared ones in conftest.py)."""
import ast
import functools
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def _trees(folder: Path) -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.py"))}


def imports_of_test_files(folder: Path) -> list[str]:
    """'FILE imports MODULE' for every import of a test_*.py module, anywhere in a file of folder."""
    found = []
    for name, tree in _trees(folder).items():
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{name} imports {m}" for m in modules if m.split(".")[0].startswith("test_")]
    return found


def fixtures_defined_twice(folder: Path) -> dict[str, list[str]]:
    """Fixture name -> the files defining it, for every name defined in more than one place."""
    where = defaultdict(list)
    for name, tree in _trees(folder).items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(
                    "fixture" in ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list):
                where[node.name].append(name)
    return {k: v for k, v in where.items() if len(v) > 1}


def test_no_test_file_imports_another():
    assert imports_of_test_files(TESTS) == [], "share fixtures through conftest.py, helpers through helpers.py"


def test_each_fixture_is_defined_once():
    assert fixtures_defined_twice(TESTS) == {}, "define a shared fixture once, in conftest.py"
