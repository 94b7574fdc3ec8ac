"""Imports run one way: every module of the package imports only its own layer and the layers
below it (core at the bottom, tooling on top), transformers internals only in the seam and
private PyTorch compiler APIs only in their own module. Read from the source files (every
import statement, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
#: lowest first: a module may import its own layer and the layers below it
LAYERS = [
    ("atskv.metrics",),  # measurement collectors: timing, memory, the read floor
    ("atskv.core",),  # the cache engine: types, method contract, stores, kernels, seam, engine
    ("atskv.methods", "atskv.benchmarks"),  # the strategies and the tasks
    ("atskv.analysis",),  # result files -> statistics, tables, plots, the report
    ("atskv.experiments", "hydra_plugins"),  # configs, runs, results, tuning, the matrix
    ("atskv.bench", "atskv.integrations"),  # make bench, gpu-check; lm-eval
]
#: modules allowed to touch internals, by what they touch
FENCES = {
    "transformers internals": (("transformers.cache_utils", "transformers.integrations",
                                "transformers.models", "transformers.modeling_"),
                               "atskv.core.seam"),
    "private PyTorch compiler APIs": (("torch._dynamo", "torch._inductor"), "atskv.core.dynamo"),
}


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name, from pyproject.toml's package folders."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = {}
    for pkg, folder in dirs.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("").parts
            name = ".".join((pkg, *rel))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return out


def layer(name: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_every_module_has_a_layer():
    names = [n for n in modules() if n != "atskv"]
    assert len(names) > 40
    assert [n for n in names if layer(n) is None] == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_run_down_the_layers(name):
    own = layer(name)
    up = sorted({m for m in imports(modules()[name])
                 if (lv := layer(m)) is not None and own is not None and lv > own})
    assert up == [], f"{name} (layer {own}) imports from layers above it: {up}"


@pytest.mark.parametrize("what", sorted(FENCES))
def test_internals_are_touched_in_one_module(what):
    prefixes, allowed = FENCES[what]
    users = sorted(n for n, p in modules().items()
                   if any(m.startswith(prefixes) for m in imports(p)))
    assert users == [allowed]


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule can fail: an engine module importing the runner is caught."""
    bad = tmp_path / "engine.py"
    bad.write_text("def f():\n    from atskv.experiments.runner import run\n")
    assert layer("atskv.core.engine") < max(layer(m) for m in imports(bad))
