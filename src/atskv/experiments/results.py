"""Result files: ``result.json`` and ``samples.jsonl`` per run, written atomically, plus
provenance (versions, git commit, device, date). While a run is under way its answered samples
are appended to ``samples.partial.jsonl`` and its segments listed in ``progress.json``, so that
an interrupted run resumes where it stopped; both go once ``result.json`` says ``ok``."""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from statistics import mean
from typing import Any

RESULT = "result.json"
SAMPLES = "samples.jsonl"
PARTIAL = "samples.partial.jsonl"
PROGRESS = "progress.json"
PACKAGES = ("torch", "transformers", "hydra-core", "omegaconf", "datasets", "wandb", "lm-eval",
            "atskv")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder and rename it into place: readers see either
    the old file or the complete new one, never a partial one (also on Ctrl-C or a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")


def _lines(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(_clean(r)) + "\n" for r in rows)


def write_samples(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, _lines(rows))


def append_samples(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append complete lines to a run's partial samples file and flush them to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(_lines(rows))
        f.flush()
        os.fsync(f.fileno())


def read_partial(folder: Path) -> list[dict[str, Any]]:
    """The rows an interrupted run of ``folder`` had answered ([] when none); a line cut short by
    the interruption is left out."""
    try:
        text = (folder / PARTIAL).read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "id" in row:
            rows.append(row)
    return rows


def read_segments(folder: Path) -> list[dict[str, Any]]:
    """The segments (start, commit, samples answered before) of an interrupted run of
    ``folder`` ([] when none)."""
    try:
        return list(json.loads((folder / PROGRESS).read_text())["segments"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return []


def read_result(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / RESULT).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished(folder: Path) -> bool:
    """True when the folder holds a successful result (failed runs are rerun)."""
    res = read_result(folder)
    return bool(res) and res.get("status") == "ok"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def short_commit(commit: str | None) -> str:
    """A commit as the reports show it: 7 hex digits, and ``-dirty`` when it was dirty."""
    if not commit:
        return "unknown"
    return commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")


def provenance(device: str) -> dict[str, Any]:
    """Versions, the git commit (``-dirty`` when tracked files differ from it), the date, the
    device and the machine: read when a run starts. :func:`run_facts` adds what only the run's
    end knows."""
    import torch

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    dev = torch.device(device)
    device_name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                   else platform.processor() or platform.machine())
    return {
        "versions": versions,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": now_iso(),
        "device": str(dev),
        "device_name": device_name,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        **run_facts(),
    }


def run_facts() -> dict[str, Any]:
    """What a run's provenance can only say once it has run: the torch threads it used and the
    CPU decode kernels that ran (:mod:`atskv.core.kernels`), or why PyTorch's code did."""
    import torch

    from atskv.core import kernels

    return {"torch_threads": torch.get_num_threads(), "decode_attention": kernels.status()}


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def load_summary(start: list[float] | None, end: list[float] | None) -> dict[str, Any]:
    """The machine's load around a run; ``oversubscribed`` when the 1-minute load exceeded the
    CPUs this process may use (timings then are inflated and noisy)."""
    import torch

    cpus = usable_cpus()
    busy = [x[0] for x in (start, end) if x]
    return {"loadavg_start": start, "loadavg_end": end, "usable_cpus": cpus,
            "torch_threads": torch.get_num_threads(),
            "oversubscribed": bool(busy) and max(busy) > cpus}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return mean(vals) if vals else None


def summarize(rows: list[dict[str, Any]], benchmark: Any = None) -> dict[str, Any]:
    """Aggregate per-sample rows into the run's summary metrics. Each task's score is the
    benchmark's own aggregate of its samples (the mean of their scores, or e.g. ZeroSCROLLS'
    corpus-level ROUGE); accuracy is the mean over tasks (tasks weigh equally, as LongBench
    reports). LongBench-E tasks are also scored per length bucket."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    by_bucket: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
        bucket = (r.get("meta") or {}).get("length_bucket")
        if bucket:
            by_bucket.setdefault(r["task"], {}).setdefault(bucket, []).append(r)

    def agg(task: str, task_rows: list[dict[str, Any]]) -> float:
        if benchmark is None:
            return mean(r["score"] for r in task_rows)
        return float(benchmark.aggregate(task, task_rows))

    task_scores = {t: agg(t, rs) for t, rs in sorted(by_task.items())}
    kv = _mean([r["kv_cache_bytes"] for r in rows])
    kv_full = _mean([r["kv_cache_bytes_uncompressed"] for r in rows])
    described = {}
    if benchmark is not None:
        described = {"task_metrics": {t: benchmark.task_metric(t) for t in task_scores},
                     "task_aggregation": {t: benchmark.aggregation(t) for t in task_scores}}
    return {
        "accuracy": mean(task_scores.values()) if task_scores else None,
        "task_scores": task_scores,
        **described,
        "task_scores_by_bucket": {t: {b: agg(t, rs) for b, rs in sorted(bs.items())}
                                  for t, bs in sorted(by_bucket.items())} or None,
        "kv_cache_bytes": kv,
        "kv_cache_bytes_after_compression": _mean([r["kv_cache_bytes_after_compression"] for r in rows]),
        "kv_cache_bytes_uncompressed": kv_full,
        "kv_cache_fraction": (kv / kv_full) if kv is not None and kv_full else None,
        "decode_kv_read_bytes": _mean([r["decode_kv_read_bytes"] for r in rows]),
        "ttft_s": _mean([r["ttft_s"] for r in rows]),
        "decode_tokens_per_s": _mean([r["decode_tokens_per_s"] for r in rows]),
        "prompt_tokens": _mean([r["prompt_tokens"] for r in rows]),
        "generated_tokens": _mean([r["generated_tokens"] for r in rows]),
        "prompt_tokens_kept": _kept(rows),
        "kv_cache_bytes_prefill": _mean([r.get("kv_cache_bytes_prefill") for r in rows]),
        "needle_recall": _mean([r.get("needle_recall") for r in rows]),
        "prefill_s": _mean([r.get("prefill_s") for r in rows]),
        "compress_s": _mean([r.get("compress_s") for r in rows]),
        "extend_s": _mean([r.get("extend_s") for r in rows]),
        "compile_s": sum(r.get("compile_s") or 0.0 for r in rows),
        # >1: the members and samples of a batch decoded together, so that TTFT and decode
        # rates are the batch's, not the method's alone (compare speed with make bench)
        "decode_batch_size": max((r.get("decode_batch_size") or 1 for r in rows), default=None),
        "accuracy_by_position": _by_position(rows, benchmark),
    }


def _by_position(rows: list[dict[str, Any]], benchmark: Any) -> dict[str, float] | None:
    """Several questions per context: accuracy (mean over tasks) of the questions asked at each
    position (``"0"``: the first), None when no row has a ``question_position``."""
    at: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("question_position") is not None:
            at.setdefault(int(r["question_position"]), []).append(r)
    if not at:
        return None
    return {str(p): summarize_scores(rs, benchmark) for p, rs in sorted(at.items())}


def summarize_scores(rows: list[dict[str, Any]], benchmark: Any) -> float:
    """The mean over tasks of each task's score (the benchmark's own aggregate)."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    scores = [float(benchmark.aggregate(t, rs)) if benchmark is not None
              else mean(r["score"] for r in rs) for t, rs in by_task.items()]
    return mean(scores)


def _kept(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Run-level prompt tokens kept per layer and KV head: mean of the samples' means, min of
    their mins, max of their maxes."""
    kept = [r["prompt_tokens_kept"] for r in rows if r.get("prompt_tokens_kept")]
    if not kept:
        return None
    return {"mean": mean(k["mean"] for k in kept), "min": min(k["min"] for k in kept),
            "max": max(k["max"] for k in kept)}
