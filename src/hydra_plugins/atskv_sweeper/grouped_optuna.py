"""hydra-optuna-sweeper's sweeper with prefill sharing: each batch of trials it asks for
(``hydra.sweeper.n_jobs`` at a time) differs only in method hyperparameters, so the batch runs
as one prefill-sharing group (:class:`GroupingLauncher`) and each trial still gets its own run
folder, result and objective. ``share_prefill=false`` launches every trial on its own."""

from __future__ import annotations

from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.atskv_sweeper.grouped_sweeper import GroupingLauncher


class GroupedOptunaSweeper(OptunaSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if OmegaConf.select(config, "share_prefill", default=False):
            self.sweeper.launcher = GroupingLauncher(self.sweeper.launcher)
