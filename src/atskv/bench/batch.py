"""``make bench``'s batch section: what decoding sequences together buys, and the throughput
that compression buys at a fixed memory budget.

Per context length, one prefill of the bench prompt; every batch is that prefill compressed once
per row (each row its own stores) and decoded with :meth:`Engine.generate_batch`
(``stop_at_eos=False``: every row decodes ``new_tokens`` tokens). Two measurements:

* **scaling**: each method's aggregate decode rate (tokens of all rows / the batch's decode time,
  compile steps left out) at each of ``batch_sizes``, and its ratio to the same method at batch
  size 1;
* **at a memory budget**: the budget is the KV a full cache holds for ``budget_seqs`` sequences
  (measured from the tensors, at the end of decoding); each method decodes the largest batch
  whose KV fits it (its bytes per sequence measured the same way; at most ``max_batch``), and
  its aggregate rate is given as a ratio to full's at full's batch.

Repetitions are interleaved over the methods (rep ``r`` rotates the method list by ``r - 1``);
medians over repetitions. A weight read once per step serves every row, so the rate grows with
the batch until the KV the rows read dominates the step: the smaller a method's KV, the further
it grows, and the more rows fit the budget.
"""

from __future__ import annotations

import statistics
from typing import Any

from atskv.core.engine import Request

#: the batch section's defaults
BATCH_SIZES = [1, 8]
BUDGET_SEQS = 4
MAX_BATCH = 64


def decode_batch(engine: Any, pre: Any, method: Any, batch: int,
                 new_tokens: int) -> dict[str, Any]:
    """``batch`` rows of ``method`` over one prefill, decoded together: the aggregate decode
    rate and the KV bytes a row holds."""
    outs = engine.generate_batch([Request(pre, method, new_tokens, stop_at_eos=False)
                                  for _ in range(batch)])
    seconds = max(o.decode_s for o in outs)
    tokens = sum(o.decode_tokens for o in outs)
    return {"batch": batch, "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "decode_s": seconds, "kv_bytes_per_seq": outs[0].kv_bytes_peak,
            "compile_s": max(o.stats["compile_s"] for o in outs)}


def run_batch(engine: Any, methods: dict[str, Any], prompts: dict[int, list[int]],
              batch_sizes: list[int], budget_seqs: int, max_batch: int, reps: int,
              new_tokens: int, log: Any) -> dict[str, Any]:
    """The section's rows: ``scaling`` (method, context length, batch size) and ``budget``
    (method, context length)."""
    names = list(methods)
    scaling, budget = [], []
    for ctx, ids in prompts.items():
        pre = engine.prefill(ids, max(m.queries_needed() for m in methods.values()))
        per_seq = {}
        for n in names:  # warm-up (compiles for batch size 1) and the bytes a row holds
            per_seq[n] = decode_batch(engine, pre, methods[n], 1, new_tokens)["kv_bytes_per_seq"]
        full_bytes = per_seq.get("full") or max(per_seq.values())
        fits = {n: max(1, min(max_batch, int(budget_seqs * full_bytes // per_seq[n])))
                for n in names}
        sizes = {n: sorted({*batch_sizes, fits[n]}) for n in names}
        for n in names:
            for b in sizes[n]:  # warm-up: a fixed batch compiles once per batch size
                decode_batch(engine, pre, methods[n], b, 2)
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in range(reps):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                for b in sizes[n]:
                    runs.setdefault((n, b), []).append(
                        decode_batch(engine, pre, methods[n], b, new_tokens))
            log(f"batch section ctx {ctx}: rep {r + 1}/{reps} done")
        rate = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in runs.items()}
        for n in names:
            for b in batch_sizes:
                scaling.append({"method": n, "context_len": ctx, "batch": b,
                                "tokens_per_s": rate[(n, b)],
                                "x_batch_1": (rate[(n, b)] / rate[(n, 1)]
                                              if (n, 1) in rate else None),
                                "kv_bytes": per_seq[n] * b})
        ref = rate.get(("full", fits.get("full", 0)))
        for n in names:
            budget.append({"method": n, "context_len": ctx, "kv_bytes_per_seq": per_seq[n],
                           "budget_bytes": budget_seqs * full_bytes, "batch": fits[n],
                           "capped": fits[n] == max_batch,
                           "tokens_per_s": rate[(n, fits[n])],
                           "x_full": rate[(n, fits[n])] / ref if ref else None})
    return {"scaling": scaling, "budget": budget}


def render(section: dict[str, Any]) -> list[str]:
    mib = 2.0**20
    lines = ["", "## Decoding sequences together", "",
             f"Aggregate decode tokens/s of a batch of rows (one prefill, each row its own "
             f"compressed copy, {section['new_tokens']} new tokens each), median of "
             f"{section['reps']} interleaved rep(s); ×B=1: against the same method alone.", "",
             "| Method | ctx | batch | tok/s | ×B=1 | KV MiB |", "|---|---|---|---|---|---|"]
    for r in section["rows"]["scaling"]:
        lines.append(f"| {r['method']} | {r['context_len']} | {r['batch']} | "
                     f"{_f(r['tokens_per_s'], 2)} | {_f(r['x_batch_1'], 2)} | "
                     f"{r['kv_bytes'] / mib:.1f} |")
    lines += ["", f"### Throughput at a memory budget ({section['budget_seqs']} full-cache "
                  "sequences of KV)", "",
              "The largest batch whose KV fits the budget (KV per sequence measured at the end "
              f"of decoding; at most {section['max_batch']} rows), and its aggregate rate against "
              "full's at full's batch, in this run.", "",
              "| Method | ctx | KV/seq MiB | batch | tok/s | ×full |", "|---|---|---|---|---|---|"]
    for r in section["rows"]["budget"]:
        cap = " (cap)" if r["capped"] else ""
        lines.append(f"| {r['method']} | {r['context_len']} | {r['kv_bytes_per_seq'] / mib:.2f} | "
                     f"{r['batch']}{cap} | {_f(r['tokens_per_s'], 2)} | {_f(r['x_full'], 2)} |")
    return lines


def plot(section: dict[str, Any], path: Any) -> None:
    """Aggregate tokens/s against the batch's KV MiB, one line per method (scaling rows and the
    budget's batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens = sorted({r["context_len"] for r in section["rows"]["scaling"]})
    fig, axes = plt.subplots(1, len(lens), figsize=(6 * len(lens), 4.5), squeeze=False)
    for ax, ctx in zip(axes[0], lens):
        points: dict[str, list[tuple[float, float]]] = {}
        for r in section["rows"]["scaling"] + section["rows"]["budget"]:
            if r["context_len"] == ctx and r["tokens_per_s"]:
                kv = r.get("kv_bytes") or r["kv_bytes_per_seq"] * r["batch"]
                points.setdefault(r["method"], []).append((kv / 2**20, r["tokens_per_s"]))
        for name, pts in sorted(points.items()):
            pts = sorted(set(pts))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("KV of the batch (MiB)")
        ax.set_ylabel("decode tokens/s (all rows)")
        ax.set_title(f"context {ctx}")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(x: float | None, dec: int) -> str:
    return "n/a" if x is None else f"{x:.{dec}f}"
