"""KV-cache methods; importing this package registers them all in ``METHODS``."""

from atskv.methods import (  # noqa: F401
    atskv,
    dynamic_kv,
    full,
    h2o,
    pyramidkv,
    quest,
    rocket_kv,
    sliding_window,
    snapkv,
)
from atskv.methods.base import METHODS, AttendResult, Method, PrefillContext

__all__ = ["METHODS", "AttendResult", "Method", "PrefillContext"]
