"""Tests for atskv.analysis.export_kvpress: runs written in NVIDIA kvpress's evaluation layout
(folder names, predictions.csv, metrics.json, config.yaml), from hand-written run folders. The
sweep test in test_sweeps.py exports real tiny-model runs too."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from report_helpers import _write

from atskv.analysis import export_kvpress


def _samples(task: str, n: int, **meta) -> list[dict]:
    return [{"id": f"{task}/{i}", "task": task, "score": 100.0 * (i % 2), "score_parts": {},
             "prediction": f"answer {i}", "reference": [f"gold {i}", "alt"], "prompt_tokens": 2048,
             "generated_tokens": 5, "meta": {"question": f"q{i}?", "answer_prefix": "A:", **meta}}
            for i in range(n)]


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    lb = {"benchmark": "longbench", "model": "smollm2_135m", "context_len": 2048,
          "task_metrics": {"multi_news": "ROUGE-L"}}
    _write(root, "lb_full", **lb, accuracy=20.0, task_scores={"multi_news": 20.0},
           samples=_samples("multi_news", 3))
    _write(root, "lb_snap_tuned", **lb, method="snapkv", budget=0.2, method_preset="tuned/snapkv",
           tuned=True, accuracy=12.345, task_scores={"multi_news": 12.345},
           config={"method": {"name": "snapkv", "window": 8}, "benchmark": {"max_new_tokens": 64}},
           samples=_samples("multi_news", 3))
    syn = {"benchmark": "synthetic", "model": "tiny_random", "context_len": 512,
           "protocol": "question_agnostic",
           "task_metrics": {"single_needle": "string match", "multi_value": "recall of values"}}
    for seed in (0, 1):
        _write(root, f"syn_h2o_s{seed}", **syn, method="h2o", budget=0.1, seed=seed,
               accuracy=50.0, task_scores={"single_needle": 60.0, "multi_value": 40.0},
               samples=_samples("single_needle", 2, depth=0.5) + _samples("multi_value", 2))
    zs = {"benchmark": "zeroscrolls", "model": "smollm2_135m", "context_len": 2048,
          "config": {"benchmark": {"data_dir": "../shared/data/zero_scrolls"}}}
    _write(root, "zs_kv", **zs, method="quest", budget=None, kv_size=256, accuracy=10.0,
           prompt_tokens=2048, prompt_tokens_kept={"mean": 512.0, "min": 512, "max": 512},
           task_scores={"qasper": 10.0, "quality": 0.0},
           task_metrics={"qasper": "F1", "quality": "accuracy"},
           samples=_samples("qasper", 2) + _samples("quality", 2))
    _write(root, "failed", method="snapkv", budget=0.3, status="failed", error="boom")
    return root


def test_folders_files_and_fields_mirror_kvpress(runs, tmp_path):
    out = tmp_path / "kvpress"
    folders = export_kvpress.export([runs], out)
    names = sorted(str(f.relative_to(out)) for f in folders)
    assert names == [
        "atskv_synthetic__512__tiny_random__h2o__0.90__max_context512",
        "atskv_synthetic__512__tiny_random__h2o__0.90__max_context512/1",  # seed 1: kvpress's rule
        "longbench__multi_news__smollm2_135m__no_press__0.00__max_context2048__query_aware",
        "longbench__multi_news__smollm2_135m__snapkv_tuned__0.80__max_context2048__query_aware",
        "zero_scrolls_fixture__qasper__smollm2_135m__quest__0.75__max_context2048__query_aware",
        "zero_scrolls_fixture__quality__smollm2_135m__quest__0.75__max_context2048__query_aware",
    ]
    for f in folders:
        assert {p.name for p in f.iterdir() if p.is_file()} == {
            "predictions.csv", "metrics.json", "config.yaml", "atskv.json"}
    snap = out / names[3]
    assert json.loads((snap / "metrics.json").read_text()) == 12.35  # LongBench: one number
    cfg = yaml.safe_load((snap / "config.yaml").read_text())
    assert list(cfg)[:6] == ["dataset", "data_dir", "model", "device", "press_name",
                             "compression_ratio"]
    assert (cfg["dataset"], cfg["data_dir"], cfg["press_name"]) == ("longbench", "multi_news",
                                                                    "snapkv_tuned")
    assert cfg["compression_ratio"] == pytest.approx(0.8) and cfg["query_aware"] is True
    assert cfg["max_context_length"] == 2048 and cfg["max_new_tokens"] == 64
    assert cfg["press_init_command"] == "atskv:snapkv(window=8)"
    with (snap / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert list(rows[0])[:8] == ["_id", "task", "question", "answer_prefix", "answers",
                                 "max_new_tokens", "predicted_answer", "compression_ratio"]
    assert rows[1]["predicted_answer"] == "answer 1" and json.loads(rows[1]["answers"]) == \
        ["gold 1", "alt"]
    assert float(rows[0]["compression_ratio"]) == pytest.approx(0.8)
    full = yaml.safe_load((out / names[2] / "config.yaml").read_text())
    assert (full["press_name"], full["compression_ratio"]) == ("no_press", 0.0)
    syn = out / names[0]
    assert json.loads((syn / "metrics.json").read_text()) == {
        "multi_value": {"recall_of_values": 40.0}, "single_needle": {"string_match": 60.0}}
    scfg = yaml.safe_load((syn / "config.yaml").read_text())
    assert scfg["query_aware"] is False and scfg["seed"] == 0 and scfg["data_dir"] == "512"
    with (syn / "predictions.csv").open() as f:
        srows = list(csv.DictReader(f))
    assert [r["needle_depth"] for r in srows] == ["0.5", "0.5", "", ""]
    assert yaml.safe_load((out / names[1] / "config.yaml").read_text())["seed"] == 1
    zs = out / names[4]  # kv_size 256 of 2048 prompt tokens kept: 1 - 512/2048
    assert json.loads((zs / "metrics.json").read_text()) == {"qasper": {"f1": 10.0}}
    extra = json.loads((zs / "atskv.json").read_text())
    assert extra["data"] == "ZeroSCROLLS-format fixture (L-Eval documents)"
    assert extra["kv_size"] == 256 and extra["source"].endswith("zs_kv/result.json")


def test_cli(runs, tmp_path, capsys):
    assert export_kvpress.main(["--results", str(runs), "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.startswith("6 folder(s)")
    # again into the same folder: the same folders, overwritten, not numbered again
    assert export_kvpress.main(["--results", str(runs), "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").rglob("predictions.csv"))) == 6
    assert export_kvpress.main(["--results", str(tmp_path / "nope"), "--out", "x"]) == 2
    (tmp_path / "empty").mkdir()
    assert export_kvpress.main(["--results", str(tmp_path / "empty"), "--out", "x"]) == 1
