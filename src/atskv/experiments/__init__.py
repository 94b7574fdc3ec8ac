"""Running experiments: typed configs and their checks (:mod:`.config`, :mod:`.compose`), model
loading (:mod:`.models`), jobs and prefill-sharing groups (:mod:`.runner`), result files and
provenance (:mod:`.results`), the W&B mirror (:mod:`.wandb_log`), dev-split tuning (:mod:`.tune`)
and the reference results matrix (:mod:`.matrix`)."""
