"""The package's import graph (read from the source with ast, nothing imported): no cycle among module-level
imports, the engine imports no family, the networks import no training code (docs/layout.md's rules)."""

import ast
from pathlib import Path

import rs_transfer

ROOT = Path(rs_transfer.__file__).parent
FAMILY_PACKAGES = ("rs_transfer.downstream", "rs_transfer.pretrain", "rs_transfer.video", "rs_transfer.families",
                   "rs_transfer.runs", "rs_transfer.predict", "rs_transfer.evaluate", "rs_transfer.export",
                   "rs_transfer.reproduce", "rs_transfer.bench", "rs_transfer.cli", "rs_transfer.api")
# What the networks must not import: the engine and every family or command built on it (bench/ measures networks:
# `rs-transfer info` counts FLOPs with bench/flops.py).
TRAINING_PACKAGES = tuple(p for p in FAMILY_PACKAGES if p != "rs_transfer.bench") + ("rs_transfer.engine",)


def module_name(path: Path) -> str:
    return ".".join(("rs_transfer",) + path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def imported(path: Path, module_level: bool) -> set:
    """The package's modules `path` imports: at module level only, or anywhere (functions' lazy imports too).
    `from a.b import c` counts a.b, and a.b.c when that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in (tree.body if module_level else ast.walk(tree)):
        if module_level and isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in MODULES}


def cycles(graph: dict) -> list:
    """Every cycle a depth-first search meets, as [a, b, ..., a]."""
    state, found = {}, []

    def visit(node, path):
        state[node] = "open"
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                found.append(path[path.index(child):] + [child])
            elif child not in state:
                visit(child, path + [child])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_cycle_among_module_level_imports():
    assert cycles({name: imported(path, module_level=True) for name, path in MODULES.items()}) == []


def test_a_cycle_is_found():  # the checker itself: a graph with a cycle is not passed
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def offenders(package: str, forbidden: tuple) -> dict:
    """{module of `package`: the modules of `forbidden` it imports anywhere, lazily included}."""
    found = {}
    for name, path in MODULES.items():
        if name == package or name.startswith(package + "."):
            bad = sorted(m for m in imported(path, module_level=False)
                         if any(m == f or m.startswith(f + ".") for f in forbidden))
            if bad:
                found[name] = bad
    return found


def test_the_engine_imports_no_family_and_the_networks_no_training_code():
    assert offenders("rs_transfer.engine", FAMILY_PACKAGES) == {}
    assert offenders("rs_transfer.models", TRAINING_PACKAGES) == {}
