"""The package's import graph: no cycle between any two modules, counting imports inside functions
and under TYPE_CHECKING (which modules close one, if any), every module inside the layers of
import-linter's contract (`make lint` checks that imports point down them), private names at home."""

import ast
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def _graph():
    return grimp.build_graph("toolchain", exclude_type_checking_imports=False)


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
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
    return found


def test_no_module_imports_its_way_back_to_itself():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle_closed_inside_a_function():
    graph = grimp.ImportGraph()
    for module in ("a", "a.low", "a.high"):
        graph.add_module(module)
    graph.add_import(importer="a.high", imported="a.low", line_number=1, line_contents="from a.low import x")
    graph.add_import(
        importer="a.low", imported="a.high", line_number=9, line_contents="    from a.high import y"
    )
    assert _cycles(graph) == [["a.high", "a.low"]]


def test_every_module_is_in_a_layer_of_the_contract():
    """Import-linter's contract (`make lint`) checks that imports point down its layers; a module
    outside every layer would escape it unseen."""
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layers = {m.strip() for layer in contract["layers"] for m in layer.split("|")}

    def in_a_layer(module: str) -> bool:
        parts = module.split(".")
        return any(".".join(parts[:n]) in layers for n in range(len(parts), 0, -1))

    assert {m for m in _graph().modules if m != "toolchain" and not in_a_layer(m)} == set()


def test_the_top_level_stays_small_and_private_names_stay_home():
    top = list((ROOT / "toolchain").glob("*.py"))
    assert len(top) <= 15, sorted(p.name for p in top)
    crossing = []
    for path in (ROOT / "toolchain").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):  # every import, wrapped or in a function
            if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("toolchain")
            ):
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                crossing += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names]
    assert crossing == []


def test_the_private_name_check_reads_wrapped_imports(tmp_path):
    source = "from toolchain.passes.equalize import (\n    check_same,\n    _hidden,\n)\n"
    node = ast.parse(source).body[0]
    assert [a.name for a in node.names if a.name.startswith("_")] == ["_hidden"]
