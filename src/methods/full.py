"""The full cache: no compression; the baseline every ratio is taken against."""

from __future__ import annotations

from dataclasses import dataclass

from atskv.methods.base import METHODS, Method


@METHODS.register("full")
@dataclass(frozen=True)
class Full(Method):
    compresses = False
    # no hyperparameters: nothing to tune
    search_space = {}
