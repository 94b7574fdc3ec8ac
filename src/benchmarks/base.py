"""The benchmark interface: ``load`` builds samples, ``score`` grades one prediction (0-100)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from atskv.registry import Registry
from atskv.types import Sample


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


BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark")
