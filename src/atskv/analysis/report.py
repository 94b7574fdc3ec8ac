"""Turn the ``result.json`` files of one or more sweeps into a comparison report.

    python -m atskv.analysis.report [--results DIR ...] [--out DIR] [--resamples N] [--wandb]

Writes ``report.md``, a self-contained ``report.html``, PNG figures under ``figures/``,
``summary.csv`` and ``per_context.csv`` into ``--out`` (default ``outputs/report``).

Only runs under the prompt budget meaning (``budget_of: "prompt"``) are reported; older runs
are counted in the notes. Memory reduction is always ``1 - kv_cache_bytes(method) /
kv_cache_bytes(full)`` against the ``full`` run of the same setting (benchmark, model,
hardware, dtype, split, tasks, samples, context length, seed; see :mod:`atskv.analysis.data`).
Peak memory likewise, and only when both runs measured the same ``peak_memory_kind`` (and, for
a CPU process's peak RSS, each ran first in a fresh process). Without such a run the cell is
"n/a" and a note says why; nothing else is ever used as the denominator. Accuracy comes with
a 95% bootstrap interval over samples and a paired interval of its difference to ``full``
(:mod:`atskv.analysis.stats`), read from each run's ``samples.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from atskv.analysis import stats
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
from atskv.analysis.render import log_to_wandb, render_html, render_md, slug
from atskv.analysis.tables import Intervals, fmt, section

MAX_LISTED = 5


class NoResultsError(RuntimeError):
    """No usable result.json under the given folders."""


@dataclass
class Report:
    out_dir: Path
    summary: pd.DataFrame  # numeric, one row per (section, method)
    per_context: pd.DataFrame  # numeric, one row per (section, method, context_len)
    notes: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


def _old_note(old: list[str]) -> str:
    listed = ", ".join(f"`{p}`" for p in sorted(old)[:MAX_LISTED])
    more = f" and {len(old) - MAX_LISTED} more" if len(old) > MAX_LISTED else ""
    return (f"{len(old)} run{'s use' if len(old) != 1 else ' uses'} the old budget meaning "
            "(budget of prompt + generation; no `budget_of: prompt`); rerun "
            f"{'them' if len(old) != 1 else 'it'}. Left out of every table: {listed}{more}.")


def _header(results, ok: pd.DataFrame, failed: pd.DataFrame, notes: list[str]) -> list:
    hw = sorted({f"{h} ({d})" for h, d in zip(ok["hardware"], ok["dtype"], strict=True)})
    kinds = sorted({str(k) for k in ok["peak_memory_kind"].dropna()})
    if len(kinds) > 1:
        notes.append("Peak memory was measured in different ways "
                     f"({', '.join(kinds)}); peak reductions only compare runs of the same kind.")
    if ok.empty:
        notes.append("No successful runs: there are no numbers to report.")
    blocks: list = [("h", 1, "atskv KV-cache compression report"),
                    ("list", [f"Results: {', '.join(shown_path(r) for r in results)}",
                              f"Runs: {len(ok)} ok, {len(failed)} failed",
                              f"Hardware (dtype): {', '.join(hw) or 'unknown'}",
                              f"Peak memory kind: {', '.join(kinds) or 'unknown'}"])]
    return blocks + ([("h", 2, "Notes"), ("list", notes)] if notes else [])


def _failed_table(failed: pd.DataFrame) -> list:
    if failed.empty:
        return []

    def size(r) -> str:
        if pd.notna(r.kv_size):
            return f"kv{int(r.kv_size)}"
        return fmt(r.budget, None, 3)

    rows = [[r.method + (f"[{r.hparams}]" if r.hparams else ""), r.benchmark, r.model,
             f"{r.hardware} ({r.dtype})", fmt(r.context_len, None, 0), size(r),
             fmt(r.seed, None, 0), r.status, str(r.error or "no error recorded")[:300], r.path]
            for r in failed.itertuples(index=False)]
    return [("h", 2, "Failed runs"),
            ("p", "These runs are excluded from every number above."),
            ("table", ["Method", "Benchmark", "Model", "Hardware", "Context length", "Budget",
                       "Seed", "Status", "Error", "File"], rows)]


def generate_report(results: list[str | Path], out_dir: str | Path = "outputs/report",
                    use_wandb: bool = False, n_resamples: int = stats.N_RESAMPLES) -> Report:
    from atskv.analysis import plots

    runs, notes, old = load_results(results)
    where = ", ".join(str(r) for r in results)
    if runs.empty and old:
        raise NoResultsError(
            f"all {len(old)} result.json under {where} use the old budget meaning (budget of "
            "prompt + generation; no `budget_of: prompt`) and cannot be compared with new runs; "
            "rerun them with the current atskv.")
    if runs.empty:
        raise NoResultsError(f"no result.json found under {where}"
                             + (f" ({'; '.join(notes)})" if notes else "") + "; run a sweep first.")
    if old:
        notes.append(_old_note(old))
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for stale in fig_dir.glob("*.png"):  # stale figures from an earlier report
        stale.unlink()
    failed = runs[runs["status"] != "ok"]
    ok, red_notes = prepare(runs[runs["status"] == "ok"])
    notes += red_notes
    labels = order(ok["label"]) if len(ok) else []
    ivs = Intervals(n_resamples)
    body, summary_rows, ctx_rows, figures = [], [], [], []
    for title, sec in ok.groupby("section", sort=True):
        sec_blocks, srows, crows = section(sec, title, labels, ivs)
        body += sec_blocks
        summary_rows += srows
        ctx_rows += crows
        cells = pd.DataFrame(crows)
        for cap, path in plots.context_plots(sec, labels, title, slug(title), fig_dir,
                                                    cells):
            body.append(("img", f"figures/{path.name}", cap))
            figures.append(path)
    summary = pd.DataFrame(summary_rows)
    per_context = pd.DataFrame(ctx_rows)
    if not summary.empty:
        body.append(("h", 2, "Across benchmarks"))
        for cap, path in plots.cross_plots(summary, labels, fig_dir):
            body.append(("img", f"figures/{path.name}", cap))
            figures.append(path)
    notes += ivs.notes
    blocks = _header(results, ok, failed, notes) + body + _failed_table(failed)
    (out_dir / "report.md").write_text(render_md(blocks))
    (out_dir / "report.html").write_text(render_html(blocks, out_dir))
    summary.to_csv(out_dir / "summary.csv", index=False)
    per_context.to_csv(out_dir / "per_context.csv", index=False)
    if use_wandb:
        tables = {f"table/{b[1][0]}_{i}": pd.DataFrame(b[2], columns=b[1])
                  for i, b in enumerate(blocks) if b[0] == "table"}
        tables["summary"] = summary
        log_to_wandb(tables, figures)
    return Report(out_dir, summary, per_context, notes, figures)


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
    if rep.summary.empty:
        print(f"atskv.analysis.report: error: no successful runs; see {rep.out_dir / 'report.md'}",
              file=sys.stderr)
        return 1
    print(rep.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
