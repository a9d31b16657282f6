"""The import rule of docs/design.md#data-flow, read from the doc's floor table and checked against every
import of every module of the repository (lazy imports inside functions included): each module is on one
floor, an import never goes up, and no modules import each other in a cycle."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_CODE = {"tests", "docs", "slurm", ".ci", ".git"}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every importable module of the repository (packages by their __init__), tests excluded."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in NOT_CODE or rel.parts[0].startswith("."):
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in its body: `import a.b`, `from a import b` (b a module
    or a name of a), at module level or inside a function."""
    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {owner(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {owner(f"{node.module}.{a.name}") for a in node.names}
    return found - {None}


def floor_table(doc: Path = ROOT / "docs" / "design.md") -> dict[str, int]:
    """{module or `package.*`: floor} from the table under "Modules sit on" in docs/design.md."""
    text = doc.read_text()
    section = text[text.index("Modules sit on"):]
    floors = {}
    for line in section.splitlines()[2:]:
        if floors and not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not cells or not cells[0].isdigit():
            continue
        for name in re.findall(r"`([\w.*]+)`", cells[-1]):
            assert name not in floors, f"docs/design.md's floor table lists {name} twice"
            floors[name] = int(cells[0])
    return floors


def floor_of(module: str, floors: dict[str, int]) -> int | None:
    if module in floors:
        return floors[module]
    if f"{module}.*" in floors:  # `pkg.*` holds the package itself too
        return floors[f"{module}.*"]
    package = module
    while package:
        package = package.rpartition(".")[0]
        if f"{package}.*" in floors:
            return floors[f"{package}.*"]
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), and self-imports."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def violations(modules: dict[str, Path], floors: dict[str, int]) -> list[str]:
    problems = []
    graph = {m: imports_of(p, modules) - {m} for m, p in modules.items()}
    for m in sorted(modules):
        if floor_of(m, floors) is None:
            problems.append(f"{m} is on no floor of docs/design.md's table")
    for m, targets in sorted(graph.items()):
        here = floor_of(m, floors)
        for t in sorted(targets):
            there = floor_of(t, floors)
            if here is not None and there is not None and there > here:
                problems.append(f"{m} (floor {here}) imports {t} (floor {there}): an import goes up")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    stale = [name for name in floors if not name.endswith(".*") and name not in modules]
    problems += [f"docs/design.md's floor table names {name}, which is no module" for name in stale]
    return problems


def test_every_module_is_on_a_floor_and_imports_only_go_down():
    assert violations(project_modules(), floor_table()) == []


def test_the_adm_evaluator_can_be_copied_out_with_reg_utils():
    modules = project_modules()
    seen, todo = set(), ["evaluations.evaluator"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imports_of(modules[m], modules)
    assert seen - {"reg", "reg.utils", "evaluations"} == {m for m in seen if m.startswith("evaluations.")}


def test_the_check_sees_lazy_imports_an_upward_import_and_a_cycle(tmp_path):
    """The checker on a planted tree: a lazy upward import and a two-module cycle are both reported."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "low.py").write_text("def f():\n    from top import g  # lazy, and upwards\n")
    (tmp_path / "top.py").write_text("import low\n\ndef g():\n    pass\n")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import x\n")
    (tmp_path / "pkg" / "b.py").write_text("from pkg import a\nx = 1\n")
    modules = project_modules(tmp_path)
    assert set(modules) == {"pkg", "pkg.a", "pkg.b", "low", "top"}
    problems = violations(modules, {"top": 1, "low": 0, "pkg": 0, "pkg.*": 0, "gone": 0})
    assert "low (floor 0) imports top (floor 1): an import goes up" in problems
    assert "import cycle: low -> top" in problems and "import cycle: pkg.a -> pkg.b" in problems
    assert "docs/design.md's floor table names gone, which is no module" in problems
    assert violations(modules, {"top": 1, "low": 1, "pkg.a": 0, "pkg.b": 0}) == [
        "pkg is on no floor of docs/design.md's table", "import cycle: low -> top", "import cycle: pkg.a -> pkg.b"]


@pytest.mark.parametrize("module", ["models.sit", "models.vae", "models.encoders"])
def test_models_know_no_checkpoint_folder(module):
    """models/ is below the checkpoint code: it imports nothing of ours but reg.hub and reg.utils."""
    modules = project_modules()
    assert imports_of(modules[module], modules) <= {"reg", "reg.hub", "reg.utils", "models"}
