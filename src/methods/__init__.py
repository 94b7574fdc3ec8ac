"""KV-cache methods; importing this package registers them all in ``METHODS``."""

from atskv.methods import full, sliding_window  # noqa: F401
from atskv.methods.base import METHODS, AttendResult, Method, PrefillContext

__all__ = ["METHODS", "AttendResult", "Method", "PrefillContext"]
