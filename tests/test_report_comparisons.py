"""Tests for what the report compares and how: protocols and data sources never share a table,
nothing is averaged over context lengths, a missing `full` run falls back to the run's own
uncompressed bytes, small cells are never marked, Holm over each table, the best tuned
baseline, the area under the score-vs-budget curve, the labels of what ran, the figures'
series per panel and the needle-depth grid."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from report_helpers import _cell, _section, _table, _write

from atskv.analysis import plots, report
from atskv.analysis.heatmap import N_BINS, depth_grid

ACC, DELTA = "Accuracy [95% CI]", "Δ vs full [95% CI]"
ACC_R, DELTA_R = "Accuracy (range)", "Δ vs full (range)"
BASE, VS_BASE = "Best tuned baseline (accuracy)", "Δ vs best tuned baseline [95% CI]"


def _same(task: str, values, start: int = 0) -> list[dict]:
    return [{"id": f"{task}/{i}", "task": task, "score": float(v), "score_parts": {}, "meta": {}}
            for i, v in enumerate(values, start)]


def _run(root: Path, name: str, scores: list[float], method: str = "full", **over) -> dict:
    """One-task run whose accuracy is the mean of ``scores`` (one sample each)."""
    acc = sum(scores) / len(scores)
    return _write(root, name, method=method, accuracy=acc, task_scores={"qa": acc},
                  samples=_same("qa", scores), **over)


def test_protocols_are_never_mixed(tmp_path):
    root = tmp_path / "r"
    _run(root, "aware/full", [100] * 12)  # no protocol field: question-aware
    _run(root, "aware/snap", [50] * 12, "snapkv", budget=0.2, kv_cache_bytes=250.0)
    _run(root, "agnostic/snap", [20] * 12, "snapkv", budget=0.2, kv_cache_bytes=250.0,
         protocol="question_agnostic")
    _run(root, "agnostic/h2o", [10] * 12, "h2o", budget=0.2, kv_cache_bytes=100.0,
         config={"protocol": "question_agnostic"})  # from the config when not top level
    rep = report.generate_report([root], tmp_path / "o")
    pc = rep.per_context
    aware, agnostic = "LongBench, question-aware", "LongBench, question-agnostic"
    assert set(pc["section"]) == {aware, agnostic}
    assert set(pc.loc[pc["section"] == agnostic, "variant"]) == {"snapkv", "h2o"}
    assert set(pc["protocol"]) == {"question_aware", "question_agnostic"}
    ag = pc[pc["section"] == agnostic].set_index("variant")
    # the question-aware full run is no reference for a question-agnostic run
    assert math.isnan(ag.loc["snapkv", "delta"]) and ag.loc["snapkv", "memory_reduction_ref"] == "own"
    assert pc[pc["section"] == aware].set_index("variant").loc["snapkv", "delta"] == -50.0
    md = (tmp_path / "o" / "report.md").read_text()
    assert "Protocol: question-agnostic" in _section(md, agnostic)
    assert {r["Method"] for r in _table(md, agnostic, "Context length 1024")} == {"snapkv", "h2o"}
    # a figure belongs to one section: no figure shows both protocols
    names = [f.name for f in rep.figures]
    assert sorted(names) == ["LongBench_question-agnostic_pareto.png",
                             "LongBench_question-aware_pareto.png"]


def test_no_average_over_context_lengths_and_the_memory_fallback(tmp_path):
    """The user's sweep: `full` ran at 2048 (the default job), atskv and rocket_kv at 512 and
    4096. No table averages them together; memory reduction falls back to each run's own
    kv_cache_bytes_uncompressed (marked); Δ vs full is n/a."""
    root = tmp_path / "outputs"
    syn = {"benchmark": "synthetic"}
    _run(root, "full_2048", [100] * 12, context_len=2048, **syn)
    for m, acc in (("atskv", 60), ("rocket_kv", 40)):
        for ctx, unc in ((512, 1000.0), (4096, 8000.0)):
            _run(root, f"{m}_{ctx}", [acc] * 12, m, budget=0.25, context_len=ctx,
                 kv_cache_bytes=unc / 5, kv_cache_bytes_uncompressed=unc, **syn)
    rep = report.generate_report([root], tmp_path / "o")
    pc = rep.per_context
    assert not pc.duplicated(["variant", "size", "context_len"]).any()
    assert sorted(pc.loc[pc["variant"] == "full", "context_len"]) == [2048]
    for m in ("atskv", "rocket_kv"):
        assert sorted(pc.loc[pc["variant"] == m, "context_len"]) == [512, 4096]
        for ctx in (512, 4096):
            row = pc[(pc["variant"] == m) & (pc["context_len"] == ctx)].iloc[0]
            assert row["memory_reduction_pct"] == pytest.approx(80.0)  # 1 - (unc / 5) / unc
            assert row["memory_reduction_ref"] == "own" and math.isnan(row["delta"])
    md = (tmp_path / "o" / "report.md").read_text()
    sec = "synthetic, question-aware"
    assert [r["Method"] for r in _table(md, sec, "Context length 2048")] == ["full"]
    assert [r["Method"] for r in _table(md, sec, "Context length 512")] == ["atskv", "rocket_kv"]
    assert _cell(md, sec, "Context length 512", "Memory reduction %", 1, Method="atskv") == "80.0 §"
    assert _cell(md, sec, "Context length 4096", DELTA, Method="rocket_kv") == "n/a"
    assert "Avg" not in md


def test_small_cells_are_never_marked_and_holm_counts_the_table(tmp_path):
    """n = 12 (tested): `bad` is worse on every sample, exact permutation p = 2 / 2^12;
    `one` differs on one sample only, p = 1. Holm over m = 2: 2 x 2/4096 for `bad`, 1 for
    `one`. n = 3 (another setting, not tested): the same all-worse pattern shows ranges."""
    root = tmp_path / "r"
    cfg12, cfg3 = {"benchmark": {"n_samples": 12}}, {"benchmark": {"n_samples": 3}}
    _run(root, "n12/full", [100] * 12, config=cfg12)
    _run(root, "n12/bad", [0] * 12, "snapkv", budget=0.2, config=cfg12)
    _run(root, "n12/one", [100] * 11 + [0], "h2o", budget=0.2, config=cfg12)
    _run(root, "n3/full", [100] * 3, config=cfg3)
    _run(root, "n3/bad", [0] * 3, "snapkv", budget=0.2, config=cfg3)
    rep = report.generate_report([root], tmp_path / "o")
    pc = rep.per_context.set_index(["section", "variant"])
    s12, s3 = "LongBench, question-aware (n=12)", "LongBench, question-aware (n=3)"
    assert pc.loc[(s12, "snapkv"), "delta_p"] == pytest.approx(2 / 4096)
    assert pc.loc[(s12, "snapkv"), "delta_p_holm"] == pytest.approx(2 * 2 / 4096)
    assert pc.loc[(s12, "h2o"), "delta_p"] == 1.0 and pc.loc[(s12, "h2o"), "delta_p_holm"] == 1.0
    assert pc.loc[(s12, "snapkv"), "delta_significant"]
    assert not pc.loc[(s12, "h2o"), "delta_significant"]
    assert math.isnan(pc.loc[(s3, "snapkv"), "delta_p"])
    assert not pc.loc[(s3, "snapkv"), "delta_significant"]
    md = (tmp_path / "o" / "report.md").read_text()
    ctx = "Context length 1024"
    assert _cell(md, s12, ctx, DELTA, Method="snapkv") == "-100.0 [-100.0, -100.0] *"
    assert _cell(md, s12, ctx, DELTA, Method="h2o").endswith("]")  # interval, no mark
    assert "over the 2 comparisons with `full` in this table" in _section(md, s12)
    assert "family-wise α = 0.05" in _section(md, s12)
    assert _cell(md, s3, ctx, DELTA_R, Method="snapkv") == "-100.0 (range -100.0 to -100.0)"
    assert _cell(md, s3, ctx, ACC_R, Method="snapkv") == "0.0 (range 0.0 to 0.0)"
    assert "Nothing is tested here." in _section(md, s3)


def test_best_tuned_baseline_is_another_methods_best_tuned_preset(tmp_path):
    root = tmp_path / "r"
    _run(root, "full", [100] * 12)
    tuned = {"tuned": True}
    _run(root, "snap", [30] * 12, "snapkv", budget=0.2)  # paper defaults
    _run(root, "snap_t", [50] * 12, "snapkv", budget=0.2, method_preset="tuned/snapkv", **tuned)
    _run(root, "h2o_t", [40] * 12, "h2o", budget=0.2, method_preset="tuned/h2o", **tuned)
    _run(root, "quest_t", [45] * 12, "quest", budget=0.2, method_preset="tuned/quest", **tuned)
    _run(root, "snap_t5", [70] * 12, "snapkv", budget=0.5, method_preset="tuned/snapkv", **tuned)
    rep = report.generate_report([root], tmp_path / "o")
    pc = rep.per_context.set_index(["variant", "size"])
    # neither snapkv variant is compared with snapkv[tuned]: the best other tuned is quest
    assert pc.loc[("snapkv", "0.2"), "baseline"] == "quest[tuned]"
    assert pc.loc[("snapkv[tuned]", "0.2"), "baseline"] == "quest[tuned]"
    assert pc.loc[("h2o[tuned]", "0.2"), "baseline"] == "snapkv[tuned]"
    assert pc.loc[("quest[tuned]", "0.2"), "baseline"] == "snapkv[tuned]"
    assert pc.loc[("snapkv[tuned]", "0.5"), "baseline"] == ""  # no other tuned at 0.5
    assert pc.loc[("snapkv", "0.2"), "base_delta"] == pytest.approx(-15.0)  # 30 - 45, paired
    assert pc.loc[("h2o[tuned]", "0.2"), "base_delta"] == pytest.approx(-10.0)
    md = (tmp_path / "o" / "report.md").read_text()
    sec, ctx = "LongBench, question-aware", "Context length 1024"
    rows = {(r["Method"], r["Budget"]): r for r in _table(md, sec, ctx)}
    assert rows[("snapkv", "0.2")][BASE] == "quest[tuned] (45.0)"
    assert rows[("snapkv", "0.2")]["Preset"] == "paper defaults"
    assert rows[("snapkv[tuned]", "0.2")]["Preset"] == "dev-tuned"
    assert rows[("snapkv[tuned]", "0.5")][BASE] == "none tuned"
    assert rows[("full", "all (full cache)")][BASE] == "—"
    assert rows[("snapkv", "0.2")][VS_BASE] == "-15.0 [-15.0, -15.0] *"


def test_area_under_the_budget_curve_hand_computed(tmp_path):
    """x at 0.1, 0.2, 0.5 scores 10, 30, 40: (0.1 x 40 / 2 + 0.3 x 70 / 2) / 0.4 = 31.25;
    y at 20, 20, 20: 20. Adding z at 0.1 and 0.2 only narrows every curve to [0.1, 0.2]:
    x (10 + 30) / 2 = 20."""
    root = tmp_path / "r"
    _run(root, "full", [50] * 12, benchmark="synthetic")
    for m, accs in (("snapkv", (10, 30, 40)), ("h2o", (20, 20, 20))):
        for b, acc in zip((0.1, 0.2, 0.5), accs, strict=True):
            _run(root, f"{m}_{b}", [acc - 5] * 6 + [acc + 5] * 6, m, budget=b,
                 benchmark="synthetic")
    rep = report.generate_report([root], tmp_path / "o")
    auc = rep.auc.set_index("variant")
    assert auc.loc["snapkv", "auc"] == pytest.approx(31.25)
    assert auc.loc["h2o", "auc"] == pytest.approx(20.0)
    assert (auc.loc["snapkv", "budget_low"], auc.loc["snapkv", "budget_high"]) == (0.1, 0.5)
    assert auc.loc["snapkv", "auc_low"] < 31.25 < auc.loc["snapkv", "auc_high"]
    md = (tmp_path / "o" / "report.md").read_text()
    assert "context 1024: budgets 0.1-0.5 (3 points)" in md
    assert any(f.name.endswith("_budget_curves.png") for f in rep.figures)
    for b in (0.1, 0.2):
        _run(root, f"quest_{b}", [0] * 12, "quest", budget=b, benchmark="synthetic")
    auc = report.generate_report([root], tmp_path / "o2").auc.set_index("variant")
    assert auc.loc["snapkv", "auc"] == pytest.approx(20.0)
    assert auc.loc["snapkv", "budget_high"] == 0.2 and auc.loc["quest", "auc"] == 0.0


def test_labels_say_what_ran(tmp_path):
    import dataclasses

    from atskv.methods import METHODS

    root = tmp_path / "r"
    fixture = {"benchmark": {"data_dir": "../shared/data/zero_scrolls"}}
    defaults = {f.name: f.default for f in dataclasses.fields(METHODS.get("atskv"))
                if f.name not in ("budget", "kv_size")}
    zs = {"benchmark": "zeroscrolls", "model": "smollm2_135m"}
    _run(root, "fixture/full", [10] * 12, **zs, config=fixture)
    _run(root, "fixture/atskv", [10] * 12, "atskv", budget=0.2, **zs,
         config={**fixture, "method": {"name": "atskv", **defaults}})
    _run(root, "fixture/h2o", [10] * 12, "h2o", budget=0.2, **zs, config=fixture)
    _run(root, "hub/full", [10] * 12, **zs)  # no data_dir: the hub's ZeroSCROLLS
    rep = report.generate_report([root], tmp_path / "o")
    md = (tmp_path / "o" / "report.md").read_text()
    fx = "ZeroSCROLLS-format fixture (L-Eval documents), question-aware"
    assert f"\n## {fx}\n" in md and "\n## ZeroSCROLLS, question-aware\n" in md
    assert "Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32)" in md
    presets = {r["Method"]: r["Preset"] for r in _table(md, fx, "Context length 1024")}
    # atskv's defaults are its dev-tuned values (conf/method/tuned/atskv.yaml, rounded)
    assert presets == {"full": "—", "atskv": "defaults (= dev-tuned)", "h2o": "paper defaults"}
    assert set(rep.per_context["data"]) == {"ZeroSCROLLS-format fixture (L-Eval documents)",
                                            "ZeroSCROLLS"}


def test_accuracy_by_question_position(tmp_path):
    root = tmp_path / "r"
    _run(root, "full", [80] * 12, benchmark="synthetic",
         accuracy_by_position={"0": 90.0, "1": 80.0, "2": 70.0})
    _run(root, "snap", [40] * 12, "snapkv", budget=0.2, benchmark="synthetic",
         accuracy_by_position={"0": 60.0, "1": 40.0, "2": 20.0})
    report.generate_report([root], tmp_path / "o")
    md = (tmp_path / "o" / "report.md").read_text()
    sec, t = "synthetic, question-aware", "Accuracy by question position"
    rows = {r["Method"]: [r[f"question {i}"] for i in (1, 2, 3)] for r in _table(md, sec, t)}
    assert rows == {"full": ["90.0", "80.0", "70.0"], "snapkv": ["60.0", "40.0", "20.0"]}


def test_depth_grid_bins_and_blank_cells():
    rows = {512: [{"score": 100.0, "meta": {"depth": 0.05}},
                  {"score": 0.0, "meta": {"depth": 0.15}},   # same bin as 0.05: mean 50
                  {"score": 100.0, "meta": {"depth": 1.0}},  # the last bin includes 1.0
                  {"score": 100.0, "meta": {}}],             # no depth: not counted
            4096: [{"score": 30.0, "meta": {"depth": 0.5}}]}
    grid, count = depth_grid(rows, [512, 4096])
    assert grid.shape == (N_BINS, 2)
    assert grid[0, 0] == 50.0 and count[0, 0] == 2 and grid[N_BINS - 1, 0] == 100.0
    assert grid[N_BINS // 2, 1] == 30.0
    assert math.isnan(grid[1, 0]) and math.isnan(grid[0, 1])  # no sample: blank
    assert count.sum() == 4


def test_depth_heatmap_is_drawn_for_needle_samples(tmp_path):
    root = tmp_path / "r"
    for m, b in (("full", None), ("snapkv", 0.2)):
        for ctx in (512, 1024):
            rows = [{"id": f"n/{i}", "task": "single_needle", "score": 100.0 * (i % 2),
                     "meta": {"depth": i / 12}} for i in range(12)]
            _write(root, f"{m}{ctx}", method=m, budget=b, context_len=ctx, benchmark="synthetic",
                   accuracy=50.0, task_scores={"single_needle": 50.0}, samples=rows)
    rep = report.generate_report([root], tmp_path / "o")
    names = sorted(f.name for f in rep.figures)
    assert names == ["synthetic_question-aware_context.png", "synthetic_question-aware_depth_0.2.png",
                     "synthetic_question-aware_pareto.png"]


def test_at_most_ten_series_per_panel(tmp_path, monkeypatch):
    """Twelve methods: the budget curves split into two figures of 9 + 3 methods, each panel
    with full's line; every panel of every figure holds at most MAX_SERIES lines."""
    root = tmp_path / "r"
    _run(root, "full", [50] * 12, benchmark="synthetic")
    methods = [f"m{i:02d}" for i in range(12)]
    for m in methods:
        for b in (0.1, 0.5):
            _run(root, f"{m}_{b}", [10 + 3 * int(m[1:])] * 12, m, budget=b, benchmark="synthetic")
    seen = []
    real = plots._save

    def count(fig, path):
        seen.append((path.name, [len(ax.get_lines()) for ax in fig.axes if ax.get_visible()]))
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", count)
    report.generate_report([root], tmp_path / "o")
    curves = [(n, c) for n, c in seen if "budget_curves" in n]
    assert [n for n, _ in curves] == ["synthetic_question-aware_budget_curves.png",
                                      "synthetic_question-aware_budget_curves1.png"]
    assert [c for _, c in curves] == [[10], [4]]  # 9 methods + full, 3 methods + full
    assert all(max(c) <= plots.MAX_SERIES for _, c in seen), seen
    # one context length: no plot against context length
    assert not [n for n, _ in seen if "context" in n]
