"""``make results``: the reference results matrix, on the **test** split: every method's
dev-tuned preset (``conf/method/tuned/``; ``--variants paper,tuned`` adds the paper defaults)
and the full cache, in both protocols, then the report.

    python -m atskv.experiments.matrix [--date YYYY-MM-DD] [--variants tuned] [--parts ...]
                                   [--budgets 0.05,0.1,0.25,0.5] [--dry-run] [extra Hydra overrides]

Parts (each one ``run.py -m`` sweep; every job of a sweep that differs only in method, budget and
protocol shares each sample's prefill, and they decode together; the real tasks' long answers
also decode 4 samples together, ``benchmark.batch_size=4``, with results identical to one at a
time):

* ``synthetic``: the four synthetic tasks x budgets 0.05, 0.1, 0.2 and 0.5 x context 512, 2048
  and 4096, 16 samples per task (64 per cell);
* ``multi_question``: four questions of one context, 8 contexts (32 questions) at 2048 tokens and
  budgets 0.1 and 0.2 (accuracy by question position);
* ``longbench``: LongBench multi_news at budget 0.2, context 2048, 30 samples;
* ``zeroscrolls``: the ZeroSCROLLS-format fixture's qasper and qmsum at budget 0.2, context 2048,
  20 samples each.

Every part runs ``protocol=question_aware,question_agnostic``.

``--budgets`` replaces every part's budgets with one list (a sweep over ``budget=``; the jobs of a
setting share each sample's prefill).

The LongBench and ZeroSCROLLS parts need their data (``../shared/data`` beside the repository by
default; ``--data ROOT`` points elsewhere) and are skipped with a note when it is missing.
Results go to ``results/<date>/runs`` (result.json and samples.jsonl per run; finished runs are
skipped and an interrupted run resumes at its first unanswered sample, so the matrix can be
completed in parts), the report to ``results/<date>/report``, and
``docs/results.md`` (the report's tables and figures, with n, wall time and machine; a
``results/<date>/NOTES.md``, when present, is quoted under its header).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from atskv.core.types import ConfigError
from atskv.experiments import results

ROOT = Path(__file__).resolve().parents[3]
SYNTHETIC_TASKS = "[single_needle,multi_key,multi_value,variable_tracking]"
PARTS = {
    "synthetic": ["benchmark=synthetic", f"benchmark.tasks={SYNTHETIC_TASKS}",
                  "benchmark.n_samples=16", "budget=0.05,0.1,0.2,0.5",
                  "context_len=512,2048,4096"],
    "multi_question": ["benchmark=synthetic", "benchmark.tasks=[multi_question]",
                       "benchmark.n_samples=8", "budget=0.1,0.2", "context_len=2048"],
    "longbench": ["benchmark=longbench", "benchmark.data_dir={data}/longbench",
                  "benchmark.tasks=[multi_news]", "benchmark.n_samples=30", "budget=0.2",
                  "context_len=2048", "benchmark.batch_size=4"],
    "zeroscrolls": ["benchmark=zeroscrolls", "benchmark.data_dir={data}/zero_scrolls",
                    "benchmark.tasks=[qasper,qmsum]", "benchmark.n_samples=20", "budget=0.2",
                    "context_len=2048", "benchmark.batch_size=4"],
}
COMMON = ["benchmark.split=test", "model=smollm2_135m", "hardware=cpu", "hardware.compile=false",
          "protocol=question_aware,question_agnostic", "wandb.mode=disabled"]


def methods(variant: str) -> list[str]:
    """The method options of a variant, from the registry: every registered method
    (``paper``), or each one's dev-tuned preset (``tuned``; a method without a preset in
    conf/method/tuned runs its defaults, with a note, and ``full`` has nothing to tune)."""
    from atskv.methods import METHODS

    if variant == "paper":
        return METHODS.names()
    have = {p.stem for p in (ROOT / "conf/method/tuned").glob("*.yaml")}
    missing = [m for m in METHODS.names() if m != "full" and m not in have]
    if missing:
        print(f"[results] no tuned preset for {', '.join(missing)} in conf/method/tuned: "
              f"{'it runs' if len(missing) == 1 else 'they run'} with the defaults "
              f"(`make tune METHOD=<name>` makes one)", file=sys.stderr)
    return [f"tuned/{m}" if m in have else m for m in METHODS.names() if m != "full"]


def parse_budgets(text: str | None) -> str | None:
    """``--budgets``: comma-separated fractions in (0, 1], returned as Hydra's sweep list."""
    if not text:
        return None
    try:
        values = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--budgets {text!r}: give comma-separated fractions, e.g. "
                          "0.05,0.1,0.25,0.5") from None
    if not values or any(not 0.0 < b <= 1.0 for b in values):
        raise ConfigError(f"--budgets {text!r}: every budget must be in (0, 1] (a fraction of "
                          "the prompt's KV cache)")
    return ",".join(f"{b:g}" for b in values)


def commands(out: Path, variants: list[str], parts: list[str], data: Path,
             extra: list[str], budgets: str | None = None) -> list[tuple[str, list[str]]]:
    cmds = []
    for part in parts:
        needs = {"longbench": "longbench", "zeroscrolls": "zero_scrolls"}.get(part)
        if needs and not (data / needs).is_dir():
            print(f"[results] skipping {part}: no data under {data}", file=sys.stderr)
            continue
        for variant in variants:
            # paths as run from the repository (the runs record them; committed files hold
            # no machine's absolute paths)
            args = [a.format(data=os.path.relpath(data, ROOT)) for a in PARTS[part]]
            if budgets:
                args = [f"budget={budgets}" if a.startswith("budget=") else a for a in args]
            cmds.append((f"{part}/{variant}", [
                sys.executable, "run.py", "-m", f"method={','.join(methods(variant))}",
                *args, *COMMON, f"hydra.sweep.dir={os.path.relpath(out / 'runs', ROOT)}",
                *extra]))
    return cmds


def write_docs(out: Path, log: list[dict], docs: Path) -> None:
    """docs/results.md: how the matrix was made (n, wall time, machine), then the report."""
    from atskv.analysis.report import generate_report

    rep = generate_report([out / "runs"], out / "report")
    figures = docs / "results"
    shutil.rmtree(figures, ignore_errors=True)
    shutil.copytree(out / "report" / "figures", figures / "figures")
    body = (out / "report" / "report.md").read_text().replace("](figures/", "](results/figures/")
    mach = results.provenance("cpu")  # this machine; the runs' own provenance below
    runs = [json.loads(p.read_text()) for p in (out / "runs").rglob("result.json")]
    n = sum(r.get("n_samples") or 0 for r in runs)
    prov = [r.get("provenance") or {} for r in runs]
    threads = sorted({str(p["torch_threads"]) for p in prov if p.get("torch_threads")})
    commits = sorted({results.short_commit(p.get("git_commit")) for p in prov})
    dirty = sum(1 for p in prov if str(p.get("git_commit")).endswith("-dirty"))
    head = [
        "# Results: every method, dev-tuned, in both protocols, on the test split", "",
        f"Made by `make results` (`python -m atskv.experiments.matrix`) into `{out.relative_to(ROOT)}`"
        f" on {mach['date'][:10]} (rendered at git {results.short_commit(mach['git_commit'])}; "
        f"the runs were made at git {', '.join(commits)}"
        f"{f', {dirty} of {len(runs)} from a dirty tree' if dirty else ''}): {len(runs)} runs, "
        f"{n} samples in all; wall time {sum(p['seconds'] for p in log) / 3600:.2f} h. Machine: "
        f"{mach['device_name']} CPU, {'/'.join(threads) or '?'} torch thread(s) per run "
        f"process, {mach['platform']}; torch {mach['versions']['torch']}, transformers "
        f"{mach['versions']['transformers']}; SmolLM2-135M-Instruct in float32. Every number "
        f"re-renders with `make report ARGS=\"--results {out.relative_to(ROOT)}/runs\"`.", "",
        "| part | wall time (min) | exit code |", "|---|---|---|",
        *[f"| {p['part']} | {p['seconds'] / 60:.1f} | {p['rc']} |" for p in log], "",
        "Timings were taken on a shared 2-core machine (see the load marks below); compare "
        "methods by the ratios inside one table, not across tables.", "",
    ]
    notes = out / "NOTES.md"  # what the person who made the matrix has to say about it
    if notes.is_file():
        head += [notes.read_text().strip(), ""]
    (docs / "results.md").write_text("\n".join(head) + body)
    print(f"[results] {len(rep.summary)} summary rows; wrote {docs / 'results.md'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m atskv.experiments.matrix",
                                description=__doc__.split("\n")[0])
    p.add_argument("--date", default=date.today().isoformat())
    p.add_argument("--variants", default="tuned")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--budgets", default=None, metavar="B,B,...",
                   help="budgets for every part (default: each part's own)")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--report-only", action="store_true", help="only re-render the report/docs")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    out = ROOT / "results" / args.date
    variants = [v for v in args.variants.split(",") if v]
    parts = [x for x in args.parts.split(",") if x]
    try:
        bad = [x for x in parts if x not in PARTS] + [v for v in variants if v not in ("paper", "tuned")]
        if bad:
            raise ConfigError(f"unknown part/variant {bad}; parts: {', '.join(PARTS)}; "
                              f"variants: paper, tuned")
        budgets = parse_budgets(args.budgets)
        cmds = [] if args.report_only else commands(out, variants, parts, Path(args.data),
                                                      args.overrides, budgets)
    except ConfigError as e:
        print(f"atskv.experiments.matrix: error: {e}", file=sys.stderr)
        return 2
    # one log per process, so that parts can run in parallel processes
    log_path = out / f"matrix_log_{'_'.join(variants)}_{'_'.join(parts)}.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else []
    for name, cmd in cmds:
        print("[results]", name, " ".join(cmd[2:]), flush=True)
        if args.dry_run:
            continue
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        log.append({"part": name, "seconds": time.perf_counter() - t0, "rc": rc,
                    "command": cmd[1:]})
        results.atomic_write_text(log_path, json.dumps(log, indent=1))
    if args.dry_run:
        return 0
    every = [e for f in sorted(out.glob("matrix_log_*.json")) for e in json.loads(f.read_text())]
    write_docs(out, every, Path(args.docs))
    return 0 if all(p["rc"] == 0 for p in log) else 1


if __name__ == "__main__":
    sys.exit(main())
