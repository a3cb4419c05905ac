"""The package's layout: no import cycles between its modules, and the import paths users' scripts
rely on (the public surface) still resolve to the implementations in the subpackages."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "apo_jax"


def _module_graph() -> dict[str, set[str]]:
    """module -> the apo_jax modules it imports at module level (function-level imports, which run
    only when called, are the sanctioned way to reach upwards lazily and are not edges)."""
    files = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = f

    def resolve(name: str) -> str:
        while name not in files and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        edges = set()
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.Import):
                edges |= {resolve(a.name) for a in node.names if a.name.startswith("apo_jax")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("apo_jax"):
                edges |= {resolve(f"{node.module}.{a.name}") for a in node.names}
        graph[name] = edges - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycles():
    graph = _module_graph()
    assert len(graph) > 50 and "apo_jax.game.loop" in graph and "apo_jax.models" in graph["apo_jax.game.loop"]
    assert _cycles(graph) == []


def test_public_import_paths_reach_the_implementations():
    import apo_jax
    from apo_jax import evaluation, hf, models, sampler
    from apo_jax.evaluation import preference
    from apo_jax.inference import sampler as inference_sampler
    from apo_jax.io import hf as io_hf
    from apo_jax.models import heads

    assert hf.load_pretrained is io_hf.load_pretrained and hf.save_pretrained is io_hf.save_pretrained
    assert models.lm_logits is heads.lm_logits and models.rewards is heads.rewards
    assert sampler.generate is inference_sampler.generate
    assert evaluation.score_texts is preference.score_texts
    # The package's lazy top-level API names the same objects.
    assert apo_jax.load_pretrained is io_hf.load_pretrained and apo_jax.generate is inference_sampler.generate
    assert apo_jax.score_texts is preference.score_texts and apo_jax.rewards is heads.rewards
