"""Helpers of the report tests: a result folder written by hand (result.json and
samples.jsonl) and the tables of a rendered report.md."""

from __future__ import annotations

import json
from pathlib import Path


def _samples_for(task_scores: dict) -> list[dict]:
    """Two samples per task whose mean is the task score (ids shared by every method)."""
    rows = []
    for task, s in task_scores.items():
        d = min(10.0, s, 100.0 - s)
        for i, v in enumerate((s - d, s + d)):
            rows.append({"id": f"{task}/{i}", "task": task, "score": v, "score_parts": {},
                         "prediction": "p", "reference": ["r"], "meta": {}})
    return rows


def _write(root: Path, name: str, samples="auto", **over) -> dict:
    """A result.json (and, unless ``samples=None``, a samples.jsonl: by default two samples
    per task matching ``task_scores``, which defaults to ``accuracy`` for qa and summ)."""
    rec = {
        "method": "full", "benchmark": "longbench", "model": "smollm2-135m", "context_len": 1024,
        "budget": None, "kv_size": None, "budget_of": "prompt", "seed": 0, "status": "ok",
        "error": None, "accuracy": 50.0,
        "kv_cache_bytes": 1000.0, "kv_cache_bytes_after_compression": 1000.0,
        # 8x the real footprint: using this as a denominator (or swapping the ratio) would
        # print the -700 % that a broken report once showed for every method.
        "kv_cache_bytes_uncompressed": 8000.0, "decode_kv_read_bytes": 1000.0,
        "peak_memory_bytes": 1_000_000.0, "peak_memory_kind": "process_peak_rss",
        "fresh_process": True, "ttft_s": 0.5, "decode_tokens_per_s": 20.0,
        "hardware": "cpu (test)", "dtype": "float32", "split": "test",
        "machine_load": {"loadavg_start": [0.5, 0.5, 0.5], "loadavg_end": [0.6, 0.5, 0.5],
                         "usable_cpus": 2, "torch_threads": 2, "oversubscribed": False},
        "started_at": "2025-01-01T00:00:00+00:00", "finished_at": "2025-01-01T01:00:00+00:00",
        "config": {}, "provenance": {},
    }
    rec.update(over)
    if "task_scores" not in over and rec["accuracy"] is not None:
        rec["task_scores"] = {"qa": rec["accuracy"], "summ": rec["accuracy"]}
    rec.setdefault("tasks", sorted(rec.get("task_scores") or {"qa": 0, "summ": 0}))
    rows = _samples_for(rec.get("task_scores") or {}) if samples == "auto" else samples
    rec.setdefault("n_samples", len(rows) if rows else 4)
    path = root / name / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    if rows is not None:
        (path.parent / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rec


def _section(md: str, name: str) -> str:
    return md.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]


def _table(md: str, section: str, heading: str, k: int = 0) -> list[dict]:
    """The ``k``-th table under ``heading`` (up to the next heading) of ``section``, as one
    dict per row keyed by the header."""
    part = _section(md, section).split(f"{heading}\n", 1)[1].split("\n#", 1)[0]
    tables, cur = [], []
    for line in part.splitlines() + [""]:
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif cur:
            tables.append(cur)
            cur = []
    head, _, *rows = tables[k]
    return [dict(zip(head, r, strict=True)) for r in rows]


def _cell(md: str, section: str, heading: str, column: str, k: int = 0, **match) -> str:
    rows = [r for r in _table(md, section, heading, k)
            if all(r[h] == v for h, v in match.items())]
    assert len(rows) == 1, (match, rows)
    return rows[0][column]


