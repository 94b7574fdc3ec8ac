"""ZeroSCROLLS (Shaham et al., arXiv 2305.14196): ten zero-shot long-text tasks, validation split.

Each record's ``input`` already holds the instruction, the document and the query; the
``document_*`` and ``query_*`` indices mark the spans. ``context_len`` is the maximum input
length: when the prompt, chat template included, does not fit ``context_len`` tokens, the
document is cut at a token boundary (its head is kept), the record's ``truncation_seperator``
is inserted, and the query with everything after it is kept whole (ZeroSCROLLS' own truncation,
token-exact: the prompt then has exactly ``context_len`` tokens). The generation comes on top,
with upstream's per-task lengths (:data:`DEFAULT_MAX_NEW_TOKENS`) and no stop string (upstream
generates to EOS or the length limit). The prompt goes through the tokenizer's chat template
when it has one (``chat_template: false`` in the config turns that off).

Metrics (upstream definitions, per prediction, 0-100):

* gov_report, summ_screen_fd, qmsum, squality: ROUGE-1/2/L F1 (rouge-score, Porter stemming;
  with several references, each ROUGE type takes its best reference). A sample's ``score`` is
  their geometric mean; the task's score is upstream's corpus aggregate, the geometric mean of
  the corpus-mean ROUGE-1/2/L (``aggregation`` ``"geomean_of_part_means"`` over
  :meth:`ZeroScrolls.score_parts`, which are in 0-100), never below the mean of per-sample
  geometric means. (SCROLLS' metric script, tau/scrolls ``metrics/scrolls.py``, scores ROUGE
  without stemming; ZeroSCROLLS' own script could not be checked here, so stemming is kept.)
* qasper, narrative_qa, musique: SQuAD token F1, max over references;
* quality: accuracy of the first standalone option letter A-D of the prediction;
* space_digest: exponential similarity ``0.5 ** (|gold% - predicted%| / 10)`` of the first
  percentage in each (0 when the prediction has none);
* book_sum_sort: concordance index, the share of pairs of summaries the prediction orders as the
  gold permutation does (ids are the integers in the text; a pair with an id the prediction
  omits counts as discordant).

Records sharing an ``id`` (several references for one question) form one sample. The other
tasks' score is the mean over samples.

Splits (``benchmark.split``): a sample (a group of records sharing an ``id``) is ``dev`` when the
SHA-1 of ``"atskv-split:" + id``, as an integer, is divisible by 4 (about a quarter), else
``test``. ``n_samples`` and the seeded subset apply within the split. Queries about the same
document have different ids, so a document can appear in both splits with different questions.

Data: ``datasets.load_dataset("tau/zero_scrolls", task, split="validation")`` or, with
``data_dir``, ``<data_dir>/<task>/validation.jsonl`` files in the same schema.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

from atskv.benchmarks.base import BENCHMARKS, TaskFileBenchmark, aggregate_rows
from atskv.benchmarks.textmetrics import (
    cfg_get,
    check_fields,
    check_task_names,
    encode,
    encode_split,
    hub_load,
    max_over_references,
    prompt_wrapper,
    qa_f1,
)
from atskv.core.types import ConfigError, Sample

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

METRIC_NAMES: dict[str, str] = {
    "rouge": "ROUGE geometric mean",
    "f1": "F1",
    "accuracy": "accuracy",
    "exp_similarity": "exponential similarity",
    "concordance_index": "concordance index",
}
"""Report-table names of the metrics in :data:`TASK_METRIC`."""

ROUGE_PARTS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")

DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {
    "gov_report": 1024,
    "summ_screen_fd": 512,
    "qmsum": 512,
    "squality": 512,
    "qasper": 128,
    "narrative_qa": 64,
    "quality": 10,
    "musique": 32,
    "space_digest": 36,
    "book_sum_sort": 256,
}
"""Upstream's generation lengths: ``dataset_to_leave_tokens_for_generations`` in
tau-nlp/zero_scrolls ``experiments/api/api.py`` (commit 27aa342), the room its API runners
leave for the answer (their ``max_tokens``). Its Flan-T5 runner (``experiments/hf/
run_hf_model.py``) uses ``max_length=1024`` for every task instead. ``benchmark.max_new_tokens``
overrides them for every task."""

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
    return {k: float(scores[k].fmeasure) for k in ROUGE_PARTS}


def rouge_parts(prediction: str, references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 in [0, 100] (keys ``rouge1``, ``rouge2``, ``rougeL``), each the best over
    the references; the prediction is stripped first, as :func:`score_prediction` does."""
    r = rouge_components(prediction.strip(), references)
    return {k: 100.0 * v for k, v in r.items()}


def rouge_geometric_mean(prediction: str, references: list[str]) -> float:
    """Geometric mean of ROUGE-1/2/L F1, in [0, 100]."""
    r = rouge_components(prediction, references)
    return 100.0 * math.prod(r.values()) ** (1.0 / 3.0)


def corpus_rouge(predictions: list[str], samples: list[Sample]) -> float:
    """Upstream's aggregate: geometric mean of the corpus-mean ROUGE-1/2/L, in [0, 100]
    (NaN for no predictions)."""
    rows = [
        {"score": 0.0, "score_parts": rouge_parts(p, s.references)}
        for p, s in zip(predictions, samples, strict=True)
    ]
    return aggregate_rows("geomean_of_part_means", rows)


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
    tokenizer: Any, record: dict[str, Any], context_len: int, template_tokens: int = 0
) -> tuple[list[int], bool, int, int]:
    """``(ids, truncated, full_length, question_start)`` for a record's ``input`` within
    ``context_len`` minus ``template_tokens`` tokens: the whole input when it fits, else
    instruction + document head + separator + query and rest, exactly filling the room.
    ``question_start`` is the index of the first id of the query and what follows it (the
    question part; the instruction, the document and, when cut, the separator are the context).
    Raises :class:`ConfigError` when the instruction, separator and query alone do not fit."""
    budget = context_len - template_tokens
    text = record["input"]
    ds, de, qs = (record[k] for k in _INDEX_FIELDS[:3])
    full, question_at = encode_split(tokenizer, text, max(de, qs))
    if len(full) <= budget:
        return full, False, len(full), question_at
    head = encode(tokenizer, text[:ds])
    doc = encode(tokenizer, text[ds:de])
    sep = record["truncation_seperator"]
    rest, rest_at = encode_split(tokenizer, sep + text[max(de, qs) :], len(sep))
    keep = budget - len(head) - len(rest)
    if keep < 0:
        raise ConfigError(
            f"context_len={context_len} is too small for ZeroSCROLLS record {record['id']}: "
            f"the instruction and query alone take {len(head) + len(rest)} tokens "
            f"(with the separator) and the chat template {template_tokens}"
        )
    return head + doc[:keep] + rest, True, len(full), len(head) + keep + rest_at


@BENCHMARKS.register("zeroscrolls")
class ZeroScrolls(TaskFileBenchmark):
    """ZeroSCROLLS validation split.

    Config fields: ``tasks`` (None: all ten from the hub, or every task whose
    ``<task>/validation.jsonl`` exists in ``data_dir``), ``data_dir``, ``n_samples`` (cap per
    task, used when ``load`` gets ``n=None``), ``max_new_tokens`` (overrides
    :data:`DEFAULT_MAX_NEW_TOKENS`), ``chat_template`` (default true), ``split`` (``dev`` or
    ``test``; see the module docstring).
    """

    suite = "zeroscrolls"
    display_name = "ZeroSCROLLS"
    all_tasks = TASKS
    default_tasks = TASKS
    task_path = f"{{task}}/{SPLIT}.jsonl"
    hub_path = HUB_PATH

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

    def default_max_new_tokens(self, task: str) -> int:
        return DEFAULT_MAX_NEW_TOKENS[task]

    def _metric(self, task: str) -> str:
        """``task``'s key in :data:`METRIC_NAMES` (an unknown task raises ConfigError)."""
        check_task_names(self.suite, [task], self.all_tasks)
        return TASK_METRIC[task]

    def task_metric(self, task: str) -> str:
        return METRIC_NAMES[self._metric(task)]

    # -- data ---------------------------------------------------------------------------------

    def _check_record(self, task: str, record: dict[str, Any], where: str) -> dict[str, Any]:
        return check_record(record, where)

    def _hub_rows(self, task: str) -> list[dict[str, Any]]:
        return hub_load([(HUB_PATH, task)], SPLIT, _DATA_HINT)

    def _items(self, task: str) -> list[tuple[str, Any]]:
        return [(record["id"], (record, refs)) for record, refs in group_by_id(self._records(task))]

    def load(self, tokenizer: Any, context_len: int, n: int | None, seed: int) -> list[Sample]:
        """The split's samples of every selected task, each prompt at most ``context_len``
        tokens (exactly ``context_len`` when the document had to be cut)."""
        chat = bool(cfg_get(self.cfg, "chat_template", True))
        pre, post, used_chat = prompt_wrapper(tokenizer, chat)
        samples: list[Sample] = []
        for task in self.tasks():
            for i, (record, references) in self.selected_items(task, n, seed):
                ids, truncated, full_len, question_at = truncate_input(
                    tokenizer, record, context_len, len(pre) + len(post)
                )
                samples.append(
                    Sample(
                        id=f"{task}/{record['id']}",
                        task=task,
                        input_ids=pre + ids + post,
                        references=references,
                        max_new_tokens=self.task_max_new_tokens(task),
                        meta={
                            "metric": TASK_METRIC[task],
                            "chat_template": used_chat,
                            "truncated": truncated,
                            "prompt_tokens_full": full_len + len(pre) + len(post),
                            "index": i,
                            "split": self.split(),
                        },
                        stop=[],
                        question_start=len(pre) + question_at,
                    )
                )
        return samples

    # -- scoring ------------------------------------------------------------------------------

    def score(self, prediction: str, sample: Sample) -> float:
        return score_prediction(sample.task, prediction, sample.references)

    def score_parts(self, prediction: str, sample: Sample) -> dict[str, float]:
        """ROUGE tasks: ``{"rouge1", "rouge2", "rougeL"}`` F1 in 0-100 (best reference per
        type); the other tasks: ``{}``."""
        if self._metric(sample.task) != "rouge":
            return {}
        return rouge_parts(prediction, sample.references)

    def aggregation(self, task: str) -> str:
        """``"geomean_of_part_means"`` for the ROUGE tasks (upstream's corpus ROUGE), else
        ``"mean"``."""
        return "geomean_of_part_means" if self._metric(task) == "rouge" else "mean"
