"""``make bench``'s paired section: per-step decode time of each method against a reference
method, paired step by step, with a confidence interval.

The main section's rates come from a few repetitions of whole generations; on a noisy machine
they move by more than 5% between runs, which hides a 1-2% difference. Here, per context length
and round, every method compresses the same prefill afresh (the methods in a random order) and
then decodes ``steps`` steps, the methods' steps interleaved in a random order, so that a burst
of machine noise hits every method alike. Step ``i`` of a method is paired with step ``i`` of the
reference in the same round. Reported per method: its median step, the median of its paired
differences with the reference, and a 95% bootstrap interval of that median that resamples whole
rounds (a round's steps share its compression and its stretch of machine noise, so they are not
independent).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import numpy as np
import torch

from atskv.metrics.floor import step_bytes

LEVEL = 0.95
RESAMPLES = 2000
#: steps of each method and round before the timed ones: a first step may compile, and on CUDA
#: the first runs eagerly and the second is captured in a CUDA graph
UNTIMED = 2


def round_interval(diffs: list[list[float]], seed: int) -> tuple[float, float]:
    """A ``LEVEL`` bootstrap interval of the median of the pooled ``diffs`` (one list per round),
    resampling rounds."""
    rng = np.random.default_rng(seed)
    rounds = [np.asarray(d) for d in diffs]
    meds = [float(np.median(np.concatenate([rounds[i] for i in rng.integers(0, len(rounds),
                                                                             len(rounds))])))
            for _ in range(RESAMPLES)]
    lo, hi = np.quantile(meds, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(lo), float(hi)


def run_paired(engine: Any, methods: dict[str, Any], reference: str,
               prompts: dict[int, list[int]], rounds: int, steps: int, seed: int,
               log: Any) -> list[dict[str, Any]]:
    """One row per method and context length (the reference's own row included)."""
    names = list(methods)
    order_rng = random.Random(seed)
    rows = []
    for ctx, ids in prompts.items():
        pre = engine.prefill(ids, max(m.queries_needed() for m in methods.values()))
        first = int(torch.argmax(pre.logits))
        times: dict[str, list[list[float]]] = {n: [] for n in names}
        kv_read: dict[str, list[int]] = {n: [] for n in names}  # KV bytes of each timed step
        for r in range(rounds):
            with engine.stepping():
                steppers, tokens = {}, {}
                made = names[:]  # compressed in a random order too: no method always allocates
                order_rng.shuffle(made)  # its stores first (or last) in a round
                for n in made:
                    state = engine.compress(pre, methods[n], steps + UNTIMED + 1).state
                    steppers[n] = engine.stepper(methods[n], state, pre.prompt_len)
                    tokens[n] = first
                    for _ in range(UNTIMED):
                        tokens[n] = int(torch.argmax(steppers[n](tokens[n])[0]))
                    times[n].append([])
                for _ in range(steps):
                    order = names[:]
                    order_rng.shuffle(order)
                    for n in order:
                        t0 = time.perf_counter()
                        logits, read = steppers[n](tokens[n])
                        tokens[n] = int(torch.argmax(logits))  # a host sync
                        times[n][-1].append(time.perf_counter() - t0)
                        kv_read[n].append(read)
                del steppers
            log(f"paired ctx {ctx}: round {r + 1}/{rounds} done")
        del pre
        ref = times[reference]
        weights = step_bytes(engine.model, 0)
        ref_bytes = weights + statistics.mean(kv_read[reference])
        ref_ms = statistics.median(t * 1e3 for rd in ref for t in rd)
        for n in names:
            diffs = [[(b - a) * 1e3 for a, b in zip(ra, rb)] for ra, rb in zip(ref, times[n])]
            step_ms = statistics.median(t * 1e3 for rd in times[n] for t in rd)
            diff = statistics.median(d for rd in diffs for d in rd)
            lo, hi = round_interval(diffs, seed) if n != reference else (0.0, 0.0)
            kv = statistics.mean(kv_read[n])
            rows.append({"method": n, "context_len": ctx, "rounds": rounds, "steps": steps,
                         "median_step_ms": step_ms, "minus_reference_ms": diff,
                         "interval_ms": [lo, hi], "rate_x_reference": ref_ms / (ref_ms + diff),
                         "kv_read_bytes_per_step": kv, "floor_x_reference": ref_bytes / (weights + kv),
                         "step_s": times[n]})
    return rows


def render(section: dict[str, Any]) -> list[str]:
    ref = section["reference"]
    lines = ["", "## Paired decode steps",
             "",
             f"Per context length, {section['rounds']} rounds: every method compresses the same "
             f"prefill afresh, in a random order, then {section['steps']} decode steps of each, "
             f"interleaved in a random order. A method's step i is paired with {ref}'s step i of "
             f"the same round; the interval is a {LEVEL:.0%} bootstrap of the median difference, "
             "resampling rounds. rate ×ref = the reference's median step over (it + the median "
             "difference); an interval that contains 0 is no evidence of a difference. floor "
             "×ref = the reference's bytes per step over the method's (the weights and the mean "
             "KV a step read): the rate ×ref those bytes allow a step that reads at the "
             "machine's bandwidth.",
             "",
             f"| Method | ctx | median step ms | minus {ref} ms | {LEVEL:.0%} interval "
             "| rate ×ref | floor ×ref | KV read/step MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        lo, hi = r["interval_ms"]
        if r["method"] == ref:
            diff, interval = "(reference)", ""
        else:
            diff, interval = f"{r['minus_reference_ms']:+.3f}", f"[{lo:+.3f}, {hi:+.3f}]"
        lines.append(f"| {r['method']} | {r['context_len']} | {r['median_step_ms']:.2f} | "
                     f"{diff} | {interval} | {r['rate_x_reference']:.3f} | "
                     f"{r['floor_x_reference']:.3f} | {r['kv_read_bytes_per_step'] / 2**20:.3f} |")
    return lines
