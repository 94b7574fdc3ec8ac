"""Hydra callbacks for sweeps, registered in ``conf/config.yaml`` under ``hydra.callbacks``."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class FixSweepId(Callback):
    """Give every job of a sweep the same ``sweep_id``.

    Its default, ``${now:%Y%m%d-%H%M%S}``, resolves when a job composes its config: seconds apart
    for jobs run one after another, hours apart for SLURM jobs queued behind each other, so each
    job would get its own id. Resolving it once in the sweep's config at the start stores the value
    in that config's resolver cache, which Hydra copies into every job's config under each
    launcher (basic, joblib, submitit local and SLURM). An explicit ``sweep_id=...`` is kept.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _ = config.sweep_id
