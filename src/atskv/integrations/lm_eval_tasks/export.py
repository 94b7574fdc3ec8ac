"""Our benchmarks as lm-eval tasks: synthetic datasets built in-process, exports to jsonl + task
YAML, and the scorer lm-eval calls.

A record (one lm-eval doc) holds ``prompt`` (the sample's ``input_ids`` decoded with special
tokens, i.e. chat template included), ``input_ids``, ``question_start``, ``references``,
``max_new_tokens``, the sub-task, the benchmark name and ``meta`` (JSON text). Building or
loading records registers ``prompt -> sample`` in this process, and the ``atskv`` lm-eval model
feeds its exact ids (after checking that its tokenizer decodes them to the prompt), so a score
through lm-eval is computed on the same tokens as ``run.py``'s, and it knows where each
question starts and which questions share a context (``protocol=question_agnostic``, the
multi-question task). Other models, or ``--apply_chat_template`` (which
rewrites the prompt), tokenize the text instead.

Command line (writes ``<out>/<task>.jsonl`` and ``<out>/<task>.yaml`` per sub-task)::

    python -m atskv.integrations.lm_eval_tasks --benchmark longbench --tasks qasper \\
        --context-len 4096 --n 20 --out /tmp/atskv_tasks benchmark.data_dir=/data/longbench
    atskv-lm-eval --model atskv --model_args method=snapkv,budget=0.25,context_len=4096 \\
        --include_path /tmp/atskv_tasks --tasks atskv_longbench_qasper --device cpu
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from atskv.core.types import ConfigError, Sample

SYNTHETIC_TASKS = {  # lm-eval task name -> synthetic benchmark task
    "atskv_niah_single": "single_needle",
    "atskv_niah_multikey": "multi_key",
    "atskv_niah_multivalue": "multi_value",
    "atskv_vt": "variable_tracking",
    **{f"atskv_mq_q{j}": "multi_question" for j in range(4)},  # one task per question position
}
SYNTHETIC_DEFAULTS = {"context_len": 2048, "n_samples": 8, "seed": 0, "haystack": "generated"}

_PROMPT_SAMPLES: dict[str, Sample] = {}


# -- exact prompt ids ------------------------------------------------------------------------
def register_sample(prompt: str, sample: Sample) -> None:
    """Remember the sample (its exact token ids, where its question starts, its context) a
    benchmark built for ``prompt``."""
    _PROMPT_SAMPLES[prompt] = sample


def lookup_sample(tokenizer: Any, prompt: str) -> Sample | None:
    """The registered sample of ``prompt`` when ``tokenizer`` decodes its ids back to it, else
    None."""
    sample = _PROMPT_SAMPLES.get(prompt)
    if sample is None or decode_prompt(tokenizer, sample.input_ids) != prompt:
        return None
    return sample


def decode_prompt(tokenizer: Any, ids: Iterable[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


# -- records ---------------------------------------------------------------------------------
def sample_record(sample: Sample, tokenizer: Any, benchmark: str) -> dict[str, Any]:
    """One lm-eval doc for ``sample`` (also registers its exact ids)."""
    prompt = decode_prompt(tokenizer, sample.input_ids)
    register_sample(prompt, sample)
    return {
        "id": sample.id,
        "benchmark": benchmark,
        "task": sample.task,
        "prompt": prompt,
        "input_ids": list(sample.input_ids),
        "question_start": sample.question_start,
        "references": list(sample.references),
        "max_new_tokens": int(sample.max_new_tokens),
        "stop": list(sample.stop),
        "meta": json.dumps(sample.meta, default=str),
    }


def record_sample(doc: dict[str, Any]) -> Sample:
    """The :class:`Sample` a record came from (what the benchmark's scorer reads)."""
    meta = doc.get("meta") or "{}"
    return Sample(
        id=str(doc.get("id", "")),
        task=str(doc["task"]),
        input_ids=list(doc.get("input_ids") or []),
        references=list(doc["references"]),
        max_new_tokens=int(doc.get("max_new_tokens") or 0),
        meta=json.loads(meta) if isinstance(meta, str) else dict(meta),
        stop=list(doc.get("stop") or []),
        question_start=doc.get("question_start"),
    )


_SCORERS: dict[str, Any] = {}


def score_doc(doc: dict[str, Any], prediction: str) -> float:
    """The benchmark's own score (0-100) of ``prediction`` for the record ``doc``."""
    from atskv.benchmarks import BENCHMARKS

    name = str(doc["benchmark"])
    if name not in _SCORERS:
        _SCORERS[name] = BENCHMARKS.get(name)(SimpleNamespace(name=name))
    return float(_SCORERS[name].score(prediction, record_sample(doc)))


def register_docs(docs: Iterable[dict[str, Any]]) -> None:
    for doc in docs:
        if doc.get("input_ids") and isinstance(doc.get("prompt"), str):
            register_sample(doc["prompt"], record_sample(doc))


# -- models and benchmarks by preset name ----------------------------------------------------
def load_preset_tokenizer(model: str = "smollm2_135m", model_path: str | None = None) -> Any:
    """The tokenizer of a ``conf/model`` preset (what the ``atskv`` lm-eval model loads)."""
    from atskv.experiments import models
    from atskv.experiments.compose import check_choice, compose_run_config, group_choices

    check_choice("model", model, group_choices("model"))
    cfg = compose_run_config([f"model={model}"])
    if model_path:
        cfg.model.path = str(model_path)
    return models.load_tokenizer(cfg.model, models.resolve_path(cfg.model))


def synthetic_dataset(task: str, position: int | None = None, **metadata: Any) -> dict[str, Any]:
    """lm-eval ``custom_dataset`` for a synthetic task: ``{"test": datasets.Dataset}`` (with
    ``position``, only the multi-question task's questions asked at that position).

    lm-eval calls it with the task metadata: ``--model_args`` merged with ``--metadata``. Read
    here: ``model`` / ``model_path`` (whose tokenizer and chat template build the prompts),
    ``context_len`` (the exact prompt length, default 2048), ``n_samples`` (default 8),
    ``seed`` (default 0), ``haystack`` ("generated" or a folder of .txt essays)."""
    import datasets

    from atskv.benchmarks.synthetic import SyntheticBenchmark

    opts = {k: metadata.get(k, v) for k, v in SYNTHETIC_DEFAULTS.items()}
    for key in ("context_len", "n_samples", "seed"):
        value = opts[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise ConfigError(f"{task}: metadata {key}={value!r} must be a "
                              f"{'non-negative' if key == 'seed' else 'positive'} integer")
    tokenizer = load_preset_tokenizer(metadata.get("model") or "smollm2_135m", metadata.get("model_path"))
    cfg = SimpleNamespace(name="synthetic", tasks=[task], haystack=str(opts["haystack"]),
                          n_samples=opts["n_samples"], max_new_tokens=None)
    samples = SyntheticBenchmark(cfg).load(tokenizer, opts["context_len"], opts["n_samples"], opts["seed"])
    if position is not None:  # every position's samples are registered: the model needs them all
        rows = [sample_record(s, tokenizer, "synthetic") for s in samples]
        rows = [r for r, s in zip(rows, samples) if s.meta["question_position"] == position]
    else:
        rows = [sample_record(s, tokenizer, "synthetic") for s in samples]
    return {"test": datasets.Dataset.from_list(rows)}


# -- export ----------------------------------------------------------------------------------
def task_name(benchmark: str, task: str, prefix: str = "atskv_") -> str:
    return prefix + re.sub(r"[^A-Za-z0-9_]+", "_", f"{benchmark}_{task}")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def task_yaml(name: str, data_file: str | Path, max_gen_toks: int, until: list[str] | None = None) -> str:
    """An lm-eval task YAML over a jsonl of records, scored by the benchmark's scorer."""
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(Path(data_file).resolve()))}",
        "test_split: test",
        "output_type: generate_until",
        "process_docs: !function atskv.integrations.lm_eval_tasks.utils.process_docs",
        'doc_to_text: "{{prompt}}"',
        "doc_to_target: \"{{references | join(', ')}}\"",
        "process_results: !function atskv.integrations.lm_eval_tasks.utils.process_results",
        "metric_list:",
        "  - metric: score",
        "    aggregation: mean",
        "    higher_is_better: true",
        "generation_kwargs:",
        f"  until: {json.dumps(list(until or []))}",
        "  do_sample: false",
        f"  max_gen_toks: {int(max_gen_toks)}",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def export_samples(samples: list[Sample], tokenizer: Any, benchmark: str, out_dir: str | Path,
                   prefix: str = "atskv_") -> list[str]:
    """Write ``<out_dir>/<task>.jsonl`` and ``<task>.yaml`` per sub-task of ``samples``;
    returns the lm-eval task names (use ``--include_path out_dir``)."""
    out_dir = Path(out_dir)
    by_task: dict[str, list[Sample]] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    names = []
    for task, group in by_task.items():
        name = task_name(benchmark, task, prefix)
        data = write_jsonl(out_dir / f"{name}.jsonl",
                           (sample_record(s, tokenizer, benchmark) for s in group))
        max_gen = max(s.max_new_tokens for s in group)
        stops = sorted({tuple(s.stop) for s in group})
        if len(stops) > 1:
            raise ConfigError(f"{benchmark} task {task}: samples disagree on stop strings {stops}")
        (out_dir / f"{name}.yaml").write_text(task_yaml(name, data, max_gen, list(stops[0])),
                                              encoding="utf-8")
        names.append(name)
    return names


def export_benchmark(benchmark: str, out_dir: str | Path, context_len: int, n: int | None = None,
                     seed: int = 0, model: str = "smollm2_135m", overrides: list[str] | None = None,
                     prefix: str = "atskv_") -> list[str]:
    """Build a benchmark's samples exactly as ``run.py`` would (``benchmark=<name>``,
    ``model=<preset>`` and further Hydra ``overrides`` such as ``benchmark.tasks=[qasper]``) and
    export them; returns the lm-eval task names."""
    from atskv.benchmarks import BENCHMARKS
    from atskv.experiments import models
    from atskv.experiments.compose import check_choice, compose_run_config, group_choices

    presets = group_choices("benchmark")
    check_choice("benchmark", benchmark, sorted(set(presets) | set(BENCHMARKS.names())))
    check_choice("model", model, group_choices("model"))
    # a registered benchmark without a conf/benchmark preset: the schema's defaults
    group = [f"benchmark={benchmark}"] if benchmark in presets else [
        "benchmark=benchmark_schema", f"benchmark.name={benchmark}"]
    cfg = compose_run_config([*group, f"model={model}", *(overrides or [])])
    bench = BENCHMARKS.get(cfg.benchmark.name)(cfg.benchmark)
    bench.validate()
    tokenizer = models.load_tokenizer(cfg.model, models.resolve_path(cfg.model))
    samples = bench.load(tokenizer, context_len, n if n is not None else cfg.benchmark.n_samples, seed)
    if not samples:
        raise ConfigError(f"benchmark {benchmark} produced no samples")
    return export_samples(samples, tokenizer, cfg.benchmark.name, out_dir, prefix)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m atskv.integrations.lm_eval_tasks",
        description="Export an atskv benchmark to lm-eval task YAML + jsonl (one task per sub-task)")
    p.add_argument("--benchmark", default="synthetic", help="conf/benchmark preset")
    p.add_argument("--model", default="smollm2_135m", help="conf/model preset (tokenizer, template)")
    p.add_argument("--context-len", type=int, required=True, help="prompt tokens per sample")
    p.add_argument("--n", type=int, default=None, help="samples per sub-task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=None, help="comma-separated sub-tasks (benchmark.tasks)")
    p.add_argument("--out", required=True, help="folder for the YAML and jsonl files")
    p.add_argument("--prefix", default="atskv_", help="lm-eval task name prefix")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. benchmark.data_dir=/data")
    a = p.parse_args(argv)
    overrides = list(a.overrides)
    if a.tasks:
        overrides.append("benchmark.tasks=[" + ",".join(t.strip() for t in a.tasks.split(",")) + "]")
    try:
        names = export_benchmark(a.benchmark, a.out, a.context_len, a.n, a.seed, a.model, overrides,
                                 a.prefix)
    except ConfigError as e:
        p.exit(2, f"error: {e}\n")
    print(f"wrote {len(names)} task(s) to {a.out}: {', '.join(names)}")
    print(f"run: atskv-lm-eval --model atskv --include_path {a.out} --tasks {','.join(names)} ...")


if __name__ == "__main__":
    main()
