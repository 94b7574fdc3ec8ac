"""run.py end to end as a subprocess: a sweep, skipping finished runs, W&B offline, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_random", "benchmark.n_samples=1", "warmup=false", "hardware.threads=1",
        "hardware.compile=false"]  # compiled decoding has its own tests (test_compiled_decode.py)


def run_py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def results_under(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("result.json"))]


def test_sweep_writes_one_result_per_job_and_skips_finished(tmp_path):
    args = ["-m", "method=full,sliding_window", "context_len=512", "budget=0.25",
            "wandb.mode=disabled", f"hydra.sweep.dir={tmp_path}", *TINY]
    proc = run_py(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results_under(tmp_path)
    assert sorted(r["method"] for r in res) == ["full", "sliding_window"]
    keys = {"method", "benchmark", "model", "context_len", "budget", "n_samples", "status",
            "accuracy", "task_scores", "kv_cache_bytes", "kv_cache_bytes_uncompressed",
            "peak_memory_bytes", "ttft_s", "decode_tokens_per_s", "config", "provenance"}
    for r in res:
        assert keys <= set(r), keys - set(r)
        assert r["status"] == "ok" and r["n_samples"] == 1
        assert r["provenance"]["versions"]["transformers"]
        assert r["peak_memory_kind"] == "process_peak_rss" and r["peak_memory_bytes"] > 0
    by = {r["method"]: r for r in res}
    ratio = by["sliding_window"]["kv_cache_bytes"] / by["full"]["kv_cache_bytes"]
    assert ratio == pytest.approx(0.25, abs=0.01)
    # full holds K/V for every token plus its per-head fill counters
    assert by["full"]["kv_cache_bytes"] == pytest.approx(by["full"]["kv_cache_bytes_uncompressed"], rel=1e-3)
    for p in tmp_path.rglob("samples.jsonl"):
        rows = [json.loads(line) for line in p.read_text().splitlines()]
        assert len(rows) == 1 and {"prediction", "reference", "score", "ttft_s"} <= set(rows[0])

    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")}
    again = run_py(*args)
    assert again.returncode == 0
    assert "skipping" in again.stderr + again.stdout
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")} == before


def test_wandb_offline_run_is_written(tmp_path):
    proc = run_py("context_len=512", "wandb.mode=offline", f"hydra.run.dir={tmp_path}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "result.json").is_file()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


@pytest.mark.parametrize("override,message", [
    ("budget=1.5", "budget=1.5 is outside (0, 1]"),
    ("method=snapkvv", "snapkvv"),
    ("benchmark.tasks=[needle]", "needle"),
])
def test_bad_input_fails_fast_and_writes_nothing(tmp_path, override, message):
    proc = run_py("context_len=512", "wandb.mode=disabled", f"hydra.run.dir={tmp_path}", override, *TINY)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not list(tmp_path.rglob("result.json"))
    assert "Loading weights" not in proc.stderr


@pytest.mark.slow
def test_newline_stop_string_ends_generation_through_run_py(tmp_path):
    """LongBench's samsum stops at the first newline (its protocol's stop string): the real
    model's summary ends there, fewer tokens than the 128 allowed are made."""
    data = tmp_path / "lb"
    data.mkdir()
    dialogue = ("Anna: Are we still on for lunch tomorrow?\nBen: Yes! 12:30 at the Thai place?\n"
                "Anna: Perfect, I'll book a table.\nBen: Great, see you there.\n")
    with open(data / "samsum.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"input": dialogue, "context": "Dialogue: " + dialogue * 3,
                                "answers": ["Anna and Ben will have lunch at the Thai place."],
                                "length": 60, "dataset": "samsum", "language": "en",
                                "all_classes": None, "_id": f"s{i}"}) + "\n")
    out = tmp_path / "run"
    proc = run_py("benchmark=longbench", f"benchmark.data_dir={data}", "benchmark.tasks=[samsum]",
                  "benchmark.n_samples=2", "context_len='512'", "warmup=false",
                  "wandb.mode=disabled", "hardware.compile=false", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert rows
    for r in rows:
        assert r["stopped_by"] in ("stop", "eos"), r
        assert "\n" not in r["prediction"]
        assert r["generated_tokens"] < 128
    assert any(r["stopped_by"] == "stop" for r in rows)


def test_a_compiled_run_compiles_once_and_records_it(tmp_path):
    """The warm-up (prompts of 64 and 80 tokens) and the samples (512) share one compiled decode
    step: result.json counts one compile, and the seconds it took are recorded (the warm-up's)."""
    args = ["method=snapkv", "context_len=512", "budget=0.25", "benchmark.n_samples=3",
            "model=tiny_random", "hardware.threads=1", "hardware.compile=true",
            "hardware.compile_min_steps=0", "wandb.mode=disabled", f"hydra.run.dir={tmp_path}"]
    proc = run_py(*args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = results_under(tmp_path)
    assert res["compile_decision"]["compiled"] and res["compile_decision"]["min_steps"] == 0
    assert res["compiles"] == 1
    assert res["warmup_compile_s"] > 0 and res["compile_s"] == 0
