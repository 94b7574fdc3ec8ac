"""Functions the task YAMLs in this folder name with ``!function utils.<name>``.

lm-eval loads this file by path (a module of its own), so it keeps no state: everything lives
in :mod:`atskv.integrations.lm_eval_tasks.export`.
"""

from __future__ import annotations

from typing import Any

from atskv.integrations.lm_eval_tasks.export import register_docs, score_doc, synthetic_dataset


def niah_single(**metadata: Any) -> dict[str, Any]:
    return synthetic_dataset("single_needle", **metadata)


def niah_multikey(**metadata: Any) -> dict[str, Any]:
    return synthetic_dataset("multi_key", **metadata)


def niah_multivalue(**metadata: Any) -> dict[str, Any]:
    return synthetic_dataset("multi_value", **metadata)


def variable_tracking(**metadata: Any) -> dict[str, Any]:
    return synthetic_dataset("variable_tracking", **metadata)


def multi_question_q0(**metadata: Any) -> dict[str, Any]:
    return synthetic_dataset("multi_question", 0, **metadata)


def multi_question_q1(**metadata: Any) -> dict[str, Any]:
    return synthetic_dataset("multi_question", 1, **metadata)


def multi_question_q2(**metadata: Any) -> dict[str, Any]:
    return synthetic_dataset("multi_question", 2, **metadata)


def multi_question_q3(**metadata: Any) -> dict[str, Any]:
    return synthetic_dataset("multi_question", 3, **metadata)


def process_docs(dataset: Any) -> Any:
    """Exported records: register their exact token ids, leave the docs unchanged."""
    register_docs(dataset)
    return dataset


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """The benchmark's own scorer (0-100) on the generated text."""
    return {"score": score_doc(doc, results[0])}
