"""Turn the ``result.json`` files of one or more sweeps into a comparison report.

    python -m atskv.analysis.report [--results DIR ...] [--out DIR] [--resamples N] [--wandb]

Writes ``report.md``, a self-contained ``report.html``, PNG figures under ``figures/``,
``per_context.csv`` (one row per method variant, budget and context length of each section) and
``auc.csv`` into ``--out`` (default ``outputs/report``).

One section per setting: the data a benchmark read, the protocol (question-aware or -agnostic,
never mixed), model, hardware, dtype, split, tasks and samples requested. Within it every table
and figure is per context length (nothing is averaged over context lengths): accuracy against
budget with the area under each curve, accuracy against measured KV memory with the Pareto
frontier, needle depth x context length heatmaps (synthetic tasks), accuracy against context
length (when several were run), then per context length the accuracy table (95% bootstrap
intervals, paired comparisons with ``full`` and with the best tuned baseline, Holm-corrected)
and the memory and time table; then per-task, per-question-position and LongBench-E tables.
The notes come last, one line per kind of remark.

Only runs under the prompt budget meaning (``budget_of: "prompt"``) are reported. Memory
reduction is ``1 - kv_cache_bytes(method) / kv_cache_bytes(full)`` against the ``full`` run of
the same setting, context length and seed (:mod:`atskv.analysis.data`); without one, against the
run's own ``kv_cache_bytes_uncompressed`` (marked). Peak memory only between runs that measured
the same ``peak_memory_kind`` (and, for a CPU process's peak RSS, each ran first in a fresh
process). Statistics: :mod:`atskv.analysis.stats`, from each run's ``samples.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from atskv.analysis import curves, heatmap, labels, plots, stats, tables
from atskv.analysis.data import (  # noqa: F401 - re-exported for callers of atskv.analysis.report
    FULL,
    KEY,
    SETTING,
    hparams,
    load_results,
    method_order,
    order,
    prepare,
    shown_path,
)
from atskv.analysis.intervals import Intervals
from atskv.analysis.render import log_to_wandb, render_html, render_md, slug

MAX_LISTED = 3


class NoResultsError(RuntimeError):
    """No usable result.json under the given folders."""


@dataclass
class Report:
    out_dir: Path
    per_context: pd.DataFrame  # numeric, one row per (section, variant, budget, context_len)
    auc: pd.DataFrame  # one row per (section, variant, context_len) with a curve
    notes: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    @property
    def summary(self) -> pd.DataFrame:
        """The per-context rows (nothing is averaged over context lengths)."""
        return self.per_context


def _old_note(old: list[str]) -> str:
    listed = ", ".join(f"`{p}`" for p in sorted(old)[:MAX_LISTED])
    more = f" and {len(old) - MAX_LISTED} more" if len(old) > MAX_LISTED else ""
    return (f"{len(old)} run{'s use' if len(old) != 1 else ' uses'} the old budget meaning "
            "(budget of prompt + generation; no `budget_of: prompt`); rerun "
            f"{'them' if len(old) != 1 else 'it'}. Left out of every table: {listed}{more}.")


def _models(ok: pd.DataFrame) -> list[str]:
    return sorted({labels.model_label(m, d, p or None) for m, d, p in
                   zip(ok["model"], ok["dtype"], ok["model_path"], strict=True)})


def _header(results, ok: pd.DataFrame, failed: pd.DataFrame) -> list:
    hw = sorted({f"{h} ({d})" for h, d in zip(ok["hardware"], ok["dtype"], strict=True)})
    kinds = sorted({str(k) for k in ok["peak_memory_kind"].dropna()})
    return [("h", 1, "atskv KV-cache compression report"),
            ("list", [f"Results: {', '.join(shown_path(r) for r in results)}",
                      f"Runs: {len(ok)} ok, {len(failed)} failed",
                      f"Model: {'; '.join(_models(ok)) or 'unknown'}",
                      f"Hardware (dtype): {', '.join(hw) or 'unknown'}",
                      f"Peak memory kind: {', '.join(kinds) or 'unknown'}",
                      "Notes on the runs are at the end."])]


def _tasks(sec: pd.DataFrame) -> str:
    metric: dict[str, str] = {}
    for d in sec["task_metrics"]:
        for t, m in (d.items() if isinstance(d, dict) else ()):
            metric.setdefault(t, m)
    if not metric:
        return sec["tasks"].iloc[0] or "the benchmark default"
    return ", ".join(f"{t} ({m})" for t, m in sorted(metric.items()))


def _setting(sec: pd.DataFrame) -> str:
    r = sec.iloc[0]
    budgets = sorted({s for s in sec["size"] if s}, key=lambda s: (s.startswith("kv"),
                                                                  float(s.lstrip("kv"))))
    proto = labels.PROTOCOLS.get(r["protocol"], r["protocol"])
    return (f"Data: {r['data']} (benchmark `{r['benchmark']}`). Protocol: {proto}. Model: "
            f"{'; '.join(_models(sec))}. Hardware: {r['hardware']} ({r['dtype']}). Split: "
            f"{r['split']}. Tasks (metric): {_tasks(sec)}. Samples requested "
            f"per task: {r['n_requested']}. Context lengths: "
            f"{', '.join(f'{c:g}' for c in sorted(sec['context_len'].unique()))}. Budgets: "
            f"{', '.join(budgets) or 'none'}. Presets: "
            f"{', '.join(sorted(set(sec.loc[sec['method'] != FULL, 'preset'])))}.")


def _section(sec: pd.DataFrame, title: str, ivs: Intervals, fig_dir: Path):
    cells = tables.build_cells(sec, ivs)
    stem = slug(title)
    blocks: list = [("h", 2, title), ("p", _setting(sec))]
    figures = []

    def add(figs: list) -> None:
        for cap, path in figs:
            blocks.append(("img", f"figures/{path.name}", cap))
            figures.append(path)

    aucs = curves.auc_cells(cells, ivs)
    budget_figs = plots.budget_curves(cells, title, stem, fig_dir)
    if budget_figs:
        blocks.append(("h", 3, "Accuracy vs budget"))
        add(budget_figs)
        blocks += curves.auc_table(cells, aucs)
    blocks.append(("h", 3, "Accuracy vs KV memory"))
    add(plots.pareto(cells, title, stem, fig_dir))
    depth = heatmap.depth_heatmaps(cells, ivs, title, stem, fig_dir)
    if depth:
        blocks.append(("h", 3, "Accuracy by needle depth and context length"))
        add(depth)
    ctx_figs = plots.context_curves(cells, title, stem, fig_dir)
    if ctx_figs:
        blocks.append(("h", 3, "Accuracy vs context length"))
        add(ctx_figs)
    for ctx in sorted({c.ctx for c in cells}):
        here = [c for c in cells if c.ctx == ctx]
        blocks += [("h", 3, f"Context length {ctx:g}")] + tables.accuracy_table(here)
        blocks += tables.memory_table(here, sec)
    blocks += tables.task_table(cells, ivs) + tables.position_table(cells)
    blocks += tables.bucket_table(cells, ivs)
    r = sec.iloc[0]
    meta = {"section": title, "benchmark": r["benchmark"], "data": r["data"],
            "protocol": r["protocol"], "model": r["model"], "hardware": r["hardware"],
            "dtype": r["dtype"], "split": r["split"]}
    auc_rows = [{**meta, "variant": a.variant, "context_len": a.ctx, "budget_low": a.budgets[0],
                 "budget_high": a.budgets[-1], "n_budgets": len(a.budgets), "auc": a.value,
                 "auc_low": a.ci.low if a.ci else None, "auc_high": a.ci.high if a.ci else None}
                for a in aucs]
    return blocks, tables.numbers(cells, meta), auc_rows, figures


def _failed_table(failed: pd.DataFrame) -> list:
    if failed.empty:
        return []

    def size(r) -> str:
        if pd.notna(r.kv_size):
            return f"kv{int(r.kv_size)}"
        return tables.num(r.budget, 3)

    rows = [[r.method + (f"[{r.hparams}]" if r.hparams else ""), r.benchmark, r.model,
             f"{r.hardware} ({r.dtype})", tables.num(r.context_len, 0), size(r),
             tables.num(r.seed, 0), r.status, str(r.error or "no error recorded")[:300], r.path]
            for r in failed.itertuples(index=False)]
    return [("h", 2, "Failed runs"),
            ("p", "These runs are excluded from every number above."),
            ("table", ["Method", "Benchmark", "Model", "Hardware", "Context length", "Budget",
                       "Seed", "Status", "Error", "File"], rows)]


def generate_report(results: list[str | Path], out_dir: str | Path = "outputs/report",
                    use_wandb: bool = False, n_resamples: int = stats.N_RESAMPLES) -> Report:
    runs, notes, old = load_results(results)
    where = ", ".join(str(r) for r in results)
    if runs.empty and old:
        raise NoResultsError(
            f"all {len(old)} result.json under {where} use the old budget meaning (budget of "
            "prompt + generation; no `budget_of: prompt`) and cannot be compared with new runs; "
            "rerun them with the current atskv.")
    if runs.empty:
        raise NoResultsError(f"no result.json found under {where}"
                             + (f" ({'; '.join(notes.lines())})" if len(notes) else "")
                             + "; run a sweep first.")
    if old:
        notes.add(_old_note(old))
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for stale in fig_dir.glob("*.png"):  # stale figures from an earlier report
        stale.unlink()
    failed = runs[runs["status"] != "ok"]
    ok, notes = prepare(runs[runs["status"] == "ok"], notes)
    if ok.empty:
        notes.add("No successful runs: there are no numbers to report.")
    kinds = sorted({str(k) for k in ok["peak_memory_kind"].dropna()})
    if len(kinds) > 1:
        notes.add(f"Peak memory was measured in different ways ({', '.join(kinds)}); peak "
                  "reductions only compare runs of the same kind.")
    ivs = Intervals(notes, n_resamples)
    body, cell_rows, auc_rows, figures = [], [], [], []
    for title, sec in ok.groupby("section", sort=True):
        blocks, rows, aucs, figs = _section(sec, title, ivs, fig_dir)
        body += blocks
        cell_rows += rows
        auc_rows += aucs
        figures += figs
    tail = _failed_table(failed)
    if len(notes):
        tail += [("h", 2, "Notes"), ("list", notes.lines())]
    blocks = _header(results, ok, failed) + body + tail
    (out_dir / "report.md").write_text(render_md(blocks))
    (out_dir / "report.html").write_text(render_html(blocks, out_dir))
    per_context, auc = pd.DataFrame(cell_rows), pd.DataFrame(auc_rows)
    per_context.to_csv(out_dir / "per_context.csv", index=False)
    auc.to_csv(out_dir / "auc.csv", index=False)
    if use_wandb:
        tabs = {f"table/{b[1][0]}_{i}": pd.DataFrame(b[2], columns=b[1])
                for i, b in enumerate(blocks) if b[0] == "table"}
        tabs["per_context"] = per_context
        log_to_wandb(tabs, figures)
    return Report(out_dir, per_context, auc, notes.lines(), figures)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m atskv.analysis.report", description=__doc__.split("\n")[0])
    p.add_argument("--results", nargs="+", action="extend", metavar="DIR",
                   help="folder(s) searched recursively for result.json (default: outputs)")
    p.add_argument("--out", default="outputs/report", help="output folder")
    p.add_argument("--resamples", type=int, default=stats.N_RESAMPLES, metavar="N",
                   help="bootstrap resamples per interval (default %(default)s; tiny runs are "
                        "enumerated exactly)")
    p.add_argument("--wandb", action="store_true", help="also log tables and figures to W&B")
    args = p.parse_args(argv)
    try:
        rep = generate_report(args.results or ["outputs"], args.out, use_wandb=args.wandb,
                              n_resamples=args.resamples)
    except NoResultsError as exc:
        print(f"atskv.analysis.report: error: {exc}", file=sys.stderr)
        return 2
    if rep.per_context.empty:
        print(f"atskv.analysis.report: error: no successful runs; see {rep.out_dir / 'report.md'}",
              file=sys.stderr)
        return 1
    print(rep.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
