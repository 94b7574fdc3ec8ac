"""atskv against the best tuned baseline of each cell of a results matrix (the goal table).

    python -m atskv.analysis.goal results/<date>/matrix.yaml [--grid] [--out FILE]

The manifest names, per slice of the matrix, the folders holding atskv's runs and those holding
the baselines' runs (paths relative to the manifest, glob patterns allowed)::

    slices:
      - name: synthetic, 512 tokens
        atskv: [runs_512_n16_atskv]
        baselines: [runs_512_n16, ../2026-12-05/runs_512_n16]
        protocols: [question_aware]   # optional: only these protocols' cells (default: all)

A cell is a benchmark's task (every synthetic task together), context length, budget and
protocol. In it atskv's run is paired by sample id with ``full`` (any budget) and with every
other dev-tuned method of the slice's baseline folders; the best tuned baseline is the one that
scores highest on these same samples (which favours the baseline). Each row gives atskv's
accuracy with its 95% bootstrap interval, the fraction of full it keeps, and the paired 95%
bootstrap interval of atskv minus the best baseline; ``bar`` says whether that interval's lower
end is above -2 points and whether all of it is above 0 (cells under ``stats.MIN_N`` samples are
not judged). A cell whose runs do not hold the same sample ids is an error, as is a cell with two
atskv runs or two runs of one baseline that answered differently.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from atskv.analysis import stats
from atskv.analysis.data import load_samples

ATSKV, FULL = "atskv", "full"
PROTOCOLS = ("question_aware", "question_agnostic")
BAR = -2.0  # the lower end of atskv minus the best baseline must lie above this


class ManifestError(ValueError):
    """A manifest or the runs it names cannot make a goal table."""


@dataclass
class Run:
    method: str
    rows: list[dict]
    aggregation: dict | None
    path: Path


@dataclass
class Row:
    cell: tuple  # (benchmark, task, context_len, budget, protocol)
    n: int
    full: float
    atskv: stats.Interval
    best: str
    best_acc: float
    n_baselines: int
    diff: stats.Interval

    @property
    def judged(self) -> bool:
        return stats.testable(self.n)

    @property
    def above_bar(self) -> bool:
        return self.judged and self.diff.low > BAR

    @property
    def above_zero(self) -> bool:
        return self.judged and self.diff.low > 0


def _runs(folder: Path) -> list[tuple[tuple, Run]]:
    """Every successful run under ``folder``, split into its cells."""
    if not folder.is_dir():
        raise ManifestError(f"results folder {folder} does not exist")
    out = []
    for f in sorted(folder.rglob("result.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"`{f}` is unreadable ({e})") from e
        if rec.get("status") != "ok":
            continue
        if rec["method"] not in (ATSKV, FULL) and not rec.get("tuned"):
            continue  # paper defaults are not the bar
        rows, why = load_samples(str(f))
        if rows is None:
            raise ManifestError(why)
        tasks = ["all"] if rec["benchmark"] == "synthetic" else sorted({r["task"] for r in rows})
        for t in tasks:
            sel = [r for r in rows if t == "all" or r["task"] == t]
            budget = None if rec["method"] == FULL else rec["budget"]
            cell = (rec["benchmark"], t, rec["context_len"], budget, rec["protocol"])
            out.append((cell, Run(rec["method"], sel, rec.get("task_aggregation"), f)))
    return out


def _ids(run: Run) -> set:
    return {r["id"] for r in run.rows}


def _answers(run: Run) -> dict:
    return {r["id"]: r["prediction"] for r in run.rows}


def slice_rows(atskv_dirs: list[Path], baseline_dirs: list[Path],
               protocols: tuple[str, ...] = PROTOCOLS) -> list[Row]:
    """The goal table's rows of one slice (its cells of ``protocols`` only)."""
    mine: dict[tuple, Run] = {}
    for d in atskv_dirs:
        for cell, run in _runs(d):
            if run.method != ATSKV or cell[4] not in protocols:
                continue
            if cell in mine:
                raise ManifestError(f"two atskv runs for cell {cell}: {mine[cell].path} and "
                                    f"{run.path}")
            mine[cell] = run
    others: dict[tuple, dict[str, Run]] = {}
    for d in baseline_dirs:
        for cell, run in _runs(d):
            if run.method == ATSKV or cell[4] not in protocols:
                continue
            have = others.setdefault(cell, {})
            if run.method in have and _answers(have[run.method]) == _answers(run):
                continue  # full ignores the budget: each sweep over budgets ran it once
            if run.method in have:
                raise ManifestError(f"two {run.method} runs for cell {cell}: "
                                    f"{have[run.method].path} and {run.path}")
            have[run.method] = run
    out = []
    for cell, run in sorted(mine.items(), key=lambda kv: tuple(map(str, kv[0]))):
        full = others.get(cell[:3] + (None,) + cell[4:], {}).get(FULL)
        base = {m: r for m, r in others.get(cell, {}).items() if m != FULL}
        if full is None or not base:
            raise ManifestError(f"cell {cell} has no full run or no tuned baseline in "
                                f"{[str(d) for d in baseline_dirs]}")
        for r in [full, *base.values()]:
            if _ids(r) != _ids(run):
                raise ManifestError(f"cell {cell}: {r.path} and {run.path} hold different "
                                    "samples")
        agg = run.aggregation
        acc = {m: stats.accuracy(r.rows, agg) for m, r in base.items()}
        best = max(sorted(acc), key=acc.get)
        out.append(Row(cell, len(run.rows), stats.accuracy(full.rows, agg),
                       stats.bootstrap_ci(run.rows, agg), best, acc[best], len(base),
                       stats.paired_bootstrap_diff(run.rows, base[best].rows, agg)))
    return out


def load(manifest: Path) -> list[tuple[str, list[Row]]]:
    """Every slice of a manifest with its rows."""
    spec = yaml.safe_load(manifest.read_text()) or {}
    slices = spec.get("slices")
    if not isinstance(slices, list) or not slices:
        raise ManifestError(f"{manifest}: expected a non-empty list under 'slices'")
    out = []
    for s in slices:
        if not isinstance(s, dict):
            raise ManifestError(f"{manifest}: a slice is a mapping with name, atskv and "
                                f"baselines, not {s!r}")
        missing = {"name", ATSKV, "baselines"} - set(s)
        if missing:
            raise ManifestError(f"{manifest}: slice {s.get('name', s)} lacks {sorted(missing)}")
        protocols = s.get("protocols", list(PROTOCOLS))
        if (not isinstance(protocols, list) or not protocols
                or any(p not in PROTOCOLS for p in protocols)):
            raise ManifestError(f"{manifest}: slice {s['name']}: protocols must be a non-empty "
                                f"list of {list(PROTOCOLS)}, not {protocols!r}")
        out.append((s["name"], slice_rows(_paths(manifest.parent, s[ATSKV]),
                                          _paths(manifest.parent, s["baselines"]),
                                          tuple(protocols))))
    return out


def _paths(root: Path, patterns: list[str]) -> list[Path]:
    out = []
    for pat in patterns:
        found = sorted(root.glob(pat)) if any(c in pat for c in "*?[") else [root / pat]
        if not found:
            raise ManifestError(f"no folder matches {root / pat}")
        out += found
    return out


def _pct(x: float) -> str:
    return f"{x:.1f}"


def _signed(iv: stats.Interval) -> str:
    return f"{iv.estimate:+.1f} [{iv.low:+.1f}, {iv.high:+.1f}]"


def verdict(row: Row) -> str:
    if not row.judged:
        return f"not judged (n < {stats.MIN_N})"
    if row.above_zero:
        return "ahead (all above 0)"
    return "level (above -2)" if row.above_bar else "missed (below -2)"


def render(slices: list[tuple[str, list[Row]]]) -> str:
    """The goal table in markdown, one table per slice, with the tallies."""
    lines = []
    for name, rows in slices:
        lines += [f"### {name}", "",
                  "| cell | n | full | atskv [95% CI] | atskv / full | best tuned baseline "
                  "(of k) | atskv minus it [95% CI] | bar |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            _, task, ctx, budget, proto = r.cell
            what = f"{ctx} / {budget}" if task == "all" else f"{task} {ctx} / {budget}"
            ratio = r.atskv.estimate / r.full if r.full > 0 else math.nan
            lines.append(
                f"| {what}, {proto.removeprefix('question_')} | {r.n} | {_pct(r.full)} | "
                f"{_pct(r.atskv.estimate)} [{_pct(r.atskv.low)}, {_pct(r.atskv.high)}] | "
                f"{ratio:.0%} | {r.best} {_pct(r.best_acc)} (of {r.n_baselines}) | "
                f"{_signed(r.diff)} | {verdict(r)} |")
        lines.append("")
    rows = [r for _, rs in slices for r in rs]
    judged = [r for r in rows if r.judged]
    lines.append(f"Cells: {len(rows)}; judged (at least {stats.MIN_N} samples): {len(judged)}; "
                 f"lower end above {BAR:g}: {sum(r.above_bar for r in judged)}; whole interval "
                 f"above 0: {sum(r.above_zero for r in judged)}.")
    return "\n".join(lines) + "\n"


def grid(slices: list[tuple[str, list[Row]]]) -> str:
    """The differences alone, one row per task, context length and protocol and one column per
    budget: bold where the whole interval is above 0, ``(-)`` where its lower end is at or
    below -2, italic where the cell is not judged."""
    rows = [r for _, rs in slices for r in rs]
    budgets = sorted({r.cell[3] for r in rows})
    lines: dict[tuple, dict] = {}
    for r in rows:
        _, task, ctx, budget, proto = r.cell
        name = "synthetic" if task == "all" else task
        lines.setdefault((name, ctx, proto), {})[budget] = r
    out = ["| task | tokens | protocol | " + " | ".join(f"budget {b}" for b in budgets) + " |",
           "|---|---|---|" + "---|" * len(budgets)]
    for (name, ctx, proto), cells in lines.items():
        parts = []
        for b in budgets:
            r = cells.get(b)
            if r is None:
                parts.append("")
                continue
            m = "**" if r.above_zero else "" if r.judged else "_"
            text = f"{m}{_signed(r.diff)}{m}" + (" (-)" if r.judged and not r.above_bar else "")
            parts.append(text + ("" if r.judged else f" n={r.n}"))
        out.append(f"| {name} | {ctx} | {proto.removeprefix('question_')} | "
                   + " | ".join(parts) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", type=Path, help="matrix.yaml naming the slices' folders")
    p.add_argument("--out", type=Path, help="write the table here (default: print it)")
    p.add_argument("--grid", action="store_true",
                   help="only the differences, one column per budget")
    a = p.parse_args(argv)
    try:
        slices = load(a.manifest)
    except (ManifestError, OSError, yaml.YAMLError) as e:
        p.error(str(e))
    text = grid(slices) if a.grid else render(slices)
    if a.out:
        a.out.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
