"""Benchmarks. Importing this package imports every module in it, which registers each benchmark
class in ``BENCHMARKS`` (``@BENCHMARKS.register("name")``): a new benchmark is a new module here
(and its ``conf/benchmark/<name>.yaml``)."""

import importlib
import pkgutil

from atskv.benchmarks.base import BENCHMARKS, Benchmark

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["BENCHMARKS", "Benchmark"]
