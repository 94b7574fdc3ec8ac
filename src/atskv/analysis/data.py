"""Loading for :mod:`atskv.analysis.report`: result records, run keys, the matching ``full`` run,
method order, labels, sections and samples.

Two runs are like with like when they share :data:`SETTING` (benchmark, the data it read,
protocol, model, hardware, dtype, split, tasks, samples requested, context length, seed). A
run's key adds the method, its non-default hyperparameters and its budget / kv_size; the
``full`` run a method is compared with matches every :data:`SETTING` field, so a ratio never
crosses protocol, hardware, dtype, split, task set or sample count, and a section (one per
:data:`SECTION` value) never holds two protocols or two data sources.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atskv.analysis import labels
from atskv.analysis.notes import Notes

FULL = "full"
PROMPT = "prompt"  # budget_of of runs whose budget is a fraction of the prompt's KV cache
SETTING = ["benchmark", "data", "protocol", "model", "hardware", "dtype", "split", "tasks",
           "n_requested", "context_len", "seed"]
KEY = ["method", "hparams"] + SETTING + ["budget", "kv_size"]
SECTION = [c for c in SETTING if c not in ("context_len", "seed")]
NUMERIC = ["context_len", "budget", "kv_size", "seed", "n_samples", "accuracy",
           "kv_cache_bytes", "kv_cache_bytes_after_compression", "kv_cache_bytes_uncompressed",
           "kv_cache_bytes_prefill", "decode_kv_read_bytes", "peak_memory_bytes", "ttft_s",
           "decode_tokens_per_s", "prefill_s", "compress_s", "needle_recall", "kept_mean",
           "kept_min", "kept_max"]
TEXT = ["method", "hparams", "benchmark", "data", "protocol", "model", "status", "error",
        "peak_memory_kind", "hardware", "dtype", "split", "tasks", "n_requested", "preset",
        "model_path", "started_at", "finished_at"]
OBJECT = ["task_scores", "task_metrics", "task_aggregation", "task_scores_by_bucket",
          "accuracy_by_position", "fresh_process", "oversubscribed", "machine_load", "path",
          "tuned"]
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


def _pick(rec: dict, top: str, *path):
    """The top-level field, else the same value from the resolved config."""
    v = rec.get(top)
    return labels.config_value(rec, *path) if v is None and path else v


def hparams(rec: dict) -> str:
    """The run's non-default method hyperparameters as ``k=v,k=v`` ("" when all are defaults):
    ``config.method`` minus ``name`` (and ``budget`` / ``kv_size``, already in the key),
    compared with the method dataclass's defaults, in field order. For a method that is not
    registered (no defaults known) every hyperparameter counts, so distinct configurations
    never merge."""
    from atskv.methods import METHODS

    if str(rec.get("method_preset") or "").startswith("tuned/"):
        return "tuned"  # the dev-tuned preset (its values are in the run's config)
    cfg = labels.config_value(rec, "method")
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
    rec["protocol"] = labels.protocol_of(rec)
    rec["data"] = labels.data_label(rec)
    rec["tuned"] = labels.is_tuned(rec)
    rec["preset"] = labels.preset_label(rec, rec["hparams"])
    rec["model_path"] = str(labels.config_value(rec, "model", "path") or "")
    rec["hardware"] = str(_pick(rec, "hardware", "hardware", "name") or "unknown")
    rec["dtype"] = str(_pick(rec, "dtype", "hardware", "dtype") or "unknown")
    rec["split"] = str(_pick(rec, "split", "benchmark", "split") or "all")
    tasks = _pick(rec, "tasks", "benchmark", "tasks")
    rec["tasks"] = ",".join(sorted(str(t) for t in tasks)) if isinstance(tasks, list) else ""
    # samples asked for: config.benchmark.n_samples (per task; null = all) when recorded,
    # since the top-level n_samples counts the samples actually run (fewer in a failed run)
    bench = labels.config_value(rec, "benchmark")
    n = bench["n_samples"] if isinstance(bench, dict) and "n_samples" in bench else rec.get("n_samples")
    rec["n_requested"] = "all" if n is None else str(n)
    if rec.get("kv_size") is None and labels.config_value(rec, "kv_size") is not None:
        rec["kv_size"] = labels.config_value(rec, "kv_size")
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


def load_results(dirs: list[str | Path]) -> tuple[pd.DataFrame, Notes, list[str]]:
    """All result.json under ``dirs`` (recursively) under the prompt budget meaning, one kept
    per KEY: a successful run before a failed one, then the newest. Returns (runs, notes,
    paths of the runs under the old budget meaning, which are left out)."""
    notes, files = Notes(), {}
    for d in dirs:
        if not Path(d).is_dir():
            notes.add(f"Results folder `{d}` does not exist; skipped.")
            continue
        for f in sorted(Path(d).rglob("result.json")):
            files.setdefault(f.resolve(), f)
    groups: dict[tuple, list[dict]] = {}
    old = []
    for f in files.values():
        try:
            rec = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            notes.add(f"Skipped unreadable `{f}`: {e}")
            continue
        if not isinstance(rec, dict) or not rec.get("method") or not rec.get("benchmark"):
            notes.add("Skipped: not a result record (no method/benchmark)", shown_path(f))
            continue
        if rec.get("budget_of") != PROMPT:
            old.append(str(f))
            continue
        rec["path"] = shown_path(f)
        groups.setdefault(key(normalize(rec)), []).append(rec)
    kept = []
    for recs in groups.values():
        # a successful run beats a failed one, then the newest wins
        recs.sort(key=lambda r: (r.get("status") == "ok", when(r.get("finished_at"))))
        kept.append(recs[-1])
        for r in recs[:-1]:
            full = " (`full` ignores the budget: a sweep over budgets runs it once per budget)" \
                if r.get("method") == FULL else ""
            notes.add("Duplicate runs (same method, hyperparameters, setting, budget and seed): "
                      f"the successful, newest one of each is kept{full}", r["path"])
    df = pd.DataFrame(kept)
    for c in TEXT + NUMERIC + OBJECT:
        if c not in df:
            df[c] = None
    for c in NUMERIC:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df["status"] = df["status"].fillna("missing")
    df["hparams"] = df["hparams"].fillna("")
    return df, notes, old


def order(names) -> list:
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

    return sorted(set(names), key=sort_key)


def _size(b, k) -> str:
    """A run's budget as shown: ``0.2`` (fraction of the prompt's KV), ``kv256``, or ``""``."""
    if pd.notna(k):
        return f"kv{int(k)}"
    return "" if pd.isna(b) else f"{b:g}"


def _labels(ok: pd.DataFrame) -> list[str]:
    sizes = {m: {_size(b, k) for b, k in zip(g["budget"], g["kv_size"], strict=True)}
             for m, g in ok.groupby("method")}
    return [v + (f"@{_size(b, k)}" if len(sizes[m]) > 1 else "")
            for m, v, b, k in zip(ok["method"], ok["variant"], ok["budget"], ok["kv_size"],
                                  strict=True)]


def sections(ok: pd.DataFrame) -> list[str]:
    """Section titles: the data (benchmark and source) and the protocol, plus whichever of
    model, hardware/dtype, split, tasks and samples asked for differ between runs (of the same
    data for the last two)."""
    many = {c: ok[c].nunique() > 1 for c in ("model", "split")}
    many["hw"] = ok[["hardware", "dtype"]].drop_duplicates().shape[0] > 1
    per_data = ok.groupby("data")[["tasks", "n_requested"]].nunique()
    titles = []
    for r in ok.itertuples(index=False):
        extra = [r.model] if many["model"] else []
        if many["hw"]:
            extra.append(f"{r.hardware}, {r.dtype}")
        if many["split"]:
            extra.append(f"split {r.split}")
        if per_data.loc[r.data, "tasks"] > 1:
            tasks = r.tasks or "default tasks"
            extra.append(f"tasks {tasks if len(tasks) <= 60 else tasks[:57] + '...'}")
        if per_data.loc[r.data, "n_requested"] > 1:
            extra.append(f"n={r.n_requested}")
        head = f"{r.data}, {labels.PROTOCOL_SHORT.get(r.protocol, r.protocol)}"
        titles.append(f"{head} ({'; '.join(extra)})" if extra else head)
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


def prepare(ok: pd.DataFrame, notes: Notes | None = None) -> tuple[pd.DataFrame, Notes]:
    """Variants, labels, sections, MiB columns and the reductions vs the matching ``full`` run
    (KV memory: vs the run's own ``kv_cache_bytes_uncompressed`` when there is none;
    ``memory_reduction_ref`` says which)."""
    notes = Notes() if notes is None else notes
    ok = ok.copy()
    for c in set(TEXT + NUMERIC + OBJECT) - set(ok.columns):
        ok[c] = None
    fill = {"hardware": "unknown", "dtype": "unknown", "split": "all", "tasks": "",
            "n_requested": "all", "hparams": "", "protocol": labels.QUESTION_AWARE,
            "preset": labels.PAPER, "model_path": ""}
    for c, v in fill.items():
        ok[c] = ok[c].fillna(v)
    ok["data"] = ok["data"].fillna(ok["benchmark"])
    for c in ("fresh_process", "oversubscribed", "tuned"):  # only a recorded true counts
        ok[c] = ok[c].map(lambda v: isinstance(v, (bool, np.bool_)) and bool(v)).astype(bool)
    where = ok["path"].where(ok["path"].notna(), ok["method"])
    for p in where[ok["context_len"].isna()]:
        notes.add("Left out: no context_len", str(p))
    ok = ok[ok["context_len"].notna()].assign(seed=ok["seed"].fillna(0))
    ok["variant"] = [m + (f"[{hp}]" if hp else "") for m, hp in
                     zip(ok["method"], ok["hparams"], strict=True)]
    ok["size"] = [_size(b, k) for b, k in zip(ok["budget"], ok["kv_size"], strict=True)]
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
    kv = ok["kv_cache_bytes"].to_numpy(dtype=float)
    vs_full = _reduction(kv, ok["full_kv"].to_numpy(dtype=float), everything, is_full)
    own = _reduction(kv, ok["kv_cache_bytes_uncompressed"].to_numpy(dtype=float), everything,
                     is_full)
    use_own = ~np.isfinite(vs_full) & np.isfinite(own)
    ok["memory_reduction_pct"] = np.where(use_own, own, vs_full)
    ok["memory_reduction_ref"] = np.where(use_own, "own", np.where(np.isfinite(vs_full), FULL, ""))
    same_kind = (ok["peak_memory_kind"] == ok["full_kind"]).to_numpy()
    rss = (ok["peak_memory_kind"] == RSS).to_numpy()
    fresh = (ok["fresh_process"] & (ok["full_fresh"] == True)).to_numpy()  # noqa: E712
    comparable = same_kind & (~rss | fresh | is_full)
    ok["peak_memory_reduction_pct"] = _reduction(ok["peak_memory_bytes"].to_numpy(),
                                                 ok["full_peak"].to_numpy(dtype=float),
                                                 comparable, is_full)
    for p in ok.loc[ok["full_path"].isna() & ~is_full, "path"]:
        notes.add("No `full` run of the same setting (benchmark, data, protocol, model, hardware, "
                  "dtype, split, tasks, samples, context length, seed): Δ vs full is n/a and "
                  "memory reduction is taken against the run's own `kv_cache_bytes_uncompressed`",
                  str(p))
    has = ok["peak_memory_bytes"].notna().to_numpy() & ok["full_peak"].notna().to_numpy()
    for mask, why in (
        (has & ~same_kind, "Peak memory reduction is n/a where a run and its `full` run measured "
                           "peak memory differently (`peak_memory_kind`)"),
        (has & same_kind & rss & ~fresh & ~is_full,
         "Peak memory reduction is n/a where the process peak RSS (CPU) is not both runs' own "
         "(`fresh_process: true` in each): a process's peak RSS never shrinks, so a later job of "
         "a sweep reports the largest peak of every job before it")):
        for p in ok.loc[mask, "path"]:
            notes.add(why, str(p))
    return ok, notes
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
