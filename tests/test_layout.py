"""The house rules (README, "Layout"), checked on the source: the import-linter contracts in setup.cfg
hold, no import cycle exists (module-level or inside a function), no module reaches into another's
`_private` names, no `sega_jax` import hides inside a function, every subpackage says what lives in it,
and no file of the package, its scripts or its tests is over 400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sega_jax"
MAX_LINES = 400
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}  # public despite the underscore


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the strongly connected components with more than one module."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_graph() -> dict[str, set[str]]:
    built = grimp.build_graph("sega_jax")  # every import statement, inside functions too
    modules = {m for m in built.modules if m.startswith("sega_jax")}
    return {m: {t for t in built.find_modules_directly_imported_by(m) if t in modules} for m in modules}


def test_the_import_contracts_hold():
    result = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                             "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_no_import_cycle_even_through_function_local_imports():
    assert strongly_connected(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def imported_modules(tree: ast.Module) -> dict[str, str]:
    """Local name -> sega_jax module, for `import sega_jax.x as y` and `from sega_jax.x import module`."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sega_jax") and alias.asname:
                    names[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sega_jax"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if (ROOT / (candidate.replace(".", "/") + ".py")).exists() or \
                        (ROOT / candidate.replace(".", "/") / "__init__.py").exists():
                    names[alias.asname or alias.name] = candidate
    return names


def private_reach_ins(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sega_jax"):
            found += [f"{path.name}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    modules = imported_modules(tree)
    for node in ast.walk(tree):
        private = isinstance(node, ast.Attribute) and node.attr.startswith("_")
        if not private or node.attr.startswith("__"):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in modules:
            found.append(f"{path.name}:{node.lineno} uses {modules[node.value.id]}.{node.attr}")
        elif node.attr not in NAMEDTUPLE_API and root_name(node.value) not in ("self", "cls"):
            found.append(f"{path.name}:{node.lineno} reaches into {ast.unparse(node)}")
    return found


def root_name(node: ast.expr) -> str | None:
    """The name an attribute chain or call starts from: `self` for `self.a.b` or `cls(...).c`."""
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


@pytest.mark.parametrize("path", sources(), ids=lambda p: module_name(p))
def test_no_module_uses_another_modules_private_names(path):
    assert private_reach_ins(path) == []


def test_the_private_name_check_sees_each_form(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from sega_jax.pipelines import inputs\nfrom sega_jax.settings import _x\n"
                     "inputs._number\npipe._unet\nself._unet\njob._replace(seed=1)\n")
    assert len(private_reach_ins(probe)) == 3


def function_local_sega_imports(path: Path) -> list[str]:
    found = []
    for func in ast.walk(ast.parse(path.read_text())):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if any(name.startswith("sega_jax") for name in names):
                    found.append(f"{path.name}:{node.lineno} in {func.name}")
    return found


@pytest.mark.parametrize("path", sources(), ids=lambda p: module_name(p))
def test_sega_jax_imports_sit_at_module_top(path):
    """Function-local imports are for optional heavy dependencies (torch, gradio, fsspec back ends) only."""
    assert function_local_sega_imports(path) == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: module_name(p))
def test_every_package_says_what_lives_in_it(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.split()) >= 8, f"{path.relative_to(ROOT)} needs a docstring: what lives here"


def test_no_file_over_400_lines():
    files = [*sources(), *sorted((ROOT / "scripts").glob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
