"""The read floor of a decode step: how long the device takes to read, once, the bytes that every
decode step of a method must read (the model's weights and the KV the step reads), timed in the
same run as the steps.

One decode step of a small model is memory-bound on a CPU (and on a GPU at batch 1), so a method
that reads fewer KV bytes can only be as much faster as its bytes allow: the ratio of two
methods' :func:`step_bytes` is the speed-up a step that reads at the machine's bandwidth would
get. The timed floor says how close the steps come to that: it is read the way torch's own
reductions read memory (one pass per tensor on a CPU, fused multi-tensor passes on a GPU). It is
a reference, not a proven lower bound: a step whose data stay in cache between steps can beat
it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from atskv.metrics.timing import synchronize


def kv_blocks(kv_read_bytes: float, n_blocks: int, dtype: torch.dtype,
              device: torch.device | str) -> list[Tensor]:
    """``kv_read_bytes`` (rounded down to whole elements) in ``n_blocks`` equal blocks of
    ``dtype``, one per layer, written once so that every page is backed by memory of its own (a
    never-written allocation can read as one shared zero page)."""
    if n_blocks < 1:
        raise ValueError(f"n_blocks={n_blocks}: need at least one block")
    per = int(kv_read_bytes) // torch.empty((), dtype=dtype).element_size() // n_blocks
    return [torch.full((per,), 1.0, dtype=dtype, device=device) for _ in range(n_blocks)]


def read_once(tensors: Sequence[Tensor]) -> None:
    """Read every element of ``tensors`` once: a sum per tensor on a CPU (torch's fastest read
    there; the fused multi-tensor norm computes more and ran at half the rate), fused
    multi-tensor norms on a GPU (one launch per tensor would time the launches, not the reads)."""
    if tensors and tensors[0].device.type == "cuda":
        torch._foreach_norm(list(tensors))
    else:
        for t in tensors:
            t.sum()


def read_floor_s(weights: Sequence[Tensor], kv: Sequence[Tensor], passes: int = 5) -> float:
    """The median seconds of ``passes`` timed reads of ``weights`` then ``kv`` (after one
    untimed read, which brings them to the same state as a step that follows another)."""
    if passes < 1:
        raise ValueError(f"passes={passes}: need at least one timed read")
    tensors = [*weights, *kv]
    device = tensors[0].device
    read_once(tensors)
    times = []
    for _ in range(passes):
        synchronize(device)
        t0 = time.perf_counter()
        read_once(tensors)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_weights(model: torch.nn.Module) -> list[Tensor]:
    """The weights a decode step of ``model`` reads whole: all of them, once each, except the
    input embeddings where they are not tied to the output layer (a step reads one row)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    return [p.detach() for p in model.parameters() if p is not emb or tied]


def step_bytes(model: torch.nn.Module, kv_read_bytes: float) -> int:
    """Bytes a decode step of ``model`` that reads ``kv_read_bytes`` of KV must read at least:
    :func:`step_weights` and the KV."""
    return sum(t.numel() * t.element_size() for t in step_weights(model)) + int(kv_read_bytes)


def step_floor_s(model: torch.nn.Module, kv_read_bytes: float, n_layers: int,
                 passes: int = 5) -> float:
    """:func:`read_floor_s` of a decode step of ``model`` that reads ``kv_read_bytes`` of KV:
    :func:`step_weights`, then the KV as ``n_layers`` blocks of the weights' dtype."""
    weights = step_weights(model)
    kv = kv_blocks(kv_read_bytes, n_layers, weights[0].dtype, weights[0].device)
    return read_floor_s(weights, kv, passes)
