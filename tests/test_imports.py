"""The package's import structure, read from the source with ``ast`` (nothing is imported).

1. No import cycles between tinyseek's modules.
2. No imports inside functions, except of the heavy or optional third-party packages in
   :data:`LAZY`, each from the modules listed there.
3. Layering: a module imports only from its own layer or the layers below it (:data:`LAYERS`,
   the one place that states the layering; README and DESIGN.md describe it in words).

:data:`PENDING_EDGES` and :data:`PENDING_LOCAL` excuse violations a restructuring is still removing
(empty when none is). An entry that no longer matches a violation fails the test, so they only shrink.

An edge goes from a module to the module it names: ``from tinyseek.model.moe import MoE`` ->
``tinyseek.model.moe``, ``from tinyseek.post import sft`` -> ``tinyseek.post.sft``,
``from tinyseek.model import Transformer`` -> ``tinyseek.model`` (the package's ``__init__``).
Cycles are looked for over every import, at the top of a module or inside a function.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG_DIR = Path(__file__).resolve().parents[1] / "tinyseek"

# Layers, from the ground up. A module imports from its own layer and the ones before it, never after.
LAYERS: list[tuple[str, ...]] = [
    # foundations: errors, settings, file and RNG helpers, glibc malloc settings, PNG plots
    ("tinyseek", "tinyseek.errors", "tinyseek.fsutil", "tinyseek.common", "tinyseek.config", "tinyseek.integrity", "tinyseek.malloc",
     "tinyseek.plots"),
    ("tinyseek.kernels",),  # C sources + the loader that builds them; fast variants of ops; nothing from model/
    ("tinyseek.model",),  # PyTorch reference modules; each op has one seam where a kernel variant is chosen once
    # text, corpora, problems; model formats in and out (Hugging Face directories, GGUF files)
    ("tinyseek.tokenizer", "tinyseek.data", "tinyseek.tasks", "tinyseek.interop"),
    ("tinyseek.train",),  # pretraining loop, optimizers, checkpoints, parallelism
    ("tinyseek.quant", "tinyseek.serve"),  # quantized checkpoints; the inference engine and the HTTP server
    ("tinyseek.post",),  # SFT, GRPO, DPO, rejection sampling, distillation, rewards
    # stages over finished checkpoints and run folders; the run folder's stage markers (stages.py)
    ("tinyseek.eval", "tinyseek.export", "tinyseek.importer", "tinyseek.stages", "tinyseek.report"),
    ("tinyseek.pipeline",),  # `tinyseek run`: every stage in order, the report last
    ("tinyseek.cli", "tinyseek.__main__"),  # the command line (stages by name, cli.STAGES)
]

# Third-party imports allowed inside functions: {package or dotted prefix: the modules allowed to}.
# Each is heavy (import time after ``import torch``, 2-core CPU machine, 2026-12-06:
# `python -c "import torch, time; t = time.perf_counter(); import X; print(time.perf_counter() - t)"`)
# or optional (not in pyproject's dependencies, needed by one feature only). Cheap ones go at the top
# of the module (tokenizers 0.01 s, jinja2 0.02 s, xxhash 0.005 s, uvicorn 0.02 s, torch's DDP hooks 0.002 s).
LAZY: dict[str, set[str]] = {
    "opacus": {"tinyseek.post.dp"},  # 1.4 s, optional (--dp only)
    "reasoning_gym": {"tinyseek.tasks.gsm"},  # 0.8-0.9 s, optional (the gsm task only)
    "datasketch": {"tinyseek.data.dedup"},  # 0.33 s, optional (near-dup only)
    "ray": {"tinyseek.data.engine"},  # 0.4 s, optional (tinyseek data --executor ray only)
    "matplotlib": {"tinyseek.plots"},  # 0.37 s (only when a PNG is written)
    "pyarrow": {"tinyseek.data.ingest"},  # 0.11 s, optional (Parquet input only)
    "torchao": {"tinyseek.train.precision"},  # ~3.5 s, optional (--fp8 only)
    "gguf": {"tinyseek.interop.gguf_io"},  # optional (GGUF in and out only)
    "torch.utils.tensorboard": {"tinyseek.common"},  # optional (--tensorboard only; not installed here)
    "torch.distributed.checkpoint": {"tinyseek.train.distributed"},  # 0.67 s (FSDP checkpoints only)
    "torch.distributed.fsdp": {"tinyseek.train.distributed"},  # 0.62 s (--dist-mode fsdp only)
    "torch.distributed._composable": {"tinyseek.train.distributed"},  # older torch's FSDP2 (fallback of the above)
    "torch.distributed.pipelining": {"tinyseek.train.pp"},  # 1.3 s, pulls in torch._dynamo (--parallel pp= only)
}

# ---- pending: violations a restructuring in progress is removing (empty since issue 16 landed) ---------
# (importer, imported) edges that close a cycle or break the layering, e.g. ("tinyseek.pipeline", "tinyseek.report")
PENDING_EDGES: set[tuple[str, str]] = set()
# modules whose function-local imports their owners are moving to the top, e.g. "tinyseek.serve.server"
PENDING_LOCAL: set[str] = set()


# ---- reading the package ---------------------------------------------------------------------------
def package_modules(root: Path = PKG_DIR) -> dict[str, Path]:
    """``{dotted module name: path}`` for every ``.py`` file under ``root`` (a package's ``__init__.py``
    is the package itself)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = package_modules()


def targets(module: str, node: ast.Import | ast.ImportFrom, is_pkg: bool) -> list[str]:
    """The modules an import statement names (see the module docstring)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from .x import y
        pkg = module if is_pkg else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{base}" if base else pkg
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports_of(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import statement of a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: dict[tuple[str, int, bool], None] = {}  # ordered set: `from x import a, b` names x once

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.update(dict.fromkeys((t, child.lineno, local) for t in targets(module, child, is_pkg)
                                         if t != "__future__"))
            visit(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return list(out)


IMPORTS = {m: imports_of(m, p) for m, p in MODULES.items()}


def internal(name: str) -> bool:
    return name == "tinyseek" or name.startswith("tinyseek.")


def edges() -> dict[str, set[str]]:
    """``{module: tinyseek modules it imports}``, every import (top or inside a function)."""
    g: dict[str, set[str]] = defaultdict(set)
    for m, imps in IMPORTS.items():
        g[m] |= {t for t, _, _ in imps if internal(t) and t != m}
    return g


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of the longest entry that is ``module`` or a package above it (the
    bare ``tinyseek`` entry is the package's ``__init__`` only)."""
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            hit = module == n or (n != "tinyseek" and module.startswith(n + "."))
            if hit and n.count(".") > depth:
                best, depth = i, n.count(".")
    return best


def strongly_connected(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (a module importing itself
    is not counted: ``edges`` drops it)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth <= number of modules (~90)
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def a_cycle(g: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One cycle through the first module of a strongly connected component (breadth first: shortest)."""
    start, inside = comp[0], set(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g.get(v, ())):
                if w == start:
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(prev[chain[-1]])
                    return chain[::-1] + [start]
                if w in inside and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    return [a_cycle(g, c) for c in strongly_connected(g)]


def layer_violations() -> dict[tuple[str, str], int]:
    """``{(module, imported): line}`` for imports of a module in a higher layer."""
    out = {}
    for m, imps in IMPORTS.items():
        for t, line, _ in imps:
            if internal(t) and layer_of(t) is not None and layer_of(m) is not None and layer_of(t) > layer_of(m):
                out.setdefault((m, t), line)
    return out


def lazy_ok(module: str, imported: str) -> str | None:
    """The :data:`LAZY` entry that lets ``module`` import ``imported`` inside a function, if any."""
    for prefix, allowed in LAZY.items():
        if (imported == prefix or imported.startswith(prefix + ".")) and module in allowed:
            return prefix
    return None


def local_imports() -> list[tuple[str, str, int]]:
    """``(module, imported, line)`` for every import inside a function."""
    return [(m, t, line) for m, imps in IMPORTS.items() for t, line, local in imps if local]


def where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(PKG_DIR.parent)}:{line}"


# ---- the tests -------------------------------------------------------------------------------------
def test_the_reader_sees_the_package():
    assert {"tinyseek", "tinyseek.cli", "tinyseek.model.transformer", "tinyseek.train.checkpoint"} <= set(MODULES)
    g = edges()
    assert "tinyseek.train.checkpoint" in g["tinyseek.train.pretrain"]  # from tinyseek.train import checkpoint as ckpt
    assert "tinyseek.errors" in g["tinyseek.cli"]
    assert ("tinyseek.errors", 20, False) in IMPORTS["tinyseek.config"]  # ast.parse counts lines from 1


def test_the_cycle_finder_finds_cycles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert sorted(map(tuple, strongly_connected(g))) == [("a", "b", "c"), ("e", "f")]
    assert cycles(g) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"
    assert layer_of("tinyseek") == 0 and layer_of("tinyseek.model.moe") == 2
    assert layer_of("tinyseek.post.plots") == layer_of("tinyseek.post.sft") > layer_of("tinyseek.plots")


def test_no_import_cycles():
    g = edges()
    for a, b in PENDING_EDGES:
        g[a].discard(b)
    found = cycles(g)
    assert not found, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in found)


def test_imports_follow_the_layers():
    bad = {k: line for k, line in layer_violations().items() if k not in PENDING_EDGES}
    assert not bad, "imports from a higher layer (see LAYERS):\n" + "\n".join(
        f"  {where(m, line)}: {m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for (m, t), line in sorted(bad.items()))


def test_no_imports_inside_functions():
    bad = [(m, t, line) for m, t, line in local_imports()
           if m not in PENDING_LOCAL and not lazy_ok(m, t)]
    assert not bad, ("imports inside functions (move them to the top of the module; a heavy optional "
                     "dependency goes in LAZY with its measured import time):\n" +
                     "\n".join(f"  {where(m, line)}: {t}" for m, t, line in bad))


def test_allowlists_are_still_needed():
    """An entry of LAZY, PENDING_EDGES or PENDING_LOCAL that no import needs any more is an error."""
    full = edges()
    in_cycle = {frozenset(c) for c in strongly_connected(full)}
    layered = layer_violations()
    stale = [f"PENDING_EDGES {e}" for e in sorted(PENDING_EDGES)
             if e[1] not in full.get(e[0], ()) or
             (e not in layered and not any(e[0] in c and e[1] in c for c in in_cycle))]
    local = local_imports()
    stale += [f"PENDING_LOCAL {m}" for m in sorted(PENDING_LOCAL)
              if not any(lm == m and not lazy_ok(m, t) for lm, t, _ in local)]
    used = {(lazy_ok(m, t), m) for m, t, _ in local}
    stale += [f"LAZY {p!r}: {m}" for p, mods in sorted(LAZY.items()) for m in sorted(mods) if (p, m) not in used]
    assert not stale, "no longer needed, remove from tests/test_imports.py:\n  " + "\n  ".join(stale)
