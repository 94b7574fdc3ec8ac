"""Score-versus-budget curves of one report section: which variant of each method the figures
show, the budgets a panel compares, and the area under each curve with its interval.

* **Shown variant** (:func:`shown_variants`): per method, its dev-tuned preset when the section
  has one, else its defaults (paper defaults, or defaults equal to its dev-tuned values), else
  its first variant; the tables hold every variant.
* **Area under the curve** (:func:`auc_cells`): per context length, over the budgets (fractions
  of the prompt's KV) that every non-``full`` variant there has, at least two; the trapezoid
  area divided by the budget range, so it reads as a mean accuracy over that range
  (:func:`atskv.analysis.stats.trapezoid_weights`). Its 95% interval resamples the samples
  jointly across budgets: the runs of one variant at the budgets of a context length, with the
  same seed and samples requested, score the same prompts (same sample ids), so one draw of ids
  is applied to every budget's run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atskv.analysis import labels, stats
from atskv.analysis.intervals import Intervals
from atskv.analysis.tables import Cell, num

SHOWN_CAPTION = ("one variant per method: its dev-tuned preset where the section has one, "
                 "else its defaults (every variant is in the tables)")


def shown_variants(cells: list[Cell]) -> dict[str, str]:
    """Method -> the variant the figures show (see the module docstring), ``full`` included."""
    out: dict[str, str] = {}
    for c in cells:  # cells are in method order, defaults before tuned before others
        cur = out.get(c.method)
        if cur is None:
            out[c.method] = c.variant
            continue
        cur_tuned = any(x.variant == cur and x.tuned for x in cells)
        cur_default = any(x.variant == cur and x.preset in (labels.PAPER, labels.TUNED_DEFAULTS)
                          for x in cells)
        if (c.tuned and not cur_tuned) or (
                not cur_tuned and not cur_default
                and c.preset in (labels.PAPER, labels.TUNED_DEFAULTS)):
            out[c.method] = c.variant
    return out


def fraction_cells(cells: list[Cell]) -> list[Cell]:
    """Cells whose budget is a fraction of the prompt's KV (not kv_size, not full)."""
    return [c for c in cells if not c.is_full and c.size and not c.size.startswith("kv")]


def common_budgets(cells: list[Cell], ctx: float) -> list[float]:
    """The budgets every non-full variant at context length ``ctx`` has (sorted)."""
    by_variant: dict[str, set] = {}
    for c in fraction_cells(cells):
        if c.ctx == ctx:
            by_variant.setdefault(c.variant, set()).add(float(c.budget))
    if not by_variant:
        return []
    return sorted(set.intersection(*by_variant.values()))


@dataclass
class Auc:
    variant: str
    ctx: float
    budgets: list[float]
    value: float
    ci: stats.Interval | None


def auc_cells(cells: list[Cell], ivs: Intervals) -> list[Auc]:
    out = []
    for ctx in sorted({c.ctx for c in cells}):
        budgets = common_budgets(cells, ctx)
        if len(budgets) < 2:
            continue
        w = stats.trapezoid_weights(budgets)
        for variant in dict.fromkeys(c.variant for c in fraction_cells(cells) if c.ctx == ctx):
            at = {float(c.budget): c for c in fraction_cells(cells)
                  if c.ctx == ctx and c.variant == variant}
            row = [at[b] for b in budgets]
            value = float(np.dot(w, [c.acc for c in row]))
            seeds = set.intersection(*(set(c.runs["seed"]) for c in row))
            by_seed = [[(wj, next(r for r in c.runs.itertuples(index=False) if r.seed == s))
                        for wj, c in zip(w, row, strict=True)] for s in sorted(seeds)]
            out.append(Auc(variant, ctx, budgets, value, ivs.auc(by_seed) if by_seed else None))
    return out


def auc_table(cells: list[Cell], aucs: list[Auc]) -> list:
    if not aucs:
        return []
    ctxs = sorted({a.ctx for a in aucs})
    small = {c.ctx for c in cells if not stats.testable(c.n)}
    heads = []
    for ctx in ctxs:
        b = next(a.budgets for a in aucs if a.ctx == ctx)
        heads.append(f"context {ctx:g}: budgets {b[0]:g}-{b[-1]:g} ({len(b)} points)")
    rows = []
    fulls = {c.ctx: c for c in cells if c.is_full}
    if any(ctx in fulls for ctx in ctxs):
        rows.append(["full (its accuracy)"] + [num(fulls[ctx].acc, 1) if ctx in fulls else "n/a"
                                               for ctx in ctxs])
    for variant in dict.fromkeys(a.variant for a in aucs):
        row = [variant]
        for ctx in ctxs:
            a = next((a for a in aucs if a.variant == variant and a.ctx == ctx), None)
            if a is None:
                row.append("n/a")
            elif a.ci is None or ctx in small:
                row.append(num(a.value, 1))
            else:
                row.append(f"{num(a.value, 1)} [{num(a.ci.low, 1)}, {num(a.ci.high, 1)}]")
        rows.append(row)
    return [("table", ["Method"] + heads, rows),
            ("caption", "Area under each method's accuracy-vs-budget curve (trapezoid over the "
                        "budgets every method at that context length has), divided by the "
                        "budget range: a mean accuracy (0-100) over that range. `[low, high]`: "
                        "95% bootstrap interval, the samples resampled jointly across budgets "
                        "(the same prompts at every budget); none where a cell has fewer than "
                        f"{stats.MIN_N} samples.")]
