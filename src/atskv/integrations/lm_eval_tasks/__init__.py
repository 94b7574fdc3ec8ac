"""lm-eval tasks for atskv's benchmarks (use ``--include_path`` with :data:`TASK_DIR`).

``TASK_DIR`` holds the synthetic needle-in-a-haystack tasks (``atskv_niah_single``,
``atskv_niah_multikey``, ``atskv_niah_multivalue``, ``atskv_vt``; group ``atskv_synthetic``) and
the multi-question task (``atskv_mq_q0`` .. ``atskv_mq_q3``, the questions asked at each
position of one context; group ``atskv_multi_question``),
whose data is generated offline when lm-eval loads them; :mod:`atskv.integrations.lm_eval_tasks.export`
writes any benchmark's samples as a jsonl + task YAML pair.
"""

from pathlib import Path

from atskv.integrations.lm_eval_tasks.export import (
    export_benchmark,
    export_samples,
    lookup_sample,
    register_sample,
    score_doc,
    synthetic_dataset,
)

TASK_DIR = Path(__file__).resolve().parent

__all__ = [
    "TASK_DIR",
    "export_benchmark",
    "export_samples",
    "lookup_sample",
    "register_sample",
    "score_doc",
    "synthetic_dataset",
]
