"""KV-cache methods. Importing this package imports every module in it, which registers each
method class in ``METHODS`` (``@METHODS.register("name")``): a new method is a new module here."""

import importlib
import pkgutil

from atskv.core.method import METHODS, AttendResult, Method, PrefillContext, State

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "AttendResult", "Method", "PrefillContext", "State"]
