"""Measurement collectors: latency (device-synchronised) and peak memory."""

from atskv.metrics.memory import PeakMemory, current_bytes, trim_heap
from atskv.metrics.timing import Timer

__all__ = ["PeakMemory", "Timer", "current_bytes", "trim_heap"]
