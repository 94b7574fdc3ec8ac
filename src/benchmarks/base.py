"""The benchmark interface.

``load`` builds samples (prompt of at most ``context_len`` tokens; the generation comes on top),
``score`` grades one prediction (0-100), ``score_parts`` gives the per-sample components a
task's aggregate needs, ``aggregate`` turns per-sample rows into the task's score the way the
benchmark's own scorer does, ``max_new_tokens`` tells the runner the generation length before
any data or tokenizer is loaded.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from atskv.benchmarks.textmetrics import (
    SPLITS,
    cfg_get,
    check_task_names,
    hash_split,
    iter_jsonl,
    requested_tasks,
    subset_indices,
)
from atskv.core.registry import Registry
from atskv.core.types import ConfigError, Sample

AGGREGATIONS: tuple[str, ...] = ("mean", "geomean_of_part_means")
"""How a task's score is computed from per-sample rows (see :func:`aggregate_rows`)."""


def aggregate_rows(aggregation: str, rows: Sequence[Mapping[str, Any]]) -> float:
    """A task's score from per-sample rows (dicts with ``score`` and ``score_parts``).

    * ``"mean"``: the mean of ``score``;
    * ``"geomean_of_part_means"``: the mean of each component in ``score_parts`` over the
      rows, then the geometric mean of those means (the components' scale is kept: parts in
      0-100 give a score in 0-100).

    Returns NaN for no rows. Raises ``ValueError`` for an unknown aggregation or rows whose
    ``score_parts`` do not all hold the same components."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if not rows:
        return math.nan
    if aggregation == "mean":
        return sum(float(r["score"]) for r in rows) / len(rows)
    keys = sorted(rows[0].get("score_parts") or {})
    if not keys or any(sorted(r.get("score_parts") or {}) != keys for r in rows):
        raise ValueError(f"{aggregation} needs the same non-empty score_parts in every row")
    means = [sum(float(r["score_parts"][k]) for r in rows) / len(rows) for k in keys]
    return math.prod(means) ** (1.0 / len(means))


class Benchmark(ABC):
    """A benchmark turns its data into :class:`Sample` objects and scores predictions.

    Subclasses are registered with ``@BENCHMARKS.register("name")`` and constructed with the
    composed ``benchmark`` config (an object with the fields of
    :class:`atskv.experiments.config.BenchmarkConfig`; ``None`` or missing fields mean the defaults).
    """

    higher_is_better: bool = True

    def __init__(self, cfg: Any):
        self.cfg = cfg

    # -- configuration ------------------------------------------------------------------------

    def split(self) -> str:
        """The configured split (``benchmark.split``, default ``"test"``); a bad value raises
        :class:`ConfigError` naming it and the choices."""
        value = cfg_get(self.cfg, "split")
        if value is None:
            return "test"
        if value not in SPLITS:
            raise ConfigError(f"benchmark.split={value!r} is not a split; choose one of: "
                              f"{', '.join(SPLITS)}")
        return str(value)

    def max_new_tokens_override(self) -> int | None:
        """``benchmark.max_new_tokens`` (None: each task's own length); must be a positive
        integer."""
        value = cfg_get(self.cfg, "max_new_tokens")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"benchmark.max_new_tokens={value!r} must be a positive integer "
                              f"(or null for each task's own generation length)")
        return value

    def validate(self) -> None:
        """Check inputs (split, files, task names, ...) cheaply, before any model is loaded.
        Raise :class:`atskv.core.types.ConfigError` naming the bad value and the valid choices.
        Subclasses extend it and call ``super().validate()``."""
        self.split()
        self.max_new_tokens_override()

    @abstractmethod
    def tasks(self) -> list[str]:
        """The selected task names, in order."""

    @abstractmethod
    def default_max_new_tokens(self, task: str) -> int:
        """The benchmark protocol's generation length for ``task``."""

    def task_max_new_tokens(self, task: str) -> int:
        """The generation length of ``task``'s samples: the override, else the task's own."""
        override = self.max_new_tokens_override()
        return override if override is not None else self.default_max_new_tokens(task)

    def max_new_tokens(self) -> int:
        """The largest generation length over the selected tasks (respecting
        ``benchmark.max_new_tokens``), computed without reading data files or a tokenizer, so
        the runner can check prompt + generation against the model before loading anything."""
        tasks = self.tasks()
        if not tasks:
            raise ConfigError("benchmark.tasks is empty; name at least one task")
        return max(self.task_max_new_tokens(t) for t in tasks)

    # -- data ---------------------------------------------------------------------------------

    @abstractmethod
    def load(self, tokenizer: Any, context_len: int, n: int | None, seed: int) -> list[Sample]:
        """Deterministic samples of the configured split, each with at most ``context_len``
        prompt tokens (``n`` caps samples per task; ``None`` = the config's ``n_samples``)."""

    # -- scoring ------------------------------------------------------------------------------

    @abstractmethod
    def score(self, prediction: str, sample: Sample) -> float:
        """Score in [0, 100] for one prediction."""

    def score_parts(self, prediction: str, sample: Sample) -> dict[str, float]:
        """Per-sample components that the task's aggregate needs besides ``score`` (empty for
        tasks aggregated by the mean of ``score``)."""
        return {}

    def aggregation(self, task: str) -> str:
        """How ``task``'s score is computed from per-sample rows, one of :data:`AGGREGATIONS`
        (stored with the results so a report can recompute it, e.g. for bootstrap intervals,
        without importing benchmark code)."""
        return "mean"

    def aggregate(self, task: str, rows: Sequence[Mapping[str, Any]]) -> float:
        """``task``'s score (0-100) from per-sample rows (dicts with at least ``score`` and
        ``score_parts``), as the benchmark's own scorer computes it; NaN for no rows."""
        return aggregate_rows(self.aggregation(task), rows)

    @abstractmethod
    def task_metric(self, task: str) -> str:
        """The human name of ``task``'s metric, for report tables."""


class TaskFileBenchmark(Benchmark):
    """A benchmark of named tasks whose records come from the hub or, with ``data_dir``, from
    one JSONL file per task under that folder.

    Subclasses set :attr:`suite` (the registry name used in task-name errors),
    :attr:`display_name`, :attr:`all_tasks` (every valid name, in order),
    :attr:`default_tasks` (the hub default), :attr:`task_path` (the file of a task relative to
    ``data_dir``, ``{task}`` filled in, ``/``-separated) and :attr:`hub_path`, and implement
    :meth:`_check_record`, :meth:`_hub_rows` and :meth:`_items`.

    Splits: an item (a record, or a group of records forming one sample) is ``dev`` when the
    SHA-1 of ``"atskv-split:" + id``, as an integer, is divisible by :attr:`dev_one_in` (4:
    about a quarter), else ``test``. The rule depends on the id alone: fixed across runs, seeds and task lists.
    The per-task cap and the seeded subset are drawn within the configured split.
    """

    suite: str
    display_name: str
    all_tasks: tuple[str, ...]
    default_tasks: tuple[str, ...]
    task_path: str
    hub_path: str
    dev_one_in: int = 4

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self._hub_cache: dict[str, list[dict[str, Any]]] = {}

    # -- configuration ------------------------------------------------------------------------

    @property
    def data_dir(self) -> str | None:
        d = cfg_get(self.cfg, "data_dir")
        return os.path.expanduser(str(d)) if d else None

    def task_file(self, task: str) -> str:
        assert self.data_dir is not None
        return os.path.join(self.data_dir, *self.task_path.format(task=task).split("/"))

    def tasks(self) -> list[str]:
        """The tasks this config selects (validated names, in order, no duplicates); with
        ``data_dir`` and no task list, the tasks whose file exists (no file is read)."""
        requested = requested_tasks(self.cfg)
        if requested is not None:
            if not requested:
                raise ConfigError(f"benchmark.tasks is empty; choose from: "
                                  f"{', '.join(self.all_tasks)}")
            check_task_names(self.suite, requested, self.all_tasks)
            return list(dict.fromkeys(requested))
        if self.data_dir is None:
            return list(self.default_tasks)
        self._check_data_dir()
        found = [t for t in self.all_tasks if os.path.isfile(self.task_file(t))]
        if not found:
            raise ConfigError(
                f"benchmark.data_dir {self.data_dir} holds no {self.display_name} task file; "
                f"expected {self.task_path.format(task='<task>')} for tasks among: "
                f"{', '.join(self.all_tasks)}"
            )
        return found

    def _check_data_dir(self) -> None:
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ConfigError(f"benchmark.data_dir {self.data_dir} is not a directory")

    def validate(self) -> None:
        super().validate()
        self._check_data_dir()
        for task in self.tasks():
            self._validate_task(task)

    def _validate_task(self, task: str) -> list[dict[str, Any]]:
        """Check one task's records (non-empty, some in the split); subclasses add checks."""
        records = self._records(task)
        if not records:
            raise ConfigError(
                f"{self.display_name} task {task}: no records in {self._source(task)}"
            )
        self.split_items(task)
        return records

    # -- data ---------------------------------------------------------------------------------

    def _source(self, task: str) -> str:
        return self.task_file(task) if self.data_dir else f"hub {self.hub_path}/{task}"

    @abstractmethod
    def _check_record(self, task: str, record: dict[str, Any], where: str) -> dict[str, Any]:
        """Validate one record (``where`` names its file and line, or hub record)."""

    @abstractmethod
    def _hub_rows(self, task: str) -> list[dict[str, Any]]:
        """The task's raw records from the hub."""

    @abstractmethod
    def _items(self, task: str) -> list[tuple[str, Any]]:
        """``(id, item)`` for every item that becomes one sample, in dataset order; the id is
        what the split hashes."""

    def _records(self, task: str) -> list[dict[str, Any]]:
        if self.data_dir is not None:
            path = self.task_file(task)
            return [
                self._check_record(task, rec, f"{path}, line {lineno}")
                for lineno, rec in iter_jsonl(path)
            ]
        if task not in self._hub_cache:
            self._hub_cache[task] = [
                self._check_record(task, r, f"hub {self.hub_path}/{task}, record {i}")
                for i, r in enumerate(self._hub_rows(task))
            ]
        return self._hub_cache[task]

    def split_items(self, task: str) -> list[tuple[int, Any]]:
        """``(position, item)`` of the task's items in the configured split (position: the
        item's index among all the task's items). Raises :class:`ConfigError` when the split
        holds none of them."""
        split = self.split()
        items = self._items(task)
        chosen = [
            (i, item)
            for i, (key, item) in enumerate(items)
            if hash_split(key, self.dev_one_in) == split
        ]
        if not chosen:
            raise ConfigError(
                f"{self.display_name} task {task}: none of the {len(items)} items in "
                f"{self._source(task)} falls in benchmark.split={split!r} (dev: SHA-1 of "
                f"'atskv-split:' + id divisible by {self.dev_one_in}; test: the rest); choose the other split "
                f"(dev, test) or add records"
            )
        return chosen

    def selected_items(self, task: str, n: int | None, seed: int) -> list[tuple[int, Any]]:
        """The items :meth:`load` turns into samples: a seeded subset of at most ``n`` (None:
        the config's ``n_samples``; None again: all) of the split's items, in dataset order."""
        cap = n if n is not None else cfg_get(self.cfg, "n_samples")
        chosen = self.split_items(task)
        return [chosen[j] for j in subset_indices(len(chosen), cap, seed)]


BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark")
