"""The full cache: no compression; the baseline every ratio is taken against."""

from __future__ import annotations

from dataclasses import dataclass

from atskv.core.method import METHODS, Method, State


@METHODS.register("full")
@dataclass(frozen=True)
class Full(Method[State]):
    compresses = False
    # no hyperparameters: nothing to tune
    search_space = {}
