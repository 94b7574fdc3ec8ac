"""Mirror a finished run to Weights & Biases. The local result files are the source of truth:
any W&B failure is logged as a warning and never affects them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("accuracy", "kv_cache_bytes", "kv_cache_bytes_after_compression",
                "kv_cache_bytes_uncompressed", "kv_cache_fraction", "decode_kv_read_bytes",
                "peak_memory_bytes", "ttft_s", "decode_tokens_per_s", "n_samples")
SAMPLE_COLUMNS = ("id", "task", "score", "prediction", "reference", "ttft_s",
                  "decode_tokens_per_s", "kv_cache_bytes")


def log_run(result: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path,
            wandb_cfg: Any) -> str | None:
    """One W&B run per job: config, summary metrics and a samples table. Returns the run's
    local folder (offline) or URL, or None when disabled or failed."""
    if wandb_cfg.mode == "disabled":
        return None
    try:
        import wandb

        name = f"{result['method']}-{result['benchmark']}-ctx{result['context_len']}-b{result['budget']}"
        run = wandb.init(
            project=wandb_cfg.project, entity=wandb_cfg.entity, mode=wandb_cfg.mode,
            group=wandb_cfg.group or result.get("sweep_id"), name=name, dir=str(out_dir),
            config=result.get("config", {}), job_type="eval", reinit="finish_previous",
            tags=[result["method"], result["benchmark"], result["model"]],
        )
        try:
            summary = {k: result.get(k) for k in SUMMARY_KEYS if result.get(k) is not None}
            summary.update({f"task/{t}": s for t, s in (result.get("task_scores") or {}).items()})
            run.summary.update(summary)
            table = wandb.Table(columns=list(SAMPLE_COLUMNS))
            for r in rows:
                table.add_data(*[_cell(r.get(c)) for c in SAMPLE_COLUMNS])
            run.log({"samples": table, **summary})
            where = run.url or getattr(run, "dir", None)
        finally:
            run.finish()
        return where
    except Exception as e:  # noqa: BLE001 - W&B must never cost the local results
        log.warning("W&B logging failed (%s: %s); local results are intact in %s",
                    type(e).__name__, e, out_dir)
        return None


def _cell(v: Any) -> Any:
    if isinstance(v, (list, dict)):
        return str(v)
    return v
