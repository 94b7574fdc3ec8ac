"""lm-eval tasks for atskv's benchmarks (use ``--include_path`` with :data:`TASK_DIR`).

``TASK_DIR`` holds the synthetic needle-in-a-haystack tasks (``atskv_niah_single``,
``atskv_niah_multikey``, ``atskv_niah_multivalue``, ``atskv_vt``; group ``atskv_synthetic``),
whose data is generated offline when lm-eval loads them; :mod:`atskv.integrations.lm_eval_tasks.export`
writes any benchmark's samples as a jsonl + task YAML pair.
"""

from pathlib import Path

from atskv.integrations.lm_eval_tasks.export import (
    export_benchmark,
    export_samples,
    lookup_prompt_ids,
    register_prompt_ids,
    score_doc,
    synthetic_dataset,
)

TASK_DIR = Path(__file__).resolve().parent

__all__ = [
    "TASK_DIR",
    "export_benchmark",
    "export_samples",
    "lookup_prompt_ids",
    "register_prompt_ids",
    "score_doc",
    "synthetic_dataset",
]
