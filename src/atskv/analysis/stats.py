"""Bootstrap confidence intervals for run accuracies (pure numpy, deterministic).

A run's accuracy is the mean over its tasks of each task's aggregate of its samples:

* ``"mean"``: the mean of the per-sample ``score`` (0-100);
* ``"geomean_of_part_means"``: the geometric mean of the means of the samples'
  ``score_parts`` (each in 0-100, as the benchmarks write them: ZeroSCROLLS' ROUGE-1/2/L
  aggregate), the same computation as :func:`atskv.benchmarks.base.aggregate_rows`.

The bootstrap resamples samples with replacement **within each task** (stratified: every
resample keeps each task's size) and recomputes each task's aggregate and then the mean over
tasks. The interval is the percentile interval of that bootstrap distribution (the lower and
upper ``(1 - level) / 2`` quantiles, ``inverted_cdf`` definition: the smallest value whose
cumulative probability reaches the quantile).

When the distribution is small enough (every task's multiset of resampled counts enumerated,
at most ``exact_limit`` combinations in all) it is computed **exactly** (each count vector
weighted by its multinomial probability) instead of by ``n_resamples`` random resamples.
Random resamples use ``numpy.random.default_rng(seed)``: the same inputs and seed give the
same interval.

A sample is a mapping with ``task``, ``score``, ``score_parts`` (geomean tasks only) and
``id`` (paired intervals only).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MEAN = "mean"
GEOMEAN = "geomean_of_part_means"
AGGREGATIONS = (MEAN, GEOMEAN)
N_RESAMPLES = 2000
EXACT_LIMIT = 20_000  # largest exactly enumerated distribution (combinations)
_EXACT_MAX = 2_000_000  # exact=True beyond this raises instead of exhausting memory
_BLOCK = 4_000_000  # counts matrix entries drawn at once


@dataclass(frozen=True)
class Interval:
    estimate: float  # the statistic on the samples themselves
    low: float
    high: float
    level: float
    n: int  # samples (paired: ids present in both runs) the interval is over
    exact: bool  # the bootstrap distribution was enumerated exactly
    n_resamples: int  # random resamples drawn (0 when exact)
    dropped: int = 0  # paired: samples present in only one of the two runs (left out)

    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high


@dataclass(frozen=True)
class Term:
    """One summand of a weighted statistic: ``weight x accuracy(samples)``, or with a
    ``reference`` ``weight x (accuracy(samples) - accuracy(reference))`` over the sample ids
    both hold, resampled together (paired). Terms are resampled independently of each other."""

    weight: float
    samples: Sequence[Mapping]
    aggregation: Mapping[str, str] | None = None
    reference: Sequence[Mapping] | None = None


@dataclass(frozen=True)
class Joint:
    """``weight x sum(coef x accuracy(samples))`` over several runs of the same prompts (e.g. one
    method at several budgets), every run resampled with the same draw of sample ids (within
    tasks; ids missing from any run are left out). ``runs``: ``(coef, samples, aggregation)``."""

    weight: float
    runs: Sequence[tuple[float, Sequence[Mapping], Mapping[str, str] | None]]


@dataclass
class _Task:
    how: str
    scores: np.ndarray  # (n,)
    parts: np.ndarray | None  # (n, P) for GEOMEAN


@dataclass
class _Unit:
    """``n`` items resampled together; ``fn(counts (K, n)) -> (K,)`` values times ``coef``."""

    n: int
    fn: Callable[[np.ndarray], np.ndarray]
    coef: float


# ----------------------------------------------------------------------------- aggregates
def _how(aggregation: Mapping[str, str] | None, task: str) -> str:
    how = (aggregation or {}).get(task) or MEAN
    if how not in AGGREGATIONS:
        raise ValueError(f"task {task!r}: unknown aggregation {how!r}; known: {AGGREGATIONS}")
    return how


def _task_data(samples: Sequence[Mapping], how: str, task: str) -> _Task:
    scores = np.array([float(s["score"]) for s in samples], dtype=float)
    if not np.isfinite(scores).all() and how == MEAN:
        raise ValueError(f"task {task!r}: a sample has no finite score")
    parts = None
    if how == GEOMEAN:
        rows = [s.get("score_parts") or {} for s in samples]
        keys = sorted(rows[0]) if rows else []
        if not keys or any(sorted(r) != keys for r in rows):
            raise ValueError(f"task {task!r}: {GEOMEAN} needs the same non-empty score_parts "
                             "in every sample")
        parts = np.array([[float(r[k]) for k in keys] for r in rows], dtype=float)
    return _Task(how, scores, parts)


def _agg(t: _Task, counts: np.ndarray) -> np.ndarray:
    """The task aggregate of each resample (row of ``counts``); NaN where a row is empty."""
    total = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if t.how == MEAN:
            return counts @ t.scores / total
        means = counts @ t.parts / total[:, None]
        return np.prod(means, axis=1) ** (1.0 / t.parts.shape[1])


def task_aggregate(samples: Sequence[Mapping], how: str = MEAN) -> float:
    """One task's aggregate of its samples (see the module docstring)."""
    t = _task_data(samples, _how({"x": how}, "x"), "x")
    return float(_agg(t, np.ones((1, len(samples))))[0])


def _by_task(samples: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    out: dict[str, list[Mapping]] = {}
    for s in samples:
        out.setdefault(str(s["task"]), []).append(s)
    return dict(sorted(out.items()))


def accuracy(samples: Sequence[Mapping], aggregation: Mapping[str, str] | None = None) -> float:
    """Mean over tasks of each task's aggregate (what ``result.json``'s ``accuracy`` holds)."""
    groups = _by_task(samples)
    if not groups:
        raise ValueError("no samples")
    return float(np.mean([task_aggregate(g, _how(aggregation, t)) for t, g in groups.items()]))


# ----------------------------------------------------------------------------- units
def _units(term: Term | Joint, stratify: bool) -> tuple[list[_Unit], int, int]:
    """Resampling units of one term, the number of samples and of dropped (unpaired) ones."""
    if isinstance(term, Joint):
        if not stratify:
            raise ValueError("joint intervals are always stratified by task")
        return _joint_units(term.weight, term.runs)
    if term.reference is None:
        groups = _by_task(term.samples)
        if not groups:
            raise ValueError("no samples")
        data = {t: _task_data(g, _how(term.aggregation, t), t) for t, g in groups.items()}
        n = sum(len(g) for g in groups.values())
        if stratify:
            return [_Unit(len(d.scores), (lambda c, d=d: _agg(d, c)), term.weight / len(data))
                    for d in data.values()], n, 0
        bounds = np.cumsum([0] + [len(d.scores) for d in data.values()])

        def pooled(c: np.ndarray) -> np.ndarray:  # tasks absent from a resample are left out
            vals = np.stack([_agg(d, c[:, a:b]) for d, a, b in
                             zip(data.values(), bounds[:-1], bounds[1:], strict=True)], axis=1)
            return np.nanmean(vals, axis=1)

        return [_Unit(n, pooled, term.weight)], n, 0
    if not stratify:
        raise ValueError("paired intervals are always stratified by task")
    units, n, dropped = _joint_units(term.weight, [(1.0, term.samples, term.aggregation),
                                                   (-1.0, term.reference, term.aggregation)])
    return units, n, dropped


def _joint_data(runs: Sequence[tuple[float, Sequence[Mapping], Mapping[str, str] | None]]
                ) -> tuple[dict[str, list[_Task]], int, int]:
    """Per task, each run's data over the sample ids every run holds (in one order); the number
    of common ids and of samples left out (held by some runs only)."""
    if not runs:
        raise ValueError("no runs")
    maps = [_ids(s) for _, s, _ in runs]
    common = [i for i in maps[0] if all(i in m for m in maps[1:])]
    dropped = sum(len(m) for m in maps) - len(maps) * len(common)
    by_task: dict[str, list[str]] = {}
    for i in common:
        tasks = {str(m[i]["task"]) for m in maps}
        if len(tasks) > 1:
            raise ValueError(f"sample id {i!r} has different tasks in the runs: {sorted(tasks)}")
        by_task.setdefault(tasks.pop(), []).append(i)
    if not by_task:
        raise ValueError("the runs share no sample id")
    data = {t: [_task_data([m[i] for i in ids], _how(agg, t), t)
                for m, (_, _, agg) in zip(maps, runs, strict=True)]
            for t, ids in sorted(by_task.items())}
    return data, len(common), dropped


def _joint_units(weight: float, runs) -> tuple[list[_Unit], int, int]:
    """``weight x sum(coef x accuracy(run))`` over the ids all ``runs`` ``(coef, samples,
    aggregation)`` hold, every run resampled with the same draw (within tasks)."""
    data, n, dropped = _joint_data(runs)
    coefs = [c for c, _, _ in runs]

    def fn(c: np.ndarray, ds: list[_Task]) -> np.ndarray:
        return sum(k * _agg(d, c) for k, d in zip(coefs, ds, strict=True))

    units = [_Unit(len(ds[0].scores), (lambda c, ds=ds: fn(c, ds)), weight / len(data))
             for ds in data.values()]
    return units, n, dropped


def _ids(samples: Sequence[Mapping]) -> dict[str, Mapping]:
    out: dict[str, Mapping] = {}
    for s in samples:
        i = str(s["id"])
        if i in out:
            raise ValueError(f"sample id {i!r} occurs twice in one run")
        out[i] = s
    return out


# ----------------------------------------------------------------------------- distributions
def _n_compositions(n: int) -> int:
    return math.comb(2 * n - 1, n)


def _compositions(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every count vector of a resample of ``n`` items and its multinomial probability."""
    counts = np.array([np.bincount(c, minlength=n) for c in
                       itertools.combinations_with_replacement(range(n), n)], dtype=float)
    log_p = (math.lgamma(n + 1) - n * math.log(n)
             - np.array([sum(math.lgamma(k + 1) for k in row) for row in counts]))
    p = np.exp(log_p)
    return counts, p / p.sum()


def _distribution(units: list[_Unit], n_resamples: int, seed: int, exact: bool | None,
                  exact_limit: int) -> tuple[np.ndarray, np.ndarray | None, bool]:
    size = math.prod(_n_compositions(u.n) for u in units)
    if exact is None:
        exact = size <= exact_limit
    if exact:
        if size > _EXACT_MAX:
            raise ValueError(f"exact bootstrap needs {size} combinations (max {_EXACT_MAX})")
        vals, weights = np.zeros(1), np.ones(1)
        for u in units:
            counts, p = _compositions(u.n)
            v = u.coef * u.fn(counts)
            vals = (vals[:, None] + v[None, :]).ravel()
            weights = (weights[:, None] * p[None, :]).ravel()
        return vals, weights, True
    if n_resamples < 1:
        raise ValueError("n_resamples must be at least 1")
    rng = np.random.default_rng(seed)
    vals = np.zeros(n_resamples)
    for u in units:
        step = max(1, _BLOCK // u.n)
        for lo in range(0, n_resamples, step):
            k = min(step, n_resamples - lo)
            counts = rng.multinomial(u.n, np.full(u.n, 1.0 / u.n), size=k).astype(float)
            vals[lo:lo + k] += u.coef * u.fn(counts)
    return vals, None, False


def _quantile(vals: np.ndarray, weights: np.ndarray | None, q: float) -> float:
    """Smallest value whose cumulative probability reaches ``q`` (inverted CDF)."""
    order = np.argsort(vals, kind="stable")
    v = vals[order]
    w = np.full(len(v), 1.0 / len(v)) if weights is None else weights[order] / weights.sum()
    cum = np.cumsum(w)
    i = int(np.searchsorted(cum, q - 1e-12, side="left"))
    return float(v[min(i, len(v) - 1)])


def bootstrap_distribution(terms: Sequence[Term | Joint], *, n_resamples: int = N_RESAMPLES,
                           seed: int = 0, stratify: bool = True, exact: bool | None = None,
                           exact_limit: int = EXACT_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap distribution of ``sum(term)`` as (values, probabilities); random
    resamples each get probability ``1 / n_resamples``."""
    units = [u for t in terms for u in _units(t, stratify)[0]]
    vals, w, _ = _distribution(units, n_resamples, seed, exact, exact_limit)
    return vals, (np.full(len(vals), 1.0 / len(vals)) if w is None else w)


def weighted_bootstrap(terms: Sequence[Term | Joint], *, level: float = 0.95,
                       n_resamples: int = N_RESAMPLES, seed: int = 0, stratify: bool = True,
                       exact: bool | None = None, exact_limit: int = EXACT_LIMIT) -> Interval:
    """Percentile interval of ``sum(term.weight x term statistic)``, each term resampled
    independently (within tasks; paired terms with the same resample for both runs)."""
    if not terms:
        raise ValueError("no terms")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must be in (0, 1)")
    units, n, dropped = [], 0, 0
    for t in terms:
        u, k, d = _units(t, stratify)
        units += u
        n, dropped = n + k, dropped + d
    estimate = float(sum(u.coef * u.fn(np.ones((1, u.n)))[0] for u in units))
    vals, w, was_exact = _distribution(units, n_resamples, seed, exact, exact_limit)
    alpha = (1.0 - level) / 2.0
    lo, hi = _quantile(vals, w, alpha), _quantile(vals, w, 1.0 - alpha)
    return Interval(estimate, lo, hi, level, n, was_exact, 0 if was_exact else n_resamples,
                    dropped)


def bootstrap_ci(samples: Sequence[Mapping], aggregation: Mapping[str, str] | None = None,
                 **kw) -> Interval:
    """95% (``level``) percentile bootstrap interval of a run's accuracy over its samples,
    resampled within tasks (``stratify=False``: pooled, tasks absent from a resample left out).
    Keywords: ``level``, ``n_resamples`` (default 2000), ``seed``, ``stratify``, ``exact``
    (None: exact when at most ``exact_limit`` combinations), ``exact_limit``."""
    return weighted_bootstrap([Term(1.0, samples, aggregation)], **kw)


def paired_bootstrap_diff(samples: Sequence[Mapping], reference: Sequence[Mapping],
                          aggregation: Mapping[str, str] | None = None, **kw) -> Interval:
    """Paired percentile bootstrap interval of ``accuracy(samples) - accuracy(reference)`` over
    the sample ids both runs hold (joined by ``id``; ids within each task resampled, the same
    resample applied to both runs). ``Interval.dropped`` counts samples found in one run only.
    Significant when the interval does not contain 0 (``not contains_zero()``)."""
    return weighted_bootstrap([Term(1.0, samples, aggregation, reference)], **kw)


# ----------------------------------------------------------------------------- tests
MIN_N = 10  # fewer samples in a cell: no test, no significance mark, its range instead
ALPHA = 0.05  # family-wise error rate of the Holm-corrected tests
N_PERMUTATIONS = 10_000
EXACT_PERMUTATIONS = 16  # up to this many paired samples, all 2^n sign flips are enumerated


def permutation_p(terms: Sequence[Term], *, n_permutations: int = N_PERMUTATIONS,
                  seed: int = 0) -> float:
    """Two-sided p-value of a paired permutation test of ``sum(term.weight x (accuracy(samples)
    - accuracy(reference)))`` = 0: under the null hypothesis the two runs' results of a sample
    are exchangeable, so each sample's pair is swapped or not (a sign flip of its difference for
    mean tasks; geomean tasks recompute their aggregate). p = the share of swap patterns whose
    statistic is at least as far from 0 as the observed one: all ``2^n`` patterns when there
    are at most :data:`EXACT_PERMUTATIONS` samples in all, else ``n_permutations`` random ones
    (``(1 + hits) / (1 + n_permutations)``, seeded). Three samples, all worse: p = 2/8 = 0.25."""
    units: list[tuple[float, _Task, _Task]] = []
    for t in terms:
        if t.reference is None:
            raise ValueError("permutation_p needs paired terms (a reference)")
        data, _, _ = _joint_data([(1.0, t.samples, t.aggregation),
                                  (-1.0, t.reference, t.aggregation)])
        units += [(t.weight / len(data), a, b) for a, b in data.values()]
    n = sum(len(a.scores) for _, a, _ in units)
    if n <= EXACT_PERMUTATIONS:
        swaps = ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1).astype(float)
    else:
        swaps = np.random.default_rng(seed).integers(0, 2, size=(n_permutations, n)).astype(float)
    swaps = np.vstack([np.zeros((1, n)), swaps])  # row 0: the observed assignment
    stat = np.zeros(len(swaps))
    lo = 0
    for coef, a, b in units:
        s = swaps[:, lo:lo + len(a.scores)]
        lo += len(a.scores)
        stat += coef * (_swapped(a, b, s) - _swapped(b, a, s))
    hits = np.abs(stat[1:]) >= abs(stat[0]) - 1e-9
    if n <= EXACT_PERMUTATIONS:
        return float(hits.mean())
    return float((1 + hits.sum()) / (1 + len(hits)))


def _swapped(a: _Task, b: _Task, swap: np.ndarray) -> np.ndarray:
    """Task aggregate of run ``a`` with the samples where ``swap`` is 1 taken from ``b``."""
    keep, n = 1.0 - swap, swap.shape[1]
    if a.how == MEAN:
        return (keep @ a.scores + swap @ b.scores) / n
    means = (keep @ a.parts + swap @ b.parts) / n
    return np.prod(means, axis=1) ** (1.0 / a.parts.shape[1])


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> tuple[list[float], list[bool]]:
    """Holm's step-down correction. NaN p-values are not tested (not counted in ``m``, never
    rejected). Returns the adjusted p-values (``max over j <= i of min(1, (m - j + 1) p_(j))``
    in ascending order of p) and whether each hypothesis is rejected at family-wise ``alpha``
    (``p_(i) <= alpha / (m - i + 1)`` for every ``j <= i``, i.e. adjusted p <= alpha)."""
    p = np.asarray(pvalues, dtype=float)
    tested = np.flatnonzero(np.isfinite(p))
    m = len(tested)
    adj = np.full(len(p), np.nan)
    running = 0.0
    for rank, i in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj.tolist(), [bool(np.isfinite(a) and a <= alpha) for a in adj]


def testable(n: int | float | None) -> bool:
    """Whether a cell of ``n`` samples is tested (and marked) at all: ``n >= MIN_N``."""
    return n is not None and np.isfinite(n) and n >= MIN_N


def trapezoid_weights(xs: Sequence[float]) -> np.ndarray:
    """Weights ``w`` with ``sum(w * y)`` = the trapezoid area under ``y(x)`` over ``xs``
    (sorted, distinct, at least two) divided by ``max(xs) - min(xs)``: a mean score over the
    range. They sum to 1."""
    x = np.asarray(xs, dtype=float)
    if len(x) < 2 or np.any(np.diff(x) <= 0):
        raise ValueError(f"trapezoid over {list(xs)}: needs at least two increasing values")
    w = np.zeros(len(x))
    w[:-1] += np.diff(x) / 2
    w[1:] += np.diff(x) / 2
    return w / (x[-1] - x[0])
