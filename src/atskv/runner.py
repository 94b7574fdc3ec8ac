"""One job: config -> benchmark samples -> model -> method -> generate and score -> results."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from atskv import models, results, wandb_log
from atskv.benchmarks import BENCHMARKS
from atskv.config import method_kwargs, validate
from atskv.engine import Engine
from atskv.methods import METHODS
from atskv.metrics import PeakMemory
from atskv.types import ConfigError

log = logging.getLogger("atskv")


def prepare(cfg: DictConfig) -> tuple[Any, Any, Path, int]:
    """Every check that needs no model weights; returns (benchmark, tokenizer, model path,
    the model's position limit).
    Raises :class:`ConfigError` on bad input."""
    validate(cfg)
    benchmark = BENCHMARKS.get(cfg.benchmark.name)(cfg.benchmark)
    benchmark.validate()
    path = models.resolve_path(cfg.model)
    limit = models.max_positions(cfg.model, path)
    if cfg.context_len >= limit:
        raise ConfigError(f"context_len={cfg.context_len} does not fit model {cfg.model.name}'s "
                          f"{limit} positions (prompt plus generated tokens); choose a smaller "
                          f"context_len")
    tokenizer = models.load_tokenizer(cfg.model, path)
    return benchmark, tokenizer, path, limit


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any] | None:
    """Run one job into ``out_dir``. Returns the result dict, or None when skipped.

    Bad input raises :class:`ConfigError` before any model loads and writes nothing. A failure
    after that is recorded as ``status: failed`` with the error (so a sweep goes on); results of
    other runs are never touched. Ctrl-C propagates and leaves only complete files behind.
    """
    out_dir = Path(out_dir)
    if results.finished(out_dir) and not cfg.overwrite:
        log.info("skipping: %s already has a finished result.json (overwrite=true reruns it)", out_dir)
        return None
    benchmark, tokenizer, path, limit = prepare(cfg)
    samples = benchmark.load(tokenizer, cfg.context_len, cfg.benchmark.n_samples, cfg.seed)
    if not samples:
        raise ConfigError(f"benchmark {cfg.benchmark.name} produced no samples for tasks "
                          f"{cfg.benchmark.tasks}")
    too_long = [s.id for s in samples if len(s.input_ids) + s.max_new_tokens > limit]
    if too_long:
        raise ConfigError(f"samples {too_long[:3]} do not fit the model's positions")

    base: dict[str, Any] = {
        "method": cfg.method.name, "benchmark": cfg.benchmark.name, "model": cfg.model.name,
        "context_len": cfg.context_len, "budget": cfg.budget, "seed": cfg.seed,
        "hardware": cfg.hardware.name, "sweep_id": cfg.sweep_id,
        "started_at": results.now_iso(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        if cfg.hardware.threads:
            torch.set_num_threads(cfg.hardware.threads)
        torch.manual_seed(cfg.seed)
        model = models.load_model(cfg.model, path, cfg.hardware.device, cfg.hardware.dtype,
                                  cfg.hardware.device_map)
        method = METHODS.get(cfg.method.name)(**method_kwargs(cfg))
        engine = Engine(model, tokenizer, method, prefill_chunk=cfg.hardware.prefill_chunk,
                        cuda_graph=cfg.hardware.cuda_graph)
        if cfg.warmup:
            engine.warmup()
        with PeakMemory(engine.device) as mem:
            bar = tqdm(samples, desc=f"{cfg.method.name} {cfg.benchmark.name} ctx{cfg.context_len}",
                       unit="sample", dynamic_ncols=True)
            for sample in bar:
                out = engine.generate(sample.input_ids, sample.max_new_tokens)
                score = benchmark.score(out.text, sample)
                rows.append(sample_row(sample, out, score))
                bar.set_postfix(acc=f"{sum(r['score'] for r in rows) / len(rows):.1f}")
        result = {
            **base, "status": "ok", "error": None, "n_samples": len(rows),
            **results.summarize(rows),
            "peak_memory_bytes": mem.peak_bytes, "peak_memory_kind": mem.kind,
            "peak_memory_since_reset": mem.since_reset,
        }
    except Exception as e:  # noqa: BLE001 - recorded, so that the rest of a sweep goes on
        log.error("run failed: %s: %s", type(e).__name__, e)
        result = {**base, "status": "failed", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc(), "n_samples": len(rows),
                  **results.summarize(rows)}
    result["finished_at"] = results.now_iso()
    result["duration_s"] = time.perf_counter() - t_start
    result["provenance"] = results.provenance(cfg.hardware.device)
    results.write_samples(out_dir / results.SAMPLES, rows)
    results.write_json(out_dir / results.RESULT, result)  # written last: marks the run complete
    where = wandb_log.log_run(result, rows, out_dir, cfg.wandb)
    if where:
        result["wandb"] = where
    return result


def sample_row(sample: Any, out: Any, score: float) -> dict[str, Any]:
    return {
        "id": sample.id, "task": sample.task, "score": score, "prediction": out.text,
        "reference": sample.references, "prompt_tokens": out.prompt_tokens,
        "generated_tokens": len(out.token_ids), "ttft_s": out.ttft_s,
        "decode_s": out.decode_s, "decode_tokens_per_s": out.decode_tokens_per_s,
        "kv_cache_bytes": out.kv_bytes_peak,
        "kv_cache_bytes_after_compression": out.kv_bytes_after_compression,
        "kv_cache_bytes_uncompressed": out.kv_bytes_uncompressed,
        "decode_kv_read_bytes": out.decode_kv_read_bytes,
        "meta": {k: v for k, v in sample.meta.items() if isinstance(v, (int, float, str))},
    }
