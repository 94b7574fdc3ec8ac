"""atskv inside other tools: transformers (:mod:`.hf`: ``compress()`` and the
``atskv-text-generation`` pipeline), lm-evaluation-harness (:mod:`.lm_eval`,
:mod:`.lm_eval_tasks`)."""
