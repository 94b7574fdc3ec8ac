"""LongBench v1 (THUDM, arXiv 2308.14508): the 16 English tasks and their LongBench-E variants.

Protocol (THUDM's ``pred.py``/``eval.py``, as shipped by lm-eval 0.4.13):

* prompts, maximum generation lengths and stop strings are read at run time from lm-eval's
  task YAMLs (``lm_eval/tasks/longbench/<task>.yaml``: ``doc_to_text``, ``max_gen_toks``,
  ``until``); their ``{{question}}`` is THUDM's ``input`` field. ``until`` is ``["\\n"]`` for
  trec, triviaqa, samsum, lsht (and their -E variants), empty for the others; it becomes
  :attr:`Sample.stop`;
* ``context_len`` is THUDM's ``max_length``: the whole prompt, chat template included, is
  middle-truncated (first and last halves kept) to at most ``context_len`` tokens,
  token-exact; the generation comes on top;
* the chat template is applied except for trec, triviaqa, samsum, lsht, lcc and repobench-p;
* trec, triviaqa, samsum and lsht keep only the first line of the prediction;
* the score is the task's metric (qa_f1, ROUGE-L, classification, retrieval, count or code
  similarity; lm-eval's implementations of THUDM's functions), max over the references, x100;
  a task's score is the mean over its samples;
* LongBench-E samples (``<task>_e``) carry ``meta["length_bucket"]``: ``"0-4k"``, ``"4-8k"`` or
  ``"8k+"`` from the record's ``length`` (words), as THUDM's ``eval.py`` (``scorer_e``) buckets:
  ``length < 4000``, ``< 8000``, else.

Splits (``benchmark.split``): a record is ``dev`` when the SHA-1 of ``"atskv-split:" + _id``
(its position in the file when it has no ``_id``), as an integer, is divisible by 4 (about a
quarter of the records), else ``test``. The id alone decides, so a record shared by a task and its -E variant lands in
the same split. ``n_samples`` and the seeded subset apply within the split.

Data: ``datasets.load_dataset("THUDM/LongBench", task, split="test")``, falling back to the
parquet copy lm-eval uses; or, with ``data_dir``, THUDM-format ``<data_dir>/<task>.jsonl`` files
(the content of THUDM's ``data.zip``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml

from atskv.benchmarks.base import BENCHMARKS, TaskFileBenchmark
from atskv.benchmarks.textmetrics import (
    check_fields,
    check_task_names,
    encode_split,
    hub_load,
    kept_index,
    lm_eval_longbench_metrics,
    max_over_references,
    middle_truncate,
    prompt_wrapper,
)
from atskv.core.types import ConfigError, Sample

TASKS: tuple[str, ...] = (
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "gov_report",
    "qmsum",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)
"""The 16 English LongBench v1 tasks (the default task list)."""

E_TASKS: tuple[str, ...] = tuple(
    f"{t}_e" for t in TASKS if t not in ("narrativeqa", "musique", "qmsum")
)
"""LongBench-E: the same tasks with lengths spread evenly over 0-4k, 4-8k and 8k+ words."""

ALL_TASKS: tuple[str, ...] = TASKS + E_TASKS

TASK_METRIC: dict[str, str] = {
    "narrativeqa": "qa_f1_score",
    "qasper": "qa_f1_score",
    "multifieldqa_en": "qa_f1_score",
    "hotpotqa": "qa_f1_score",
    "2wikimqa": "qa_f1_score",
    "musique": "qa_f1_score",
    "gov_report": "rouge_score",
    "qmsum": "rouge_score",
    "multi_news": "rouge_score",
    "trec": "classification_score",
    "triviaqa": "qa_f1_score",
    "samsum": "rouge_score",
    "passage_count": "count_score",
    "passage_retrieval_en": "retrieval_score",
    "lcc": "code_sim_score",
    "repobench-p": "code_sim_score",
}
"""Per-pair metric of each base task: a function name in ``lm_eval.tasks.longbench.metrics``."""

METRIC_NAMES: dict[str, str] = {
    "qa_f1_score": "F1",
    "rouge_score": "ROUGE-L",
    "classification_score": "classification accuracy",
    "retrieval_score": "retrieval accuracy",
    "count_score": "count accuracy",
    "code_sim_score": "code edit similarity",
}
"""Report-table names of the metric functions in :data:`TASK_METRIC`."""

NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum", "lsht"})
HUB_PATH = "THUDM/LongBench"

_FIELDS: dict[str, tuple[type, ...]] = {"input": (str,), "context": (str,), "answers": (list,)}
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_DATA_HINT = (
    "a folder of THUDM-format <task>.jsonl files (THUDM/LongBench's data.zip, extracted), "
    "e.g. benchmark.data_dir=/path/to/LongBench/data"
)


def base_task(task: str) -> str:
    """``qasper_e`` -> ``qasper`` (LongBench-E tasks share the prompt rules and metric)."""
    return task[:-2] if task.endswith("_e") else task


@dataclass(frozen=True)
class TaskSpec:
    """What lm-eval's YAML says about one task."""

    prompt: str  # template with {{context}} and {{question}}
    max_new_tokens: int
    until: tuple[str, ...]
    process_results: str
    dataset_path: str
    dataset_name: str


class _YamlLoader(yaml.SafeLoader):
    pass


_YamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def lm_eval_task_dir() -> str:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("LongBench prompts come from lm-eval: pip install lm-eval==0.4.13")
    return os.path.join(list(spec.submodule_search_locations)[0], "tasks", "longbench")


@cache
def task_spec(task: str) -> TaskSpec:
    """Prompt template, generation length and metric of ``task`` from lm-eval's YAML."""
    path = os.path.join(lm_eval_task_dir(), f"{task}.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"lm-eval has no LongBench task file {path} (expected lm-eval 0.4.13)")
    with open(path, encoding="utf-8") as f:
        doc = yaml.load(f, Loader=_YamlLoader)
    gen = doc.get("generation_kwargs") or {}
    return TaskSpec(
        prompt=str(doc["doc_to_text"]),
        max_new_tokens=int(gen.get("max_gen_toks", 256)),
        until=tuple(gen.get("until") or ()),
        process_results=str(doc.get("process_results", "")),
        dataset_path=str(doc.get("dataset_path", "")),
        dataset_name=str(doc.get("dataset_name", task)),
    )


def length_bucket(length: float) -> str:
    """LongBench-E's length bucket of a record's word count ``length``: ``"0-4k"`` below 4000,
    ``"4-8k"`` below 8000, else ``"8k+"`` (THUDM ``eval.py``, ``scorer_e``)."""
    if length < 4000:
        return "0-4k"
    return "4-8k" if length < 8000 else "8k+"


def render_split(template: str, record: dict[str, Any]) -> tuple[str, int]:
    """:func:`render_prompt` and where its question part begins: the character after the
    context (what follows ``{{context}}`` in the template is the question part, as kvpress
    splits LongBench's prompts; the instruction before the context stays with it)."""
    head, sep, _ = template.partition("{{context}}")
    text = render_prompt(template, record)
    if not sep:
        raise ConfigError("LongBench prompt template has no {{context}}")
    return text, len(render_prompt(head, record)) + len(record["context"])


def render_prompt(template: str, record: dict[str, Any]) -> str:
    """Fill ``{{context}}`` and ``{{question}}`` (THUDM's ``input``) from a record."""
    values = {"context": record["context"], "question": record["input"], "input": record["input"]}

    def fill(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise ConfigError(f"LongBench prompt uses unknown field {m.group(1)!r}")
        return str(values[m.group(1)])

    return _PLACEHOLDER.sub(fill, template)


def score_prediction(
    task: str, prediction: str, references: list[str], all_classes: list[str] | None = None
) -> float:
    """THUDM's scorer for one prediction: first-line post-processing where the protocol says so,
    then the task's metric, max over the references, in [0, 100]."""
    base = base_task(task)
    if base in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = getattr(lm_eval_longbench_metrics(), TASK_METRIC[base])
    best = max_over_references(fn, prediction, references, all_classes=all_classes)
    return round(100.0 * best, 6)  # rouge's F1 carries a 1e-8 epsilon: 99.9999995 -> 100


def record_id(record: dict[str, Any], index: int) -> str:
    """A record's id: THUDM's ``_id``, else its position in the task's file."""
    return str(record.get("_id") or index)


def check_record(task: str, record: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate one THUDM-schema record (lm-eval's copies name ``input`` ``question``)."""
    if "input" not in record and "question" in record:
        record = {**record, "input": record["question"]}
    check_fields(record, _FIELDS, where)
    answers = record["answers"]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ConfigError(f"{where}: field 'answers' should be a non-empty list of strings")
    if base_task(task) in ("trec", "lsht"):
        check_fields(record, {"all_classes": (list,)}, where)
    if task.endswith("_e"):
        check_fields(record, {"length": (int, float)}, where)
    return record


@BENCHMARKS.register("longbench")
class LongBench(TaskFileBenchmark):
    """LongBench v1 English tasks (and LongBench-E with ``<task>_e``).

    Config fields: ``tasks`` (None: the 16 English tasks from the hub, or every task whose
    ``<task>.jsonl`` exists in ``data_dir``), ``data_dir``, ``n_samples`` (cap per task, used
    when ``load`` gets ``n=None``), ``max_new_tokens`` (overrides the per-task lengths),
    ``split`` (``dev`` or ``test``; see the module docstring).
    """

    suite = "longbench"
    display_name = "LongBench"
    all_tasks = ALL_TASKS
    default_tasks = TASKS
    task_path = "{task}.jsonl"
    hub_path = HUB_PATH

    def _validate_task(self, task: str) -> list[dict[str, Any]]:
        task_spec(task)
        return super()._validate_task(task)

    def default_max_new_tokens(self, task: str) -> int:
        """lm-eval's ``max_gen_toks`` for ``task`` (THUDM's ``dataset2maxlen``)."""
        return task_spec(task).max_new_tokens

    def task_metric(self, task: str) -> str:
        check_task_names(self.suite, [task], self.all_tasks)
        return METRIC_NAMES[TASK_METRIC[base_task(task)]]

    # -- data ---------------------------------------------------------------------------------

    def _check_record(self, task: str, record: dict[str, Any], where: str) -> dict[str, Any]:
        return check_record(task, record, where)

    def _hub_rows(self, task: str) -> list[dict[str, Any]]:
        spec = task_spec(task)
        candidates = [(HUB_PATH, task)]
        if spec.dataset_path and spec.dataset_path != HUB_PATH:
            candidates.append((spec.dataset_path, spec.dataset_name))
        return hub_load(candidates, "test", _DATA_HINT)

    def _items(self, task: str) -> list[tuple[str, Any]]:
        return [(record_id(r, i), r) for i, r in enumerate(self._records(task))]

    def load(self, tokenizer: Any, context_len: int, n: int | None, seed: int) -> list[Sample]:
        """The split's samples of every selected task, each prompt at most ``context_len``
        tokens (exactly ``context_len`` when it had to be truncated)."""
        wrappers = {chat: prompt_wrapper(tokenizer, chat) for chat in (True, False)}
        samples: list[Sample] = []
        for task in self.tasks():
            for i, record in self.selected_items(task, n, seed):
                samples.append(self._sample(task, i, record, tokenizer, context_len, wrappers))
        return samples

    def _sample(
        self,
        task: str,
        index: int,
        record: dict[str, Any],
        tokenizer: Any,
        context_len: int,
        wrappers: dict[bool, tuple[list[int], list[int], bool]],
    ) -> Sample:
        spec = task_spec(task)
        base = base_task(task)
        pre, post, used_chat = wrappers[base not in NO_CHAT_TEMPLATE]
        text, at = render_split(spec.prompt, record)
        content, question_at = encode_split(tokenizer, text, at)
        budget = context_len - len(pre) - len(post)
        if budget <= 0:
            raise ConfigError(
                f"context_len={context_len} leaves no room for a LongBench {task} prompt: the "
                f"chat template alone takes {len(pre) + len(post)} tokens"
            )
        kept = middle_truncate(content, budget)
        meta: dict[str, Any] = {
            "all_classes": record.get("all_classes"),
            "first_line": base in FIRST_LINE_ONLY,
            "chat_template": used_chat,
            "stop": list(spec.until),
            "metric": TASK_METRIC[base],
            "prompt_tokens_full": len(content) + len(pre) + len(post),
            "truncated": len(kept) < len(content),
            "length": record.get("length"),
            "index": index,
            "split": self.split(),
        }
        if task.endswith("_e"):
            meta["length_bucket"] = length_bucket(record["length"])
        return Sample(
            id=f"{task}/{record_id(record, index)}",
            task=task,
            input_ids=pre + kept + post,
            references=list(record["answers"]),
            max_new_tokens=self.task_max_new_tokens(task),
            meta=meta,
            stop=list(spec.until),
            question_start=len(pre) + kept_index(question_at, len(content), budget),
        )

    # -- scoring ------------------------------------------------------------------------------

    def score(self, prediction: str, sample: Sample) -> float:
        return score_prediction(
            sample.task, prediction, sample.references, sample.meta.get("all_classes")
        )
