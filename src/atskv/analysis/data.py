"""Loading for :mod:`atskv.analysis.report`: result records, run keys, the matching ``full`` run,
method order, labels, sections and samples.

Two runs are like with like when they share :data:`SETTING` (benchmark, model, hardware,
dtype, split, tasks, samples requested, context length, seed). A run's key adds the method,
its non-default hyperparameters and its budget / kv_size; the ``full`` run a method is
compared with matches every :data:`SETTING` field, so a ratio never crosses hardware, dtype,
split, task set or sample count.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FULL = "full"
PROMPT = "prompt"  # budget_of of runs whose budget is a fraction of the prompt's KV cache
SETTING = ["benchmark", "model", "hardware", "dtype", "split", "tasks", "n_requested",
           "context_len", "seed"]
KEY = ["method", "hparams"] + SETTING + ["budget", "kv_size"]
SECTION = [c for c in SETTING if c not in ("context_len", "seed")]
NUMERIC = ["context_len", "budget", "kv_size", "seed", "n_samples", "accuracy",
           "kv_cache_bytes", "kv_cache_bytes_after_compression", "kv_cache_bytes_uncompressed",
           "kv_cache_bytes_prefill", "decode_kv_read_bytes", "peak_memory_bytes", "ttft_s",
           "decode_tokens_per_s", "prefill_s", "compress_s", "needle_recall", "kept_mean",
           "kept_min", "kept_max"]
TEXT = ["method", "hparams", "benchmark", "model", "status", "error", "peak_memory_kind",
        "hardware", "dtype", "split", "tasks", "n_requested", "started_at", "finished_at"]
OBJECT = ["task_scores", "task_metrics", "task_aggregation", "task_scores_by_bucket",
          "fresh_process", "oversubscribed", "machine_load", "path"]
MIB = float(2**20)
RSS = "process_peak_rss"


def shown_path(path: Any) -> str:
    """``path`` relative to the working folder when it lies inside it (a report names no
    machine's absolute paths), else as given."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def method_order() -> list[str]:
    """``full`` first, then the registered methods in ``METHODS.names()`` order; methods
    that are not registered sort after these (alphabetically)."""
    from atskv.methods import METHODS

    return [FULL] + [m for m in METHODS.names() if m != FULL]


def when(value) -> pd.Timestamp:
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


def _cfg(rec: dict, *path):
    node = rec.get("config")
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def _pick(rec: dict, top: str, *path):
    """The top-level field, else the same value from the resolved config."""
    v = rec.get(top)
    return _cfg(rec, *path) if v is None and path else v


def hparams(rec: dict) -> str:
    """The run's non-default method hyperparameters as ``k=v,k=v`` ("" when all are defaults):
    ``config.method`` minus ``name`` (and ``budget`` / ``kv_size``, already in the key),
    compared with the method dataclass's defaults, in field order. For a method that is not
    registered (no defaults known) every hyperparameter counts, so distinct configurations
    never merge."""
    from atskv.methods import METHODS

    if str(rec.get("method_preset") or "").startswith("tuned/"):
        return "tuned"  # the dev-tuned preset (its values are in the run's config)
    cfg = _cfg(rec, "method")
    if not isinstance(cfg, dict):
        return ""
    given = {k: v for k, v in cfg.items() if k not in ("name", "budget", "kv_size", "budget_of")}
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


def normalize(rec: dict) -> dict:
    """Fill the key fields in place (top-level fields first, then the config)."""
    rec["hparams"] = hparams(rec)
    rec["hardware"] = str(_pick(rec, "hardware", "hardware", "name") or "unknown")
    rec["dtype"] = str(_pick(rec, "dtype", "hardware", "dtype") or "unknown")
    rec["split"] = str(_pick(rec, "split", "benchmark", "split") or "all")
    tasks = _pick(rec, "tasks", "benchmark", "tasks")
    rec["tasks"] = ",".join(sorted(str(t) for t in tasks)) if isinstance(tasks, list) else ""
    # samples asked for: config.benchmark.n_samples (per task; null = all) when recorded,
    # since the top-level n_samples counts the samples actually run (fewer in a failed run)
    bench = _cfg(rec, "benchmark")
    n = bench["n_samples"] if isinstance(bench, dict) and "n_samples" in bench else rec.get("n_samples")
    rec["n_requested"] = "all" if n is None else str(n)
    if rec.get("kv_size") is None and _cfg(rec, "kv_size") is not None:
        rec["kv_size"] = _cfg(rec, "kv_size")
    if rec.get("method") == FULL:  # the full cache keeps everything: one run per setting
        rec["budget"] = rec["kv_size"] = None
    kept = rec.get("prompt_tokens_kept")
    kept = kept if isinstance(kept, dict) else {}
    rec["kept_mean"], rec["kept_min"], rec["kept_max"] = (kept.get(k) for k in ("mean", "min", "max"))
    load = rec.get("machine_load")
    rec["oversubscribed"] = bool(load.get("oversubscribed")) if isinstance(load, dict) else False
    rec["fresh_process"] = rec.get("fresh_process") is True
    return rec


def key(rec: dict) -> tuple:
    cast = {"context_len": int, "seed": int, "budget": float, "kv_size": int}
    return tuple(_norm(rec.get(k), cast[k]) if k in cast else rec.get(k, "") for k in KEY)


def load_results(dirs: list[str | Path]) -> tuple[pd.DataFrame, list[str], list[str]]:
    """All result.json under ``dirs`` (recursively) under the prompt budget meaning, one kept
    per KEY: a successful run before a failed one, then the newest. Returns (runs, notes,
    paths of the runs under the old budget meaning, which are left out)."""
    notes, files = [], {}
    for d in dirs:
        if not Path(d).is_dir():
            notes.append(f"Results folder `{d}` does not exist; skipped.")
            continue
        for f in sorted(Path(d).rglob("result.json")):
            files.setdefault(f.resolve(), f)
    groups: dict[tuple, list[dict]] = {}
    old = []
    for f in files.values():
        try:
            rec = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            notes.append(f"Skipped unreadable `{f}`: {e}")
            continue
        if not isinstance(rec, dict) or not rec.get("method") or not rec.get("benchmark"):
            notes.append(f"Skipped `{f}`: not a result record (no method/benchmark).")
            continue
        if rec.get("budget_of") != PROMPT:
            old.append(str(f))
            continue
        rec["path"] = shown_path(f)
        groups.setdefault(key(normalize(rec)), []).append(rec)
    kept = []
    for k, recs in groups.items():
        # a successful run beats a failed one, then the newest wins
        recs.sort(key=lambda r: (r.get("status") == "ok", when(r.get("finished_at"))))
        kept.append(recs[-1])
        if len(recs) > 1:
            desc = ", ".join(f"{n}={v}" for n, v in zip(KEY, k, strict=True) if v not in ("", None))
            which = ("the newest" if all(when(r.get("finished_at")) <= when(recs[-1].get("finished_at"))
                                         for r in recs) else "the newest successful run")
            dropped = "; ".join(f"`{r['path']}` ({r.get('status')}, {r.get('finished_at')})"
                                for r in recs[:-1])
            notes.append(f"Duplicate run ({desc}): kept {which} `{recs[-1]['path']}` "
                         f"({recs[-1].get('status')}, finished_at {recs[-1].get('finished_at')}); "
                         f"dropped {dropped}.")
    df = pd.DataFrame(kept)
    for c in TEXT + NUMERIC + OBJECT:
        if c not in df:
            df[c] = None
    for c in NUMERIC:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df["status"] = df["status"].fillna("missing")
    df["hparams"] = df["hparams"].fillna("")
    return df, notes, old


def order(labels) -> list:
    """Labels (``method[k=v,...]@budget`` or ``...@kv<size>``, both parts optional) in
    :func:`method_order`, then default hyperparameters first, then budgets, then kv sizes."""
    rank = {m: i for i, m in enumerate(method_order())}

    def sort_key(lab: str):
        head, _, b = str(lab).rpartition("@") if "@" in str(lab) else (str(lab), "", "")
        m, _, hp = head.partition("[")
        kv = b.startswith("kv")
        try:
            v = float(b[2:] if kv else b) if b else -1.0
        except ValueError:
            v = -1.0
        return (rank.get(m, len(rank)), m, hp.rstrip("]"), kv, v)

    return sorted(set(labels), key=sort_key)


def _labels(ok: pd.DataFrame) -> list[str]:
    def size(b, k) -> str:
        if pd.notna(k):
            return f"@kv{int(k)}"
        return "" if pd.isna(b) else f"@{b:g}"

    sizes = {m: {size(b, k) for b, k in zip(g["budget"], g["kv_size"], strict=True)}
             for m, g in ok.groupby("method")}
    return [(m + (f"[{hp}]" if hp else "")) + (size(b, k) if len(sizes[m]) > 1 else "")
            for m, hp, b, k in zip(ok["method"], ok["hparams"], ok["budget"], ok["kv_size"],
                                   strict=True)]


def sections(ok: pd.DataFrame) -> list[str]:
    """Section titles: the benchmark, plus whichever of model, hardware/dtype, split, tasks
    and samples asked for differ between runs (of the same benchmark for the last two)."""
    many = {c: ok[c].nunique() > 1 for c in ("model", "split")}
    many["hw"] = ok[["hardware", "dtype"]].drop_duplicates().shape[0] > 1
    per_bench = ok.groupby("benchmark")[["tasks", "n_requested"]].nunique()
    titles = []
    for r in ok.itertuples(index=False):
        extra = [r.model] if many["model"] else []
        if many["hw"]:
            extra.append(f"{r.hardware}, {r.dtype}")
        if many["split"]:
            extra.append(f"split {r.split}")
        if per_bench.loc[r.benchmark, "tasks"] > 1:
            tasks = r.tasks or "default tasks"
            extra.append(f"tasks {tasks if len(tasks) <= 60 else tasks[:57] + '...'}")
        if per_bench.loc[r.benchmark, "n_requested"] > 1:
            extra.append(f"n={r.n_requested}")
        titles.append(f"{r.benchmark} ({'; '.join(extra)})" if extra else str(r.benchmark))
    # two settings with the same title would be merged: keep them apart
    setting_of: dict[str, set] = {}
    for t, s in zip(titles, ok[SECTION].itertuples(index=False, name=None), strict=True):
        setting_of.setdefault(t, set()).add(s)
    numbered = {t: sorted(s) for t, s in setting_of.items() if len(s) > 1}
    return [f"{t} #{numbered[t].index(s) + 1}" if t in numbered else t
            for t, s in zip(titles, ok[SECTION].itertuples(index=False, name=None), strict=True)]


def _match_full(ok: pd.DataFrame) -> pd.DataFrame:
    """For every run, the matching full run's path, KV bytes, peak bytes, kind and freshness."""
    full = ok[ok["method"] == FULL]
    cols = {"path": "full_path", "kv_cache_bytes": "full_kv", "peak_memory_bytes": "full_peak",
            "peak_memory_kind": "full_kind", "fresh_process": "full_fresh",
            "task_aggregation": "full_aggregation", "accuracy": "full_accuracy"}
    # newest first: one full run per setting (hparams of full never differ in practice)
    ref = (full.sort_values("finished_at", key=lambda s: s.map(when), ascending=False)
           .drop_duplicates(SETTING)[SETTING + list(cols)].rename(columns=cols))
    return ok[SETTING].merge(ref, on=SETTING, how="left").set_index(ok.index)


def _reduction(val: np.ndarray, ref: np.ndarray, good: np.ndarray, is_full: np.ndarray) -> np.ndarray:
    ok = good & np.isfinite(ref) & (ref > 0) & np.isfinite(val)
    red = np.full(len(val), np.nan)
    red[ok] = 100.0 * (1.0 - val[ok] / ref[ok])
    red[ok & is_full] = 0.0  # exactly 0 by definition
    return red


def prepare(ok: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Labels, sections, MiB columns and the reductions vs the matching ``full`` run."""
    ok = ok.copy()
    for c in set(TEXT + NUMERIC + OBJECT) - set(ok.columns):
        ok[c] = None
    fill = {"hardware": "unknown", "dtype": "unknown", "split": "all", "tasks": "",
            "n_requested": "all", "hparams": ""}
    for c, v in fill.items():
        ok[c] = ok[c].fillna(v)
    for c in ("fresh_process", "oversubscribed"):  # only a recorded true counts
        ok[c] = ok[c].map(lambda v: isinstance(v, (bool, np.bool_)) and bool(v)).astype(bool)
    where = ok["path"].where(ok["path"].notna(), ok["method"])
    notes = [f"Left out `{p}`: no context_len." for p in where[ok["context_len"].isna()]]
    ok = ok[ok["context_len"].notna()].assign(seed=ok["seed"].fillna(0))
    ok["label"] = _labels(ok) if len(ok) else []
    ok["section"] = sections(ok) if len(ok) else []
    for src, dst in (("kv_cache_bytes", "kv_cache_mib"), ("peak_memory_bytes", "peak_memory_mib"),
                     ("decode_kv_read_bytes", "decode_kv_read_mib"),
                     ("kv_cache_bytes_prefill", "kv_prefill_mib")):
        ok[dst] = ok[src] / MIB
    ref = _match_full(ok)
    for c in ref.columns.difference(SETTING):
        ok[c] = ref[c]
    is_full = (ok["method"] == FULL).to_numpy()
    everything = np.ones(len(ok), dtype=bool)
    ok["memory_reduction_pct"] = _reduction(ok["kv_cache_bytes"].to_numpy(),
                                            ok["full_kv"].to_numpy(dtype=float), everything, is_full)
    same_kind = (ok["peak_memory_kind"] == ok["full_kind"]).to_numpy()
    rss = (ok["peak_memory_kind"] == RSS).to_numpy()
    fresh = (ok["fresh_process"] & (ok["full_fresh"] == True)).to_numpy()  # noqa: E712
    comparable = same_kind & (~rss | fresh | is_full)
    ok["peak_memory_reduction_pct"] = _reduction(ok["peak_memory_bytes"].to_numpy(),
                                                 ok["full_peak"].to_numpy(dtype=float),
                                                 comparable, is_full)
    missing = ok[ok["memory_reduction_pct"].isna()]
    for (s, c), g in missing.groupby(["section", "context_len"], dropna=False):
        seeds = ", ".join(f"{x:g}" for x in sorted(g["seed"].dropna().unique()))
        b, m = g["benchmark"].iloc[0], g["model"].iloc[0]
        where = "" if s == b else f" in section {s}"
        notes.append(f"Memory reduction is n/a for {b} / {m} at context length {c:g} "
                     f"(seed {seeds or '?'}){where}: no `full` run with kv_cache_bytes for "
                     "the same benchmark, model, hardware, dtype, split, tasks, samples, context "
                     f"length and seed ({', '.join(order(g['label']))}).")
    notes += _peak_notes(ok, same_kind, rss, fresh, is_full)
    return ok, notes


def _peak_notes(ok, same_kind, rss, fresh, is_full) -> list[str]:
    has = ok["peak_memory_bytes"].notna().to_numpy() & ok["full_peak"].notna().to_numpy()
    notes = []
    for mask, why in (
        (has & ~same_kind, "the method and its `full` run measured peak memory differently "
                           "(peak_memory_kind {kinds}); they are not comparable"),
        (has & same_kind & rss & ~fresh & ~is_full,
         "process peak RSS (CPU) compares only runs that were each the first job of a fresh "
         "process (`fresh_process: true` in both); a process's peak RSS never shrinks, so a "
         "later job reports the largest peak of every job before it (a five-method sweep in "
         "one CPU process once showed a fake -47 % for sliding_window this way)")):
        sel = ok[mask]
        for s, g in sel.groupby("section"):
            cells = ", ".join(f"{lab} at {c:g}" + (f" seed {sd:g}" if sd else "")
                              for lab, c, sd in zip(g["label"], g["context_len"], g["seed"],
                                                    strict=True))
            kinds = ", ".join(sorted({f"{a} vs full {b}" for a, b in
                                      zip(g["peak_memory_kind"], g["full_kind"], strict=True)}))
            notes.append(f"Peak memory reduction is n/a in {s} for {cells}: "
                         + why.format(kinds=kinds) + ".")
    return notes


def load_samples(result_path: str) -> tuple[list[dict] | None, str | None]:
    """The samples.jsonl next to a result.json: (rows, None) or (None, why not)."""
    f = Path(result_path).parent / "samples.jsonl"
    try:
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return None, f"no `{f}`"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"`{f}` is unreadable ({e})"
    if not rows or not all(isinstance(r, dict) and "task" in r and "score" in r for r in rows):
        return None, f"`{f}` has no samples with task and score"
    return rows, None
