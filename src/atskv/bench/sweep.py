"""``make bench``'s sweep section: what sharing the prefill saves a sweep.

The same sweep (every registered method, or those asked for, x budgets on one prompt per context
length) runs twice in this
process: **unshared** (every job prefills the prompt itself, as a sweep without sharing does) and
**shared** (one prefill, then every job compresses its own copy and decodes). Both use the same
engine calls the runner uses (:meth:`Engine.generate` vs :meth:`Engine.prefill` +
:meth:`Engine.generate_from`). Reported per context length: the wall time of each, their ratio
(the sweep speed-up), and whether every job's tokens and byte counters were identical.
"""

from __future__ import annotations

import time
from typing import Any

from atskv.metrics.timing import synchronize

SWEEP_BUDGETS = [0.1, 0.2]
SWEEP_LENS = [2048, 4096]
SAME = ("token_ids", "kv_bytes_peak", "kv_bytes_after_compression", "decode_kv_read_bytes")


def _record(out: Any) -> dict[str, Any]:
    rec = {k: getattr(out, k) for k in SAME}
    rec["prompt_tokens_kept"] = out.stats["prompt_tokens_kept"]
    return rec


def run_sweep(engine: Any, jobs: list[tuple[str, float, Any]], prompts: dict[int, list[int]],
              new_tokens: int, log: Any) -> list[dict[str, Any]]:
    """``jobs``: (method name, budget, method) triples. Returns one row per context length."""
    rows = []
    for ctx, ids in prompts.items():
        engine.generate(ids[:64], jobs[0][2], 2, stop_at_eos=False)  # warm, untimed
        synchronize(engine.device)
        t0 = time.perf_counter()
        alone = [_record(engine.generate(ids, m, new_tokens, stop_at_eos=False))
                 for _, _, m in jobs]
        synchronize(engine.device)
        unshared_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pre = engine.prefill(ids, max(m.queries_needed() for _, _, m in jobs))
        shared = [_record(engine.generate_from(pre, m, new_tokens, stop_at_eos=False))
                  for _, _, m in jobs]
        del pre
        synchronize(engine.device)
        shared_s = time.perf_counter() - t0
        same = [a == b for a, b in zip(alone, shared)]
        rows.append({"context_len": ctx, "jobs": len(jobs), "unshared_s": unshared_s,
                     "shared_s": shared_s, "speedup": unshared_s / shared_s,
                     "identical": all(same),
                     "different": [f"{n}@{b:g}" for (n, b, _), ok in zip(jobs, same) if not ok]})
        log(f"sweep ctx {ctx}: unshared {unshared_s:.1f}s, shared {shared_s:.1f}s, "
            f"x{unshared_s / shared_s:.2f}, identical={all(same)}")
    return rows


def render(section: dict[str, Any]) -> list[str]:
    lines = ["", "## Sweep with a shared prefill",
             "",
             f"{len(section['methods'])} methods ({', '.join(section['methods'])}) x budgets "
             f"{', '.join(f'{b:g}' for b in section['budgets'])} = {section['rows'][0]['jobs']} "
             f"jobs on one prompt, {section['new_tokens']} new tokens each; unshared: every job "
             "prefills; shared: one prefill, each job compresses its own copy. Same process, "
             "unshared first.",
             "",
             "| ctx | jobs | unshared s | shared s | speed-up | identical results |",
             "|---|---|---|---|---|---|"]
    for r in section["rows"]:
        lines.append(f"| {r['context_len']} | {r['jobs']} | {r['unshared_s']:.1f} | "
                     f"{r['shared_s']:.1f} | {r['speedup']:.2f} | "
                     f"{'yes' if r['identical'] else 'NO: ' + ', '.join(r['different'])} |")
    return lines
