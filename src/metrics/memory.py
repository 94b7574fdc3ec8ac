"""Peak memory over a region: the CUDA allocator's peak on GPU, the process's peak resident set
size on CPU (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``). Each figure says which
kind it is; a figure that cannot be measured is ``None``, never 0. And :func:`trim_heap`, which
hands the freed pages of the C heap back to the system."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

import torch

CUDA_KIND = "cuda_max_allocated"
RSS_KIND = "process_peak_rss"


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in bytes; ``None`` where
    it cannot be read (non-Linux) or is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _read_hwm() -> int | None:
    return _proc_status_bytes("VmHWM")


def current_bytes(device: torch.device | str = "cpu") -> int | None:
    """The memory level a :class:`PeakMemory` peak is compared with: allocated CUDA bytes, or
    the process's current RSS on CPU (``None`` where it cannot be read)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _proc_status_bytes("VmRSS")


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` and ``m.kind``.

    On CPU, when the peak RSS cannot be reset (non-Linux), the figure is the process's lifetime
    peak and ``m.since_reset`` is False; callers should record that.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.kind = CUDA_KIND if self.device.type == "cuda" else RSS_KIND
        self.peak_bytes: int | None = None
        self.since_reset = True

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.since_reset = _reset_hwm()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak_bytes = _read_hwm()


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> bool:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``): the CPU tensors
    a sweep group frees after a batch of samples otherwise stay in the process's RSS, scattered
    among live ones (docs/sweeps.md). False where the C library has no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
