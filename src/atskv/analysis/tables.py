"""Cells and tables of one report section (one setting: data, protocol, model, hardware, ...)
for :mod:`atskv.analysis.report`.

A :class:`Cell` is one configuration (method variant, budget, context length) with its runs (one
per seed). Nothing is averaged over context lengths: every table is per context length, or has
a context-length column. Comparisons (:mod:`atskv.analysis.intervals`): each cell against the
matching ``full`` run and against the best tuned baseline of its context length and budget (the
dev-tuned preset of another method, ``full`` excluded, with the highest accuracy there), each
family Holm-corrected over the comparisons of its table; a cell with fewer than
``stats.MIN_N`` samples shows ranges, never a test.

A *block* is a tuple rendered by :mod:`atskv.analysis.render`: ``("h", level, text)``,
``("p", text)``, ``("caption", text)``, ``("note", text)``, ``("list", items)``,
``("table", header, rows)``, ``("img", path, caption)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from atskv.analysis import stats
from atskv.analysis.data import FULL, method_order
from atskv.analysis.intervals import Comparison, Intervals

SIG = "*"
LOAD_MARK = "‡"
OWN_MARK = "§"
BUCKETS = ["0-4k", "4-8k", "8k+"]
# (column, header, decimals) of the memory and time table; optional ones only when recorded
MEMORY_COLS = [("kv_cache_mib", "KV cache (MiB)", 3),
               ("memory_reduction_pct", "Memory reduction %", 1),
               ("peak_memory_reduction_pct", "Peak memory reduction %", 1),
               ("decode_kv_read_mib", "KV read / decode step (MiB)", 3),
               ("kept", "Prompt tokens kept (min-max)", 1),
               ("needle_recall", "Needle recall", 3),
               ("ttft_s", "Time to first token (s)", 3),
               ("decode_tokens_per_s", "Throughput (tokens/s)", 1)]
OPTIONAL = ("peak_memory_reduction_pct", "decode_kv_read_mib", "needle_recall", "kept")
TIMING = ("ttft_s", "decode_tokens_per_s")
NUMBERS = ["kv_cache_mib", "kv_prefill_mib", "memory_reduction_pct", "peak_memory_mib",
           "peak_memory_reduction_pct", "decode_kv_read_mib", "needle_recall", "ttft_s",
           "prefill_s", "compress_s", "decode_tokens_per_s", "kept_mean", "kept_min", "kept_max"]


@dataclass
class Cell:
    variant: str
    method: str
    size: str  # "0.2", "kv256" or "" (full)
    budget: float
    ctx: float
    tuned: bool
    preset: str
    runs: pd.DataFrame  # one row per seed
    n: int  # samples per run (smallest)
    acc: float
    acc_std: float
    ci: stats.Interval | None = None
    lo: float = np.nan  # range of the per-sample scores
    hi: float = np.nan
    vs_full: Comparison | None = None
    base: Cell | None = None
    vs_base: Comparison | None = None
    sig: dict = field(default_factory=dict)  # family -> (holm-adjusted p, rejected)

    @property
    def is_full(self) -> bool:
        return self.method == FULL

    @property
    def label(self) -> str:
        return self.variant + (f"@{self.size}" if self.size else "")


def _rank(method: str, variant: str) -> tuple:
    order = {m: i for i, m in enumerate(method_order())}
    hp = variant.partition("[")[2].rstrip("]")
    return (order.get(method, len(order)), method, hp != "", hp != "tuned", hp)


def _size_key(size: str) -> tuple:
    if not size:
        return (0, 0.0)
    return (2, float(size[2:])) if size.startswith("kv") else (1, float(size))


def build_cells(sec: pd.DataFrame, ivs: Intervals) -> list[Cell]:
    """Every cell of a section with its interval and comparisons, Holm-corrected per context
    length (one family for Δ vs full, one for Δ vs the best tuned baseline)."""
    cells = []
    for (ctx, variant, size), runs in sec.groupby(["context_len", "variant", "size"]):
        first = runs.iloc[0]
        n = runs["n_samples"].dropna()
        cell = Cell(variant, first["method"], size, first["budget"], ctx, bool(first["tuned"]),
                    first["preset"], runs, int(n.min()) if len(n) else 0,
                    runs["accuracy"].mean(), runs["accuracy"].std(ddof=1))
        cell.ci, cell.lo, cell.hi = ivs.accuracy(list(runs.itertuples(index=False)))
        cells.append(cell)
    cells.sort(key=lambda c: (c.ctx, _size_key(c.size), _rank(c.method, c.variant)))
    by_path = {r.path: r for r in sec.itertuples(index=False)}
    for ctx in sorted({c.ctx for c in cells}):
        here = [c for c in cells if c.ctx == ctx]
        for c in here:
            if c.is_full:
                continue
            pairs = [(r, by_path[r.full_path]) for r in c.runs.itertuples(index=False)
                     if isinstance(r.full_path, str) and r.full_path in by_path]
            c.vs_full = ivs.compare(pairs) if len(pairs) == c.runs.shape[0] else None
            bases = [b for b in here if b.tuned and not b.is_full and b.method != c.method
                     and b.size == c.size and np.isfinite(b.acc)]
            if bases:
                c.base = max(bases, key=lambda b: b.acc)  # first of equals, in table order
                seeds = {r.seed: r for r in c.base.runs.itertuples(index=False)}
                pairs = [(r, seeds[r.seed]) for r in c.runs.itertuples(index=False)
                         if r.seed in seeds]
                c.vs_base = ivs.compare(pairs) if pairs else None
        for family, get in (("full", lambda c: c.vs_full), ("base", lambda c: c.vs_base)):
            tested = [c for c in here if get(c) is not None]
            adj, rej = stats.holm([get(c).p for c in tested])
            for c, a, r in zip(tested, adj, rej, strict=True):
                c.sig[family] = (a, r)
    return cells


# ----------------------------------------------------------------------------- formatting
def num(x, dec: int) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{round(float(x), dec) + 0.0:.{dec}f}"  # + 0.0 turns -0.0 into 0.0


def fmt(mean, std, dec: int) -> str:
    out = num(mean, dec)
    if out != "n/a" and std is not None and np.isfinite(std):
        out += f" ± {float(std):.{dec}f}"
    return out


def fmt_acc(c: Cell) -> str:
    out = fmt(c.acc, c.acc_std, 1)
    if out == "n/a":
        return out
    if not stats.testable(c.n):
        return out + (f" (range {num(c.lo, 1)} to {num(c.hi, 1)})" if np.isfinite(c.lo) else "")
    return out + (f" [{num(c.ci.low, 1)}, {num(c.ci.high, 1)}]" if c.ci else " [n/a]")


def fmt_cmp(cmp: Comparison | None, sig: tuple | None) -> str:
    if cmp is None or cmp.ci is None:
        return "n/a"
    out = num(cmp.ci.estimate, 1)
    if not stats.testable(cmp.n):
        return out + f" (range {num(cmp.low, 1)} to {num(cmp.high, 1)})"
    out += f" [{num(cmp.ci.low, 1)}, {num(cmp.ci.high, 1)}]"
    return out + (f" {SIG}" if sig and sig[1] else "")


def _n_text(c: Cell) -> str:
    n = c.runs["n_samples"].dropna()
    if n.empty:
        return "n/a"
    lo, hi = int(n.min()), int(n.max())
    seeds = f" x {len(c.runs)} seeds" if len(c.runs) > 1 else ""
    return (str(lo) if lo == hi else f"{lo}-{hi}") + seeds


def reduction_runs(c: Cell) -> tuple[pd.DataFrame, bool]:
    """The runs a cell's memory reduction is the mean over: those with a matching ``full`` run
    when any has one (a mean never mixes the two references), else all (against their own
    uncompressed bytes: True)."""
    vs_full = c.runs[c.runs["memory_reduction_ref"] == FULL]
    return (vs_full, False) if len(vs_full) else (c.runs, bool(
        (c.runs["memory_reduction_ref"] == "own").any()))


def _budget_text(c: Cell) -> str:
    return "all (full cache)" if c.is_full else (c.size or "default")


# ----------------------------------------------------------------------------- tables
def accuracy_table(cells: list[Cell]) -> list:
    """One context length's accuracy table with both comparisons and their captions."""
    rows = []
    for c in cells:
        base = (f"{c.base.variant} ({num(c.base.acc, 1)})" if c.base else
                "—" if c.is_full else "none tuned")
        rows.append([c.variant, c.preset if not c.is_full else "—", _budget_text(c),
                     _n_text(c), fmt_acc(c),
                     "reference" if c.is_full else fmt_cmp(c.vs_full, c.sig.get("full")),
                     base, "—" if c.is_full else fmt_cmp(c.vs_base, c.sig.get("base"))])
    m_full = sum(1 for c in cells if "full" in c.sig and np.isfinite(c.sig["full"][0]))
    m_base = sum(1 for c in cells if "base" in c.sig and np.isfinite(c.sig["base"][0]))
    small = [c for c in cells if not stats.testable(c.n)]
    caption = ("Accuracy: mean over tasks (0-100), mean over seeds; `[low, high]`: 95% "
               "percentile bootstrap interval over samples (resampled within tasks). Δ: accuracy "
               "minus the reference's over the same sample ids, paired bootstrap interval "
               "(unadjusted). ")
    if m_full or m_base:
        caption += (f"`{SIG}`: significant after Holm's correction at family-wise α = "
                    f"{stats.ALPHA} (two-sided paired permutation test), over the {m_full} "
                    f"comparison{'s' if m_full != 1 else ''} with `full` in this table, and "
                    f"separately over the {m_base} with the best tuned baseline. ")
    else:
        caption += "Nothing is tested here. "
    caption += ("Best tuned baseline: at the same budget, the dev-tuned preset of another "
                "method (`full` excluded) with the highest accuracy in this table; it is picked "
                "on these results, so its column favours the baseline.")
    if small:
        caption += (f" Fewer than {stats.MIN_N} samples: a cell shows the range of its "
                    "per-sample scores (or differences) instead of an interval, and is not "
                    "tested.")
    kind = ("[95% CI]" if not small else "(range)" if len(small) == len(cells)
            else "[95% CI] or (range)")
    return [("table", ["Method", "Preset", "Budget", "Samples", f"Accuracy {kind}",
                       f"Δ vs full {kind}", "Best tuned baseline (accuracy)",
                       f"Δ vs best tuned baseline {kind}"], rows),
            ("caption", caption)]


def memory_table(cells: list[Cell], sec: pd.DataFrame) -> list:
    rest = sec[sec["method"] != FULL]  # a column only full has a value in says nothing
    have = {c: (rest["kept_mean"] if c == "kept" else rest[c]).notna().any() for c in OPTIONAL}
    cols = [c for c in MEMORY_COLS if c[0] not in OPTIONAL or have[c[0]]]
    rows, marks = [], set()
    for c in cells:
        row = [c.variant, _budget_text(c)]
        for col, _, dec in cols:
            r = c.runs
            if col == "kept":
                m = r["kept_mean"].mean()
                rng = (f" ({r['kept_min'].min():.0f}-{r['kept_max'].max():.0f})"
                       if np.isfinite(r["kept_min"].min()) else "")
                row.append("n/a" if not np.isfinite(m) else f"{m:.1f}{rng}")
                continue
            own = False
            if col == "memory_reduction_pct":
                r, own = reduction_runs(c)
            cell = fmt(r[col].mean(), r[col].std(ddof=1), dec)
            if own:
                cell, _ = cell + f" {OWN_MARK}", marks.add(OWN_MARK)
            if col in TIMING and r["oversubscribed"].any() and cell != "n/a":
                cell, _ = cell + f" {LOAD_MARK}", marks.add(LOAD_MARK)
            row.append(cell)
        rows.append(row)
    caption = ("Memory reduction = 1 - KV bytes / KV bytes of the matching `full` run (same "
               "setting, context length and seed); KV bytes are the largest footprint of every "
               "tensor a method keeps while decoding, generated tokens included. `± std` over "
               "seeds where several exist.")
    if OWN_MARK in marks:
        caption += (f" {OWN_MARK} no matching `full` run: against the run's own "
                    "`kv_cache_bytes_uncompressed` (a full cache of the same tokens).")
    if LOAD_MARK in marks:
        caption += (f" {LOAD_MARK} measured while the machine was oversubscribed (1-minute load "
                    "above its usable CPUs at the start or end of the run): timings inflated.")
    return [("table", ["Method", "Budget"] + [h for _, h, _ in cols], rows), ("caption", caption)]


def numbers(cells: list[Cell], meta: dict) -> list[dict]:
    """Numeric rows (one per cell) for ``per_context.csv``."""
    out = []
    for c in cells:
        row = {**meta, "method": c.method, "variant": c.variant, "preset": c.preset,
               "tuned": c.tuned, "budget": c.budget, "size": c.size, "context_len": c.ctx,
               "n_seeds": len(c.runs), "n_samples": c.n, "accuracy": c.acc,
               "accuracy_std": c.acc_std,
               "accuracy_low": c.ci.low if c.ci else np.nan,
               "accuracy_high": c.ci.high if c.ci else np.nan,
               "score_min": c.lo, "score_max": c.hi}
        for name, cmp, fam in (("delta", c.vs_full, "full"), ("base_delta", c.vs_base, "base")):
            ok = cmp is not None and cmp.ci is not None
            adj, rej = c.sig.get(fam, (np.nan, False))
            ref = 0.0 if c.is_full and name == "delta" else np.nan  # full against itself
            row.update({name: cmp.ci.estimate if ok else ref,
                        f"{name}_low": cmp.ci.low if ok else ref,
                        f"{name}_high": cmp.ci.high if ok else ref,
                        f"{name}_p": cmp.p if ok else np.nan, f"{name}_p_holm": adj,
                        f"{name}_significant": bool(rej)})
        row["baseline"] = c.base.variant if c.base else ""
        for col in NUMBERS:
            row[col], row[f"{col}_std"] = c.runs[col].mean(), c.runs[col].std(ddof=1)
        runs, own = reduction_runs(c)
        row["memory_reduction_pct"] = runs["memory_reduction_pct"].mean()
        row["memory_reduction_pct_std"] = runs["memory_reduction_pct"].std(ddof=1)
        row["memory_reduction_ref"] = "own" if own else FULL
        out.append(row)
    return out


def _nested(d, *keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _mean_of(c: Cell, field_name: str, *keys) -> float:
    vals = pd.to_numeric(pd.Series([_nested(d, *keys) for d in c.runs[field_name]]),
                         errors="coerce")
    return vals.mean() if vals.notna().any() else np.nan


def _n_range(values) -> str:
    n = sorted(set(values))
    return "" if not n else f"n={n[0]}" if len(n) == 1 else f"n={n[0]}-{n[-1]}"


def task_table(cells: list[Cell], ivs: Intervals) -> list:
    tasks = sorted({t for c in cells for d in c.runs["task_scores"] if isinstance(d, dict)
                    for t in d})
    if len(tasks) < 2:  # one task: its score is the accuracy
        return []
    metric = {}
    for c in cells:
        for d in c.runs["task_metrics"]:
            for t, m in (d.items() if isinstance(d, dict) else ()):
                metric.setdefault(t, m)
    counts: dict[str, set] = {}
    for c in cells:
        for run in c.runs.itertuples(index=False):
            rows = ivs.samples(run) or []
            for t in tasks:
                if rows:
                    counts.setdefault(t, set()).add(sum(1 for r in rows if r.get("task") == t))

    def head(t):
        inner = ", ".join(x for x in (metric.get(t, ""), _n_range(counts.get(t, ()))) if x)
        return f"{t} ({inner})" if inner else t

    rows = [[c.variant, _budget_text(c), f"{c.ctx:g}"]
            + [num(_mean_of(c, "task_scores", t), 1) for t in tasks] for c in cells]
    return [("h", 3, "Per task"),
            ("table", ["Method", "Budget", "Context length"] + [head(t) for t in tasks], rows),
            ("caption", "Each task's score in its own metric (named in the header; n = samples "
                        "per run), mean over seeds.")]


def position_table(cells: list[Cell]) -> list:
    """Accuracy per question position (multi-question tasks: ``accuracy_by_position``)."""
    pos = sorted({int(p) for d in pd.concat([c.runs["accuracy_by_position"] for c in cells])
                  if isinstance(d, dict) for p in d}, key=int)
    if not pos:
        return []
    rows = [[c.variant, _budget_text(c), f"{c.ctx:g}"]
            + [num(_mean_of(c, "accuracy_by_position", str(p)), 1) for p in pos] for c in cells
            if c.runs["accuracy_by_position"].map(lambda d: isinstance(d, dict)).any()]
    return [("h", 3, "Accuracy by question position"),
            ("table", ["Method", "Budget", "Context length"]
             + [f"question {p + 1}" for p in pos], rows),
            ("caption", "Accuracy (0-100) of the questions asked at each position after one "
                        "compressed context (question 1 first), mean over seeds.")]


def bucket_table(cells: list[Cell], ivs: Intervals) -> list:
    """LongBench-E: task scores per length bucket (``task_scores_by_bucket``)."""
    buckets = sorted({(t, b) for c in cells for d in c.runs["task_scores_by_bucket"]
                      if isinstance(d, dict) for t, v in d.items() if isinstance(v, dict)
                      for b in v})
    if not buckets:
        return []
    seen = {b for _, b in buckets}
    names = [b for b in BUCKETS if b in seen] + sorted(seen - set(BUCKETS))
    btasks = sorted({t for t, _ in buckets})
    counts: dict[str, list[int]] = {b: [] for b in names}
    for c in cells:
        for run in c.runs.itertuples(index=False):
            got = [(r.get("meta") or {}).get("length_bucket") for r in ivs.samples(run) or []]
            for b in names:
                if b in got:
                    counts[b].append(got.count(b))
    rows = []
    for c in cells:
        for t in ["*"] + btasks:
            vals = []
            for b in names:
                if t == "*":
                    v = [_mean_of(c, "task_scores_by_bucket", x, b) for x in btasks
                         if (x, b) in buckets]
                    v = [x for x in v if np.isfinite(x)]
                    vals.append(num(np.mean(v), 1) if v else "n/a")
                else:
                    vals.append(num(_mean_of(c, "task_scores_by_bucket", t, b), 1))
            rows.append([c.variant, _budget_text(c), f"{c.ctx:g}",
                         "mean over tasks" if t == "*" else t] + vals)
    heads = [f"{b} ({_n_range(counts[b])})" if counts[b] else b for b in names]
    return [("h", 3, "Per length bucket (LongBench-E)"),
            ("table", ["Method", "Budget", "Context length", "Task"] + heads, rows),
            ("caption", "Task scores by the sample's length bucket (n = samples per run in the "
                        "bucket), mean over seeds; the first row of each method is the mean "
                        "over its tasks.")]
