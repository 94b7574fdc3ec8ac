"""The goal table (atskv.analysis.goal): atskv paired with the best dev-tuned baseline per cell."""

from __future__ import annotations

from pathlib import Path

import pytest
from report_helpers import _write

from atskv.analysis import goal, stats

TASKS = ("single_needle", "multi_key")


def _rows(hits: dict[str, int], n: int = 6, answer: str = "a") -> list[dict]:
    """``n`` samples per task, the first ``hits[task]`` of them right (score 100)."""
    return [{"id": f"{t}/{i}", "task": t, "score": 100.0 if i < hits[t] else 0.0,
             "score_parts": {}, "prediction": answer, "reference": ["r"], "meta": {}}
            for t in TASKS for i in range(n)]


def _run(root: Path, name: str, method: str, hits: dict, tuned=True, budget=0.2, n=6,
         answer="a", protocol="question_aware"):
    rows = _rows(hits, n, answer)
    _write(root, name, samples=rows, method=method, tuned=tuned, benchmark="synthetic",
           context_len=512, budget=None if method == "full" else budget, protocol=protocol,
           accuracy=None, task_scores=None, task_aggregation={t: "mean" for t in TASKS})


def _manifest(root: Path, text: str) -> Path:
    p = root / "matrix.yaml"
    p.write_text(text)
    return p


MANIFEST = "slices:\n  - name: s\n    atskv: [mine]\n    baselines: [base]\n"


def _cell(root: Path, snap_n: int = 6) -> None:
    """atskv, full and a tuned snapkv in one cell (snapkv on ``snap_n`` samples per task)."""
    _run(root / "mine", "a", "atskv", {"single_needle": 5, "multi_key": 4})
    _run(root / "base", "full", "full", {"single_needle": 6, "multi_key": 6})
    _run(root / "base", "snap", "snapkv", {"single_needle": 4, "multi_key": 3}, n=snap_n)


def test_the_best_tuned_baseline_is_paired_and_paper_defaults_are_not_the_bar(tmp_path):
    _run(tmp_path / "mine", "a", "atskv", {"single_needle": 5, "multi_key": 4})
    _run(tmp_path / "base", "full", "full", {"single_needle": 6, "multi_key": 6})
    _run(tmp_path / "base", "snap", "snapkv", {"single_needle": 4, "multi_key": 3})
    _run(tmp_path / "base", "h2o", "h2o", {"single_needle": 2, "multi_key": 2})
    # paper defaults score higher than everything, yet are not a tuned baseline
    _run(tmp_path / "base", "paper", "quest", {"single_needle": 6, "multi_key": 6}, tuned=False)
    [(name, [row])] = goal.load(_manifest(tmp_path, MANIFEST))
    assert name == "s" and row.cell == ("synthetic", "all", 512, 0.2, "question_aware")
    assert row.n == 12 and row.best == "snapkv" and row.n_baselines == 2
    # atskv 9/12 right, snapkv 7/12, full 12/12: means over tasks of 0/100 scores
    assert row.full == 100.0
    assert row.atskv.estimate == pytest.approx(100 * (5 / 6 + 4 / 6) / 2, abs=1e-9)
    assert row.diff.estimate == pytest.approx(100 * 2 / 12, abs=1e-9)
    assert row.diff.low <= row.diff.estimate <= row.diff.high
    assert row.judged == stats.testable(12)
    table = goal.render([(name, [row])])
    assert "| 512 / 0.2, aware | 12 | 100.0 |" in table
    assert "snapkv 58.3 (of 2)" in table
    assert goal.verdict(row) in table and "Cells: 1;" in table


def _row(low, n=64, budget=0.2, ctx=512):
    iv = stats.Interval(1.0, low, 5.0, 0.95, n, False, 2000)
    return goal.Row(("synthetic", "all", ctx, budget, "question_aware"), n, 60.0, iv, "kvzip",
                    60.0, 10, iv)


def test_verdicts_follow_the_lower_end_of_the_interval():
    assert goal.verdict(_row(0.5)) == "ahead (all above 0)"
    assert goal.verdict(_row(-1.9)) == "level (above -2)"
    assert goal.verdict(_row(-2.0)) == "missed (below -2)"
    assert goal.verdict(_row(0.5, n=stats.MIN_N - 1)).startswith("not judged")


def test_the_grid_has_one_column_per_budget_and_marks_each_verdict():
    rows = [_row(0.5, budget=0.1), _row(-1.9, budget=0.2), _row(-3.0, budget=0.5),
            _row(0.5, n=8, budget=0.1, ctx=4096)]
    lines = goal.grid([("s", rows)]).splitlines()
    assert lines[0] == "| task | tokens | protocol | budget 0.1 | budget 0.2 | budget 0.5 |"
    assert lines[2] == ("| synthetic | 512 | aware | **+1.0 [+0.5, +5.0]** | +1.0 [-1.9, +5.0] "
                        "| +1.0 [-3.0, +5.0] (-) |")
    assert lines[3] == "| synthetic | 4096 | aware | _+1.0 [+0.5, +5.0]_ n=8 |  |  |"


def test_different_samples_in_a_cell_are_an_error(tmp_path):
    _cell(tmp_path, snap_n=5)
    with pytest.raises(goal.ManifestError, match="different samples"):
        goal.load(_manifest(tmp_path, MANIFEST))


def test_full_runs_repeated_by_budget_sweeps_are_one_run_unless_they_differ(tmp_path):
    _cell(tmp_path)
    _run(tmp_path / "base", "full_again", "full", {"single_needle": 6, "multi_key": 6})
    [(_, [row])] = goal.load(_manifest(tmp_path, MANIFEST))
    assert row.full == 100.0
    _run(tmp_path / "base", "full_other", "full", {"single_needle": 6, "multi_key": 6},
         answer="b")
    with pytest.raises(goal.ManifestError, match="two full runs"):
        goal.load(_manifest(tmp_path, MANIFEST))


def test_two_atskv_runs_of_one_cell_are_an_error(tmp_path):
    _cell(tmp_path)
    _run(tmp_path / "mine", "b", "atskv", {"single_needle": 4, "multi_key": 4})
    with pytest.raises(goal.ManifestError, match="two atskv runs"):
        goal.load(_manifest(tmp_path, MANIFEST))


@pytest.mark.parametrize("text, match", [
    ("slices: []\n", "non-empty list"),
    ("slices:\n  - runs_512\n", "a slice is a mapping"),
    ("slices:\n  - name: s\n    atskv: [mine]\n", r"lacks \['baselines'\]"),
    ("slices:\n  - name: s\n    atskv: [nowhere*]\n    baselines: [base]\n", "no folder matches"),
    ("slices:\n  - name: s\n    atskv: [mine]\n    baselines: [absent]\n", "does not exist"),
    (MANIFEST + "    protocols: [aware]\n", r"protocols must be a non-empty list of .*'aware'"),
])
def test_bad_manifests_name_what_is_wrong(tmp_path, text, match):
    _run(tmp_path / "mine", "a", "atskv", {"single_needle": 5, "multi_key": 4})
    with pytest.raises(goal.ManifestError, match=match):
        goal.load(_manifest(tmp_path, text))


def test_a_slice_can_keep_one_protocol(tmp_path):
    _cell(tmp_path)
    for name, method, hits in (("a2", "atskv", 1), ("full2", "full", 6), ("snap2", "snapkv", 6)):
        _run(tmp_path / ("mine" if method == "atskv" else "base"), name, method,
             {"single_needle": hits, "multi_key": hits}, protocol="question_agnostic")
    assert {r.cell[4] for r in goal.load(_manifest(tmp_path, MANIFEST))[0][1]} == {
        "question_aware", "question_agnostic"}
    [(_, rows)] = goal.load(_manifest(tmp_path, MANIFEST + "    protocols: [question_agnostic]\n"))
    assert [(r.cell[4], r.best_acc) for r in rows] == [("question_agnostic", 100.0)]


def test_a_cell_without_full_or_a_tuned_baseline_is_an_error(tmp_path):
    _run(tmp_path / "mine", "a", "atskv", {"single_needle": 5, "multi_key": 4})
    _run(tmp_path / "base", "snap", "snapkv", {"single_needle": 4, "multi_key": 3})
    with pytest.raises(goal.ManifestError, match="no full run"):
        goal.load(_manifest(tmp_path, MANIFEST))


def test_the_command_line_names_a_bad_manifest_and_exits(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        goal.main([str(_manifest(tmp_path, "slices: []\n"))])
    assert e.value.code == 2 and "non-empty list" in capsys.readouterr().err


def test_the_command_line_writes_the_table(tmp_path):
    _cell(tmp_path)
    out = tmp_path / "goal.md"
    goal.main([str(_manifest(tmp_path, MANIFEST)), "--out", str(out)])
    assert out.read_text().startswith("### s\n") and "Cells: 1;" in out.read_text()


def test_a_run_without_its_samples_is_an_error(tmp_path):
    _cell(tmp_path)
    (tmp_path / "base" / "snap" / "samples.jsonl").unlink()
    with pytest.raises(goal.ManifestError, match="no `.*samples.jsonl`"):
        goal.load(_manifest(tmp_path, MANIFEST))
