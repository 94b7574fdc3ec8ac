"""Samples of each run (read once from ``samples.jsonl``) and the statistics of cells of runs
for :mod:`atskv.analysis.tables`: accuracy intervals, paired comparisons (a 95% paired
bootstrap interval and a paired permutation p-value) and the area under a score-vs-budget curve
(:mod:`atskv.analysis.stats`).

A *cell* is the runs of one configuration (method variant, budget, context length) of one
setting, one per seed; its statistic is the mean over seeds. A paired comparison pairs each run
with the run of the other configuration of the same seed and compares them over the sample ids
both hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atskv.analysis import stats
from atskv.analysis.data import load_samples
from atskv.analysis.notes import Notes


@dataclass(frozen=True)
class Comparison:
    ci: stats.Interval | None  # the paired bootstrap interval (None: no samples)
    p: float  # paired permutation p-value (NaN when not tested: n < stats.MIN_N)
    n: int  # paired samples (per seed, smallest)
    low: float  # range of the per-sample differences (shown instead of the interval, n < MIN_N)
    high: float


def _agg(run) -> dict | None:
    return run.task_aggregation if isinstance(run.task_aggregation, dict) else None


class Intervals:
    def __init__(self, notes: Notes, n_resamples: int = stats.N_RESAMPLES, seed: int = 0):
        self.notes, self.n_resamples, self.seed = notes, n_resamples, seed
        self._rows: dict[str, list[dict] | None] = {}

    def samples(self, run) -> list[dict] | None:
        """The run's samples (None, with a note, when they are missing or inconsistent)."""
        path = str(run.path)
        if path not in self._rows:
            rows, _ = load_samples(path)
            if rows is None:
                self.notes.add("Accuracy interval n/a: no usable samples.jsonl beside "
                               "result.json (missing, unreadable, or rows without task and "
                               "score)", path)
            else:
                try:
                    acc = stats.accuracy(rows, _agg(run))
                    if np.isfinite(run.accuracy) and abs(acc - run.accuracy) > 0.01:
                        self.notes.add("A run's samples give another accuracy than its "
                                       "result.json: the tables show result.json's, the "
                                       "intervals are the samples'", path)
                except (ValueError, KeyError, TypeError) as e:
                    rows = None
                    self.notes.add(f"Accuracy interval n/a: the samples cannot be aggregated "
                                   f"({type(e).__name__})", path)
            self._rows[path] = rows
        return self._rows[path]

    def _bootstrap(self, terms) -> stats.Interval | None:
        try:
            return stats.weighted_bootstrap(terms, n_resamples=self.n_resamples, seed=self.seed)
        except ValueError as e:
            self.notes.add(f"An interval is n/a: {e}")
            return None

    def accuracy(self, runs: list) -> tuple[stats.Interval | None, float, float]:
        """The 95% bootstrap interval of the mean over ``runs`` (seeds) and the range (min,
        max) of their per-sample scores."""
        rows = [self.samples(r) for r in runs]
        if not runs or any(r is None for r in rows):
            return None, np.nan, np.nan
        ci = self._bootstrap([stats.Term(1.0 / len(runs), s, _agg(r))
                              for r, s in zip(runs, rows, strict=True)])
        scores = [float(x["score"]) for s in rows for x in s]
        return ci, min(scores), max(scores)

    def compare(self, pairs: list[tuple]) -> Comparison | None:
        """``mean over pairs of accuracy(run) - accuracy(reference)`` over the ids both hold:
        paired bootstrap interval, permutation p-value (only with at least ``stats.MIN_N``
        paired samples per pair) and the range of the per-sample differences."""
        terms, diffs, n = [], [], []
        for run, ref in pairs:
            a, b = self.samples(run), self.samples(ref)
            if a is None or b is None:
                return None
            terms.append(stats.Term(1.0 / len(pairs), a, _agg(run), b))
            by_id = {str(x["id"]): float(x["score"]) for x in b}
            common = [(float(x["score"]) - by_id[str(x["id"])]) for x in a
                      if str(x["id"]) in by_id]
            if len(common) < len(a) or len(common) < len(b):
                self.notes.add("Runs compared over the sample ids both hold (some samples are "
                               "in one run only)", str(run.path))
            diffs += common
            n.append(len(common))
        if not terms or not diffs:
            return None
        ci = self._bootstrap(terms)
        if ci is None:
            return None
        p = stats.permutation_p(terms, seed=self.seed) if stats.testable(min(n)) else np.nan
        return Comparison(ci, p, min(n), min(diffs), max(diffs))

    def auc(self, by_seed: list[list[tuple[float, object]]]) -> stats.Interval | None:
        """Interval of ``mean over seeds of sum(weight x accuracy(run))`` (``by_seed``: per
        seed, ``(trapezoid weight, run)`` per budget), the runs of a seed resampled jointly
        (the same prompts at every budget)."""
        terms = []
        for runs in by_seed:
            rows = [(w, self.samples(r), _agg(r)) for w, r in runs]
            if any(s is None for _, s, _ in rows):
                return None
            terms.append(stats.Joint(1.0 / len(by_seed), rows))
        ci = self._bootstrap(terms) if terms else None
        if ci is not None and ci.dropped:
            self.notes.add("An area under a score-vs-budget curve is over the sample ids every "
                           "budget's run holds (some samples are missing at some budget)",
                           str(by_seed[0][0][1].path))
        return ci
