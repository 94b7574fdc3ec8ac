"""ZeroSCROLLS (Shaham et al., arXiv 2305.14196): ten zero-shot long-text tasks, validation split.

Each record's ``input`` already holds the instruction, the document and the query; the
``document_*`` and ``query_*`` indices mark the spans. When the prompt does not fit
``context_len`` minus the generation room (minus chat-template tokens), the document is cut at a
token boundary (its head is kept), the record's ``truncation_seperator`` is inserted, and the
query with everything after it is kept whole (ZeroSCROLLS' own truncation, token-exact).
The prompt goes through the tokenizer's chat template when it has one (``chat_template: false``
in the config turns that off).

Metrics (upstream definitions, per prediction, 0-100):

* gov_report, summ_screen_fd, qmsum, squality: geometric mean of ROUGE-1/2/L F1 (rouge-score,
  Porter stemming; with several references, each ROUGE type takes its best reference).
  Upstream takes the geometric mean of corpus-averaged ROUGE; the mean of per-sample geometric
  means reported here is never above it. :func:`corpus_rouge` gives the upstream aggregate;
* qasper, narrative_qa, musique: SQuAD token F1, max over references;
* quality: accuracy of the first standalone option letter A-D of the prediction;
* space_digest: exponential similarity ``0.5 ** (|gold% - predicted%| / 10)`` of the first
  percentage in each (0 when the prediction has none);
* book_sum_sort: concordance index, the share of pairs of summaries the prediction orders as the
  gold permutation does (ids are the integers in the text; a pair with an id the prediction
  omits counts as discordant).

Records sharing an ``id`` (several references for one question) form one sample.
Data: ``datasets.load_dataset("tau/zero_scrolls", task, split="validation")`` or, with
``data_dir``, ``<data_dir>/<task>/validation.jsonl`` files in the same schema.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

from atskv.benchmarks.base import BENCHMARKS, TaskFileBenchmark
from atskv.benchmarks.textmetrics import (
    cfg_get,
    check_fields,
    encode,
    hub_load,
    max_over_references,
    prompt_wrapper,
    qa_f1,
    subset_indices,
)
from atskv.types import ConfigError, Sample

TASKS: tuple[str, ...] = (
    "gov_report",
    "summ_screen_fd",
    "qmsum",
    "squality",
    "qasper",
    "narrative_qa",
    "quality",
    "musique",
    "space_digest",
    "book_sum_sort",
)

TASK_METRIC: dict[str, str] = {
    "gov_report": "rouge",
    "summ_screen_fd": "rouge",
    "qmsum": "rouge",
    "squality": "rouge",
    "qasper": "f1",
    "narrative_qa": "f1",
    "musique": "f1",
    "quality": "accuracy",
    "space_digest": "exp_similarity",
    "book_sum_sort": "concordance_index",
}

DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {
    "gov_report": 256,
    "summ_screen_fd": 256,
    "qmsum": 256,
    "squality": 256,
    "qasper": 64,
    "narrative_qa": 64,
    "musique": 32,
    "quality": 16,
    "space_digest": 16,
    "book_sum_sort": 128,
}
"""Generation lengths kept modest for CPU runs (upstream lets summaries run to ~512-1024
tokens); ``benchmark.max_new_tokens`` overrides them for every task."""

HUB_PATH = "tau/zero_scrolls"
SPLIT = "validation"

_INDEX_FIELDS = (
    "document_start_index",
    "document_end_index",
    "query_start_index",
    "query_end_index",
)
_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "input": (str,),
    "output": (str,),
    **{name: (int,) for name in _INDEX_FIELDS},
    "truncation_seperator": (str,),
}
_DATA_HINT = (
    "a folder with <task>/validation.jsonl files in the tau/zero_scrolls schema, "
    "e.g. benchmark.data_dir=/path/to/zero_scrolls"
)
_LETTER = re.compile(r"\b[A-D]\b")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")
_INT = re.compile(r"\d+")


# --------------------------------------------------------------------------------------------
# Metrics


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_components(prediction: str, references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 in [0, 1], each the best over the references."""
    scores = _rouge_scorer().score_multi(list(references), prediction)
    return {k: float(v.fmeasure) for k, v in scores.items()}


def rouge_geometric_mean(prediction: str, references: list[str]) -> float:
    """Geometric mean of ROUGE-1/2/L F1, in [0, 100]."""
    r = rouge_components(prediction, references)
    return 100.0 * (r["rouge1"] * r["rouge2"] * r["rougeL"]) ** (1.0 / 3.0)


def corpus_rouge(predictions: list[str], samples: list[Sample]) -> float:
    """Upstream's aggregate: geometric mean of the corpus-mean ROUGE-1/2/L, in [0, 100]."""
    if not predictions:
        return 0.0
    rows = [rouge_components(p, s.references) for p, s in zip(predictions, samples, strict=True)]
    means = [sum(r[k] for r in rows) / len(rows) for k in ("rouge1", "rouge2", "rougeL")]
    return 100.0 * math.prod(means) ** (1.0 / 3.0)


def option_letter(text: str) -> str | None:
    """The first standalone capital A-D (``(B)``, ``B.``, ``Answer: B``)."""
    m = _LETTER.search(text)
    return m.group(0) if m else None


def letter_accuracy(prediction: str, references: list[str]) -> float:
    pred = option_letter(prediction)
    golds = {option_letter(r) for r in references}
    return 100.0 if pred is not None and pred in golds else 0.0


def _first_percentage(text: str) -> float | None:
    m = _PERCENT.search(text)
    return float(m.group(1)) if m else None


def exp_similarity(prediction: str, reference: str) -> float:
    """``0.5 ** (|gold - predicted| / 10)`` of the first percentages, in [0, 1]."""
    gold = _first_percentage(reference)
    if gold is None:
        raise ValueError(f"space_digest reference without a percentage: {reference!r}")
    pred = _first_percentage(prediction)
    return 0.0 if pred is None else 0.5 ** (abs(gold - pred) / 10.0)


def _ordered_ids(text: str) -> list[int]:
    seen: dict[int, None] = {}
    for m in _INT.finditer(text):
        seen.setdefault(int(m.group(0)), None)
    return list(seen)


def concordance_index(prediction: str, reference: str) -> float:
    """Share of gold-ordered pairs (a before b) that the prediction also puts a before b, in
    [0, 1]; ids missing from the prediction make their pairs discordant."""
    gold = _ordered_ids(reference)
    gold_set = set(gold)
    rank = {v: i for i, v in enumerate(x for x in _ordered_ids(prediction) if x in gold_set)}
    pairs = [(a, b) for i, a in enumerate(gold) for b in gold[i + 1 :]]
    if not pairs:
        return 1.0 if all(g in rank for g in gold) else 0.0
    good = sum(1 for a, b in pairs if a in rank and b in rank and rank[a] < rank[b])
    return good / len(pairs)


def score_prediction(task: str, prediction: str, references: list[str]) -> float:
    """The task's ZeroSCROLLS metric for one prediction, in [0, 100]."""
    metric = TASK_METRIC[task]
    prediction = prediction.strip()
    if metric == "rouge":
        return rouge_geometric_mean(prediction, references)
    if metric == "f1":
        return 100.0 * max_over_references(qa_f1, prediction, references)
    if metric == "accuracy":
        return letter_accuracy(prediction, references)
    if metric == "exp_similarity":
        return 100.0 * max_over_references(exp_similarity, prediction, references)
    return 100.0 * max_over_references(concordance_index, prediction, references)


# --------------------------------------------------------------------------------------------
# Records


def check_record(record: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate one ZeroSCROLLS record: fields, types and span order."""
    if record.get("output", "") is None:
        raise ConfigError(
            f"{where}: field 'output' is null (test labels are hidden; use the validation split)"
        )
    check_fields(record, _FIELDS, where)
    ds, de, qs, qe = (record[k] for k in _INDEX_FIELDS)
    n = len(record["input"])
    if not 0 <= ds <= de <= n:
        raise ConfigError(
            f"{where}: field 'document_end_index' ({de}) or 'document_start_index' ({ds}) is "
            f"outside 0..{n} or out of order"
        )
    if not de <= qs <= qe <= n:
        raise ConfigError(
            f"{where}: field 'query_start_index' ({qs}) or 'query_end_index' ({qe}) is outside "
            f"{de}..{n} (the query must follow the document) or out of order"
        )
    return record


def group_by_id(records: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[str]]]:
    """One ``(first record, all outputs)`` per distinct ``id``, in order of first appearance."""
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for r in records:
        groups.setdefault(r["id"], (r, []))[1].append(r["output"])
    return list(groups.values())


def truncate_input(
    tokenizer: Any, record: dict[str, Any], budget: int
) -> tuple[list[int], bool, int]:
    """``(ids, truncated, full_length)`` for a record's ``input`` within ``budget`` tokens: the
    whole input when it fits, else instruction + document head + separator + query and rest."""
    text = record["input"]
    full = encode(tokenizer, text)
    if len(full) <= budget:
        return full, False, len(full)
    ds, de, qs = (record[k] for k in _INDEX_FIELDS[:3])
    head = encode(tokenizer, text[:ds])
    doc = encode(tokenizer, text[ds:de])
    rest = encode(tokenizer, record["truncation_seperator"] + text[max(de, qs) :])
    keep = budget - len(head) - len(rest)
    if keep < 0:
        raise ConfigError(
            f"ZeroSCROLLS record {record['id']}: the instruction and query alone take "
            f"{len(head) + len(rest)} tokens, over the {budget} left by context_len"
        )
    return head + doc[:keep] + rest, True, len(full)


@BENCHMARKS.register("zeroscrolls")
class ZeroScrolls(TaskFileBenchmark):
    """ZeroSCROLLS validation split.

    Config fields: ``tasks`` (None: all ten from the hub, or every task whose
    ``<task>/validation.jsonl`` exists in ``data_dir``), ``data_dir``, ``n_samples`` (cap per
    task, used when ``load`` gets ``n=None``), ``max_new_tokens`` (overrides
    :data:`DEFAULT_MAX_NEW_TOKENS`), ``chat_template`` (default true).
    """

    suite = "zeroscrolls"
    display_name = "ZeroSCROLLS"
    all_tasks = TASKS
    default_tasks = TASKS
    task_path = f"{{task}}/{SPLIT}.jsonl"
    hub_path = HUB_PATH

    def max_new_tokens(self) -> int:
        override = cfg_get(self.cfg, "max_new_tokens")
        return max(int(override or DEFAULT_MAX_NEW_TOKENS[t]) for t in self.tasks())

    def _validate_task(self, task: str) -> list[dict[str, Any]]:
        records = super()._validate_task(task)
        if task == "space_digest":
            for r in records:
                if _first_percentage(r["output"]) is None:
                    raise ConfigError(
                        f"ZeroSCROLLS space_digest record {r['id']}: field 'output' holds "
                        f"no percentage ({r['output']!r})"
                    )
        return records

    def _check_record(self, task: str, record: dict[str, Any], where: str) -> dict[str, Any]:
        return check_record(record, where)

    def _hub_rows(self, task: str) -> list[dict[str, Any]]:
        return hub_load([(HUB_PATH, task)], SPLIT, _DATA_HINT)

    def load(self, tokenizer: Any, context_len: int, n: int | None, seed: int) -> list[Sample]:
        cap = n if n is not None else cfg_get(self.cfg, "n_samples")
        chat = bool(cfg_get(self.cfg, "chat_template", True))
        pre, post, used_chat = prompt_wrapper(tokenizer, chat)
        override = cfg_get(self.cfg, "max_new_tokens")
        samples: list[Sample] = []
        for task in self.tasks():
            groups = group_by_id(self._records(task))
            max_new = int(override or DEFAULT_MAX_NEW_TOKENS[task])
            budget = context_len - max_new - len(pre) - len(post)
            for i in subset_indices(len(groups), cap, seed):
                record, references = groups[i]
                ids, truncated, full_len = truncate_input(tokenizer, record, budget)
                samples.append(
                    Sample(
                        id=f"{task}/{record['id']}",
                        task=task,
                        input_ids=pre + ids + post,
                        references=references,
                        max_new_tokens=max_new,
                        meta={
                            "metric": TASK_METRIC[task],
                            "chat_template": used_chat,
                            "truncated": truncated,
                            "prompt_tokens_full": full_len + len(pre) + len(post),
                            "index": i,
                        },
                    )
                )
        return samples

    def score(self, prediction: str, sample: Sample) -> float:
        return score_prediction(sample.task, prediction, sample.references)
