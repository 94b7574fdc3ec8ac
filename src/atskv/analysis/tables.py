"""Tables of one report section (one benchmark setting) for :mod:`atskv.analysis.report`.

A *block* is a tuple rendered by :mod:`atskv.analysis.render`: ``("h", level, text)``,
``("p", text)``, ``("note", text)``, ``("list", items)``, ``("table", header, rows)``,
``("img", path, caption)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from atskv.analysis import stats
from atskv.analysis.data import FULL, load_samples

LOAD_MARK = "‡"
NS_MARK = "ns"
BUCKETS = ["0-4k", "4-8k", "8k+"]
# (column, header, decimals)
SUMMARY_COLS = [("kv_cache_mib", "KV cache (MiB)", 3),
                ("kv_prefill_mib", "KV at prefill end (MiB)", 3),
                ("memory_reduction_pct", "Memory reduction %", 1),
                ("peak_memory_reduction_pct", "Peak memory reduction %", 1),
                ("kept", "Prompt tokens kept (min-max)", 1),
                ("needle_recall", "Needle recall", 3),
                ("ttft_s", "Avg time to first token (s)", 3),
                ("decode_tokens_per_s", "Avg throughput (tokens/s)", 1),
                ("accuracy", "Avg accuracy [95% CI]", 1),
                ("delta", "Δ vs full [95% CI]", 1)]
CTX_COLS = [("kv_cache_mib", "KV cache (MiB)", 3),
            ("kv_prefill_mib", "KV at prefill end (MiB)", 3),
            ("memory_reduction_pct", "Memory reduction %", 1),
            ("peak_memory_mib", "Peak memory (MiB)", 1),
            ("peak_memory_reduction_pct", "Peak memory reduction %", 1),
            ("decode_kv_read_mib", "KV read / decode step (MiB)", 3),
            ("kept", "Prompt tokens kept (min-max)", 1),
            ("needle_recall", "Needle recall", 3),
            ("ttft_s", "Time to first token (s)", 3),
            ("prefill_s", "Prefill (s)", 3),
            ("compress_s", "Compression (s)", 3),
            ("decode_tokens_per_s", "Throughput (tokens/s)", 1),
            ("accuracy", "Accuracy [95% CI]", 1),
            ("delta", "Δ vs full [95% CI]", 1)]
OPTIONAL = ("needle_recall", "prefill_s", "compress_s", "kv_prefill_mib", "kept")
TIMING = ("ttft_s", "decode_tokens_per_s", "prefill_s", "compress_s")
REDUCTIONS = ("memory_reduction_pct", "peak_memory_reduction_pct")


class Intervals:
    """Samples of each run (read once) and bootstrap intervals of cells of runs."""

    def __init__(self, n_resamples: int = stats.N_RESAMPLES, seed: int = 0):
        self.n_resamples, self.seed = n_resamples, seed
        self.notes: list[str] = []
        self._rows: dict[str, list[dict] | None] = {}
        self._pairs: set[tuple[str, str]] = set()

    def samples(self, run) -> list[dict] | None:
        path = str(run.path)
        if path not in self._rows:
            rows, why = load_samples(path)
            agg = run.task_aggregation if isinstance(run.task_aggregation, dict) else None
            if rows is not None:
                try:
                    acc = stats.accuracy(rows, agg)
                    if np.isfinite(run.accuracy) and abs(acc - run.accuracy) > 0.01:
                        self.notes.append(f"`{path}`: its samples give accuracy {acc:.2f}, "
                                          f"result.json says {run.accuracy:.2f}; the tables show "
                                          "result.json's value, the intervals are the samples'.")
                except (ValueError, KeyError, TypeError) as e:
                    rows, why = None, f"its samples cannot be aggregated ({e})"
            if rows is None:
                self.notes.append(f"Accuracy interval n/a for `{path}`: {why}.")
            self._rows[path] = rows
        return self._rows[path]

    def _full(self, run) -> list[dict] | None:
        ref = self.samples(_Path(run.full_path, run.full_aggregation, run.full_accuracy))
        rows = self.samples(run)
        if ref is not None and rows is not None and (run.path, run.full_path) not in self._pairs:
            self._pairs.add((run.path, run.full_path))
            a, b = {str(r.get("id")) for r in rows}, {str(r.get("id")) for r in ref}
            if a != b:
                self.notes.append(
                    f"`{run.path}` and its `full` run `{run.full_path}` share {len(a & b)} "
                    f"sample ids; {len(a ^ b)} sample(s) found in only one of them are left out "
                    "of Δ vs full.")
        return ref

    def interval(self, groups: list[list], paired: bool) -> stats.Interval | None:
        """``groups``: per context length, its runs (one per seed); the statistic is the mean
        over groups of the mean over runs (each run's accuracy, or its difference to its
        matching full run over their common sample ids)."""
        terms = []
        groups = [g for g in groups if g]
        for g in groups:
            for run in g:
                rows = self.samples(run)
                agg = run.task_aggregation if isinstance(run.task_aggregation, dict) else None
                ref = self._full(run) if paired else None
                if rows is None or (paired and ref is None):
                    return None
                terms.append(stats.Term(1.0 / (len(groups) * len(g)), rows, agg, ref))
        if not terms:
            return None
        try:
            return stats.weighted_bootstrap(terms, n_resamples=self.n_resamples, seed=self.seed)
        except ValueError as e:
            paths = ", ".join(f"`{r.path}`" for g in groups for r in g)
            self.notes.append(f"Accuracy interval n/a for {paths}: {e}.")
            return None


class _Path:  # the few fields Intervals.samples reads, for a full run known by its path
    def __init__(self, path, agg, acc):
        self.path, self.task_aggregation = path, agg
        self.accuracy = float(acc) if acc is not None and np.isfinite(acc) else np.nan


# ----------------------------------------------------------------------------- numbers
def _stats(sec: pd.DataFrame, col: str, per_ctx: bool) -> pd.DataFrame:
    """mean/std/n per label (or label, context); the spread is over seeds. Over context
    lengths the mean is of per-context means, and the std is over the context averages of
    the seeds that cover every context length of that label (none: no std)."""
    s = sec.groupby(["label", "context_len", "seed"])[col].mean().dropna()
    if per_ctx:
        g = s.groupby(level=["label", "context_len"])
        return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()})
    cell = s.groupby(level=["label", "context_len"]).mean()
    n_ctx = cell.groupby(level="label").size()
    g = s.groupby(level=["label", "seed"])
    seeds = pd.DataFrame({"v": g.mean(), "k": g.size()})
    full_cover = seeds["k"].to_numpy() == n_ctx.reindex(seeds.index.get_level_values(0)).to_numpy()
    per_seed = seeds.loc[full_cover, "v"].groupby(level="label")
    return pd.DataFrame({"mean": cell.groupby(level="label").mean(),
                         "std": per_seed.std(ddof=1), "n": per_seed.count()})


def fmt(mean, std, dec: int) -> str:
    if mean is None or not np.isfinite(mean):
        return "n/a"
    r = round(float(mean), dec) + 0.0  # + 0.0 turns -0.0 into 0.0
    out = f"{r:.{dec}f}"
    if std is not None and np.isfinite(std):
        out += f" ± {float(std):.{dec}f}"
    return out


def _num(x, dec: int) -> str:
    return f"{round(float(x), dec) + 0.0:.{dec}f}"


def fmt_ci(ci: stats.Interval | None, dec: int) -> str:
    return " [n/a]" if ci is None else f" [{_num(ci.low, dec)}, {_num(ci.high, dec)}]"


def fmt_delta(ci: stats.Interval | None, dec: int, is_full: bool) -> str:
    if is_full:
        return "reference"
    if ci is None:
        return "n/a"
    return (f"{_num(ci.estimate, dec)}{fmt_ci(ci, dec)}"
            + (f" {NS_MARK}" if ci.contains_zero() else ""))


def _get(st: pd.DataFrame, idx, what: str):
    return st[what].get(idx, np.nan) if len(st) else np.nan


def _kept(runs: pd.DataFrame) -> tuple[float, float, float]:
    """Mean (over context lengths of the mean over seeds), min of mins, max of maxes."""
    mean = runs.groupby("context_len")["kept_mean"].mean().mean()
    return mean, runs["kept_min"].min(), runs["kept_max"].max()


def _fmt_kept(mean, lo, hi) -> str:
    if not np.isfinite(mean):
        return "n/a"
    rng = f" ({lo:.0f}-{hi:.0f})" if np.isfinite(lo) and np.isfinite(hi) else ""
    return f"{mean:.1f}{rng}"


def _n_text(runs: pd.DataFrame) -> str:
    n = runs["n_samples"].dropna()
    if n.empty:
        return "n/a"
    lo, hi = int(n.min()), int(n.max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _shown(sec: pd.DataFrame, cols):
    """Columns with data in this section (optional ones are left out when all missing)."""
    have = {c: (sec["kept_mean"] if c == "kept" else sec[c]).notna().any() for c in OPTIONAL}
    return [c for c in cols if c[0] not in OPTIONAL or have[c[0]]]


def _cells(runs, cols, stats_of, idx, ivs: Intervals, groups, marks: set):
    """Formatted cells and numeric values of one row (summary: idx = label; per context:
    idx = (label, context))."""
    row, num = [], {}
    is_full = bool((runs["method"] == FULL).all())
    for col, _, dec in cols:
        if col == "kept":
            m, lo, hi = _kept(runs)
            row.append(_fmt_kept(m, lo, hi))
            num.update(kept_mean=m, kept_min=lo, kept_max=hi)
            continue
        if col == "delta":
            paired = [[r for r in g if isinstance(r.full_path, str)] for g in groups]
            ci = ivs.interval(paired, paired=True) if not is_full else None
            cell = fmt_delta(ci, dec, is_full)
            if ci is not None and ci.contains_zero():
                marks.add(NS_MARK)
            if ci is not None and sum(map(len, paired)) < sum(map(len, groups)):
                cell, _ = cell + " †", marks.add("†")
            row.append(cell)
            num.update(delta=0.0 if is_full else (ci.estimate if ci else np.nan),
                       delta_low=0.0 if is_full else (ci.low if ci else np.nan),
                       delta_high=0.0 if is_full else (ci.high if ci else np.nan))
            continue
        m, s = _get(stats_of[col], idx, "mean"), _get(stats_of[col], idx, "std")
        cell = fmt(m, s, dec)
        if col == "accuracy":
            ci = ivs.interval(groups, paired=False)
            cell += fmt_ci(ci, dec) if cell != "n/a" else ""
            num.update(accuracy_low=ci.low if ci else np.nan, accuracy_high=ci.high if ci else np.nan,
                       accuracy_n=ci.n if ci else np.nan)
        if col in TIMING and runs["oversubscribed"].any() and cell != "n/a":
            cell, _ = cell + f" {LOAD_MARK}", marks.add(LOAD_MARK)
        if col in REDUCTIONS and not isinstance(idx, tuple):
            n_ctx = runs["context_len"].nunique()
            n_red = runs.groupby("context_len")[col].apply(lambda x: x.notna().any()).sum()
            if 0 < n_red < n_ctx:
                cell, _ = cell + " †", marks.add("†")
        row.append(cell)
        num[col], num[f"{col}_std"] = m, s
    return row, num


def section(sec: pd.DataFrame, title: str, labels_all: list[str], ivs: Intervals
            ) -> tuple[list, list, list]:
    """Blocks, summary rows and per-context rows for one section."""
    labels = [lab for lab in labels_all if lab in set(sec["label"])]
    ctxs = sorted(sec["context_len"].dropna().unique())
    ctx_txt = ", ".join(f"{c:g}" for c in ctxs)
    blocks: list = [("h", 2, title)]
    missing_methods = [lab for lab in labels_all if lab not in labels]
    if missing_methods:
        blocks.append(("note", f"No successful run of {', '.join(missing_methods)} in this "
                               "section (they appear elsewhere in the results)."))
    for lab in labels:
        have = set(sec.loc[sec["label"] == lab, "context_len"])
        if gap := [c for c in ctxs if c not in have]:
            blocks.append(("note", f"`{lab}` has no result at context length "
                                   f"{', '.join(f'{c:g}' for c in gap)}; its averages cover "
                                   f"{', '.join(f'{c:g}' for c in ctxs if c in have)} only."))
    first = sec.iloc[0]
    meta = {"section": title, "benchmark": first["benchmark"], "model": first["model"]}
    setting = {"hardware": first["hardware"], "dtype": first["dtype"], "split": first["split"]}
    scols, ccols = _shown(sec, SUMMARY_COLS), _shown(sec, CTX_COLS)
    plain = [c for c, _, _ in CTX_COLS if c not in ("kept", "delta")]
    sst = {c: _stats(sec, c, False) for c in plain}
    cst = {c: _stats(sec, c, True) for c in plain}
    rows, num_rows, marks = [], [], set()
    for lab in labels:
        runs = sec[sec["label"] == lab]
        groups = [list(g.itertuples(index=False)) for _, g in runs.groupby("context_len")]
        row, num = _cells(runs, scols, sst, lab, ivs, groups, marks)
        rows.append([lab, _n_text(runs)] + row)
        num_rows.append({**meta, "method": lab, **setting, "context_lens": ctx_txt,
                         "n_seeds": int(runs["seed"].nunique()), "n_samples": _n_text(runs), **num})
    blocks += [("h", 3, "Summary"),
               ("p", f"Averaged over context lengths {ctx_txt} (each weighted equally; seeds "
                     "averaged first). `± std` is over seeds where several exist; `[low, high]` "
                     "is the 95% percentile bootstrap interval over samples (resampled within "
                     "tasks; runs at different context lengths and seeds resampled "
                     "independently). Δ vs full: accuracy minus the matching `full` run's over "
                     "the same sample ids, paired bootstrap. Memory reduction = 1 - KV "
                     "bytes(method) / KV bytes(full), same setting, context length and seed. "
                     "Samples: per run."),
               ("table", ["Method", "Samples"] + [h for _, h, _ in scols], rows)]
    blocks += _mark_notes(marks)
    rows, ctx_rows, marks = [], [], set()
    for lab in labels:
        for c in ctxs:
            runs = sec[(sec["label"] == lab) & (sec["context_len"] == c)]
            if runs.empty:
                continue
            n = runs["seed"].nunique()
            row, num = _cells(runs, ccols, cst, (lab, c), ivs,
                              [list(runs.itertuples(index=False))], marks)
            rows.append([lab, f"{c:g}", str(n), _n_text(runs)] + row)
            ctx_rows.append({**meta, "method": lab, **setting, "context_len": c, "n_seeds": n,
                             "n_samples": _n_text(runs), **num})
    blocks += [("h", 3, "Per context length"),
               ("table", ["Method", "Context length", "Seeds", "Samples"]
                + [h for _, h, _ in ccols], rows)]
    blocks += _mark_notes(marks)
    blocks += _task_tables(sec, labels, ctx_txt, ivs)
    return blocks, num_rows, ctx_rows


def _mark_notes(marks: set) -> list:
    text = {"†": "† averaged only over the context lengths (and seeds) where a matching "
                 "`full` run exists (see the n/a cells and the notes).",
            LOAD_MARK: f"{LOAD_MARK} measured while the machine was oversubscribed (its 1-minute "
                       "load exceeded its usable CPUs at the start or end of a run): timings are "
                       "inflated and noisy.",
            NS_MARK: f"`{NS_MARK}`: the 95% interval of the difference to `full` contains 0 "
                     "(not significant)."}
    return [("note", text[m]) for m in ("†", LOAD_MARK, NS_MARK) if m in marks]


def _scores(sec: pd.DataFrame, field: str, keys: list[tuple]) -> pd.DataFrame:
    out = sec.copy()
    for k in keys:
        def get(d, k=k):
            for part in k:
                d = d.get(part) if isinstance(d, dict) else None
            return d
        out["task::" + "::".join(k)] = pd.to_numeric(out[field].map(get), errors="coerce")
    return out


def _task_tables(sec: pd.DataFrame, labels: list[str], ctx_txt: str, ivs: Intervals) -> list:
    tasks = sorted({t for d in sec["task_scores"] if isinstance(d, dict) for t in d})
    if not tasks:
        return []
    metric = {}
    for d in sec["task_metrics"]:
        for t, m in (d.items() if isinstance(d, dict) else ()):
            metric.setdefault(t, m)
    counts: dict[str, set] = {}
    for run in sec.itertuples(index=False):
        rows = ivs.samples(run)
        for t in tasks:
            if rows is not None:
                counts.setdefault(t, set()).add(sum(1 for r in rows if r.get("task") == t))
    tsec = _scores(sec, "task_scores", [(t,) for t in tasks])
    tst = {t: _stats(tsec, f"task::{t}", False) for t in tasks}

    def head(t):
        inner = ", ".join(x for x in (metric.get(t, ""), _n_range(counts.get(t, ()))) if x)
        return f"{t} ({inner})" if inner else t

    rows = [[lab] + [fmt(_get(tst[t], lab, "mean"), _get(tst[t], lab, "std"), 1) for t in tasks]
            for lab in labels]
    blocks = [("h", 3, "Per task"),
              ("p", f"Each task's score in its own metric (named in the header; n = samples "
                    f"per run), averaged over context lengths {ctx_txt}; `± std` over seeds."),
              ("table", ["Method"] + [head(t) for t in tasks], rows)]
    return blocks + _bucket_table(sec, labels, ctx_txt, ivs)


def _n_range(values) -> str:
    n = sorted(set(values))
    return "" if not n else f"n={n[0]}" if len(n) == 1 else f"n={n[0]}-{n[-1]}"


def _bucket_table(sec: pd.DataFrame, labels: list[str], ctx_txt: str, ivs: Intervals) -> list:
    """LongBench-E: task scores per length bucket (``task_scores_by_bucket``)."""
    buckets = sorted({(t, b) for d in sec["task_scores_by_bucket"] if isinstance(d, dict)
                      for t, v in d.items() if isinstance(v, dict) for b in v})
    if not buckets:
        return []
    seen = {b for _, b in buckets}
    names = [b for b in BUCKETS if b in seen] + sorted(seen - set(BUCKETS))
    btasks = sorted({t for t, _ in buckets})
    bsec = _scores(sec, "task_scores_by_bucket", buckets)
    for b in names:  # mean over the tasks of each run that have this bucket
        bsec[f"task::*::{b}"] = bsec[[f"task::{t}::{b}" for t in btasks
                                      if (t, b) in set(buckets)]].mean(axis=1, skipna=True)
    st = {(t, b): _stats(bsec, f"task::{t}::{b}", False)
          for t in ["*"] + btasks for b in names if f"task::{t}::{b}" in bsec}
    counts: dict[str, list[int]] = {b: [] for b in names}
    for run in sec.itertuples(index=False):
        rows = ivs.samples(run) or []
        got = [(r.get("meta") or {}).get("length_bucket") for r in rows]
        for b in names:
            if b in got:
                counts[b].append(got.count(b))
    rows = [[lab, "mean over tasks" if t == "*" else t]
            + [fmt(_get(st[(t, b)], lab, "mean"), _get(st[(t, b)], lab, "std"), 1)
               if (t, b) in st else "n/a" for b in names]
            for lab in labels for t in ["*"] + btasks]
    heads = [f"{b} ({_n_range(counts[b])})" if counts[b] else b for b in names]
    return [("h", 3, "Per length bucket (LongBench-E)"),
            ("p", "Task scores by the sample's length bucket (n = samples per run in the "
                  f"bucket), averaged over context lengths {ctx_txt}; the first row of each "
                  "method is the mean over its tasks."),
            ("table", ["Method", "Task"] + heads, rows)]
