"""Jobs: config -> benchmark samples -> model -> method -> generate and score -> result files.

A job is one run configuration writing one run folder. Jobs that differ only in method, budget /
kv_size and method hyperparameters can run as a **group** (:func:`run_group`): the model loads
once and each sample is prefilled once; every member compresses its own copy of that prefill and
decodes, and writes its own result files as if it had run alone (the generated tokens, scores and
byte counters are the same; TTFT = the shared prefill's time + the member's own compression +
first token). A single job is a group of one (:func:`run`).
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from atskv.benchmarks import BENCHMARKS
from atskv.core import dynamo
from atskv.core.engine import Engine, Request
from atskv.core.types import ConfigError, GenerationOutput, Sample
from atskv.experiments import models, protocol, results, wandb_log
from atskv.experiments.config import build_method, resolved_budget, run_key, validate
from atskv.metrics import PeakMemory, trim_heap
from atskv.metrics.needles import needle_recall

log = logging.getLogger("atskv")
_jobs_in_process = 0  # jobs this process has run: a CPU process peak is a job's own only for the first

#: config keys that may differ inside a group (everything else must be equal)
GROUP_FREE = ("method", "budget", "kv_size", "protocol", "sweep_id", "overwrite", "wandb")


def group_key(cfg: DictConfig) -> str:
    """What jobs sharing a prefill must agree on: the config without method, budget, kv_size,
    protocol and bookkeeping keys."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    for k in GROUP_FREE:
        data.pop(k, None)
    return repr(sorted(data.items()))


@dataclass
class Job:
    cfg: DictConfig
    out_dir: Path
    #: the ``method`` config option chosen (e.g. ``snapkv`` or ``tuned/snapkv``)
    preset: str | None = None
    #: the command-line overrides the job was composed from (its run key)
    overrides: list[str] = field(default_factory=list)


@dataclass
class _Member:
    """A job while its group runs."""

    job: Job
    base: dict[str, Any]
    benchmark: Any = None
    method: Any = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None
    t_start: float = field(default_factory=time.perf_counter)


def prepare(cfg: DictConfig) -> tuple[Any, Any, Path, int]:
    """Every check that needs no model weights; returns (benchmark, tokenizer, model path,
    the model's position limit). Raises :class:`ConfigError` on bad input."""
    validate(cfg)
    benchmark = BENCHMARKS.get(cfg.benchmark.name)(cfg.benchmark)
    benchmark.validate()
    path = models.resolve_path(cfg.model)
    limit = models.max_positions(cfg.model, path)
    max_new = benchmark.max_new_tokens()
    if cfg.context_len + max_new > limit:
        raise ConfigError(f"context_len={cfg.context_len} (the prompt) + {max_new} new tokens "
                          f"(the longest generation of the selected {cfg.benchmark.name} tasks) = "
                          f"{cfg.context_len + max_new} exceeds model {cfg.model.name}'s {limit} "
                          f"positions; choose a smaller context_len")
    tokenizer = models.load_tokenizer(cfg.model, path)
    return benchmark, tokenizer, path, limit


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any] | None:
    """Run one job into ``out_dir``. Returns the result dict, or None when skipped.

    Bad input raises :class:`ConfigError` before any model loads and writes nothing. A failure
    after that is recorded as ``status: failed`` with the error (so a sweep goes on); results of
    other runs are never touched. Ctrl-C propagates and leaves only complete files behind.
    """
    return run_group([Job(cfg, Path(out_dir))])[0]


def run_group(jobs: list[Job]) -> list[dict[str, Any] | None]:
    """Run jobs that differ only in method, budget / kv_size and method hyperparameters, sharing
    each sample's prefill. Finished jobs are skipped (None). A member with bad input writes
    nothing and its :class:`ConfigError` is raised after the others have run; a member that fails
    later is recorded as failed and the others go on."""
    global _jobs_in_process
    keys = {group_key(j.cfg) for j in jobs}
    if len(keys) > 1:
        raise ValueError("run_group: the jobs differ in more than method, budget and kv_size")
    out: list[dict[str, Any] | None] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        if results.finished(job.out_dir) and not job.cfg.overwrite:
            log.info("skipping: %s already has a finished result.json (overwrite=true reruns it)",
                     job.out_dir)
        else:
            todo.append(i)
    if not todo:
        return out
    bad: list[ConfigError] = []
    members: dict[int, _Member] = {}
    shared = None
    for i in todo:
        try:
            if shared is None:
                shared = prepare(jobs[i].cfg)
            else:
                validate(jobs[i].cfg)
            members[i] = _Member(jobs[i], _base_record(jobs[i], len(todo)))
            members[i].method = build_method(jobs[i].cfg)
        except ConfigError as e:
            if len(jobs) == 1:
                raise
            log.error("error in %s: %s (nothing written for it; the group goes on)", jobs[i].out_dir, e)
            bad.append(e)
            members.pop(i, None)
    if members:
        assert shared is not None
        fresh = _jobs_in_process == 0 and len(members) == 1
        _jobs_in_process += len(members)
        for m in members.values():
            m.benchmark = shared[0]
            _resume(m)
        _run_members(list(members.values()), *shared, fresh=fresh)
        for i, m in members.items():
            out[i] = _finish(m)
    if bad:
        raise bad[0]
    return out


def _resume(m: _Member) -> None:
    """Take up the samples an interrupted run of the member's folder answered (they are not
    answered again; ``overwrite=true`` starts afresh) and record this segment of the run in its
    ``progress.json``."""
    folder = m.job.out_dir
    earlier = not m.job.cfg.overwrite
    # the last row of an id (a chunk answered again after a change of benchmark.batch_size)
    rows = list({r["id"]: r for r in results.read_partial(folder)}.values()) if earlier else []
    segments = [*(results.read_segments(folder) if earlier else []),
                {"started_at": m.base["started_at"],
                 "git_commit": m.base["provenance"]["git_commit"], "rows_before": len(rows)}]
    results.write_samples(folder / results.PARTIAL, rows)  # drops a line cut short
    results.write_json(folder / results.PROGRESS, {"segments": segments})
    m.rows = rows
    if len(segments) > 1:
        # duration_s and the peak memory are this segment's; each row keeps its own timings
        m.base["segments"] = segments
        log.info("resuming %s: %d samples answered by an earlier segment", folder, len(rows))
        commits = {seg["git_commit"] for seg in segments}
        if len(commits) > 1:
            log.warning("%s: the run's segments ran different commits: %s", folder,
                        sorted(map(str, commits)))


def _base_record(job: Job, group_size: int) -> dict[str, Any]:
    cfg = job.cfg
    budget = resolved_budget(cfg)
    preset = job.preset or cfg.method.name
    return {
        "method": cfg.method.name, "method_preset": preset,
        "tuned": preset.startswith("tuned/"),
        "benchmark": cfg.benchmark.name, "model": cfg.model.name,
        "context_len": cfg.context_len, "budget": budget["budget"], "kv_size": budget["kv_size"],
        "budget_of": "prompt", "protocol": cfg.protocol, "seed": cfg.seed,
        "hardware": cfg.hardware.name,
        "dtype": cfg.hardware.dtype, "split": cfg.benchmark.get("split"),
        "sweep_id": cfg.sweep_id, "prefill_shared": group_size > 1,
        "run_key": run_key(cfg.method, job.overrides),
        "started_at": results.now_iso(),
        # the code that runs: read as the job starts (a sweep's later commits are not its own)
        "provenance": results.provenance(cfg.hardware.device),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _run_members(members: list[_Member], benchmark: Any, tokenizer: Any, path: Path, limit: int,
                 fresh: bool) -> None:
    cfg = members[0].job.cfg
    load_start = results.machine_load()
    try:
        samples = benchmark.load(tokenizer, cfg.context_len, cfg.benchmark.n_samples, cfg.seed)
        if not samples:
            raise ConfigError(f"benchmark {cfg.benchmark.name} produced no samples for tasks "
                              f"{cfg.benchmark.tasks}")
        too_long = [s.id for s in samples if len(s.input_ids) + s.max_new_tokens > limit]
        if too_long:
            raise ConfigError(f"samples {too_long[:3]} do not fit the model's {limit} positions")
        protocol.check_splits(samples, {m.job.cfg.protocol for m in members})
        if cfg.hardware.threads:
            torch.set_num_threads(cfg.hardware.threads)
        torch.manual_seed(cfg.seed)
        model = models.load_model(cfg.model, path, cfg.hardware.device, cfg.hardware.dtype,
                                  cfg.hardware.device_map)
        # every member decodes every sample (together or not): the steps a compile would serve
        steps = len(members) * sum(s.max_new_tokens for s in samples)
        engine = Engine.for_hardware(model, tokenizer, cfg.hardware, decode_steps=steps)
        compiles = dynamo.compilations()  # the warm-up's included: it compiles for the run
        for m in members:
            m.base["warmup_compile_s"] = engine.warmup(m.method) if cfg.warmup else 0.0
        with PeakMemory(engine.device) as mem:
            try:
                _loop(members, engine, benchmark, samples)
            except Exception as e:  # noqa: BLE001 - a failure of the whole batch: every member's
                for m in members:
                    if m.error is None:
                        _fail(m, e, "(batch)")
        for m in members:
            m.base.update(peak_memory_bytes=mem.peak_bytes, peak_memory_kind=mem.kind,
                          peak_memory_since_reset=mem.since_reset, fresh_process=fresh,
                          # one peak for the members and samples decoded together
                          peak_memory_shared=len(members) > 1 or cfg.benchmark.batch_size > 1,
                          compiles=dynamo.compilations() - compiles,
                          compile_decision={"compiled": engine.compile, "decode_steps": steps,
                                            "min_steps": cfg.hardware.compile_min_steps})
    except Exception as e:  # noqa: BLE001 - recorded, so that the rest of a sweep goes on
        for m in members:
            if m.error is None:
                m.error, m.traceback = f"{type(e).__name__}: {e}", traceback.format_exc()
        log.error("run failed: %s: %s", type(e).__name__, e)
    load_end = results.machine_load()
    for m in members:
        m.base["machine_load"] = results.load_summary(load_start, load_end)


def _loop(members: list[_Member], engine: Engine, benchmark: Any, samples: list[Sample]) -> None:
    """``benchmark.batch_size`` samples (groups of samples sharing a context) at a time: each
    prefilled once, then every member still running compresses its own copy, and all of them
    decode together (:meth:`Engine.generate_batch`; each gets what it gets alone). A chunk that
    a member's rows already answer (an earlier segment of its run) is left out for it; each
    chunk's new rows are appended to the member's partial samples file."""
    cfg = members[0].job.cfg
    name = members[0].method.name if len(members) == 1 else f"{len(members)} jobs"
    bar = tqdm(total=len(samples), desc=f"{name} {cfg.benchmark.name} ctx{cfg.context_len}",
               unit="sample", dynamic_ncols=True)
    groups = list(protocol.context_groups(samples))
    size = cfg.benchmark.batch_size
    for chunk in (groups[i : i + size] for i in range(0, len(groups), size)):
        if all(m.error is not None for m in members):
            break
        ids = {s.id for group in chunk for s in group}
        alive = [m for m in members
                 if m.error is None and not ids <= {r["id"] for r in m.rows}]
        if not alive:  # answered by an earlier segment of every member's run
            bar.update(len(ids))
            continue
        before = {}
        for m in alive:  # a chunk is answered whole
            m.rows = [r for r in m.rows if r["id"] not in ids]
            before[id(m)] = len(m.rows)
        protocols = {m.job.cfg.protocol for m in alive}
        queries = max(m.method.queries_needed() for m in alive)
        pres = []
        for group in chunk:
            later = max((len(protocol.question(s)) for s in group[1:]), default=0)
            engine.check_fits(len(group[0].input_ids) + later,
                              max(s.max_new_tokens for s in group))
            pres.append(protocol.Prefills.make(engine, group, protocols, queries))
        consume = len(alive) == 1
        _answer(alive, engine, benchmark, chunk, pres, consume)
        del pres
        for m in alive:
            if len(m.rows) > before[id(m)]:
                results.append_samples(m.job.out_dir / results.PARTIAL, m.rows[before[id(m)]:])
        trim_heap()  # the freed tensors' pages back to the system
        bar.update(sum(len(g) for g in chunk))
        if len(members) == 1 and members[0].rows:
            rows = members[0].rows
            bar.set_postfix(acc=f"{sum(r['score'] for r in rows) / len(rows):.1f}")
    bar.close()
    order = {s.id: i for i, s in enumerate(samples)}
    for m in members:
        stale = [r["id"] for r in m.rows if r["id"] not in order]
        if stale:
            log.warning("%s: leaving out %d answered samples that this run does not have: %s",
                        m.job.out_dir, len(stale), stale[:3])
        m.rows = sorted((r for r in m.rows if r["id"] in order), key=lambda r: order[r["id"]])


def _answer(alive: list[_Member], engine: Engine, benchmark: Any, chunk: list[list[Sample]],
            pres: list[protocol.Prefills], consume: bool) -> None:
    """Every member's answers to a chunk of sample groups, decoded ``hardware.max_batch`` rows at
    a time. Members compress their copies in turn and a batch decodes as soon as it is full, so
    at most a batch of compressed copies (and one member's copies of one group) live at once,
    whatever the number of members. A member whose compression fails is marked failed and left
    out; when a batch's decoding fails, each of its members is decoded alone, so that only a
    member that fails alone is marked."""
    size = alive[0].job.cfg.hardware.max_batch  # rows decoded together, at most
    answered: dict[int, list[tuple[Sample, GenerationOutput]]] = {id(m): [] for m in alive}
    pending: list[tuple[_Member, Sample, Request]] = []
    again: list[_Member] = []  # members of a failed batch: decoded alone afterwards

    def drop(m: _Member) -> None:
        pending[:] = [p for p in pending if p[0] is not m]
        answered.pop(id(m), None)

    def decode(n: int) -> None:
        batch, pending[:] = pending[:n], pending[n:]
        try:
            outs = engine.generate_batch([r for _, _, r in batch])
        except Exception as e:  # noqa: BLE001 - find the member it was
            members = list({id(m): m for m, _, _ in batch}.values())
            if consume:
                raise
            if len(members) == 1:
                for m in members:
                    _fail(m, e, chunk[0][0].id)
                    drop(m)
                return
            log.warning("a batch's decoding failed; decoding each of its members alone")
            for m in members:
                drop(m)
                again.append(m)
            return
        for (m, s, _), out in zip(batch, outs, strict=True):
            answered[id(m)].append((s, out))

    for m in alive:
        try:
            for group, pre in zip(chunk, pres):
                if id(m) not in answered:  # failed, or decoded alone afterwards
                    break
                rs = protocol.requests(engine, group, pre, m.method, m.job.cfg.protocol, consume)
                pending += [(m, s, r) for s, r in zip(group, rs, strict=True)]
                while len(pending) >= size:
                    decode(size)
        except Exception as e:  # noqa: BLE001 - this member fails, the others go on
            _fail(m, e, chunk[0][0].id)
            drop(m)
    while pending:
        decode(size)
    for m in alive:
        for s, out in answered.get(id(m), ()):
            m.rows.append(sample_row(s, out, benchmark))
    for m in again:
        _answer([m], engine, benchmark, chunk, pres, False)


def _fail(m: _Member, e: Exception, where: str) -> None:
    m.error, m.traceback = f"{type(e).__name__}: {e}", traceback.format_exc()
    log.error("%s failed on sample %s: %s", m.job.out_dir, where, m.error)


def _finish(m: _Member) -> dict[str, Any]:
    """Write the member's files (samples first, result.json last: it marks the run complete)
    and mirror it to W&B."""
    cfg = m.job.cfg
    summary = results.summarize(m.rows, m.benchmark)
    if m.error is None:
        result = {**m.base, "status": "ok", "error": None, "n_samples": len(m.rows), **summary}
    else:
        result = {**m.base, "status": "failed", "error": m.error, "traceback": m.traceback,
                  "n_samples": len(m.rows), **summary}
    if result.get("accuracy_by_position"):
        result["multi_question"] = protocol.MULTI_QUESTION
    result["finished_at"] = results.now_iso()
    result["duration_s"] = time.perf_counter() - m.t_start
    result["provenance"].update(results.run_facts())
    results.write_samples(m.job.out_dir / results.SAMPLES, m.rows)
    results.write_json(m.job.out_dir / results.RESULT, result)
    if m.error is None:  # complete: nothing left to resume
        for name in (results.PARTIAL, results.PROGRESS):
            (m.job.out_dir / name).unlink(missing_ok=True)
    where = wandb_log.log_run(result, m.rows, m.job.out_dir, cfg.wandb)
    if where:
        result["wandb"] = where
    return result


def sample_row(sample: Sample, out: GenerationOutput, benchmark: Any) -> dict[str, Any]:
    """One line of samples.jsonl: the prediction, its score, timings and measured KV bytes."""
    meta = sample.meta
    recall = None
    if meta.get("needle_spans"):
        spans = meta["needle_spans"]
        answer = meta.get("answer_needles")
        recall = needle_recall(out.stats["kept_indices"],
                               [spans[j] for j in answer] if answer is not None else spans)
    return {
        "id": sample.id, "task": sample.task,
        "score": benchmark.score(out.text, sample),
        "score_parts": benchmark.score_parts(out.text, sample),
        "prediction": out.text, "reference": sample.references,
        "prompt_tokens": out.prompt_tokens, "generated_tokens": len(out.token_ids),
        "stopped_by": out.stats["stopped_by"],
        "ttft_s": out.ttft_s, "prefill_s": out.stats["prefill_s"],
        "compress_s": out.stats["compress_s"], "extend_s": out.stats["extend_s"],
        "compile_s": out.stats["compile_s"],
        "decode_batch_size": out.stats["decode_batch_size"],
        "question_tokens": out.stats["question_tokens"],
        "question_position": meta.get("question_position"),
        "decode_s": out.decode_s, "decode_tokens_per_s": out.decode_tokens_per_s,
        "kv_cache_bytes": out.kv_bytes_peak,
        "kv_cache_bytes_after_compression": out.kv_bytes_after_compression,
        "kv_cache_bytes_uncompressed": out.kv_bytes_uncompressed,
        "kv_cache_bytes_prefill": out.stats["kv_bytes_prefill"],
        "decode_kv_read_bytes": out.decode_kv_read_bytes,
        "prompt_tokens_kept": out.stats["prompt_tokens_kept"],
        "needle_recall": recall,
        "meta": {k: v for k, v in meta.items() if isinstance(v, (int, float, str))},
    }
