"""Tests for atskv.analysis.report: numbers against hand-computed values, and the rendered files."""

from __future__ import annotations

import math
import re
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from report_helpers import _cell, _section, _table, _write

from atskv.analysis import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


LB, RU = "LongBench, question-aware", "ruler, question-aware"


def _val(df: pd.DataFrame, col: str, **where):
    sel = df
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, (where, sel)
    return sel[col].iloc[0]


ACC, DELTA = "Accuracy [95% CI]", "Δ vs full [95% CI]"
ACC_R, DELTA_R = "Accuracy (range)", "Δ vs full (range)"


def test_memory_reduction_hand_computed(rep):
    pc = rep.per_context
    for ctx in (1024, 2048):
        assert _val(pc, "memory_reduction_pct", section=LB, variant="snapkv", context_len=ctx) == 75.0
    assert _val(pc, "memory_reduction_pct", section=LB, variant="h2o", context_len=1024) == 50.0
    assert _val(pc, "memory_reduction_pct", section=LB, variant="full", context_len=1024) == 0.0
    assert _val(pc, "peak_memory_reduction_pct", section=LB, variant="snapkv",
                context_len=1024) == pytest.approx(20.0)
    assert (pc["memory_reduction_pct"].dropna() >= 0).all(), "sign error: savings must be positive"
    mem = "Context length 1024"
    assert _cell(rep.md, LB, mem, "Memory reduction %", 1, Method="snapkv") == "75.0 ± 0.0"
    assert _cell(rep.md, LB, mem, "Memory reduction %", 1, Method="full") == "0.0 ± 0.0"
    assert _cell(rep.md, LB, mem, "Peak memory reduction %", 1, Method="snapkv") == "20.0 ± 0.0"
    assert "-700" not in rep.md


def test_means_over_seeds_never_over_context_lengths(rep):
    pc = rep.per_context
    assert _val(pc, "accuracy", section=LB, variant="snapkv", context_len=1024) == 45.0
    std = _val(pc, "accuracy_std", section=LB, variant="snapkv", context_len=1024)
    assert std == pytest.approx(math.sqrt(50.0))
    assert _val(pc, "n_seeds", section=LB, variant="snapkv", context_len=1024) == 2
    assert _val(pc, "accuracy", section=LB, variant="snapkv", context_len=2048) == 35.0
    assert math.isnan(_val(pc, "accuracy_std", section=LB, variant="h2o", context_len=2048))
    # no number anywhere mixes context lengths: one row per (variant, budget, context length)
    assert not pc.duplicated(["section", "variant", "size", "context_len"]).any()
    assert "Avg" not in rep.md and "Averaged over context lengths" not in rep.md
    assert _cell(rep.md, LB, "Context length 1024", "Samples", Method="snapkv") == "4 x 2 seeds"
    assert _cell(rep.md, LB, "Context length 1024", ACC_R, Method="snapkv").startswith("45.0 ± 7.1")
    # snapkv seed 1 at 2048 has no full run of seed 1: its Δ vs full is n/a, and says so
    assert math.isnan(_val(pc, "delta", section=LB, variant="snapkv", context_len=2048))
    # ... and its memory reduction is the seed that has one (never a mean of two references)
    assert _val(pc, "memory_reduction_ref", section=LB, variant="snapkv", context_len=2048) == "full"
    assert _val(pc, "memory_reduction_pct", section=LB, variant="snapkv", context_len=2048) == 75.0


def test_benchmarks_give_different_numbers(rep):
    pc = rep.per_context
    assert _val(pc, "memory_reduction_pct", section=RU, variant="snapkv", context_len=1024) == 90.0
    assert _val(pc, "decode_tokens_per_s", section=RU, variant="full", context_len=1024) == 40.0
    assert _val(pc, "decode_tokens_per_s", section=LB, variant="full", context_len=1024) == 20.0
    assert _table(rep.md, LB, "Context length 1024") != _table(rep.md, RU, "Context length 1024")


def test_per_task_table(rep):
    t = "Per task"
    row = {"Method": "full", "Context length": "1024"}
    assert _cell(rep.md, LB, t, "qa (n=2)", **row) == "70.0"  # no task_metrics: no name
    assert _cell(rep.md, LB, t, "summ (n=2)", **row) == "50.0"
    snap = {"Method": "snapkv", "Context length": "1024"}
    assert _cell(rep.md, LB, t, "qa (n=2)", **snap) == "55.0"  # seeds 50 and 60
    assert "Per task" not in _section(rep.md, RU)  # one task: its score is the accuracy


def test_missing_full_falls_back_to_the_runs_own_uncompressed_bytes(rep):
    pc = rep.per_context
    # ruler has no full run at 2048: 1 - 200 / 8000 (kv_cache_bytes_uncompressed), marked
    assert _val(pc, "memory_reduction_pct", section=RU, variant="snapkv", context_len=2048) == 97.5
    assert _val(pc, "memory_reduction_ref", section=RU, variant="snapkv", context_len=2048) == "own"
    mem = "Context length 2048"
    assert _cell(rep.md, RU, mem, "Memory reduction %", 1, Method="snapkv") == "97.5 §"
    assert "§ no matching `full` run: against the run's own `kv_cache_bytes_uncompressed`" in \
        _section(rep.md, RU)
    assert _cell(rep.md, RU, mem, DELTA_R, Method="snapkv") == "n/a"
    assert "No `full` run of the same setting" in _section(rep.md, "Notes")
    assert "h2o" not in [r["Method"] for r in _table(rep.md, RU, mem)]


def test_failed_runs_listed_not_averaged(rep):
    failed = _section(rep.md, "Failed runs")
    assert "quest" in failed and "CUDA out of memory (fixture)" in failed
    assert "quest" not in set(rep.per_context["method"])
    assert not re.search(r"\bquest\b", rep.md.split("\n## Failed runs")[0])


def test_duplicates_keep_newest_in_one_note(rep):
    assert _val(rep.per_context, "accuracy", section=LB, variant="h2o", context_len=2048) == 35.0
    assert _val(rep.per_context, "memory_reduction_pct", section=LB, variant="h2o",
                context_len=2048) == 50.0
    notes = _section(rep.md, "Notes")
    dup = [n for n in notes.splitlines() if "Duplicate runs" in n]
    assert len(dup) == 1 and "(1 run: `" in dup[0] and "lb_h2o_2048" in dup[0]
    assert rep.md.index("## Notes") > rep.md.index("## Failed runs")  # notes last


def test_figures_and_html(rep):
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", rep.md)
    # one budget per section: no accuracy-vs-budget figure; two context lengths: one
    # accuracy-vs-context figure; one Pareto figure per section; no needle depths recorded
    assert sorted(Path(r).name for r in refs) == sorted(
        f"{s}_{k}.png" for s in ("LongBench_question-aware", "ruler_question-aware")
        for k in ("pareto", "context"))
    assert {Path(r).name for r in refs} == {p.name for p in rep.figures}
    for r in refs:
        data = (rep.out_dir / r).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert rep.html.count('src="data:image/png;base64,') == len(refs)
    assert 'src="figures/' not in rep.html
    assert "<table>" in rep.html and "Failed runs" in rep.html
    csv = pd.read_csv(rep.out_dir / "per_context.csv")
    assert len(csv) == len(rep.per_context) == 10  # lb 3 methods x 2 lengths, ruler 4 cells
    assert list(csv.columns[:4]) == ["section", "benchmark", "data", "protocol"]


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
    assert "No successful run of" not in md  # a section only lists its own methods
    assert "ruler, question-aware" in md and "`full` ignores the budget" in md
    assert re.search(r"Duplicate runs .*\(1 run: `[^`]*/a/result.json`\)", md)
    assert _cell(md, LB, "Context length 1024", "Time to first token (s)", 1, Method="full") \
        == "0.700"
    assert _cell(md, LB, "Context length 1024", "Memory reduction %", 1, Method="snapkv") == "50.0"
    assert (out / "per_context.csv").stat().st_size > 0


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
    assert "per_context" in logged and any(k.startswith("figures/") for k in logged)
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
    note = next(n for n in notes.lines() if n.startswith("Duplicate runs"))
    assert "2 runs" in note and "new_failed" in note and "older_ok" in note
    # two failed runs: the newest failed one is kept (and listed as failed)
    _write(tmp_path / "f", "a", status="failed", error="first", finished_at="2025-01-01T00:00:00")
    _write(tmp_path / "f", "b", status="failed", error="second", finished_at="2025-01-02T00:00:00")
    runs, _, _ = report.load_results([tmp_path / "f"])
    assert list(runs["error"]) == ["second"]


def test_many_duplicates_are_one_line(tmp_path):
    """A sweep over five budgets that ran full at each: one note line with the count and two
    examples, not five paths."""
    root = tmp_path / "r"
    for i, b in enumerate((0.05, 0.1, 0.2, 0.25, 0.5)):
        _write(root, f"full_{b}", budget=b, finished_at=f"2025-01-0{i + 1}T00:00:00+00:00")
    rep = report.generate_report([root], tmp_path / "o")
    dup = [n for n in rep.notes if n.startswith("Duplicate runs")]
    assert len(dup) == 1 and "(4 runs, e.g. " in dup[0] and dup[0].count("result.json") == 2


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
    assert len(runs) == 4 and not len(notes)
    rep = report.generate_report([root], tmp_path / "o")
    s = rep.per_context.set_index("variant")
    assert list(s.index) == ["full", "atskv", "atskv[chunk=32]", "atskv[chunk=32,sparse_decode=False]"]
    assert s.loc["atskv", "accuracy"] == 40.0 and s.loc["atskv[chunk=32]", "accuracy"] == 30.0
    assert s.loc["atskv[chunk=32]", "memory_reduction_pct"] == 50.0
    assert s.loc["atskv[chunk=32]", "preset"] == "custom"
    md = (tmp_path / "o" / "report.md").read_text()
    assert "| atskv[chunk=32] |" in md
    # the same ablation twice is still a duplicate
    _write(root, "atskv_c32_again", method="atskv", budget=0.25, kv_cache_bytes=500.0,
           accuracy=35.0, config=_method_cfg("atskv", chunk=32),
           finished_at="2025-01-06T00:00:00+00:00")
    runs, notes, _ = report.load_results([root])
    assert len(runs) == 4
    assert any("Duplicate runs" in n and "atskv_c32/" in n for n in notes.lines())


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
    assert len(runs) == 4 and not len(notes) and not old
    rep = report.generate_report([root], tmp_path / "o")
    s = rep.per_context.set_index(["section", "variant"])
    c, g = "synthetic, question-aware (cpu, float32)", "synthetic, question-aware (cuda, bfloat16)"
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
    assert "Duplicate" not in md
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
    s = rep.per_context.set_index("variant")
    assert s.loc["snapkv", "peak_memory_reduction_pct"] == pytest.approx(20.0)  # 1 - 892/1115
    assert math.isnan(s.loc["sliding_window", "peak_memory_reduction_pct"])
    assert math.isnan(s.loc["h2o", "peak_memory_reduction_pct"])
    assert s.loc["sliding_window", "memory_reduction_pct"] == 80.0  # KV bytes still compare
    md = (tmp_path / "o" / "report.md").read_text()
    assert "-47.4" not in md  # 1 - 1643/1115: the process's earlier peak, not the method's
    assert _cell(md, LB, "Context length 1024", "Peak memory reduction %", 1,
                 Method="sliding_window") == "n/a"
    notes = _section(md, "Notes")
    assert re.search(r"Peak memory reduction is n/a where the process peak RSS .*fresh_process: "
                     r"true.*never shrinks.*\(1 run: `[^`]*/sw/result.json`\)", notes)
    assert re.search(r"measured peak memory differently .*\(1 run: `[^`]*/h2o/result.json`\)",
                     notes)
    # the full run itself not fresh: nothing compares with it
    _write(root, "full", peak_memory_bytes=1115.0 * mib, fresh_process=False)
    rep = report.generate_report([root], tmp_path / "o2")
    assert math.isnan(rep.per_context.set_index("variant").loc["snapkv",
                                                               "peak_memory_reduction_pct"])


def test_timings_of_oversubscribed_runs_are_marked(tmp_path):
    root = tmp_path / "r"
    _write(root, "full")
    busy = {"loadavg_start": [3.9, 2.0, 1.0], "loadavg_end": [4.2, 2.5, 1.2], "usable_cpus": 2,
            "torch_threads": 2, "oversubscribed": True}
    _write(root, "snap", method="snapkv", budget=0.2, kv_cache_bytes=500.0, machine_load=busy,
           ttft_s=0.9, decode_tokens_per_s=11.0)
    report.generate_report([root], tmp_path / "o")
    md = (tmp_path / "o" / "report.md").read_text()
    mem = "Context length 1024"
    assert _cell(md, LB, mem, "Time to first token (s)", 1, Method="snapkv") == "0.900 ‡"
    assert _cell(md, LB, mem, "Throughput (tokens/s)", 1, Method="snapkv") == "11.0 ‡"
    assert _cell(md, LB, mem, "Time to first token (s)", 1, Method="full") == "0.500"
    assert _cell(md, LB, mem, "Memory reduction %", 1, Method="snapkv") == "50.0"
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
    0/-25/-50: delta 0/-12.5/-25, [-25, 0].
    h2o: qa 50, 50; summ 50, 0 -> 37.5 [25, 50]; every paired difference is -50: [-50, -50].
    Four samples are fewer than ten: the tables show the range of the per-sample scores
    (and differences) and no test; the intervals are still in per_context.csv.
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
    cells = {m: (_cell(md, LB, "Context length 1024", ACC_R, Method=m),
                 _cell(md, LB, "Context length 1024", DELTA_R, Method=m))
             for m in ("full", "snapkv", "h2o", "quest")}
    assert cells == {"full": ("87.5 (range 50.0 to 100.0)", "reference"),
                     "snapkv": ("75.0 (range 50.0 to 100.0)", "-12.5 (range -50.0 to 0.0)"),
                     "h2o": ("37.5 (range 0.0 to 50.0)", "-50.0 (range -50.0 to -50.0)"),
                     "quest": ("60.0", "n/a")}
    assert "*" not in "".join(v for c in cells.values() for v in c)  # n < 10: never marked
    assert "Nothing is tested here." in md and "Fewer than 10 samples" in md
    notes = _section(md, "Notes")
    assert re.search(r"Accuracy interval n/a: no usable samples.jsonl .*/quest/result.json", notes)
    s = rep.per_context.set_index("variant")
    assert (s.loc["snapkv", "accuracy_low"], s.loc["snapkv", "accuracy_high"]) == (50.0, 100.0)
    assert (s.loc["snapkv", "delta_low"], s.loc["snapkv", "delta_high"]) == (-25.0, 0.0)
    assert (s.loc["h2o", "delta_low"], s.loc["h2o", "delta_high"]) == (-50.0, -50.0)
    assert math.isnan(s.loc["h2o", "delta_p"]) and not s.loc["h2o", "delta_significant"]
    assert (s.loc["full", "delta"], s.loc["full", "delta_low"]) == (0, 0)


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
    assert re.search(r"Runs compared over the sample ids both hold .*/snap/result.json", notes)
    assert re.search(r"samples give another accuracy than its result.json.*/snap/result.json",
                     notes)
    # over qa/0..2: snapkv 50 vs full 50 = 0
    assert rep.per_context.set_index("variant").loc["snapkv", "delta"] == pytest.approx(0.0)


def test_kept_tokens_prefill_kv_needle_recall_metrics_and_buckets(tmp_path):
    root = tmp_path / "r"
    mib = 2**20
    syn = {"benchmark": "synthetic", "task_scores": {"single_needle": 100.0, "multi_key": 90.0},
           "task_metrics": {"single_needle": "exact match", "multi_key": "exact match"}}
    _write(root, "full", **syn, accuracy=95.0, kv_cache_bytes=4.0 * mib,
           kv_cache_bytes_prefill=4.0 * mib, needle_recall=1.0,
           prompt_tokens_kept={"mean": 1000.0, "min": 1000, "max": 1000})
    for ctx, kept, lo, hi, recall in ((1024, 204.0, 180, 230, 0.5), (2048, 410.0, 300, 500, 0.75)):
        _write(root, f"snap{ctx}", **syn, method="snapkv", budget=0.2, context_len=ctx,
               accuracy=95.0, kv_cache_bytes=1.0 * mib, kv_cache_bytes_prefill=4.0 * mib,
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
    sy = "synthetic, question-aware"
    kept = "Prompt tokens kept (min-max)"
    assert _cell(md, sy, "Context length 1024", kept, 1, Method="snapkv") == "204.0 (180-230)"
    assert _cell(md, sy, "Context length 2048", kept, 1, Method="snapkv") == "410.0 (300-500)"
    assert _cell(md, sy, "Context length 1024", kept, 1, Method="full") == "1000.0 (1000-1000)"
    assert _cell(md, sy, "Context length 1024", "KV cache (MiB)", 1, Method="snapkv") == "1.000"
    assert _cell(md, sy, "Context length 2048", "Needle recall", 1, Method="snapkv") == "0.750"
    assert _cell(md, sy, "Context length 1024", "Samples", Method="snapkv") == "4"
    assert "| Method | Budget | Context length | multi_key (exact match, n=2) |" in md
    assert "Tasks (metric): multi_key (exact match), single_needle (exact match)" in md
    lb = _section(md, LB)
    assert "Needle recall" not in lb and "Prompt tokens kept" not in lb  # nothing recorded
    assert "| Method | Budget | Context length | hotpotqa_e (F1, n=2) | qasper_e (F1, n=3) |" in lb
    b = "Per length bucket (LongBench-E)"
    heads = list(_table(md, LB, b)[0])
    assert heads == ["Method", "Budget", "Context length", "Task", "0-4k (n=2)", "4-8k (n=2)",
                     "8k+ (n=1)"]
    rows = {r["Task"]: [r[h] for h in heads[4:]] for r in _table(md, LB, b)}
    assert rows == {"mean over tasks": ["50.0", "35.0", "20.0"],
                    "hotpotqa_e": ["60.0", "40.0", "n/a"], "qasper_e": ["40.0", "30.0", "20.0"]}
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
    s = rep.per_context.set_index("size")
    assert list(s["variant"]) == ["full", "snapkv", "snapkv"]
    assert list(s.index.fillna("")) == ["", "0.2", "kv256"]
    assert s.loc["kv256", "memory_reduction_pct"] == 70.0
    md = (tmp_path / "o" / "report.md").read_text()
    assert _cell(md, LB, "Context length 1024", "Budget", Method="full") == "all (full cache)"
    assert [r["Budget"] for r in _table(md, LB, "Context length 1024")] == \
        ["all (full cache)", "0.2", "kv256"]


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
    assert list(rep.per_context["variant"]) == ["full", "snapkv"]
    body = md.split("\n## Notes")[0]
    assert "12.2" not in body and "4096" not in body
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
    s = rep.per_context.iloc[0]
    assert s["accuracy"] == pytest.approx(gm) and s["accuracy_low"] < gm < s["accuracy_high"]
    md = (tmp_path / "o" / "report.md").read_text()
    assert "Tasks (metric): gov_report (ROUGE geometric mean)" in md


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
