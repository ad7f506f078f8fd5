"""The layering of utils/: no import circle, and the leaf modules (errors, the toy world) import nothing of ours, so
that any module may use them. Read from the source, so it also covers imports inside functions."""

import ast
import pathlib

import pytest

UTILS = pathlib.Path(__file__).resolve().parents[1] / "utils"


def our_imports(path: pathlib.Path) -> set[str]:
    """The utils modules that `path` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "utils":
            found |= {node.module.split(".")[1]} if "." in node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("utils.")}
    return found


GRAPH = {path.stem: our_imports(path) for path in UTILS.glob("*.py") if path.stem != "__init__"}


def test_no_import_circle():
    def visit(module: str, path: tuple[str, ...]):
        for imported in GRAPH.get(module, ()):
            assert imported not in path, f"import circle: {' -> '.join((*path, imported))}"
            visit(imported, (*path, imported))

    for module in GRAPH:
        visit(module, (module,))


@pytest.mark.parametrize("leaf", ["errors", "toy_task", "losses", "precision", "attention", "metrics"])
def test_leaf_modules_import_nothing_of_ours(leaf):
    assert GRAPH[leaf] == set()


def test_the_graph_is_read():  # a parser that found no imports would make the tests above pass vacuously
    assert {"errors", "logprobs", "trainer_hooks"} <= GRAPH["reference"]
