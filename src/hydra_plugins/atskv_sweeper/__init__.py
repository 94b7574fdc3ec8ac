"""atskv's Hydra sweeper: Hydra's basic sweeper, with jobs that can share a prefill grouped into
one unit of work (see :class:`GroupedSweeper`; configured by ``conf/hydra/sweeper/atskv.yaml``)."""

from hydra_plugins.atskv_sweeper.grouped_sweeper import GroupedSweeper

__all__ = ["GroupedSweeper"]
