"""``python -m atskv.integrations.lm_eval_tasks``: export a benchmark as lm-eval tasks (see ``--help``)."""

from atskv.integrations.lm_eval_tasks.export import main

main()
