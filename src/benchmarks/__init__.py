"""Benchmarks; importing this package registers them all in ``BENCHMARKS``."""

from atskv.benchmarks.base import BENCHMARKS, Benchmark

for _mod in ("synthetic", "longbench", "zeroscrolls"):
    try:
        __import__(f"atskv.benchmarks.{_mod}")
    except ModuleNotFoundError as _e:  # a benchmark module still being written
        if _e.name != f"atskv.benchmarks.{_mod}":
            raise

__all__ = ["BENCHMARKS", "Benchmark"]
