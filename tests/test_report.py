"""Tests for atskv.analysis.report: numbers against hand-computed values, and the rendered files."""

from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from atskv.analysis import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def make_fixture(root: Path, extra: Path) -> None:
    """2 benchmarks x {full, snapkv, h2o} x {1024, 2048}; snapkv/longbench has 2 seeds;
    a failed quest run; no full run for ruler at 2048; h2o missing for ruler at 2048; one
    duplicate (h2o/longbench/2048) in a second folder, newer than the original."""
    lb, ru = "longbench", "ruler"
    for ctx, k in ((1024, 1), (2048, 2)):
        _write(root, f"lb_full_{ctx}", benchmark=lb, context_len=ctx, kv_cache_bytes=1000.0 * k,
               accuracy=60.0, ttft_s=0.5 * k, task_scores={"qa": 70.0, "summ": 50.0})
        _write(root, f"lb_snap_{ctx}", method="snapkv", budget=0.25, benchmark=lb,
               context_len=ctx, kv_cache_bytes=250.0 * k, peak_memory_bytes=800_000.0,
               accuracy=40.0 if ctx == 1024 else 30.0,
               task_scores={"qa": 50.0, "summ": 30.0} if ctx == 1024 else {"qa": 40.0, "summ": 20.0})
        if ctx == 1024:  # no full run for ruler at 2048
            _write(root, "ru_full_1024", benchmark=ru, kv_cache_bytes=1000.0, accuracy=90.0,
                   ttft_s=0.25, decode_tokens_per_s=40.0, task_scores={"niah": 90.0})
        _write(root, f"ru_snap_{ctx}", method="snapkv", budget=0.25, benchmark=ru,
               context_len=ctx, kv_cache_bytes=100.0 * k, accuracy=80.0, ttft_s=0.3,
               decode_tokens_per_s=45.0, task_scores={"niah": 80.0})
    _write(root, "lb_snap_1024_s1", method="snapkv", budget=0.25, benchmark=lb, seed=1,
           kv_cache_bytes=250.0, peak_memory_bytes=800_000.0, accuracy=50.0,
           task_scores={"qa": 60.0, "summ": 40.0})
    _write(root, "lb_snap_2048_s1", method="snapkv", budget=0.25, benchmark=lb, seed=1,
           context_len=2048, kv_cache_bytes=500.0, peak_memory_bytes=800_000.0, accuracy=40.0,
           task_scores={"qa": 50.0, "summ": 30.0})
    # seed 1 of full only at 1024: snapkv seed 1 at 2048 has no reference (n/a), and full's
    # seed-1 context average would not be comparable, so full gets no summary std
    _write(root, "lb_full_1024_s1", benchmark=lb, seed=1, accuracy=60.0,
           task_scores={"qa": 70.0, "summ": 50.0})
    _write(root, "lb_h2o_1024", method="h2o", budget=0.25, benchmark=lb, kv_cache_bytes=500.0,
           accuracy=45.0)
    _write(root, "lb_h2o_2048", method="h2o", budget=0.25, benchmark=lb, context_len=2048,
           kv_cache_bytes=999_999.0, accuracy=0.0, finished_at="2025-01-01T01:00:00+00:00")
    _write(extra, "rerun/lb_h2o_2048", method="h2o", budget=0.25, benchmark=lb,
           context_len=2048, kv_cache_bytes=1000.0, accuracy=35.0,
           finished_at="2025-01-02T01:00:00+00:00")
    _write(root, "ru_h2o_1024", method="h2o", budget=0.25, benchmark=ru, kv_cache_bytes=400.0,
           accuracy=70.0, task_scores={"niah": 70.0})
    _write(root, "ru_quest_1024", method="quest", budget=0.25, benchmark=ru, status="failed",
           error="CUDA out of memory (fixture)", accuracy=99.0, kv_cache_bytes=1.0)


@pytest.fixture(scope="module")
def rep(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    make_fixture(base / "sweep1", base / "sweep2")
    r = report.generate_report([base / "sweep1", base / "sweep2"], base / "out")
    r.md = (r.out_dir / "report.md").read_text()
    r.html = (r.out_dir / "report.html").read_text()
    return r


def _val(df: pd.DataFrame, col: str, **where):
    sel = df
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, (where, sel)
    return sel[col].iloc[0]


def _section(md: str, name: str) -> str:
    return md.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]


def test_memory_reduction_hand_computed(rep):
    s = rep.summary
    assert _val(s, "memory_reduction_pct", section="longbench", method="snapkv") == 75.0
    assert _val(s, "memory_reduction_pct", section="longbench", method="h2o") == 50.0
    assert _val(s, "memory_reduction_pct", section="longbench", method="full") == 0.0
    assert _val(s, "peak_memory_reduction_pct", section="longbench", method="snapkv") == pytest.approx(20.0)
    assert _val(s, "peak_memory_reduction_pct", section="longbench", method="full") == 0.0
    assert (s["memory_reduction_pct"].dropna() >= 0).all(), "sign error: savings must be positive"
    lb = _section(rep.md, "longbench")
    pm = "( ± 0\\.0)?"  # two seeds with equal values: std 0
    kv = r"[0-9.]+( ± [0-9.]+)?"  # KV cache MiB
    assert re.search(rf"\| full \| 4 \| {kv} \| 0\.0{pm} \| 0\.0{pm} \|", lb)
    assert re.search(rf"\| snapkv \| 4 \| {kv} \| 75\.0{pm} \| 20\.0{pm} \|", lb)
    assert "-700" not in rep.md
    assert "(s) | Avg throughput (tokens/s) | Avg accuracy [95% CI] | Δ vs full [95% CI] |" in lb


def test_means_over_contexts_and_seeds(rep):
    pc = rep.per_context
    assert _val(pc, "accuracy", section="longbench", method="snapkv", context_len=1024) == 45.0
    std = _val(pc, "accuracy_std", section="longbench", method="snapkv", context_len=1024)
    assert std == pytest.approx(math.sqrt(50.0))
    assert _val(pc, "n_seeds", section="longbench", method="snapkv", context_len=1024) == 2
    assert _val(pc, "accuracy", section="longbench", method="snapkv", context_len=2048) == 35.0
    assert math.isnan(_val(pc, "accuracy_std", section="longbench", method="h2o", context_len=2048))
    # summary: mean of the per-context means (45 at 1024, 35 at 2048); std over the seeds'
    # context averages (35 and 45)
    s = rep.summary
    assert _val(s, "accuracy", section="longbench", method="snapkv") == 40.0
    assert _val(s, "accuracy_std", section="longbench", method="snapkv") == pytest.approx(math.sqrt(50.0))
    assert "| 40.0 ± 7.1 [" in _section(rep.md, "longbench")
    assert "| 45.0 ± 7.1 [" in _section(rep.md, "longbench")
    # full's seed 1 only ran at 1024: no std from seeds that cover different contexts
    assert math.isnan(_val(s, "ttft_s_std", section="longbench", method="full"))
    assert _val(pc, "memory_reduction_pct", section="longbench", method="snapkv", context_len=2048) == 75.0
    assert "n/a for longbench / smollm2-135m at context length 2048 (seed 1)" in rep.md
    assert _val(rep.summary, "ttft_s", section="longbench", method="full") == pytest.approx(0.75)
    assert "Averaged over context lengths 1024, 2048" in rep.md


def test_benchmarks_give_different_numbers(rep):
    s = rep.summary.set_index(["section", "method"])
    assert s.loc[("ruler", "snapkv"), "memory_reduction_pct"] == 90.0
    assert s.loc[("longbench", "snapkv"), "memory_reduction_pct"] == 75.0
    assert s.loc[("ruler", "snapkv"), "accuracy"] != s.loc[("longbench", "snapkv"), "accuracy"]
    assert s.loc[("ruler", "full"), "decode_tokens_per_s"] == 40.0
    assert s.loc[("longbench", "full"), "decode_tokens_per_s"] == 20.0
    lb_table = _section(rep.md, "longbench").split("### Per context length")[0]
    ru_table = _section(rep.md, "ruler").split("### Per context length")[0]
    assert lb_table != ru_table


def test_per_task_table(rep):
    lb = _section(rep.md, "longbench").split("### Per task")[1]
    assert "| Method | qa (n=2) | summ (n=2) |" in lb  # no task_metrics recorded: no name
    assert re.search(r"\| full \| 70\.0( ± 0\.0)? \| 50\.0( ± 0\.0)? \|", lb)
    assert "| snapkv | 50.0 ± 7.1 | 30.0 ± 7.1 |" in lb  # seed averages 45/55 and 25/35
    assert "| niah (n=2) |" in _section(rep.md, "ruler")


def test_missing_full_is_na_with_note(rep):
    assert math.isnan(_val(rep.per_context, "memory_reduction_pct", section="ruler",
                           method="snapkv", context_len=2048))
    ru = _section(rep.md, "ruler")
    row = next(line for line in ru.splitlines() if line.startswith("| snapkv | 2048 |"))
    assert row.split(" | ")[5] == "n/a"  # memory reduction
    assert row.split(" | ")[-1] == "n/a |"  # Δ vs full
    notes = _section(rep.md, "Notes")
    assert re.search(r"n/a for ruler .* context length 2048 .*no `full` run", notes)
    assert "90.0 †" in ru and "† averaged only over" in ru  # summary uses 1024 only, says so
    assert "`h2o` has no result at context length 2048" in ru  # partial results note


def test_failed_runs_listed_not_averaged(rep):
    failed = _section(rep.md, "Failed runs")
    assert "quest" in failed and "CUDA out of memory (fixture)" in failed
    assert "quest" not in set(rep.summary["method"]) | set(rep.per_context["method"])
    assert "quest" not in rep.md.split("\n## Failed runs")[0].split("## longbench")[1]


def test_duplicates_keep_newest(rep):
    assert _val(rep.per_context, "accuracy", section="longbench", method="h2o", context_len=2048) == 35.0
    assert _val(rep.per_context, "memory_reduction_pct", section="longbench", method="h2o",
                context_len=2048) == 50.0
    notes = _section(rep.md, "Notes")
    assert "Duplicate run" in notes and "rerun" in notes and "kept the newest" in notes


def test_figures_and_html(rep):
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", rep.md)
    assert len(refs) == 2 * 5 + 4  # 5 per benchmark + 3 bars + scatter
    assert {Path(r).name for r in refs} == {p.name for p in rep.figures}
    for r in refs:
        data = (rep.out_dir / r).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert rep.html.count('src="data:image/png;base64,') == len(refs)
    assert 'src="figures/' not in rep.html
    assert "<table>" in rep.html and "Failed runs" in rep.html
    csv = pd.read_csv(rep.out_dir / "summary.csv")
    assert len(csv) == len(rep.summary) == 6
    assert list(csv.columns[:4]) == ["section", "benchmark", "model", "method"]


def test_sign_and_denominator_unit():
    runs = pd.DataFrame([
        {"method": "full", "benchmark": "b", "model": "m", "context_len": 8, "budget": None,
         "seed": 0, "kv_cache_bytes": 1000.0, "peak_memory_bytes": 10.0,
         "peak_memory_kind": "x", "decode_kv_read_bytes": None},
        {"method": "quest", "benchmark": "b", "model": "m", "context_len": 8, "budget": 0.5,
         "seed": 0, "kv_cache_bytes": 2000.0, "peak_memory_bytes": 5.0,
         "peak_memory_kind": "y", "decode_kv_read_bytes": None},
        {"method": "snapkv", "benchmark": "b", "model": "m", "context_len": 8, "budget": 0.25,
         "seed": 0, "kv_cache_bytes": 250.0, "peak_memory_bytes": 5.0,
         "peak_memory_kind": "x", "decode_kv_read_bytes": None},
        {"method": "snapkv", "benchmark": "b", "model": "m", "context_len": 8, "budget": 0.5,
         "seed": 0, "kv_cache_bytes": 500.0, "peak_memory_bytes": None,
         "peak_memory_kind": "x", "decode_kv_read_bytes": None},
    ])
    ok, _ = report.prepare(runs)
    red = dict(zip(ok["label"], ok["memory_reduction_pct"], strict=True))
    assert red == {"full": 0.0, "quest": -100.0, "snapkv@0.25": 75.0, "snapkv@0.5": 50.0}
    peak = dict(zip(ok["label"], ok["peak_memory_reduction_pct"], strict=True))
    assert peak["snapkv@0.25"] == 50.0
    assert math.isnan(peak["quest"])  # different peak_memory_kind: not comparable
    assert math.isnan(peak["snapkv@0.5"])


def test_cli_prints_out_dir(tmp_path, capsys):
    root = tmp_path / "res"
    # a sweep that ran full once per budget: the full cache ignores the budget, so these are
    # one setting run twice (a duplicate; the newest is kept)
    _write(root, "a", budget=0.25)
    _write(root, "a2", budget=1.0, ttft_s=0.7, finished_at="2025-01-01T02:00:00+00:00")
    _write(root, "b", method="snapkv", budget=0.5, kv_cache_bytes=500.0)
    _write(root, "c", method="h2o", budget=0.5, kv_cache_bytes=500.0, benchmark="ruler")
    out = tmp_path / "rep"
    assert report.main(["--results", str(root), "--out", str(out), "--resamples", "50"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(out))
    md = (out / "report.md").read_text()
    assert re.search(r"No successful run of full, snapkv in this section", md)  # method missing in ruler
    assert "n/a for ruler" in md  # no full run for ruler at all
    assert re.search(r"Duplicate run \(method=full, .*kept the newest `[^`]*/a2/result.json`", md)
    assert re.search(r"\| full \| 4 \| [0-9.]+ \| 0\.0 \| 0\.0 \| 0\.700 \|", md)
    assert "| full | 1024 | 1 | 4 |" in md and re.search(r"\| snapkv \| 4 \| [0-9.]+ \| 50\.0 \|", md)
    assert (out / "summary.csv").stat().st_size > 0


def test_empty_folder_fails_clearly(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = report.main(["--results", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert rc != 0
    assert "no result.json found" in capsys.readouterr().err
    assert not (tmp_path / "o" / "report.md").exists()


def test_only_failed_runs_exit_nonzero(tmp_path, capsys):
    _write(tmp_path / "r", "x", status="failed", error="boom")
    assert report.main(["--results", str(tmp_path / "r"), "--out", str(tmp_path / "o")]) != 0
    assert "no successful runs" in capsys.readouterr().err
    assert "boom" in (tmp_path / "o" / "report.md").read_text()


def _fake_wandb(calls: list, fail: bool) -> types.ModuleType:
    mod = types.ModuleType("wandb")

    class Run:
        def log(self, d):
            calls.append(("log", sorted(d)))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        if fail:
            raise RuntimeError("no wandb here")
        calls.append(("init", kw))
        return Run()

    mod.init, mod.Table, mod.Image = init, (lambda dataframe: dataframe), (lambda p: p)
    return mod


def test_wandb_logging_and_failure_only_warns(tmp_path, monkeypatch):
    _write(tmp_path / "r", "a")
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls, fail=False))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    report.generate_report([tmp_path / "r"], tmp_path / "o", use_wandb=True)
    assert calls[0] == ("init", {"mode": "disabled", "project": "atskv", "job_type": "report"})
    logged = [k for c in calls if c[0] == "log" for k in c[1]]
    assert "summary" in logged and any(k.startswith("figures/") for k in logged)
    assert calls[-1] == ("finish",)
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb([], fail=True))
    with pytest.warns(UserWarning, match="W&B logging failed"):
        assert report.main(["--results", str(tmp_path / "r"), "--out", str(tmp_path / "o2"),
                            "--wandb"]) == 0
    assert (tmp_path / "o2" / "report.html").exists()


def test_duplicate_prefers_ok_over_newer_failed(tmp_path):
    root = tmp_path / "r"
    _write(root, "old_ok", method="snapkv", budget=0.25, accuracy=42.0,
           finished_at="2025-01-01T01:00:00+00:00")
    _write(root, "new_failed", method="snapkv", budget=0.25, status="failed", error="boom",
           accuracy=None, finished_at="2025-01-03T01:00:00+00:00")
    _write(root, "older_ok", method="snapkv", budget=0.25, accuracy=10.0,
           finished_at="2024-12-01T01:00:00+00:00")
    runs, notes, _ = report.load_results([root])
    assert len(runs) == 1
    kept = runs.iloc[0]
    assert kept["status"] == "ok" and kept["accuracy"] == 42.0  # ok beats failed, then newest
    assert kept["path"].endswith("old_ok/result.json")
    note = next(n for n in notes if n.startswith("Duplicate run"))
    assert "kept the newest successful run" in note and "new_failed" in note and "older_ok" in note
    # two failed runs: the newest failed one is kept (and listed as failed)
    _write(tmp_path / "f", "a", status="failed", error="first", finished_at="2025-01-01T00:00:00")
    _write(tmp_path / "f", "b", status="failed", error="second", finished_at="2025-01-02T00:00:00")
    runs, _, _ = report.load_results([tmp_path / "f"])
    assert list(runs["error"]) == ["second"]


def _method_cfg(name: str, **over) -> dict:
    import dataclasses

    from atskv.methods import METHODS

    cfg = {f.name: f.default for f in dataclasses.fields(METHODS.get(name)) if f.name != "budget"}
    return {"method": {"name": name, **cfg, **over}}


def test_hparams_against_dataclass_defaults():
    assert report.hparams({"method": "atskv", "config": _method_cfg("atskv")}) == ""
    assert report.hparams({"method": "atskv", "config": _method_cfg("atskv", chunk=32)}) == "chunk=32"
    got = report.hparams({"method": "atskv",
                          "config": _method_cfg("atskv", mass=0.5, adaptive=False)})
    assert got == "adaptive=False,mass=0.5"  # dataclass field order
    assert report.hparams({"method": "full", "config": _method_cfg("full")}) == ""
    assert report.hparams({"method": "snapkv", "config": {}}) == ""  # no config recorded
    # an unregistered method: nothing to compare with, so every hyperparameter counts
    assert report.hparams({"method": "gone", "config": {"method": {"name": "gone", "b": 2,
                                                                   "a": 1.5}}}) == "a=1.5,b=2"


def test_ablations_are_not_collapsed(tmp_path):
    root = tmp_path / "r"
    _write(root, "full", config=_method_cfg("full"))
    _write(root, "atskv", method="atskv", budget=0.25, kv_cache_bytes=250.0, accuracy=40.0,
           config=_method_cfg("atskv"))
    _write(root, "atskv_c32", method="atskv", budget=0.25, kv_cache_bytes=500.0, accuracy=30.0,
           config=_method_cfg("atskv", chunk=32), finished_at="2025-01-05T00:00:00+00:00")
    _write(root, "atskv_c32_nosparse", method="atskv", budget=0.25, kv_cache_bytes=500.0,
           accuracy=20.0, config=_method_cfg("atskv", chunk=32, sparse_decode=False))
    runs, notes, _ = report.load_results([root])
    assert len(runs) == 4 and not [n for n in notes if n.startswith("Duplicate")]
    rep = report.generate_report([root], tmp_path / "o")
    s = rep.summary.set_index("method")
    assert list(s.index) == ["full", "atskv", "atskv[chunk=32]", "atskv[chunk=32,sparse_decode=False]"]
    assert s.loc["atskv", "accuracy"] == 40.0 and s.loc["atskv[chunk=32]", "accuracy"] == 30.0
    assert s.loc["atskv[chunk=32]", "memory_reduction_pct"] == 50.0
    md = (tmp_path / "o" / "report.md").read_text()
    assert "| atskv[chunk=32] |" in md
    # the same ablation twice is still a duplicate
    _write(root, "atskv_c32_again", method="atskv", budget=0.25, kv_cache_bytes=500.0,
           accuracy=35.0, config=_method_cfg("atskv", chunk=32),
           finished_at="2025-01-06T00:00:00+00:00")
    runs, notes, _ = report.load_results([root])
    assert len(runs) == 4
    assert any("hparams=chunk=32" in n and "atskv_c32_again" in n for n in notes)


# ----------------------------------------------------------------------------- new record fields
def _row(md: str, section: str, start: str) -> list[str]:
    """The cells of the first table row in ``section`` that starts with ``start``."""
    line = next(x for x in _section(md, section).splitlines() if x.startswith(start))
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


def _col(md: str, section: str, table: str, header: str, start: str) -> str:
    """One cell by column header (``table``: text before the table in the section)."""
    part = _section(md, section).split(table, 1)[1]
    lines = [x for x in part.splitlines() if x.startswith("|")]
    heads = [c.strip() for c in lines[0].strip().strip("|").split(" | ")]
    row = next(x for x in lines[2:] if x.startswith(start))
    return [c.strip() for c in row.strip().strip("|").split(" | ")][heads.index(header)]


def test_cpu_and_gpu_runs_are_compared_with_their_own_full(tmp_path):
    root = tmp_path / "r"
    syn = {"benchmark": "synthetic", "task_scores": {"single_needle": 100.0}}
    cpu = {**syn, "hardware": "cpu", "dtype": "float32", "peak_memory_kind": "process_peak_rss"}
    gpu = {**syn, "hardware": "cuda", "dtype": "bfloat16", "peak_memory_kind": "cuda_max_allocated"}
    snap = {"method": "snapkv", "budget": 0.2}
    _write(root, "cpu/full", **cpu, accuracy=100.0, kv_cache_bytes=1000.0,
           peak_memory_bytes=1_000_000.0)
    _write(root, "cpu/snapkv", **snap, **{**cpu, "task_scores": {"single_needle": 60.0}},
           accuracy=60.0, kv_cache_bytes=250.0, peak_memory_bytes=900_000.0)
    _write(root, "gpu/full", **{**gpu, "task_scores": {"single_needle": 80.0}}, accuracy=80.0,
           kv_cache_bytes=500.0, peak_memory_bytes=400_000.0)
    _write(root, "gpu/snapkv", **snap, **{**gpu, "task_scores": {"single_needle": 60.0}},
           accuracy=60.0, kv_cache_bytes=200.0, peak_memory_bytes=300_000.0)
    runs, notes, old = report.load_results([root])
    assert len(runs) == 4 and not notes and not old
    rep = report.generate_report([root], tmp_path / "o")
    s = rep.summary.set_index(["section", "method"])
    c, g = "synthetic (cpu, float32)", "synthetic (cuda, bfloat16)"
    assert set(s.index) == {(c, "full"), (c, "snapkv"), (g, "full"), (g, "snapkv")}
    # against its own full: 1 - 250/1000 and 1 - 200/500 (crossed: 50 and 80)
    assert s.loc[(c, "snapkv"), "memory_reduction_pct"] == 75.0
    assert s.loc[(g, "snapkv"), "memory_reduction_pct"] == 60.0
    # peak: 1 - 0.9/1.0 (process RSS, both fresh) and 1 - 0.3/0.4 (CUDA)
    assert s.loc[(c, "snapkv"), "peak_memory_reduction_pct"] == pytest.approx(10.0)
    assert s.loc[(g, "snapkv"), "peak_memory_reduction_pct"] == pytest.approx(25.0)
    # accuracy difference to its own full: 60 - 100 and 60 - 80
    assert s.loc[(c, "snapkv"), "delta"] == pytest.approx(-40.0)
    assert s.loc[(g, "snapkv"), "delta"] == pytest.approx(-20.0)
    md = (tmp_path / "o" / "report.md").read_text()
    assert "Duplicate" not in md and "n/a" not in md.split("## synthetic")[1]
    assert _row(md, c, "| snapkv |")[3] == "75.0" and _row(md, g, "| snapkv |")[3] == "60.0"
    assert "Hardware (dtype): cpu (float32), cuda (bfloat16)" in md


def test_peak_memory_only_between_fresh_processes_of_the_same_kind(tmp_path):
    root = tmp_path / "r"
    mib = 2**20
    # a sweep in one CPU process: full ran first (fresh), sliding_window after it
    _write(root, "full", peak_memory_bytes=1115.0 * mib)
    _write(root, "sw", method="sliding_window", budget=0.2, fresh_process=False,
           peak_memory_bytes=1643.0 * mib, kv_cache_bytes=200.0)
    _write(root, "snap", method="snapkv", budget=0.2, peak_memory_bytes=892.0 * mib,
           kv_cache_bytes=200.0)
    _write(root, "h2o", method="h2o", budget=0.2, peak_memory_kind="cuda_max_allocated",
           peak_memory_bytes=500.0 * mib, kv_cache_bytes=200.0)
    rep = report.generate_report([root], tmp_path / "o")
    s = rep.summary.set_index("method")
    assert s.loc["snapkv", "peak_memory_reduction_pct"] == pytest.approx(20.0)  # 1 - 892/1115
    assert math.isnan(s.loc["sliding_window", "peak_memory_reduction_pct"])
    assert math.isnan(s.loc["h2o", "peak_memory_reduction_pct"])
    assert s.loc["sliding_window", "memory_reduction_pct"] == 80.0  # KV bytes still compare
    md = (tmp_path / "o" / "report.md").read_text()
    assert "-47.4" not in md  # 1 - 1643/1115: the process's earlier peak, not the method's
    assert _col(md, "longbench", "### Summary", "Peak memory reduction %", "| sliding_window |") == "n/a"
    notes = _section(md, "Notes")
    assert re.search(r"Peak memory reduction is n/a in longbench for sliding_window at 1024: "
                     r"process peak RSS .*fresh_process: true.*never shrinks", notes)
    assert re.search(r"n/a in longbench for h2o at 1024: .*measured peak memory differently "
                     r"\(peak_memory_kind cuda_max_allocated vs full process_peak_rss\)", notes)
    # the full run itself not fresh: nothing compares with it
    _write(root, "full", peak_memory_bytes=1115.0 * mib, fresh_process=False)
    rep = report.generate_report([root], tmp_path / "o2")
    assert math.isnan(rep.summary.set_index("method").loc["snapkv", "peak_memory_reduction_pct"])


def test_timings_of_oversubscribed_runs_are_marked(tmp_path):
    root = tmp_path / "r"
    _write(root, "full")
    busy = {"loadavg_start": [3.9, 2.0, 1.0], "loadavg_end": [4.2, 2.5, 1.2], "usable_cpus": 2,
            "torch_threads": 2, "oversubscribed": True}
    _write(root, "snap", method="snapkv", budget=0.2, kv_cache_bytes=500.0, machine_load=busy,
           ttft_s=0.9, decode_tokens_per_s=11.0)
    report.generate_report([root], tmp_path / "o")
    md = (tmp_path / "o" / "report.md").read_text()
    for table, ttft, tput in (("### Summary", "Avg time to first token (s)", "Avg throughput (tokens/s)"),
                              ("### Per context length", "Time to first token (s)", "Throughput (tokens/s)")):
        assert _col(md, "longbench", table, ttft, "| snapkv |") == "0.900 ‡"
        assert _col(md, "longbench", table, tput, "| snapkv |") == "11.0 ‡"
        assert _col(md, "longbench", table, ttft, "| full |") == "0.500"
        assert _col(md, "longbench", table, "Memory reduction %", "| snapkv |") == "50.0"
    assert "‡ measured while the machine was oversubscribed" in md


def _rows(task: str, scores, **extra) -> list[dict]:
    return [{"id": f"{task}/{i}", "task": task, "score": float(v), "score_parts": {}, **extra}
            for i, v in enumerate(scores)]


def test_accuracy_intervals_and_delta_hand_computed(tmp_path):
    """Two tasks of two samples each: every bootstrap resample can be enumerated by hand.

    full: qa 100, 100; summ 100, 50 -> 87.5; summ's mean is 100/75/50 with P 1/4, 1/2, 1/4,
    so the accuracy is 100/87.5/75: 95% interval [75, 100].
    snapkv: qa 100, 50; summ 100, 50 -> 75; both task means independently 100/75/50, the
    accuracy is 50 (P 1/16) ... 100 (P 1/16): [50, 100]. Paired with full: per-id
    differences qa 0, -50; summ 0, 0 -> delta -12.5 = -25/2 with qa's mean difference
    0/-25/-50: delta 0/-12.5/-25, [-25, 0], contains 0: `ns`.
    h2o: qa 50, 50; summ 50, 0 -> 37.5 [25, 50]; every paired difference is -50: [-50, -50].
    """
    root = tmp_path / "r"
    runs = {"full": ([100, 100], [100, 50]), "snapkv": ([100, 50], [100, 50]),
            "h2o": ([50, 50], [50, 0])}
    for m, (qa, summ) in runs.items():
        acc = (sum(qa) / 2 + sum(summ) / 2) / 2
        _write(root, m, method=m, budget=None if m == "full" else 0.2, accuracy=acc,
               task_scores={"qa": sum(qa) / 2, "summ": sum(summ) / 2},
               samples=_rows("qa", qa) + _rows("summ", summ))
    _write(root, "quest", method="quest", budget=0.2, accuracy=60.0, samples=None)
    rep = report.generate_report([root], tmp_path / "o")
    md = (tmp_path / "o" / "report.md").read_text()
    acc, delta = "Avg accuracy [95% CI]", "Δ vs full [95% CI]"
    cells = {m: (_col(md, "longbench", "### Summary", acc, f"| {m} |"),
                 _col(md, "longbench", "### Summary", delta, f"| {m} |"))
             for m in ("full", "snapkv", "h2o", "quest")}
    assert cells == {"full": ("87.5 [75.0, 100.0]", "reference"),
                     "snapkv": ("75.0 [50.0, 100.0]", "-12.5 [-25.0, 0.0] ns"),
                     "h2o": ("37.5 [25.0, 50.0]", "-50.0 [-50.0, -50.0]"),
                     "quest": ("60.0 [n/a]", "n/a")}
    assert _col(md, "longbench", "### Per context length", "Accuracy [95% CI]",
                "| snapkv |") == "75.0 [50.0, 100.0]"
    assert "`ns`: the 95% interval of the difference to `full` contains 0" in md
    notes = _section(md, "Notes")
    assert re.search(r"Accuracy interval n/a for `[^`]*/quest/result.json`: no `[^`]*samples.jsonl`", notes)
    s = rep.summary.set_index("method")
    assert (s.loc["snapkv", "accuracy_low"], s.loc["snapkv", "accuracy_high"]) == (50.0, 100.0)
    assert (s.loc["full", "delta"], s.loc["full", "delta_low"], s.loc["full", "delta_high"]) == (0, 0, 0)


def test_interval_notes_for_unpaired_and_inconsistent_samples(tmp_path):
    root = tmp_path / "r"
    # the same request (config.benchmark.n_samples), but snapkv's record lacks qa/3 and says
    # 80 where its samples give 50
    cfg = {"benchmark": {"n_samples": 4}}
    _write(root, "full", accuracy=50.0, task_scores={"qa": 50.0}, config=cfg,
           samples=_rows("qa", [0, 100, 50, 50]))
    _write(root, "snap", method="snapkv", budget=0.2, accuracy=80.0, task_scores={"qa": 80.0},
           kv_cache_bytes=500.0, config=cfg, samples=_rows("qa", [50, 50, 50]))
    rep = report.generate_report([root], tmp_path / "o")
    notes = "\n".join(rep.notes)
    assert re.search(r"`[^`]*/snap/result.json` and its `full` run `[^`]*/full/result.json` share "
                     r"3 sample ids; 1 sample\(s\) found in only one of them are left out", notes)
    assert re.search(r"/snap/result.json`: its samples give accuracy 50.00, result.json says 80.00",
                     notes)
    # over qa/0..2: snapkv 50 vs full 50 = 0
    assert rep.summary.set_index("method").loc["snapkv", "delta"] == pytest.approx(0.0)


def test_kept_tokens_prefill_kv_needle_recall_metrics_and_buckets(tmp_path):
    root = tmp_path / "r"
    mib = 2**20
    syn = {"benchmark": "synthetic", "task_scores": {"single_needle": 100.0},
           "task_metrics": {"single_needle": "exact match"}}
    _write(root, "full", **syn, accuracy=100.0, kv_cache_bytes=4.0 * mib,
           kv_cache_bytes_prefill=4.0 * mib, needle_recall=1.0,
           prompt_tokens_kept={"mean": 1000.0, "min": 1000, "max": 1000})
    for ctx, kept, lo, hi, recall in ((1024, 204.0, 180, 230, 0.5), (2048, 410.0, 300, 500, 0.75)):
        _write(root, f"snap{ctx}", **syn, method="snapkv", budget=0.2, context_len=ctx,
               accuracy=100.0, kv_cache_bytes=1.0 * mib, kv_cache_bytes_prefill=4.0 * mib,
               needle_recall=recall, prompt_tokens_kept={"mean": kept, "min": lo, "max": hi})
    lbe = {"qasper_e": {"0-4k": 40.0, "4-8k": 30.0, "8k+": 20.0},
           "hotpotqa_e": {"0-4k": 60.0, "4-8k": 40.0}}
    rows = [{"id": f"{t}/{b}", "task": t, "score": s, "meta": {"length_bucket": b}}
            for t, d in lbe.items() for b, s in d.items()]
    _write(root, "lbe", benchmark="longbench", accuracy=40.0,
           task_scores={"qasper_e": 30.0, "hotpotqa_e": 50.0}, task_scores_by_bucket=lbe,
           task_metrics={"qasper_e": "F1", "hotpotqa_e": "F1"}, samples=rows)
    report.generate_report([root], tmp_path / "o")
    md = (tmp_path / "o" / "report.md").read_text()
    summ, ctx = "### Summary", "### Per context length"
    kept = "Prompt tokens kept (min-max)"
    assert _col(md, "synthetic", summ, kept, "| snapkv |") == "307.0 (180-500)"  # (204+410)/2
    assert _col(md, "synthetic", ctx, kept, "| snapkv | 2048 |") == "410.0 (300-500)"
    assert _col(md, "synthetic", ctx, kept, "| full |") == "1000.0 (1000-1000)"
    assert _col(md, "synthetic", ctx, "KV at prefill end (MiB)", "| snapkv | 1024 |") == "4.000"
    assert _col(md, "synthetic", ctx, "KV cache (MiB)", "| snapkv | 1024 |") == "1.000"
    assert _col(md, "synthetic", summ, "Needle recall", "| snapkv |") == "0.625"
    assert _col(md, "synthetic", ctx, "Samples", "| snapkv | 1024 |") == "2"
    assert "| Method | single_needle (exact match, n=2) |" in md
    lb = _section(md, "longbench")
    assert "Needle recall" not in lb and "Prompt tokens kept" not in lb  # nothing recorded
    assert "| Method | hotpotqa_e (F1, n=2) | qasper_e (F1, n=3) |" in lb
    bucket = lb.split("### Per length bucket (LongBench-E)")[1]
    assert "| Method | Task | 0-4k (n=2) | 4-8k (n=2) | 8k+ (n=1) |" in bucket
    assert "| full | mean over tasks | 50.0 | 35.0 | 20.0 |" in bucket
    assert "| full | hotpotqa_e | 60.0 | 40.0 | n/a |" in bucket
    assert "| full | qasper_e | 40.0 | 30.0 | 20.0 |" in bucket
    assert not [n for n in _section(md, "Notes").splitlines() if "lbe/" in n]


def test_method_order_follows_the_registry():
    from atskv.methods import METHODS

    order = report.method_order()
    assert order[0] == "full" and order[1:] == [m for m in METHODS.names() if m != "full"]
    got = report.order(["zzz", "snapkv@kv256", "snapkv@0.5", "atskv", "full", "snapkv@0.2",
                        "atskv[chunk=32]", "aaa"])
    assert got == ["full", "atskv", "atskv[chunk=32]", "snapkv@0.2", "snapkv@0.5",
                   "snapkv@kv256", "aaa", "zzz"]


def test_budget_and_kv_size_labels(tmp_path):
    root = tmp_path / "r"
    _write(root, "full", budget=1.0)
    _write(root, "s02", method="snapkv", budget=0.2, kv_cache_bytes=200.0)
    _write(root, "s256", method="snapkv", budget=None, kv_size=256, kv_cache_bytes=300.0)
    rep = report.generate_report([root], tmp_path / "o")
    s = rep.summary.set_index("method")
    assert list(s.index) == ["full", "snapkv@0.2", "snapkv@kv256"]
    assert s.loc["snapkv@kv256", "memory_reduction_pct"] == 70.0


def test_old_budget_meaning_is_left_out(tmp_path, capsys):
    root = tmp_path / "r"
    _write(root, "full")
    _write(root, "snap", method="snapkv", budget=0.2, kv_cache_bytes=250.0)
    _write(root, "old_snap", method="snapkv", budget=0.5, budget_of=None, accuracy=12.25,
           kv_cache_bytes=777.0)
    _write(root, "old_full", budget_of="prompt+generation", accuracy=99.0, context_len=4096)
    rep = report.generate_report([root], tmp_path / "o")
    md = (tmp_path / "o" / "report.md").read_text()
    assert "2 runs use the old budget meaning (budget of prompt + generation" in md
    assert "rerun them" in md and "old_snap/result.json" in md
    assert list(rep.summary["method"]) == ["full", "snapkv"]  # one budget: no @ label
    assert "12.2" not in md.split("## Notes")[1].split("\n## ", 1)[1] and "4096" not in md.split("## longbench")[1]
    # only old runs: a clear error, no report
    only = tmp_path / "only_old"
    _write(only, "a", budget_of=None)
    assert report.main(["--results", str(only), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "old budget meaning" in err and "rerun" in err
    assert not (tmp_path / "o2" / "report.md").exists()


def test_geomean_tasks_interval_from_score_parts(tmp_path):
    root = tmp_path / "r"
    parts = [{"rouge1": 80.0, "rouge2": 20.0, "rougeL": 40.0},  # 0-100, as the benchmark writes
             {"rouge1": 40.0, "rouge2": 10.0, "rougeL": 20.0}]
    gm = (60 * 15 * 30) ** (1 / 3)  # geometric mean of the part means
    rows = [{"id": f"gov/{i}", "task": "gov_report", "score": 0.0, "score_parts": p}
            for i, p in enumerate(parts)]
    _write(root, "full", benchmark="zeroscrolls", accuracy=gm, task_scores={"gov_report": gm},
           task_aggregation={"gov_report": "geomean_of_part_means"},
           task_metrics={"gov_report": "ROUGE geometric mean"}, samples=rows)
    rep = report.generate_report([root], tmp_path / "o")
    assert not [n for n in rep.notes if "interval" in n or "samples give" in n]
    s = rep.summary.iloc[0]
    assert s["accuracy"] == pytest.approx(gm) and s["accuracy_low"] < gm < s["accuracy_high"]
    md = (tmp_path / "o" / "report.md").read_text()
    assert "gov_report (ROUGE geometric mean, n=2)" in md


def test_scatter_labels_of_coinciding_points_do_not_overlap():
    import matplotlib.pyplot as plt

    from atskv.analysis import plots

    fig, ax = plt.subplots(figsize=(8, 5.5))
    pts = [(80.0, 100.0, "atskv"), (80.0, 100.0, "sliding_window"), (80.0, 100.0, "snapkv"),
           (80.4, 99.8, "dynamic_kv"), (0.0, 100.0, "full"), (40.0, 50.0, "h2o")]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    ax.set_xlim(-5, 105)
    ax.set_ylim(0, 110)
    anns = plots.place_labels(ax, pts)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(r) for a in anns]
    assert [a.get_text() for a in anns] == [p[2] for p in pts]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (pts[i][2], pts[j][2])
    # deterministic: the same input gives the same positions
    fig2, ax2 = plt.subplots(figsize=(8, 5.5))
    ax2.set_xlim(-5, 105)
    ax2.set_ylim(0, 110)
    again = plots.place_labels(ax2, pts)
    assert [a.xyann for a in again] == [a.xyann for a in anns]
    assert anns[0].xyann != anns[1].xyann
    plt.close(fig)
    plt.close(fig2)
