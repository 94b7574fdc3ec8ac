"""The benchmark interface: ``load`` builds samples, ``score`` grades one prediction (0-100)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

from atskv.benchmarks.textmetrics import (
    cfg_get,
    check_task_names,
    iter_jsonl,
    requested_tasks,
)
from atskv.registry import Registry
from atskv.types import ConfigError, Sample


class Benchmark(ABC):
    """A benchmark turns its data into :class:`Sample` objects and scores predictions.

    Subclasses are registered with ``@BENCHMARKS.register("name")`` and constructed with the
    composed ``benchmark`` config (an object with the fields of
    :class:`atskv.config.BenchmarkConfig`).
    """

    higher_is_better: bool = True

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def validate(self) -> None:  # noqa: B027 - optional hook
        """Check inputs (files, task names, ...) cheaply, before any model is loaded.
        Raise :class:`atskv.types.ConfigError` naming the bad value and the valid choices."""

    @abstractmethod
    def load(self, tokenizer: Any, context_len: int, n: int | None, seed: int) -> list[Sample]:
        """Deterministic samples of at most ``context_len`` prompt tokens (``n`` caps samples
        per task; ``None`` = all)."""

    @abstractmethod
    def score(self, prediction: str, sample: Sample) -> float:
        """Score in [0, 100] for one prediction."""

    def score_parts(self, prediction: str, sample: Sample) -> dict[str, float]:
        """Per-sample components a task's aggregate needs (default none)."""
        return {}

    def max_new_tokens(self) -> int:
        """The longest generation of the selected tasks (no data loaded)."""
        raise NotImplementedError


class TaskFileBenchmark(Benchmark):
    """A benchmark of named tasks whose records come from the hub or, with ``data_dir``, from
    one JSONL file per task under that folder.

    Subclasses set :attr:`suite` (the registry name used in task-name errors),
    :attr:`display_name`, :attr:`all_tasks` (every valid name, in order),
    :attr:`default_tasks` (the hub default), :attr:`task_path` (the file of a task relative to
    ``data_dir``, ``{task}`` filled in, ``/``-separated) and :attr:`hub_path`, and implement
    :meth:`_check_record` and :meth:`_hub_rows`.
    """

    suite: str
    display_name: str
    all_tasks: tuple[str, ...]
    default_tasks: tuple[str, ...]
    task_path: str
    hub_path: str

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
        """The tasks this config selects (validated names, in order, no duplicates)."""
        requested = requested_tasks(self.cfg)
        if requested is not None:
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
        self._check_data_dir()
        for task in self.tasks():
            self._validate_task(task)

    def _validate_task(self, task: str) -> list[dict[str, Any]]:
        """Check one task's records (non-empty); subclasses add their own checks."""
        records = self._records(task)
        if not records:
            raise ConfigError(
                f"{self.display_name} task {task}: no records in {self._source(task)}"
            )
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


BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark")
