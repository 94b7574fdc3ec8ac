"""atskv inside other tools: lm-evaluation-harness (:mod:`.lm_eval`, :mod:`.lm_eval_tasks`)."""
