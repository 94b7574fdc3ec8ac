"""Metric collectors and result aggregation."""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers import small_llama

from atskv.experiments import results
from atskv.metrics import PeakMemory, Timer


def test_timer_measures_the_region():
    with Timer("cpu") as t:
        time.sleep(0.05)
    assert 0.05 <= t.seconds < 5


PEAK_RSS_PROBE = """
import torch
from atskv.metrics import PeakMemory
with PeakMemory("cpu") as base:
    pass
with PeakMemory("cpu") as m:
    x = torch.ones(64 * 1024 * 1024 // 4 * 4)  # 256 MiB, touched
    del x
print(m.kind, int(bool(m.since_reset)), m.peak_bytes - base.peak_bytes)
"""


def _in_fresh_process(code: str) -> list[str]:
    """What ``code`` prints, run in a new Python process, split into words."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split()


def test_peak_rss_sees_an_allocation_inside_the_region():
    """In a fresh process: after a long test session the allocator may serve the allocation from
    memory the process already holds, which no RSS measure can see."""
    out = _in_fresh_process(PEAK_RSS_PROBE)
    kind, since_reset, grown = out[0], out[1] == "1", int(out[2])
    assert kind == "process_peak_rss"
    if not since_reset:
        pytest.skip("peak RSS cannot be reset on this OS")
    assert grown >= 200 * 1024 * 1024


TRIM_PROBE = """
import torch
from atskv.metrics import current_bytes, trim_heap
held = [torch.ones(15 * 1024) for _ in range(4096)]  # 60 KiB each: heap chunks, 240 MiB
pin = torch.ones(16)  # above them in the heap: their pages cannot go back by shrinking its top
del held
before = current_bytes("cpu")
print(int(trim_heap()), before - current_bytes("cpu"))
"""


def test_trim_heap_gives_freed_heap_pages_back():
    """In a fresh process: tensors freed below a live one keep their pages in the process until
    the heap is trimmed."""
    out = _in_fresh_process(TRIM_PROBE)
    if out[0] != "1":
        pytest.skip("the C library has no malloc_trim (not glibc)")
    assert int(out[1]) >= 128 * 1024 * 1024


@pytest.mark.gpu
def test_cuda_peak_is_the_allocator_peak():
    with PeakMemory("cuda") as m:
        x = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        del x
    assert m.kind == "cuda_max_allocated" and m.peak_bytes >= 128 * 1024 * 1024


def test_summarize_averages_tasks_equally():
    rows = [
        {"task": "a", "score": 100.0}, {"task": "a", "score": 0.0}, {"task": "b", "score": 100.0},
    ]
    for r in rows:
        r.update(kv_cache_bytes=100, kv_cache_bytes_after_compression=90,
                 kv_cache_bytes_uncompressed=400, decode_kv_read_bytes=None, ttft_s=1.0,
                 decode_tokens_per_s=None, prompt_tokens=10, generated_tokens=2)
    s = results.summarize(rows)
    assert s["task_scores"] == {"a": 50.0, "b": 100.0}
    assert s["accuracy"] == 75.0
    assert s["kv_cache_fraction"] == 0.25
    assert s["decode_tokens_per_s"] is None and s["decode_kv_read_bytes"] is None


def test_atomic_write_never_leaves_partial_files(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    results.write_json(target, {"a": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(results.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        results.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize("tie", [True, False])
def test_the_floor_reads_the_weights_a_step_reads_whole(tie):
    from atskv.metrics.floor import step_weights

    model = small_llama(tie)
    emb = model.get_input_embeddings().weight
    every = {p.data_ptr(): p.numel() for p in model.parameters()}
    read = step_weights(model)
    assert len({t.data_ptr() for t in read}) == len(read)  # none read twice
    assert model.lm_head.weight.data_ptr() in {t.data_ptr() for t in read}
    # untied: the embedding table is skipped (a step reads one row of it); tied: it is the head
    assert sum(t.numel() for t in read) == sum(every.values()) - (0 if tie else emb.numel())


def test_the_floors_kv_blocks_hold_the_bytes_written():
    from atskv.metrics.floor import kv_blocks

    blocks = kv_blocks(30 * 1000 * 4 + 7, 30, torch.float32, "cpu")
    assert [b.numel() for b in blocks] == [1000] * 30
    assert all(float(b.sum()) == 1000.0 for b in blocks)  # written, not fresh zero pages
    half = kv_blocks(4000, 2, torch.bfloat16, "cpu")
    assert [b.numel() for b in half] == [1000, 1000] and half[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="n_blocks=0"):
        kv_blocks(4000, 0, torch.float32, "cpu")


def test_the_floor_is_a_positive_time_and_rejects_no_passes():
    from atskv.metrics.floor import read_floor_s

    assert read_floor_s([torch.ones(1000)], [torch.ones(10)], passes=3) > 0
    with pytest.raises(ValueError, match="passes=0"):
        read_floor_s([torch.ones(10)], [], passes=0)


@pytest.mark.gpu
def test_the_floor_on_cuda_reads_in_fused_passes():
    from atskv.metrics.floor import kv_blocks, read_floor_s

    weights = [torch.ones(1 << 20, dtype=torch.bfloat16, device="cuda") for _ in range(8)]
    kv = kv_blocks(1 << 22, 4, torch.bfloat16, "cuda")
    assert [b.numel() for b in kv] == [1 << 19] * 4
    assert read_floor_s(weights, kv, passes=3) > 0
