"""The one module that touches private PyTorch compiler APIs (``torch._dynamo``): the static
decode step under ``torch.compile(fullgraph=True)``, compiled once per kind of model, with a guard
filter that leaves the model's insides unchecked, and the count of graphs compiled so far."""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from atskv.core import seam

#: Inductor options of the decode step. ``decompose_mm_pass`` turns the one-row matrix products
#: of a decode step that remain (the CPU float32 step's projections are ``atskv::linear_rows``;
#: other dtypes; every projection whose sides are at most 2048 on CPU, none on CUDA, where its
#: thresholds exclude one-row products) into fused multiply-and-sum loops, which stream the
#: weights at close to the machine's read bandwidth where the GEMV kernel reaches well under half
#: of it. ``size_asserts`` off: the wrapper re-checked every input's sizes and strides in Python
#: (about 400 calls, 0.45 us each, per step of SmolLM2) after dynamo's guards had checked them.
COMPILE_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}, "size_asserts": False}
#: the decode step compiled per kind of model (:func:`model_key`)
_COMPILED: dict[tuple[Any, ...], Any] = {}


def available() -> bool:
    """Whether torch.compile compiles here (``TORCH_COMPILE_DISABLE=1`` turns it off)."""
    import torch._dynamo

    return not torch._dynamo.config.disable


def dynamic(tensor: Tensor, *dims: int) -> Tensor:
    """Mark ``dims`` of ``tensor`` (a store's: cache capacities, page counts) as varying between
    generations, so that a compiled decode step is compiled once for every size, not first for
    this one and again when it changes. (A dim the step specialises on stays static.)"""
    import torch._dynamo

    torch._dynamo.maybe_mark_dynamic(tensor, list(dims))
    return tensor


def unguarded_model(guards: Sequence[Any]) -> list[bool]:
    """Dynamo's guard filter for the decode step: every guard is kept except those on the
    model's insides (its modules, hooks, config and weights; the model argument's type is kept).

    Those are most of a step's guards (5,180 of 6,184 for SmolLM2 and sliding_window: every
    module's hooks dicts and attributes, each weight's sizes and strides). Checking them took
    0.4-0.8 ms in a loop and 1.1-1.4 ms of a decode step at 4096 tokens on a 2-core CPU (a paired
    A/B, 3-4% of the step); the rest take 70-160 us in a loop. What they would catch is a model
    changed between steps, which nothing here does, or another model passed to the same step: a
    step is compiled per :func:`model_key` instead, and the weights are its inputs, read at every
    call (so models of one kind share a step). The guards on the method's state and stores, the
    token and position tensors and the globals are all kept."""
    from torch._dynamo.source import get_local_source_name

    keep = []
    for g in guards:
        source = g.orig_guard.originating_source
        inside = g.name != "model" and get_local_source_name(source) == "model"
        keep.append(not inside)
    return keep


def model_key(model: Any) -> tuple[Any, ...]:
    """What a compiled decode step takes from a model besides its weights' values: its class,
    its config (every size and constant the step traces), its attention implementation and its
    weights' device and dtype."""
    weight = next(model.parameters())
    return (type(model), model.config.to_json_string(), seam.attn_implementation(model),
            weight.device, weight.dtype)


def compiled_step(model: Any) -> Any:
    """The decode step compiled for ``model``'s kind (:func:`model_key`):
    :func:`atskv.core.seam.step_logits` under ``torch.compile(fullgraph=True)`` (a graph break, a
    host sync or a data-dependent shape is an error, the same things that break CUDA-graph
    capture), with the guards of :func:`unguarded_model`. Each kind gets a copy of the
    function's code, and so compiled steps of its own (dynamo keeps them per code object), since
    no guard on the model's insides tells two kinds apart. Guards re-specialise a step per
    method; tensor sizes that vary between generations (cache capacities) become dynamic after
    their first change."""
    key = model_key(model)
    if key not in _COMPILED:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # a code object of its own (equal to the original, so that inductor's on-disk cache of
        # compiled graphs, keyed by their contents, still serves it)
        fn = seam.step_logits
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                 fn.__defaults__)
        _COMPILED[key] = torch.compile(own, fullgraph=True,
                                       options={**COMPILE_OPTIONS,
                                                "guard_filter_fn": unguarded_model})
    return _COMPILED[key]


def compilations() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
