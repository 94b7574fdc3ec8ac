"""Write atskv runs in NVIDIA kvpress's evaluation layout, to put them beside a kvpress run or
leaderboard entry.

    python -m atskv.analysis.export_kvpress --results DIR [DIR ...] --out DIR

kvpress's ``evaluation/evaluate.py`` writes one folder per run, named by its config's
``get_results_dir``: ``__``-joined ``dataset``, ``data_dir``, the model with ``/`` as ``--``,
``press_name``, ``compression_ratio`` (two decimals), then ``max_context<L>`` and
``query_aware`` when set (an existing folder gets a numbered subfolder ``1``, ``2``, ...; here:
one taken by another run of the same export, e.g. another seed). In it:
``predictions.csv`` (the dataset's columns but ``context``, plus ``predicted_answer`` and
``compression_ratio``), ``metrics.json`` (its scorer's output) and ``config.yaml`` (the
``EvaluationConfig`` fields). This module writes the same, one folder per successful run (per
run and task for LongBench and ZeroSCROLLS, where kvpress's ``data_dir`` is the task), plus
``atskv.json`` with what kvpress has no field for.

What maps to what (kvpress field: atskv source):

* ``dataset``: ``longbench`` (``longbench-e`` for ``*_e`` tasks); ``zero_scrolls`` for
  ZeroSCROLLS from the hub, ``zero_scrolls_fixture`` for the offline ZeroSCROLLS-format fixture
  (L-Eval documents: not kvpress's data); ``atskv_synthetic`` for the synthetic tasks (RULER-
  style needles, not kvpress's ``ruler`` data). Other benchmarks: ``atskv_<name>``.
* ``data_dir``: the task (LongBench, ZeroSCROLLS), the context length (synthetic, as kvpress's
  ``ruler`` uses ``4096``).
* ``model``: ``config.model.path`` when the run loaded one (a hub id or folder), else atskv's
  model preset name (``smollm2_135m`` is the Q4_1 GGUF of SmolLM2-135M-Instruct dequantised, not
  the hub weights, so it keeps its own name).
* ``press_name``: ``no_press`` for ``full`` (kvpress's name for the full cache), else atskv's
  method name, ``_tuned`` for its dev-tuned preset, ``_<8 hex>`` (SHA-1 of the hyperparameters)
  for other non-default ones. These are atskv's implementations: ``snapkv`` here is not
  kvpress's ``SnapKVPress`` (``press_init_command`` says ``atskv:...``).
* ``compression_ratio``: ``1 - budget`` (kvpress's definition: the fraction of the prompt's KV
  removed); a ``kv_size`` run: ``1 - mean prompt tokens kept / prompt tokens``; ``full``: 0.
* ``max_context_length``: ``context_len``; ``query_aware``: the run's protocol is
  ``question_aware``; ``seed``: ``seed``; ``max_new_tokens``: ``config.benchmark.max_new_tokens``
  (null: the benchmark's per-task default); ``fraction``: 1.0 (atskv takes
  ``benchmark.n_samples`` samples per task instead: in ``atskv.json``); ``device``, ``model_kwargs.
  dtype``: the run's hardware.
* ``predictions.csv``: ``predicted_answer`` = the sample's ``prediction``; ``answer`` (``answers``
  for LongBench) = its references (a JSON list); ``question``, ``answer_prefix`` from the sample's
  ``meta`` where recorded; ``task``, ``max_new_tokens``, ``compression_ratio``; and atskv's own
  ``id`` (``_id`` for LongBench), ``score``, ``prompt_tokens``, ``generated_tokens``,
  ``needle_depth`` (synthetic).
* ``metrics.json``: LongBench: the task's score (a number, as kvpress's LongBench scorer
  returns); otherwise ``{task: {metric: score}}`` as kvpress's RULER scorer writes, the metric
  named as in ``task_metrics`` in snake case (``string_match``, ``rouge_l``, ...); scores 0-100,
  two decimals. (kvpress's ZeroSCROLLS scorer writes ``{}``: the test labels are hidden; these
  are atskv's scores on labelled data.)
* ``atskv.json``: the source ``result.json``, method, preset, budget, kv_size, protocol, data,
  samples, accuracy, the KV bytes and memory figures.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
from pathlib import Path

import yaml

from atskv.analysis import labels
from atskv.analysis.data import FULL, PROMPT, hparams, load_samples, shown_path

KVPRESS_DATASETS = {"longbench": "longbench", "zeroscrolls": "zero_scrolls"}


def _snake(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_") or "score"


def dataset_name(rec: dict, task: str | None) -> str:
    bench = str(rec.get("benchmark"))
    if bench == "longbench":
        return "longbench-e" if task and task.endswith("_e") else "longbench"
    if bench == "zeroscrolls":
        return "zero_scrolls_fixture" if labels.data_label(rec) == labels.FIXTURE_ZEROSCROLLS \
            else "zero_scrolls"
    return f"atskv_{_snake(bench)}"


def press_name(rec: dict) -> str:
    method = str(rec.get("method"))
    if method == FULL:
        return "no_press"
    if labels.is_tuned(rec):
        return f"{method}_tuned"
    hp = hparams(rec)
    return f"{method}_{hashlib.sha1(hp.encode()).hexdigest()[:8]}" if hp else method


def compression_ratio(rec: dict) -> float:
    if rec.get("method") == FULL:
        return 0.0
    if rec.get("budget") is not None and rec.get("kv_size") is None:
        return 1.0 - float(rec["budget"])
    kept, prompt = (rec.get("prompt_tokens_kept") or {}).get("mean"), rec.get("prompt_tokens")
    return 1.0 - float(kept) / float(prompt) if kept and prompt else float("nan")


def folder_name(rec: dict, dataset: str, data_dir: str) -> str:
    model = str(labels.config_value(rec, "model", "path") or rec.get("model"))
    parts = [dataset, data_dir, model.replace("/", "--"), press_name(rec),
             f"{compression_ratio(rec):.2f}", f"max_context{rec.get('context_len')}"]
    if labels.protocol_of(rec) == labels.QUESTION_AWARE:
        parts.append("query_aware")
    return "__".join(p for p in parts if p)


def _unique(path: Path, used: set[Path]) -> Path:
    """kvpress's rule for a name taken by another run of this export (e.g. another seed): a
    numbered subfolder. A folder left by an earlier export is overwritten."""
    out, i = path, 0
    while out in used:
        i += 1
        out = path / str(i)
    used.add(out)
    return out


def _config(rec: dict, dataset: str, data_dir: str, out: Path) -> dict:
    method = labels.config_value(rec, "method") or {"name": rec.get("method")}
    args = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name")
    return {
        "dataset": dataset, "data_dir": data_dir,
        "model": str(labels.config_value(rec, "model", "path") or rec.get("model")),
        "device": labels.config_value(rec, "hardware", "device") or rec.get("hardware"),
        "press_name": press_name(rec), "compression_ratio": round(compression_ratio(rec), 4),
        "key_channel_compression_ratio": None, "fraction": 1.0,
        "max_new_tokens": labels.config_value(rec, "benchmark", "max_new_tokens"),
        "max_context_length": rec.get("context_len"),
        "query_aware": labels.protocol_of(rec) == labels.QUESTION_AWARE,
        "needle_depth": None, "compression_interval": None, "target_size": None,
        "hidden_states_buffer_size": None, "output_dir": str(out), "log_level": "INFO",
        "model_kwargs": {"dtype": rec.get("dtype")},
        "press_init_command": f"atskv:{method.get('name')}({args})",
        "seed": rec.get("seed"), "fp8": False,
    }


def _rows(rec: dict, samples: list[dict], longbench: bool) -> list[dict]:
    ratio = compression_ratio(rec)
    out = []
    for s in samples:
        meta = s.get("meta") or {}
        row = {"_id" if longbench else "id": s.get("id"), "task": s.get("task"),
               "question": meta.get("question", ""), "answer_prefix": meta.get("answer_prefix", ""),
               "answers" if longbench else "answer": json.dumps(s.get("reference")),
               "max_new_tokens": labels.config_value(rec, "benchmark", "max_new_tokens") or "",
               "predicted_answer": s.get("prediction"), "compression_ratio": ratio,
               "score": s.get("score"), "prompt_tokens": s.get("prompt_tokens"),
               "generated_tokens": s.get("generated_tokens")}
        if "depth" in meta:
            row["needle_depth"] = meta["depth"]
        out.append(row)
    return out


def _write(folder: Path, rec: dict, rows: list[dict], metrics, dataset: str, data_dir: str,
           source: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (folder / "predictions.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=4))
    (folder / "config.yaml").write_text(yaml.safe_dump(_config(rec, dataset, data_dir, folder.parent),
                                                       sort_keys=False))
    keep = ("method", "method_preset", "tuned", "budget", "kv_size", "budget_of", "context_len",
            "seed", "split", "n_samples", "accuracy", "task_scores", "task_metrics",
            "kv_cache_bytes", "kv_cache_bytes_uncompressed", "kv_cache_fraction",
            "prompt_tokens_kept", "decode_kv_read_bytes", "peak_memory_bytes",
            "peak_memory_kind", "ttft_s", "decode_tokens_per_s", "hardware", "dtype")
    extra = {"source": shown_path(source), "protocol": labels.protocol_of(rec),
             "data": labels.data_label(rec),
             "samples_per_task": labels.config_value(rec, "benchmark", "n_samples"),
             **{k: rec.get(k) for k in keep}}
    (folder / "atskv.json").write_text(json.dumps(extra, indent=1))


def export_run(result: Path, out: Path, used: set[Path] | None = None) -> list[Path]:
    """Write one run's kvpress folder(s) under ``out``; returns them ([] when the run is not a
    successful run of the prompt budget meaning with samples). ``used``: the folders this
    export has written so far."""
    used = set() if used is None else used
    rec = json.loads(Path(result).read_text())
    if rec.get("status") != "ok" or rec.get("budget_of") != PROMPT:
        return []
    samples, _ = load_samples(str(result))
    if samples is None:
        return []
    metric = {t: _snake(m) for t, m in (rec.get("task_metrics") or {}).items()}
    scores = rec.get("task_scores") or {}
    folders = []
    if rec.get("benchmark") in KVPRESS_DATASETS:  # one folder per task, data_dir = the task
        for task in sorted({str(s["task"]) for s in samples}):
            dataset = dataset_name(rec, task)
            rows = _rows(rec, [s for s in samples if str(s["task"]) == task],
                         rec.get("benchmark") == "longbench")
            score = round(float(scores.get(task, float("nan"))), 2)
            metrics = score if dataset.startswith("longbench") else \
                {task: {metric.get(task, "score"): score}}
            folder = _unique(out / folder_name(rec, dataset, task), used)
            _write(folder, rec, rows, metrics, dataset, task, result)
            folders.append(folder)
        return folders
    dataset, data_dir = dataset_name(rec, None), str(rec.get("context_len"))
    metrics = {t: {metric.get(t, "score"): round(float(v), 2)} for t, v in sorted(scores.items())}
    folder = _unique(out / folder_name(rec, dataset, data_dir), used)
    _write(folder, rec, _rows(rec, samples, False), metrics, dataset, data_dir, result)
    return [folder]


def export(results: list[str | Path], out: str | Path) -> list[Path]:
    out, used = Path(out), set()
    folders = []
    for d in results:
        for f in sorted(Path(d).rglob("result.json")):
            folders += export_run(f, out, used)
    return folders


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m atskv.analysis.export_kvpress",
                                description=__doc__.split("\n")[0])
    p.add_argument("--results", nargs="+", required=True, metavar="DIR",
                   help="folder(s) searched recursively for result.json")
    p.add_argument("--out", required=True, help="output folder (kvpress's output_dir)")
    args = p.parse_args(argv)
    missing = [d for d in args.results if not Path(d).is_dir()]
    if missing:
        print(f"export_kvpress: error: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    folders = export(args.results, args.out)
    if not folders:
        print(f"export_kvpress: error: no successful run with samples under "
              f"{', '.join(args.results)}", file=sys.stderr)
        return 1
    print(f"{len(folders)} folder(s) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
