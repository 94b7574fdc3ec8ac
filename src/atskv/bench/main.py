"""The performance protocol (``make bench``): every method against the full cache, in one process.

    python -m atskv.bench [--methods full,atskv,...] [--context-lens 512,1024,2048,4096]
                          [--budget 0.2] [--reps 3] [--new-tokens 32]
                          [--model smollm2_135m|tiny_random|<conf/model preset>]
                          [--device cpu|cuda] [--out outputs/bench] [--quick]

Protocol:

1. The model loads once. Each context length gets one deterministic prompt of exactly that many
   tokens (the synthetic benchmark's ``single_needle`` sample, seed ``--seed``).
2. Every method's engine, and transformers' ``generate()``, is warmed up once (a short
   generation), and once more at each context length before its timed samples (untimed, 2 new
   tokens: first-call costs at a new size, such as allocator growth, stay out of the samples).
3. Per context length, ``--reps`` interleaved repetitions: rep 1 runs full, m1, m2, ...,
   ``generate()``; rep ``r`` runs the same list rotated by ``r - 1``. Drift (other processes,
   clocks, thermals) therefore hits every entrant alike, and no entrant is always first.
4. Each sample: TTFT (prefill + compression + first token), decode tokens/s (``stop_at_eos=False``:
   every method decodes exactly ``--new-tokens`` tokens), the KV bytes the cache held (peak over
   decoding, measured from the tensors), the KV bytes one decode step reads (mean over steps),
   and peak memory over the call (:class:`atskv.metrics.PeakMemory`: CUDA allocator peak, or the
   process's peak RSS on CPU; ``peak_memory_delta_bytes`` is that peak minus the level at the
   start of the call).
5. Per (method, context length): the median over reps, and ratios to full **of this run**:
   ``median(method) / median(full)`` at the same context length. Growth with context length:
   the factor between the largest and the smallest context length, and the log-log slope
   (least squares of log(value) on log(context length): 1 = linear, 0 = flat).

Framework overhead: our full-cache decode loop against transformers' own ``generate()`` (greedy,
its DynamicCache and default attention, ``min_new_tokens = max_new_tokens`` so it never stops
early) on the same model and prompt, interleaved with the methods. ``generate()``'s decode rate is
taken inside the call: a LogitsProcessor stamps the (device-synchronised) time each step's logits
arrive; the first stamp follows the prefill forward, the last the final forward, so
``(n - 1) / (last - first)`` is its decode rate, the same span the engine's ``decode_s`` covers.
This avoids subtracting a separately measured prefill from the total, a difference of two noisy
numbers that is dominated by the prefill at long contexts. The overhead ratio is
``our tokens/s / generate tokens/s`` (> 1: our loop is faster).

Writes ``bench.json`` (every sample, the medians, ratios, growth, overhead, machine info) and
``bench.md`` into ``--out`` (atomically), prints the table and the output folder.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from atskv.core import kernels
from atskv.core.types import ConfigError
from atskv.experiments import models, results

FULL = "full"
HF = "hf_generate"  # transformers' own generate(), the overhead reference
CPU_LENS = [512, 1024, 2048, 4096]
CUDA_LENS = [4096, 8192, 16384, 32768]
CUDA_LONG_LENS = [65536, 131072]
QUICK_LENS = [256, 512]
QUICK_MODEL = "tiny_random"
SECTIONS = ("main", "paired", "sweep", "batch")
MIB = float(2**20)
# (row field, what a larger value means for growth) - the metrics ratios and growth cover
METRICS = [("ttft_s", "TTFT"), ("decode_tokens_per_s", "decode tok/s"), ("kv_bytes", "KV"),
           ("kv_read_bytes_per_step", "KV read/step"), ("peak_memory_bytes", "peak mem")]
RATIO_NAMES = {"ttft_s": "ttft_x_full", "decode_tokens_per_s": "decode_x_full",
               "decode_step_tokens_per_s": "decode_step_x_full",
               "kv_bytes": "kv_x_full", "kv_read_bytes_per_step": "kv_read_x_full",
               "peak_memory_bytes": "peak_memory_x_full",
               "peak_memory_delta_bytes": "peak_memory_delta_x_full"}


# ----------------------------------------------------------------------------- setup
def _csv(text: str, cast=str) -> list:
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from e


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m atskv.bench",
        description="The performance protocol: ratios to full, one run. Run settings (model, "
                    "hardware, budget, seed, ...) are Hydra overrides, as for run.py.")
    p.add_argument("--methods", type=_csv, default=None,
                   help="comma-separated (default: every registered method); full is always "
                        "run. A variant of a method: NAME:KEY=VALUE[:KEY=VALUE...], e.g. "
                        "atskv:max_pages=16 (method.KEY overrides; its own row)")
    p.add_argument("--context-lens", type=lambda s: _csv(s, int), default=None,
                   help=f"comma-separated prompt lengths (default: {CPU_LENS} on CPU, "
                        f"{CUDA_LENS} on CUDA)")
    p.add_argument("--long", action="store_true",
                   help=f"on CUDA, also {CUDA_LONG_LENS} by default (where the model fits them)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="tokens generated per sample (default 32)")
    p.add_argument("--sections", type=_csv, default=["main", "sweep"],
                   help="main (every method vs full), paired (every method's decode steps "
                        "paired with a reference method's, with an interval), sweep (a sweep "
                        "with and without a shared prefill), batch (decoding sequences together: "
                        "scaling with the batch, and throughput at a memory budget); default "
                        "main,sweep")
    p.add_argument("--paired-ref", default=FULL,
                   help="the paired section's reference method, one of --methods (default full)")
    p.add_argument("--paired-rounds", type=int, default=None,
                   help="the paired section's rounds per context length (default 10)")
    p.add_argument("--paired-steps", type=int, default=None,
                   help="the paired section's decode steps per method and round (default 30)")
    p.add_argument("--sweep-methods", type=_csv, default=None,
                   help="methods of the sweep section (default: every registered method)")
    p.add_argument("--sweep-budgets", type=lambda s: _csv(s, float), default=None,
                   help="budgets of the sweep section (default 0.1,0.2)")
    p.add_argument("--sweep-lens", type=lambda s: _csv(s, int), default=None,
                   help="context lengths of the sweep section (default 2048,4096; --quick: 256)")
    p.add_argument("--batch-sizes", type=lambda s: _csv(s, int), default=None,
                   help="the batch section's batch sizes (default 1,8)")
    p.add_argument("--batch-lens", type=lambda s: _csv(s, int), default=None,
                   help="the batch section's context lengths (default 2048; --quick: 256)")
    p.add_argument("--budget-seqs", type=int, default=None,
                   help="the batch section's memory budget: the KV of this many full-cache "
                        "sequences (default 4)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="the batch section's largest batch (default 64)")
    p.add_argument("--out", default="outputs/bench", help="output folder")
    p.add_argument("--quick", action="store_true",
                   help=f"CI smoke run: model={QUICK_MODEL}, context lengths {QUICK_LENS}, 1 rep, "
                        "8 new tokens (explicit options still win)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides of the run config, e.g. model=tiny_random hardware=cpu "
                        "hardware.threads=1 budget=0.2 (default budget 0.2; hardware: cuda when "
                        "available, else cpu)")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.new_tokens is None:
        args.new_tokens = 8 if args.quick else 32
    if args.paired_rounds is None:
        args.paired_rounds = 2 if args.quick else 10
    if args.paired_steps is None:
        args.paired_steps = 3 if args.quick else 30
    return args


def run_config(args: argparse.Namespace, method: str = FULL, extra: list[str] | None = None) -> Any:
    """The run config of one entrant: run.py's composition of ``--quick``'s and the default
    presets, then the user's overrides, with ``method`` (and ``extra`` overrides last)."""
    from atskv.experiments.compose import compose_run_config

    extra = list(extra or [])
    keys = {o.split("=", 1)[0].lstrip("+~") for o in [*args.overrides, *extra]}
    base = [f"hardware={'cuda' if torch.cuda.is_available() else 'cpu'}", "budget=0.2"]
    if args.quick:
        base.append(f"model={QUICK_MODEL}")
    base = [o for o in base if o.split("=", 1)[0] not in keys]
    over = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") not in
            {e.split("=", 1)[0] for e in extra}]
    return compose_run_config([*base, *over, f"method={method}", *extra])


@dataclass
class Setup:
    cfg: Any  # the run config (method=full); entrants differ only in method
    model: Any
    tokenizer: Any
    device: torch.device
    max_positions: int

    @property
    def model_name(self) -> str:
        return self.cfg.model.name


def method_variant(spec: str) -> tuple[str, list[str]]:
    """``atskv:max_pages=16:mass=0.99`` -> ``("atskv", ["method.max_pages=16",
    "method.mass=0.99"])``: a registered method and overrides of its fields (a bench entrant of
    its own, labelled by ``spec``)."""
    name, *parts = spec.split(":")
    bad = [x for x in parts if "=" not in x or not x.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError(f"--methods entry {spec!r}: {bad[0]!r} is not KEY=VALUE; write a "
                          "variant as NAME:KEY=VALUE[:KEY=VALUE...], e.g. atskv:max_pages=16")
    return name, [f"method.{x.strip()}" for x in parts]


def validate(args: argparse.Namespace) -> tuple[list[str], list[int] | None, dict[str, Any]]:
    """Checks that need no model; returns (methods, explicit context lengths, the methods by
    name)."""
    from atskv.experiments.config import build_method
    from atskv.experiments.config import validate as validate_config
    from atskv.methods import METHODS

    names = list(args.methods or METHODS.names())
    for m in names:
        METHODS.get(method_variant(m)[0])  # "did you mean" error on a typo
    names = [FULL] + [m for m in dict.fromkeys(names) if m != FULL]
    methods = {}
    for m in names:
        base, extra = method_variant(m)
        try:
            cfg = run_config(args, base, extra)
        except ConfigError as e:
            raise ConfigError(f"--methods entry {m!r}: {e}") from e
        validate_config(cfg)
        methods[m] = build_method(cfg)
    if args.reps < 1:
        raise ConfigError(f"--reps={args.reps} must be >= 1")
    if args.new_tokens < 2:
        raise ConfigError(f"--new-tokens={args.new_tokens} must be >= 2 (decode needs a step)")
    if args.paired_ref not in names:
        raise ConfigError(f"--paired-ref={args.paired_ref!r}: choose one of the methods run: "
                          f"{', '.join(names)}")
    if args.paired_rounds < 2 or args.paired_steps < 1:
        raise ConfigError(f"--paired-rounds={args.paired_rounds} must be >= 2 (the interval "
                          f"resamples rounds) and --paired-steps={args.paired_steps} >= 1")
    lens = args.context_lens if args.context_lens else (QUICK_LENS if args.quick else None)
    if lens is not None and any(c <= 0 for c in lens):
        raise ConfigError(f"--context-lens={lens}: lengths must be positive")
    return names, (sorted(dict.fromkeys(lens)) if lens else None), methods


def load(args: argparse.Namespace) -> Setup:
    cfg = run_config(args)
    path = models.resolve_path(cfg.model)
    torch.manual_seed(0)
    hw = cfg.hardware
    model = models.load_model(cfg.model, path, hw.device, hw.dtype, hw.device_map)
    tokenizer = models.load_tokenizer(cfg.model, path)
    return Setup(cfg, model, tokenizer, torch.device(hw.device), models.max_positions(cfg.model, path))


def context_lens(args: argparse.Namespace, explicit: list[int] | None, setup: Setup,
                 after: int | None = None) -> tuple[list[int], list[str]]:
    """The lengths to run, with ``after`` positions after the prompt (default: the new tokens):
    explicit ones must fit the model; defaults that do not are dropped with a note."""
    after = args.new_tokens if after is None else after
    fits = [c + after <= setup.max_positions for c in (explicit or [])]
    if explicit:
        if not all(fits):
            bad = [c for c, ok in zip(explicit, fits) if not ok]
            raise ConfigError(f"--context-lens {bad}: prompt + {after} new tokens exceed "
                              f"{setup.model_name}'s {setup.max_positions} positions")
        return explicit, []
    lens = CPU_LENS if setup.device.type == "cpu" else CUDA_LENS + (CUDA_LONG_LENS if args.long else [])
    keep = [c for c in lens if c + after <= setup.max_positions]
    notes = []
    if len(keep) < len(lens):
        notes.append(f"Default context lengths {[c for c in lens if c not in keep]} do not fit "
                     f"{setup.model_name}'s {setup.max_positions} positions; skipped.")
    if not keep:
        raise ConfigError(f"no default context length fits {setup.model_name}'s "
                          f"{setup.max_positions} positions; pass --context-lens")
    return keep, notes


def prompt(tokenizer: Any, context_len: int, seed: int) -> list[int]:
    """A deterministic prompt of exactly ``context_len`` tokens (synthetic ``single_needle``)."""
    from atskv.benchmarks.synthetic import SyntheticBenchmark

    cfg = SimpleNamespace(tasks=["single_needle"], haystack="generated", n_samples=1,
                          max_new_tokens=None)
    ids = SyntheticBenchmark(cfg).load(tokenizer, context_len, 1, seed)[0].input_ids
    assert len(ids) == context_len
    return list(ids)


# ----------------------------------------------------------------------------- measuring
class Entrant:
    """One thing measured: a method through our engine, or transformers' generate()."""

    def __init__(self, name: str, setup: Setup, method: Any = None):
        self.name, self.setup, self.method = name, setup, method
        self.engine = None
        if name != HF:
            from atskv.core.engine import Engine

            self.engine = Engine.for_hardware(setup.model, setup.tokenizer, setup.cfg.hardware)

    def warmup(self) -> None:
        if self.engine is not None:
            self.engine.warmup(self.method)
        else:
            self.run(list(range(1, 65)), 3)

    def run(self, ids: list[int], new_tokens: int) -> dict[str, Any]:
        from atskv.metrics import PeakMemory, current_bytes

        gc.collect()
        device = self.setup.device
        with PeakMemory(device) as mem:
            level = current_bytes(device)
            rec = self._engine(ids, new_tokens) if self.engine else self._generate(ids, new_tokens)
        rec.update(peak_memory_bytes=mem.peak_bytes, peak_memory_kind=mem.kind,
                   peak_memory_since_reset=mem.since_reset,
                   peak_memory_delta_bytes=(mem.peak_bytes - level)
                   if mem.peak_bytes is not None and level is not None else None)
        if self.engine is not None and rec.get("kv_read_bytes_per_step"):
            # after the memory window: the floor's KV blocks are not the method's memory
            from atskv.metrics.floor import step_bytes, step_floor_s

            kv = rec["kv_read_bytes_per_step"]
            rec["step_bytes"] = step_bytes(self.setup.model, kv)
            rec["read_floor_s"] = step_floor_s(self.setup.model, kv, self.engine.dims["n_layers"])
        return rec

    def _engine(self, ids: list[int], new_tokens: int) -> dict[str, Any]:
        assert self.engine is not None
        out = self.engine.generate(ids, self.method, new_tokens, stop_at_eos=False)
        if len(out.token_ids) != new_tokens:
            raise RuntimeError(f"{self.name} generated {len(out.token_ids)} tokens, not {new_tokens}")
        return {"ttft_s": out.ttft_s, "decode_s": out.decode_s, "decode_tokens": out.decode_tokens,
                "decode_tokens_per_s": out.decode_tokens_per_s, "kv_bytes": out.kv_bytes_peak,
                "kv_bytes_after_compression": out.kv_bytes_after_compression,
                "kv_bytes_prefill": out.stats.get("kv_bytes_prefill"),
                "kv_bytes_uncompressed": out.kv_bytes_uncompressed,
                "kv_read_bytes_per_step": out.decode_kv_read_bytes,
                "prompt_tokens_kept": out.stats["prompt_tokens_kept"]["mean"],
                "cuda_graph": out.stats.get("cuda_graph"),
                "decode_step_s": out.stats["decode_step_s"],
                "compile_steps": out.stats["compile_steps"]}  # steps not in decode_tokens

    def _generate(self, ids: list[int], new_tokens: int) -> dict[str, Any]:
        from atskv.core import seam
        from atskv.metrics.timing import synchronize

        device = self.setup.device
        x = torch.tensor([ids], device=device)
        n, stamps, t0 = seam.timed_generate(self.setup.model, x, new_tokens,
                                               lambda: synchronize(device))
        synchronize(device)
        total = time.perf_counter() - t0
        if n != new_tokens or len(stamps) != new_tokens:
            raise RuntimeError(f"generate() produced {n} tokens ({len(stamps)} steps), "
                               f"not {new_tokens}")
        decode_s = stamps[-1] - stamps[0]
        return {"ttft_s": stamps[0] - t0, "decode_s": decode_s, "decode_tokens": n - 1,
                "decode_tokens_per_s": (n - 1) / decode_s if decode_s > 0 else None,
                "decode_step_s": [b - a for a, b in zip(stamps, stamps[1:])],
                "total_s": total}


# ----------------------------------------------------------------------------- aggregation
def _median(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.median(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def _slope(xs: list[float], ys: list[float | None]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den > 0 else None


def aggregate(samples: list[dict], methods: list[str], lens: list[int]) -> list[dict]:
    """Median per (method, context length) and the ratios to full at the same length."""
    fields = [m for m, _ in METRICS] + ["decode_s", "kv_bytes_after_compression",
                                        "kv_bytes_prefill", "kv_bytes_uncompressed",
                                        "peak_memory_delta_bytes", "step_bytes"]
    rows = []
    for ctx in lens:
        med: dict[str, dict] = {}
        for m in methods:
            got = [s for s in samples if s["method"] == m and s["context_len"] == ctx
                   and not s.get("error")]
            med[m] = {f: _median([s.get(f) for s in got]) for f in fields}
            med[m]["n_reps"] = len(got)
            # every timed step of every rep pooled: a burst of machine noise moves a few steps,
            # not the median
            step = _median([x for s in got for x in s.get("decode_step_s") or []])
            med[m]["decode_step_tokens_per_s"] = 1.0 / step if step else None
            # each rep's floor against that rep's steps, timed next to them: the machine's
            # drift between reps moves both
            med[m]["step_of_floor"] = _median([_ratio(s["read_floor_s"],
                                                      _median(s.get("decode_step_s") or []))
                                               for s in got if s.get("read_floor_s")])
        for m in methods:
            row = {"method": m, "context_len": ctx, **med[m]}
            for f, r in RATIO_NAMES.items():
                row[r] = 1.0 if m == FULL and med[m][f] else _ratio(med[m][f], med[FULL][f])
            # the speed-up over full that the bytes allow (a step reading at the bandwidth)
            row["floor_x_full"] = _ratio(med[FULL]["step_bytes"], med[m]["step_bytes"])
            rows.append(row)
    return rows


def growth(rows: list[dict], methods: list[str], lens: list[int]) -> list[dict]:
    """Per method and metric: value at the largest / at the smallest context length, and the
    log-log slope over all context lengths."""
    out = []
    for m in methods:
        mine = {r["context_len"]: r for r in rows if r["method"] == m}
        g: dict[str, Any] = {"method": m, "ctx_min": lens[0], "ctx_max": lens[-1]}
        for f, _ in METRICS:
            ys = [mine[c][f] for c in lens]
            g[f] = {"factor": _ratio(ys[-1], ys[0]) if len(lens) > 1 else None,
                    "loglog_slope": _slope([float(c) for c in lens], ys)}
            ratio = RATIO_NAMES[f]
            g[ratio] = {"at_ctx_min": mine[lens[0]][ratio], "at_ctx_max": mine[lens[-1]][ratio]}
        out.append(g)
    return out


def overhead(samples: list[dict], lens: list[int]) -> dict[str, Any]:
    per = []
    for ctx in lens:
        def med(name: str, field: str, ctx: int = ctx) -> float | None:
            return _median([s.get(field) for s in samples if s["method"] == name
                            and s["context_len"] == ctx and not s.get("error")])

        ours, ref = med(FULL, "decode_tokens_per_s"), med(HF, "decode_tokens_per_s")
        per.append({"context_len": ctx, "ours_tokens_per_s": ours, "generate_tokens_per_s": ref,
                    "ratio": _ratio(ours, ref), "ours_ttft_s": med(FULL, "ttft_s"),
                    "generate_ttft_s": med(HF, "ttft_s")})
    ratios = [p["ratio"] for p in per if p["ratio"]]
    return {
        "definition": "our full-cache decode tokens/s / transformers generate() decode tokens/s "
                      "(greedy, min_new_tokens = max_new_tokens); generate()'s decode time is "
                      "the span between the first and the last step's logits (LogitsProcessor "
                      "timestamps), i.e. n-1 decode steps, the same span as the engine's decode_s",
        "per_context": per,
        "ratio_geomean": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None,
    }


# ----------------------------------------------------------------------------- rendering
def _f(x: float | None, dec: int) -> str:
    return "n/a" if x is None else f"{x:.{dec}f}"


def _mib(b: float | None) -> float | None:
    return None if b is None else b / MIB


def _x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def render_md(data: dict[str, Any]) -> str:
    lines = (render_main(data) if "rows" in data
             else ["# atskv performance benchmark", "", f"{_setting(data)}."])
    if "paired" in data:
        from atskv.bench.paired import render as render_paired

        lines += render_paired(data["paired"])
    if "sweep" in data:
        from atskv.bench.sweep import render

        lines += render(data["sweep"])
    if "batch" in data:
        from atskv.bench.batch import render as render_batch

        lines += render_batch(data["batch"])
        lines += ["", "![decode tokens/s against KV memory](batch.png)"]
    mach = data["machine"]
    lines += ["", f"Machine: {mach['cpu_model']}, {mach['cpu_count']} logical cores "
                  f"({mach['cpu_affinity']} usable), torch threads {mach['torch_threads']}, "
                  f"load average {mach['loadavg_start']} at start, {mach['loadavg_end']} at end; "
                  f"torch {mach['versions'].get('torch')}, transformers "
                  f"{mach['versions'].get('transformers')}; CPU decode kernels: "
                  f"{mach.get('decode_attention', 'n/a')}; git {mach['git_commit']}; "
                  f"{mach['date']}; {data['duration_s']:.0f} s."]
    if data["notes"]:
        lines += [""] + [f"> **Note:** {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


def _setting(data: dict[str, Any]) -> str:
    """The model, the machine and the budget of a run, for the head of its report."""
    p, mach = data["protocol"], data["machine"]
    budget = (f"kv_size {p['kv_size']}" if p.get("kv_size") else
              f"budget {p['budget']:g} of the prompt's KV" if p.get("budget") else "budget n/a")
    return (f"Model `{p['model']}` ({p['dtype']}) on "
            f"{mach['cpu_model'] if p['device'] == 'cpu' else mach['device_name']} "
            f"({p['device']}); {budget}")


def render_main(data: dict[str, Any]) -> list[str]:
    p = data["protocol"]
    lines = [
        "# atskv performance benchmark",
        "",
        f"{_setting(data)}; {p['new_tokens']} new tokens per sample (no early stop); "
        f"median of {p['reps']} interleaved rep(s); ratios (×full) are median(method) / "
        f"median(full) at the same context length, in this run. step tok/s = 1 / the median "
        f"of every timed decode step of every rep (robust to bursts of machine noise). KV = "
        f"bytes the cache held "
        f"(peak over decoding); KV read/step = bytes one decode step reads (mean); floor ×full = "
        f"full's bytes per step / the method's (the weights and the KV read/step): the speed-up "
        f"over full those bytes allow a step that reads at the machine's bandwidth; step/floor = "
        f"the time torch took to read those bytes once / the median step (per rep, timed after "
        f"its steps; median of the reps): how close the steps came to that; peak mem = "
        f"{data['peak_memory_kind']}.",
        "",
        "| Method | ctx | TTFT s | TTFT ×full | decode tok/s | decode ×full | step tok/s "
        "| step ×full | floor ×full | step/floor | KV MiB | KV ×full | KV read/step MiB "
        "| peak mem ×full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['method']} | {r['context_len']} | {_f(r['ttft_s'], 3)} | {_x(r['ttft_x_full'])} "
            f"| {_f(r['decode_tokens_per_s'], 2)} | {_x(r['decode_x_full'])} "
            f"| {_f(r['decode_step_tokens_per_s'], 2)} | {_x(r['decode_step_x_full'])} "
            f"| {_x(r['floor_x_full'])} | {_x(r['step_of_floor'])} "
            f"| {_f(_mib(r['kv_bytes']), 2)} | {_x(r['kv_x_full'])} "
            f"| {_f(_mib(r['kv_read_bytes_per_step']), 3)} | {_x(r['peak_memory_x_full'])} |")
    ov = data["overhead"]
    per = ", ".join(f"{o['context_len']}: {_x(o['ratio'])}" for o in ov["per_context"])
    lines += ["", f"**Framework overhead** (decode, our full cache / transformers `generate()`, "
                  f">1 = ours faster): {_x(ov['ratio_geomean'])} (geometric mean; per context "
                  f"length {per}).", ""]
    g0 = data["growth"][0]
    if g0["ctx_max"] != g0["ctx_min"]:
        lines += [f"Growth from context length {g0['ctx_min']} to {g0['ctx_max']}: factor "
                  "(log-log slope; 1 = linear, 0 = flat).", "",
                  "| Method | " + " | ".join(lab for _, lab in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for g in data["growth"]:
            cells = [f"{_x(g[f]['factor'])} ({_x(g[f]['loglog_slope'])})" for f, _ in METRICS]
            lines.append(f"| {g['method']} | " + " | ".join(cells) + " |")
    return lines


def machine(device: torch.device) -> dict[str, Any]:
    info = results.provenance(str(device))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    info.update(cpu_model=cpu, cpu_count=os.cpu_count(), cpu_affinity=affinity,
                loadavg_start=_loadavg())
    return info


def _loadavg() -> str | None:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


# ----------------------------------------------------------------------------- main
def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    bad = [x for x in args.sections if x not in SECTIONS]
    if bad or not args.sections:
        raise ConfigError(f"--sections={','.join(args.sections)}: choose from {', '.join(SECTIONS)}")
    names, explicit, methods = validate(args)
    sweep_jobs = sweep_methods(args) if "sweep" in args.sections else []
    setup = load(args)
    if setup.cfg.hardware.threads:
        torch.set_num_threads(setup.cfg.hardware.threads)
    mach = machine(setup.device)

    def log(msg: str) -> None:
        print(f"[bench {time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    data: dict[str, Any] = {"protocol": {
        "sections": list(args.sections), "methods": names, "reference": HF,
        "budget_of": "prompt", "reps": args.reps, "new_tokens": args.new_tokens,
        "model": setup.model_name, "device": str(setup.device),
        "hardware": setup.cfg.hardware.name, "dtype": setup.cfg.hardware.dtype,
        "prefill_chunk": setup.cfg.hardware.prefill_chunk,
        "cuda_graph": bool(setup.cfg.hardware.cuda_graph) and setup.device.type == "cuda",
        "seed": setup.cfg.seed, "quick": args.quick, "overrides": list(args.overrides),
        "prompt": "synthetic single_needle, exact length",
        "order": "interleaved; rep r runs the entrant list rotated by r-1",
        "warmup": "every entrant once (64-token prompt), and once per context length "
                  "(2 new tokens), untimed",
        "attn_implementation": hf_attn(setup.model),
        "budget": methods[names[-1]].budget if len(names) > 1 else None,
        "kv_size": methods[names[-1]].kv_size if len(names) > 1 else None,
    }, "machine": mach, "notes": [], "samples": []}
    if "main" in args.sections:
        lens, notes = context_lens(args, explicit, setup)
        prompts = {c: prompt(setup.tokenizer, c, setup.cfg.seed) for c in lens}
        entrants = [Entrant(m, setup, methods[m]) for m in names] + [Entrant(HF, setup)]
        log(f"{setup.model_name} on {setup.device}; methods {', '.join(names)} + {HF}; "
            f"context lengths {lens}; {args.reps} rep(s); warming up")
        samples = measure(entrants, prompts, args.reps, args.new_tokens, log)
        rows = aggregate(samples, names, lens)
        data["protocol"]["context_lens"] = lens
        data.update(rows=rows, growth=growth(rows, names, lens), overhead=overhead(samples, lens),
                    samples=samples, notes=notes,
                    peak_memory_kind=", ".join(sorted({str(s.get("peak_memory_kind"))
                                                       for s in samples
                                                       if s.get("peak_memory_kind")})) or "n/a")
    if "paired" in args.sections:
        from atskv.bench.paired import UNTIMED, run_paired
        from atskv.core.engine import Engine

        lens, notes = context_lens(args, explicit, setup, after=args.paired_steps + UNTIMED + 1)
        engine = Engine.for_hardware(setup.model, setup.tokenizer, setup.cfg.hardware)
        log(f"paired section: {', '.join(names)} against {args.paired_ref} at {lens}; warming up")
        for m in names:
            engine.warmup(methods[m])
        rows = run_paired(engine, {m: methods[m] for m in names}, args.paired_ref,
                          {c: prompt(setup.tokenizer, c, setup.cfg.seed) for c in lens},
                          args.paired_rounds, args.paired_steps, setup.cfg.seed, log)
        data["paired"] = {"reference": args.paired_ref, "rounds": args.paired_rounds,
                          "steps": args.paired_steps, "context_lens": lens, "rows": rows}
        data["notes"] += [n for n in notes if n not in data["notes"]]
    if sweep_jobs:
        from atskv.bench.sweep import SWEEP_LENS, run_sweep
        from atskv.core.engine import Engine

        lens = args.sweep_lens or ([256] if args.quick else SWEEP_LENS)
        engine = Engine.for_hardware(setup.model, setup.tokenizer, setup.cfg.hardware)
        log(f"sweep section: {len(sweep_jobs)} jobs at {lens}")
        rows = run_sweep(engine, sweep_jobs, {c: prompt(setup.tokenizer, c, setup.cfg.seed)
                                              for c in lens}, args.new_tokens, log)
        data["sweep"] = {"methods": list(dict.fromkeys(n for n, _, _ in sweep_jobs)),
                         "budgets": sorted({b for _, b, _ in sweep_jobs}),
                         "new_tokens": args.new_tokens, "rows": rows}
    if "batch" in args.sections:
        from atskv.bench.batch import BATCH_SIZES, BUDGET_SEQS, MAX_BATCH, run_batch
        from atskv.core.engine import Engine

        lens = args.batch_lens or ([256] if args.quick else [2048])
        engine = Engine.for_hardware(setup.model, setup.tokenizer, setup.cfg.hardware)
        sizes = args.batch_sizes or BATCH_SIZES
        seqs, cap = args.budget_seqs or BUDGET_SEQS, args.max_batch or MAX_BATCH
        log(f"batch section: {', '.join(names)} at {lens}, batch sizes {sizes}, budget {seqs} "
            f"full-cache sequences")
        rows = run_batch(engine, {m: methods[m] for m in names},
                         {c: prompt(setup.tokenizer, c, setup.cfg.seed) for c in lens},
                         sizes, seqs, cap, args.reps, args.new_tokens, log)
        data["batch"] = {"context_lens": lens, "batch_sizes": sizes, "budget_seqs": seqs,
                         "max_batch": cap, "reps": args.reps, "new_tokens": args.new_tokens,
                         "rows": rows}
    mach["loadavg_end"] = _loadavg()
    data["notes"] += _notes(data["samples"], setup.device, mach)
    data["duration_s"] = time.perf_counter() - t_start
    mach["decode_attention"] = kernels.status()
    return data


def sweep_methods(args: argparse.Namespace) -> list[tuple[str, float, Any]]:
    """The sweep section's jobs: (method, budget, the configured method), validated."""
    from atskv.bench.sweep import SWEEP_BUDGETS
    from atskv.experiments.config import build_method
    from atskv.experiments.config import validate as validate_config
    from atskv.methods import METHODS

    jobs = []
    for name in args.sweep_methods or METHODS.names():
        base, extra = method_variant(name)
        for b in args.sweep_budgets or SWEEP_BUDGETS:
            cfg = run_config(args, base, [*extra, f"budget={b}"])
            validate_config(cfg)
            jobs.append((name, float(b), build_method(cfg)))
    return jobs


def hf_attn(model: Any) -> str | None:
    from atskv.core import seam

    return seam.attn_implementation(model)


def measure(entrants: list[Entrant], prompts: dict[int, list[int]], reps: int, new_tokens: int,
            log: Any) -> list[dict[str, Any]]:
    """Warm-up, then per context length ``reps`` interleaved repetitions of every entrant."""
    for e in entrants:
        e.warmup()
    samples: list[dict[str, Any]] = []
    for ctx, ids in prompts.items():
        for e in entrants:  # first-call costs at this size stay out of the samples
            e.run(ids, 2)
        for rep in range(reps):
            k = rep % len(entrants)
            for slot, e in enumerate(entrants[k:] + entrants[:k]):
                rec: dict[str, Any] = {"method": e.name, "context_len": ctx, "rep": rep,
                                       "slot": slot}
                try:
                    rec.update(e.run(ids, new_tokens))
                except Exception as exc:  # noqa: BLE001 - recorded; the other entrants go on
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    log(f"ctx {ctx} rep {rep + 1} {e.name} FAILED: {rec['error']}")
                samples.append(rec)
            log(f"ctx {ctx}: rep {rep + 1}/{reps} done")
    return samples


def _notes(samples: list[dict[str, Any]], device: torch.device, mach: dict[str, Any]) -> list[str]:
    notes = []
    failed = sorted({(s["method"], s["context_len"]) for s in samples if s.get("error")})
    if failed:
        notes.append("Failed samples (left out of the medians): "
                     + ", ".join(f"{m} at {c}" for m, c in failed) + "; see `samples` in bench.json.")
    if any(s.get("peak_memory_since_reset") is False for s in samples):
        notes.append("Peak memory could not be reset between samples (non-Linux): peak mem "
                     "ratios are of the process's lifetime peak and not meaningful.")
    if device.type == "cpu":
        notes.append("On CPU, peak mem is the process's peak RSS (model weights included), so "
                     "its ratios stay near 1. `peak_memory_delta_bytes` in bench.json (growth "
                     "over the RSS at the start of each call) is not a working-memory measure "
                     "either: the allocator keeps freed memory, so a call that reuses it shows "
                     "little or no growth. Compare methods' memory by KV ×full (exact) or on CUDA.")
    notes.append("KV is the cache after compression (peak over decoding; the budget is a fraction "
                 "of the prompt's KV and the generated tokens come on top); during prefill every "
                 "method holds the whole prompt's KV (`kv_bytes_prefill` in bench.json).")
    busy = [float(x.split()[0]) for x in (mach["loadavg_start"], mach["loadavg_end"]) if x]
    if device.type == "cpu" and busy and max(busy) > (mach["cpu_affinity"] or 1):
        notes.append(f"The 1-minute load average ({max(busy):.1f}) exceeded the {mach['cpu_affinity']} "
                     "usable cores: other processes competed for the CPU, so absolute times are "
                     "inflated and noisy (the ratios, measured interleaved, are less affected). "
                     "On an oversubscribed machine `hardware.threads=1` is usually faster and steadier.")
    return notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        data = run_bench(args)
    except ConfigError as exc:
        print(f"atskv.bench: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    md = render_md(data)
    if "batch" in data:
        from atskv.bench.batch import plot

        out.mkdir(parents=True, exist_ok=True)
        plot(data["batch"], out / "batch.png")
    results.write_json(out / "bench.json", data)
    results.atomic_write_text(out / "bench.md", md)
    print(md)
    print(out)
    broken = any(s.get("error") for s in data["samples"]) or not all(
        r["identical"] for r in data.get("sweep", {}).get("rows", []))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
