"""The layer rule (docs/ARCHITECTURE.md): imports flow down, never up, and never in a circle.

Every import of every module under engine/ and server/ counts: module level, under `TYPE_CHECKING` and inside
functions. Each module belongs to a layer (its subpackage); a module may import its own layer and the layers
below it. A sibling layer of the same rank (inspect, kv_memory) is off limits too. No torch needed: the files are
read with `ast`, not imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module of engine/<layer>/ may import from the layers before it in this list, and from its own.
LAYERS: list[tuple[str, ...]] = [
    ("engine.core",),  # errors, outputs, model config, argument checks, paths, the process group
    ("engine.text",),  # tokenizer, structured output grammars
    ("engine.capture",),  # attention capture and head statistics
    ("engine.cache",),  # KV pools, blocks, KV quantization, eviction policy, head plans
    ("engine.model",),  # the LLaMA model, attention kernels, linear layers, checkpoints, the compiled step
    ("engine.sampling",),  # sampling parameters, the sampler, stop strings, n-gram drafts
    ("engine.sched",),  # sequences and the scheduler
    ("engine.exec",),  # the runner, one step's inputs, tensor-parallel ranks
    ("engine.api",),  # LLMEngine, Session, LLM, request validation
    ("engine",),  # engine/__init__.py: the public names
    ("engine.inspect", "engine.kv_memory"),  # tools built on the API; neither imports the other
    ("engine.cli",),  # `kvmini`
    ("server",),  # the HTTP server: imports the engine, never imported by it
]


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of engine/ and server/ by dotted name (a package by its own name)."""
    found = {}
    for path in sorted([*root.glob("engine/**/*.py"), *root.glob("server/**/*.py")]):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that `name` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # `from engine.cache import blocks` imports the module engine.cache.blocks
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer_of(name: str) -> tuple[int, str]:
    """The rank of `name`'s layer and the layer's name: the longest layer prefix."""
    best = None
    for rank, group in enumerate(LAYERS):
        for layer in group:
            if (name == layer or name.startswith(layer + ".")) and (best is None or len(layer) > len(best[1])):
                best = (rank, layer)
    if best is None:
        raise AssertionError(f"{name} belongs to no layer: add its subpackage to LAYERS in tests/test_layers.py")
    return best


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, or of another layer of the same rank."""
    bad = []
    for src, targets in sorted(graph.items()):
        src_rank, src_layer = layer_of(src)
        for dst in sorted(targets):
            dst_rank, dst_layer = layer_of(dst)
            if dst_rank > src_rank or (dst_rank == src_rank and dst_layer != src_layer):
                bad.append(f"{src} ({src_layer}) imports {dst} ({dst_layer})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, as the modules around it (one per strongly connected component)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_module_imports_a_higher_layer():
    bad = upward_edges(import_graph())
    assert not bad, "imports that run up the layers (docs/ARCHITECTURE.md):\n  " + "\n  ".join(bad)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_engine_never_imports_the_server():
    graph = import_graph()
    bad = [f"{src} imports {dst}" for src, targets in graph.items() if src.startswith("engine")
           for dst in targets if dst.split(".")[0] == "server"]
    assert not bad, bad


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize("planted, expect", [
    # a function-local import of a higher layer still counts
    ({"engine/core/errors.py": "def f():\n    from engine.api.llm import LLM\n"}, "engine.core.errors (engine.core) imports "
                                                                           "engine.api.llm (engine.api)"),
    # so does one under TYPE_CHECKING
    ({"engine/cache/blocks.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                "    from engine.sched.sequence import Sequence\n"},
     "engine.cache.blocks (engine.cache) imports engine.sched.sequence (engine.sched)"),
    # `from package import module`, and the sibling rule
    ({"engine/inspect/x.py": "from engine.kv_memory import sizing\n"},
     "engine.inspect.x (engine.inspect) imports engine.kv_memory.sizing (engine.kv_memory)"),
    ({"engine/cli.py": "import server.cli\n"}, "engine.cli (engine.cli) imports server.cli (server)"),
])
def test_a_planted_upward_import_is_named(tmp_path, planted, expect):
    """The checks fail, naming the edge, on a copy of the tree with one bad import added."""
    files = {str(p.relative_to(ROOT)): p.read_text() for p in modules().values()}
    for rel, extra in planted.items():
        files[rel] = files.get(rel, "") + "\n" + extra
    root = _plant(tmp_path, files)
    assert expect in upward_edges(import_graph(root))


def test_a_planted_cycle_is_found(tmp_path):
    files = {str(p.relative_to(ROOT)): p.read_text() for p in modules().values()}
    files["engine/core/errors.py"] += "\nfrom engine.core import checks\n"  # checks imports errors already
    assert ["engine.core.checks", "engine.core.errors"] in cycles(import_graph(_plant(tmp_path, files)))
