"""Wall-clock timing around device-synchronised regions."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


class Timer:
    """``with Timer(device) as t: ...`` then ``t.seconds``; syncs the device on entry and exit so
    that asynchronous GPU work is counted where it was issued."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0
