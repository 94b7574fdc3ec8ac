"""Turn the ``result.json`` files of one or more sweeps into a comparison report.

    python -m atskv.report [--results DIR ...] [--out DIR] [--wandb]

Writes ``report.md``, a self-contained ``report.html``, PNG figures under ``figures/``,
``summary.csv`` and ``per_context.csv`` into ``--out`` (default ``outputs/report``).

Memory reduction is always ``1 - kv_cache_bytes(method) / kv_cache_bytes(full)`` against the
``full`` run with the same benchmark, model, context length and seed (peak memory likewise,
and only when both runs measured the same ``peak_memory_kind``). Without such a run the
cell is "n/a" and a note says why; nothing else is ever used as the denominator.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

FULL = "full"
METHOD_ORDER = ["full", "sliding_window", "dynamic_kv", "rocket_kv", "snapkv", "pyramidkv",
                "h2o", "quest", "atskv"]
KEY = ["method", "hparams", "benchmark", "model", "context_len", "budget", "seed"]
NUMERIC = ["context_len", "budget", "seed", "n_samples", "accuracy", "kv_cache_bytes",
           "kv_cache_bytes_after_compression", "kv_cache_bytes_uncompressed",
           "decode_kv_read_bytes", "peak_memory_bytes", "ttft_s", "decode_tokens_per_s"]
TEXT = ["method", "hparams", "benchmark", "model", "status", "error", "peak_memory_kind",
        "hardware", "started_at", "finished_at"]
MIB = float(2**20)
# (column, header, decimals)
SUMMARY_COLS = [("memory_reduction_pct", "Memory reduction %", 1),
                ("peak_memory_reduction_pct", "Peak memory reduction %", 1),
                ("ttft_s", "Avg time to first token (s)", 3),
                ("decode_tokens_per_s", "Avg throughput (tokens/s)", 1),
                ("accuracy", "Avg accuracy", 2)]
CTX_COLS = [("kv_cache_mib", "KV cache (MiB)", 3),
            ("memory_reduction_pct", "Memory reduction %", 1),
            ("peak_memory_mib", "Peak memory (MiB)", 1),
            ("peak_memory_reduction_pct", "Peak memory reduction %", 1),
            ("decode_kv_read_mib", "KV read / decode step (MiB)", 3),
            ("ttft_s", "Time to first token (s)", 3),
            ("decode_tokens_per_s", "Throughput (tokens/s)", 1),
            ("accuracy", "Accuracy", 2)]


class NoResultsError(RuntimeError):
    """No usable result.json under the given folders."""


@dataclass
class Report:
    out_dir: Path
    summary: pd.DataFrame  # numeric, one row per (section, method)
    per_context: pd.DataFrame  # numeric, one row per (section, method, context_len)
    notes: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------- loading
def _when(value) -> pd.Timestamp:
    try:
        t = pd.Timestamp(value)
    except (TypeError, ValueError):
        t = pd.NaT
    if pd.isna(t):
        return pd.Timestamp("1900-01-01", tz="UTC")
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _norm(v, cast):
    try:
        return None if v is None else cast(v)
    except (TypeError, ValueError):
        return v


def _hp_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def hparams(rec: dict) -> str:
    """The run's non-default method hyperparameters as ``k=v,k=v`` ("" when all are defaults):
    ``config.method`` minus ``name`` (and ``budget``, already in the key), compared with the
    method dataclass's defaults, in field order. For a method that is not registered (no
    defaults known) every hyperparameter counts, so distinct configurations never merge."""
    import dataclasses

    from atskv.methods import METHODS

    config = rec.get("config")
    cfg = config.get("method") if isinstance(config, dict) else None
    if not isinstance(cfg, dict):
        return ""
    given = {k: v for k, v in cfg.items() if k not in ("name", "budget")}
    name = rec.get("method")
    if name not in METHODS:
        return ",".join(f"{k}={_hp_value(given[k])}" for k in sorted(given))
    out = []
    for f in dataclasses.fields(METHODS.get(name)):
        if f.name not in given:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if given[f.name] != default:
            out.append(f"{f.name}={_hp_value(given[f.name])}")
    known = {f.name for f in dataclasses.fields(METHODS.get(name))}
    out += [f"{k}={_hp_value(given[k])}" for k in sorted(set(given) - known)]
    return ",".join(out)


def _key(rec: dict) -> tuple:
    return (rec.get("method"), rec.get("hparams", ""), rec.get("benchmark"), rec.get("model"),
            _norm(rec.get("context_len"), int), _norm(rec.get("budget"), float),
            _norm(rec.get("seed"), int))


def load_results(dirs: list[str | Path]) -> tuple[pd.DataFrame, list[str]]:
    """All result.json under ``dirs`` (recursively), one kept per KEY: a successful run before
    a failed one, then the newest. ``hparams`` (the non-default method hyperparameters) is part
    of KEY, so ablations stay apart. Returns (runs, notes)."""
    notes, files = [], {}
    for d in dirs:
        if not Path(d).is_dir():
            notes.append(f"Results folder `{d}` does not exist; skipped.")
            continue
        for f in sorted(Path(d).rglob("result.json")):
            files.setdefault(f.resolve(), f)
    groups: dict[tuple, list[dict]] = {}
    for f in files.values():
        try:
            rec = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            notes.append(f"Skipped unreadable `{f}`: {e}")
            continue
        if not isinstance(rec, dict) or not rec.get("method") or not rec.get("benchmark"):
            notes.append(f"Skipped `{f}`: not a result record (no method/benchmark).")
            continue
        rec["path"] = str(f)
        rec["hparams"] = hparams(rec)
        groups.setdefault(_key(rec), []).append(rec)
    kept = []
    for key, recs in groups.items():
        # a successful run beats a failed one, then the newest wins
        recs.sort(key=lambda r: (r.get("status") == "ok", _when(r.get("finished_at"))))
        kept.append(recs[-1])
        if len(recs) > 1:
            desc = ", ".join(f"{k}={v}" for k, v in zip(KEY, key, strict=True) if v != "")
            which = ("the newest" if all(_when(r.get("finished_at")) <= _when(recs[-1].get("finished_at"))
                                         for r in recs) else "the newest successful run")
            dropped = "; ".join(f"`{r['path']}` ({r.get('status')}, {r.get('finished_at')})"
                                for r in recs[:-1])
            notes.append(f"Duplicate run ({desc}): kept {which} `{recs[-1]['path']}` "
                         f"({recs[-1].get('status')}, finished_at {recs[-1].get('finished_at')}); "
                         f"dropped {dropped}.")
    df = pd.DataFrame(kept)
    for c in TEXT + NUMERIC + ["task_scores", "path"]:
        if c not in df:
            df[c] = None
    for c in NUMERIC:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df["status"] = df["status"].fillna("missing")
    df["hparams"] = df["hparams"].fillna("")
    return df, notes


def _order(labels) -> list:
    """Labels (``method[k=v,...]@budget``, both parts optional) in METHOD_ORDER, then
    default hyperparameters first, then by budget."""
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}

    def key(lab: str):
        head, _, b = str(lab).rpartition("@") if "@" in str(lab) else (str(lab), "", "")
        m, _, hp = head.partition("[")
        return (rank.get(m, len(rank)), m, hp.rstrip("]"), float(b) if b else -1.0)

    return sorted(set(labels), key=key)


def prepare(ok: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Add labels, MiB columns and the two reductions vs the matching ``full`` run."""
    ok = ok.copy()
    notes = [f"Left out `{p}`: no context_len." for p in ok.get("path", ok["method"])[ok["context_len"].isna()]]
    ok = ok[ok["context_len"].notna()].assign(seed=ok["seed"].fillna(0))
    if "hparams" not in ok:
        ok["hparams"] = ""
    ok["hparams"] = ok["hparams"].fillna("")
    nb = ok.groupby("method")["budget"].nunique(dropna=False)
    ok["label"] = [(m + (f"[{hp}]" if hp else ""))
                   + ("" if m == FULL or nb[m] <= 1 or pd.isna(b) else f"@{b:g}")
                   for m, hp, b in zip(ok["method"], ok["hparams"], ok["budget"], strict=True)]
    for src, dst in (("kv_cache_bytes", "kv_cache_mib"), ("peak_memory_bytes", "peak_memory_mib"),
                     ("decode_kv_read_bytes", "decode_kv_read_mib")):
        ok[dst] = ok[src] / MIB
    cell = ["benchmark", "model", "context_len", "seed"]
    full = ok[ok["method"] == FULL]
    for src, dst, extra in (("kv_cache_bytes", "memory_reduction_pct", []),
                            ("peak_memory_bytes", "peak_memory_reduction_pct", ["peak_memory_kind"])):
        ref = full.groupby(cell + extra, dropna=False)[src].mean().rename("_ref").reset_index()
        ref = ok[cell + extra].merge(ref, on=cell + extra, how="left")["_ref"].to_numpy()
        val = ok[src].to_numpy()
        good = np.isfinite(ref) & (ref > 0) & np.isfinite(val)
        red = np.full(len(ok), np.nan)
        red[good] = 100.0 * (1.0 - val[good] / ref[good])
        red[good & (ok["method"] == FULL).to_numpy()] = 0.0  # exactly 0 by definition
        ok[dst] = red
    missing = ok[ok["memory_reduction_pct"].isna()]
    for (b, m, c), g in missing.groupby(["benchmark", "model", "context_len"], dropna=False):
        seeds = ", ".join(f"{x:g}" for x in sorted(g["seed"].dropna().unique()))
        notes.append(f"Memory reduction is n/a for {b} / {m} at context length {c:g} "
                     f"(seed {seeds or '?'}): no `full` run with kv_cache_bytes for the same "
                     f"benchmark, model, context length and seed ({', '.join(_order(g['label']))}).")
    return ok, notes


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


def _fmt(mean, std, dec: int) -> str:
    if mean is None or not np.isfinite(mean):
        return "n/a"
    r = round(float(mean), dec) + 0.0  # + 0.0 turns -0.0 into 0.0
    out = f"{r:.{dec}f}"
    if std is not None and np.isfinite(std):
        out += f" ± {float(std):.{dec}f}"
    return out


def _get(st: pd.DataFrame, idx, what: str):
    return st[what].get(idx, np.nan) if len(st) else np.nan


def _section(sec: pd.DataFrame, title: str, labels_all: list[str]) -> tuple[list, list, list]:
    """Blocks, summary rows and per-context rows for one benchmark (and model)."""
    labels = [lab for lab in labels_all if lab in set(sec["label"])]
    ctxs = sorted(sec["context_len"].dropna().unique())
    ctx_txt = ", ".join(f"{c:g}" for c in ctxs)
    blocks: list = [("h", 2, title)]
    missing_methods = [lab for lab in labels_all if lab not in labels]
    if missing_methods:
        blocks.append(("note", f"No successful run of {', '.join(missing_methods)} for this "
                               "benchmark (they appear elsewhere in the results)."))
    for lab in labels:
        have = set(sec.loc[sec["label"] == lab, "context_len"])
        if gap := [c for c in ctxs if c not in have]:
            blocks.append(("note", f"`{lab}` has no result at context length "
                                   f"{', '.join(f'{c:g}' for c in gap)}; its averages cover "
                                   f"{', '.join(f'{c:g}' for c in ctxs if c in have)} only."))
    stats = {c: _stats(sec, c, False) for c, _, _ in SUMMARY_COLS}
    red_ctx = {c: _stats(sec, c, True)["n"]
               for c in ("memory_reduction_pct", "peak_memory_reduction_pct")}
    rows, num_rows, dagger = [], [], False
    for lab in labels:
        n_ctx = (sec["label"] == lab).groupby(sec["context_len"]).any().sum()
        row = [lab]
        num = {"section": title, "benchmark": sec["benchmark"].iloc[0], "model": sec["model"].iloc[0],
               "method": lab, "context_lens": ctx_txt,
               "n_seeds": int(sec.loc[sec["label"] == lab, "seed"].nunique())}
        for col, _, dec in SUMMARY_COLS:
            m, s = _get(stats[col], lab, "mean"), _get(stats[col], lab, "std")
            cell = _fmt(m, s, dec)
            n_red = int(red_ctx[col].get(lab, pd.Series()).gt(0).sum()) if col in red_ctx else 0
            if 0 < n_red < n_ctx:
                cell, dagger = cell + " †", True
            row.append(cell)
            num[col], num[f"{col}_std"] = m, s
        rows.append(row)
        num_rows.append(num)
    blocks += [("h", 3, "Summary"),
               ("p", f"Averaged over context lengths {ctx_txt} (each weighted equally; seeds "
                     "averaged first). `± std` is over seeds where several exist. Memory "
                     "reduction = 1 - KV bytes(method) / KV bytes(full), same context length "
                     "and seed."),
               ("table", ["Method"] + [h for _, h, _ in SUMMARY_COLS], rows)]
    if dagger:
        blocks.append(("note", "† averaged only over the context lengths where a matching "
                               "`full` run exists (see the n/a cells below)."))
    ctx_stats = {c: _stats(sec, c, True) for c, _, _ in CTX_COLS}
    rows, ctx_rows = [], []
    for lab in labels:
        for c in ctxs:
            n = sec.loc[(sec["label"] == lab) & (sec["context_len"] == c), "seed"].nunique()
            if not n:
                continue
            row, num = [lab, f"{c:g}", str(n)], {"section": title, "method": lab,
                                                "context_len": c, "n_seeds": n}
            for col, _, dec in CTX_COLS:
                m, s = _get(ctx_stats[col], (lab, c), "mean"), _get(ctx_stats[col], (lab, c), "std")
                row.append(_fmt(m, s, dec))
                num[col], num[f"{col}_std"] = m, s
            rows.append(row)
            ctx_rows.append(num)
    blocks += [("h", 3, "Per context length"),
               ("table", ["Method", "Context length", "Seeds"] + [h for _, h, _ in CTX_COLS], rows)]
    tasks = sorted({t for d in sec["task_scores"] if isinstance(d, dict) for t in d})
    if tasks:
        tsec = sec.copy()
        for t in tasks:
            tsec[f"task::{t}"] = pd.to_numeric(tsec["task_scores"].map(
                lambda d, t=t: d.get(t) if isinstance(d, dict) else None), errors="coerce")
        tst = {t: _stats(tsec, f"task::{t}", False) for t in tasks}
        rows = [[lab] + [_fmt(_get(tst[t], lab, "mean"), _get(tst[t], lab, "std"), 2)
                         for t in tasks] for lab in labels]
        blocks += [("h", 3, "Per task accuracy"),
                   ("p", f"Averaged over context lengths {ctx_txt}."),
                   ("table", ["Method"] + tasks, rows)]
    return blocks, num_rows, ctx_rows


# ----------------------------------------------------------------------------- rendering
def _md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_md(blocks: list) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "note":
            out.append(f"> **Note:** {b[1]}")
        elif b[0] == "list":
            out.append("\n".join(f"- {_md_cell(i)}" for i in b[1]))
        elif b[0] == "table":
            lines = ["| " + " | ".join(_md_cell(h) for h in b[1]) + " |",
                     "|" + "|".join("---" for _ in b[1]) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b[2]]
            out.append("\n".join(lines))
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


def render_html(blocks: list, base: Path) -> str:
    out = []

    def e(x) -> str:
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(x)))

    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "note":
            out.append(f'<p class="note"><b>Note:</b> {e(b[1])}</p>')
        elif b[0] == "list":
            out.append("<ul>" + "".join(f"<li>{e(str(i))}</li>" for i in b[1]) + "</ul>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>"
                           for r in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode((base / b[1]).read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{e(b[2])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(b[2])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
             "padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             ".note{background:#fff4d6;border-left:4px solid #e0a800;padding:4px 8px}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>atskv report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


def log_to_wandb(tables: dict[str, pd.DataFrame], figures: list[Path]) -> bool:
    """Log tables and figures to a W&B run; any failure only warns."""
    try:
        import wandb

        run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), project="atskv",
                         job_type="report")
        try:
            for name, df in tables.items():
                run.log({name: wandb.Table(dataframe=df.astype(str))})
            run.log({f"figures/{f.stem}": wandb.Image(str(f)) for f in figures})
        finally:
            run.finish()
        return True
    except Exception as exc:  # noqa: BLE001 - reporting must not fail because of W&B
        warnings.warn(f"W&B logging failed, report files are still written: {exc}", stacklevel=2)
        return False


def generate_report(results: list[str | Path], out_dir: str | Path = "outputs/report",
                    use_wandb: bool = False) -> Report:
    from atskv import report_plots

    runs, notes = load_results(results)
    if runs.empty:
        raise NoResultsError(
            f"no result.json found under {', '.join(str(r) for r in results)}"
            + (f" ({'; '.join(notes)})" if notes else "") + "; run a sweep first.")
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):  # stale figures from an earlier report
        old.unlink()
    failed = runs[runs["status"] != "ok"]
    ok, red_notes = prepare(runs[runs["status"] == "ok"])
    notes += red_notes
    multi_model = ok["model"].nunique() > 1
    ok["section"] = [f"{b} ({m})" if multi_model else str(b)
                     for b, m in zip(ok["benchmark"], ok["model"], strict=True)]
    labels = _order(ok["label"]) if len(ok) else []
    hw = sorted({str(h) for h in ok["hardware"].dropna()})
    kinds = sorted({str(k) for k in ok["peak_memory_kind"].dropna()})
    blocks: list = [("h", 1, "atskv KV-cache compression report"),
                    ("list", [f"Results: {', '.join(str(r) for r in results)}",
                              f"Runs: {len(ok)} ok, {len(failed)} failed",
                              f"Hardware: {', '.join(hw) or 'unknown'}",
                              f"Peak memory kind: {', '.join(kinds) or 'unknown'}"])]
    if len(kinds) > 1:
        notes.append("Peak memory was measured in different ways "
                     f"({', '.join(kinds)}); peak reductions only compare runs of the same kind.")
    if ok.empty:
        notes.append("No successful runs: there are no numbers to report.")
    if notes:
        blocks += [("h", 2, "Notes"), ("list", notes)]
    summary_rows, ctx_rows, figures = [], [], []
    for title, sec in ok.groupby("section", sort=True):
        sec_blocks, srows, crows = _section(sec, title, labels)
        blocks += sec_blocks
        summary_rows += srows
        ctx_rows += crows
        for cap, path in report_plots.context_plots(sec, labels, title, _slug(title), fig_dir):
            blocks.append(("img", f"figures/{path.name}", cap))
            figures.append(path)
    summary = pd.DataFrame(summary_rows)
    per_context = pd.DataFrame(ctx_rows)
    if not summary.empty:
        blocks.append(("h", 2, "Across benchmarks"))
        for cap, path in report_plots.cross_plots(summary, labels, fig_dir):
            blocks.append(("img", f"figures/{path.name}", cap))
            figures.append(path)
    if len(failed):
        rows = [[r.method + (f"[{r.hparams}]" if r.hparams else ""), r.benchmark, r.model,
                 _fmt(r.context_len, None, 0), _fmt(r.budget, None, 3), _fmt(r.seed, None, 0), r.status,
                 str(r.error or "no error recorded")[:300], r.path]
                for r in failed.itertuples(index=False)]
        blocks += [("h", 2, "Failed runs"),
                   ("p", "These runs are excluded from every number above."),
                   ("table", ["Method", "Benchmark", "Model", "Context length", "Budget", "Seed",
                              "Status", "Error", "File"], rows)]
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
    p = argparse.ArgumentParser(prog="python -m atskv.report", description=__doc__.split("\n")[0])
    p.add_argument("--results", nargs="+", action="extend", metavar="DIR",
                   help="folder(s) searched recursively for result.json (default: outputs)")
    p.add_argument("--out", default="outputs/report", help="output folder")
    p.add_argument("--wandb", action="store_true", help="also log tables and figures to W&B")
    args = p.parse_args(argv)
    try:
        rep = generate_report(args.results or ["outputs"], args.out, use_wandb=args.wandb)
    except NoResultsError as exc:
        print(f"atskv.report: error: {exc}", file=sys.stderr)
        return 2
    if rep.summary.empty:
        print(f"atskv.report: error: no successful runs; see {rep.out_dir / 'report.md'}",
              file=sys.stderr)
        return 1
    print(rep.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
