"""Run one (method, benchmark, model, context_len) job, or a sweep with -m.

    python run.py                                   # the default job (full cache, synthetic)
    python run.py -m method=full,sliding_window context_len=512,4096 budget=0.2
"""

from __future__ import annotations

import logging
import signal
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from atskv.core.types import ConfigError
from atskv.experiments.config import register_configs

register_configs()
log = logging.getLogger("atskv")
# conf/hydra/launcher/submitit_local.yaml shares its name with the submitit plugin's schema, which
# Hydra then checks it against (wanted) with a deprecation warning on every sweep (not wanted).
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_local' is validated")
# Ctrl-C raises KeyboardInterrupt, which Python swallows when it lands in a finalizer (e.g.
# tqdm's __del__ as a run ends); the flag makes the next job of the sweep stop instead.
_interrupted = False


def _on_sigint(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def quote_group_numbers(argv: list[str], groups: tuple[str, ...] = ("context_len",)) -> list[str]:
    """Hydra parses ``context_len=512,4096`` as integers, which it refuses as config-group
    choices; quote plain numeric choices of those groups so the natural spelling works."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in groups and all(v.strip().isdigit() for v in value.split(",")):
            arg = key + "=" + ",".join(f"'{v.strip()}'" for v in value.split(","))
        out.append(arg)
    return out


def group_members(cfg: DictConfig) -> list:
    """The jobs of a prefill-sharing group (``atskv_group``, set by the sweeper): each member's
    config and run folder, composed exactly as if Hydra had launched it alone."""
    from omegaconf import open_dict

    from atskv.experiments.compose import compose_run_config
    from atskv.experiments.runner import Job
    from hydra_plugins.atskv_sweeper.grouped_sweeper import GROUP_KEY, decode, member_key

    hc = HydraConfig.get()
    task = [o for o in hc.overrides.task
            if not o.lstrip("+~").startswith(f"{GROUP_KEY}=") and not member_key(o)]
    # The launcher pins this job's own folder as a resolved `hydra.sweep.subdir` override; each
    # member's folder comes from the config's template instead (a custom template given on the
    # command line is not kept: members always get run.py's default folder names).
    hydra = [o for o in hc.overrides.hydra
             if not o.lstrip("+~").startswith(("hydra.sweep.subdir=", "hydra.run.dir="))]
    jobs = []
    running = HydraConfig.instance().cfg  # the group job's; a member's folder: its own
    for own in decode(cfg[GROUP_KEY]):
        member = compose_run_config([*hydra, *task, *own], return_hydra_config=True)
        HydraConfig.instance().set_config(member)  # ${hydra:overrides.task}: the member's own
        try:
            out_dir = Path(member.hydra.sweep.dir) / str(member.hydra.sweep.subdir)
        finally:
            HydraConfig.instance().set_config(running)
        preset = member.hydra.runtime.choices.get("method")
        with open_dict(member):
            del member["hydra"]
        member.sweep_id = cfg.sweep_id
        jobs.append(Job(member, out_dir, preset, [*task, *own]))
    return jobs


def objective(result: dict | None, out_dir: Path) -> float:
    """What a sweeper optimises: the run's accuracy (a finished run that was skipped reports the
    accuracy in its result.json; a failed run NaN)."""
    from atskv.experiments import results

    result = result or results.read_result(out_dir) or {}
    acc = result.get("accuracy") if result.get("status") == "ok" else None
    return float("nan") if acc is None else float(acc)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    """One job, or the members of a prefill-sharing group. Returns the objective (accuracy) of
    each: a float for one job, a list (in member order) for a group."""
    from atskv.experiments.runner import Job, run_group

    if _interrupted:
        raise KeyboardInterrupt
    hc = HydraConfig.get()
    try:
        jobs = group_members(cfg) if cfg.atskv_group else [
            Job(cfg, Path(hc.runtime.output_dir), hc.runtime.choices.get("method"),
                list(hc.overrides.task))]
        results = run_group(jobs)
    except ConfigError as e:
        if hc.mode == RunMode.MULTIRUN:
            # Hydra records the job as failed and goes on with the rest of the sweep, which then
            # exits non-zero with the first such error. Nothing is written for this job.
            log.error("error: %s (nothing written; the sweep goes on)", e)
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    failed = False
    for job, result in zip(jobs, results):
        if result is None:
            continue
        if result["status"] != "ok":
            log.error("failed: %s (recorded in %s)", result["error"], job.out_dir / "result.json")
            failed = True
            continue
        frac = result.get("kv_cache_fraction")
        log.info("%s on %s ctx=%d: accuracy %.1f, KV %.1f%% of full, TTFT %.2fs, decode %s tok/s",
                 result["method"], result["benchmark"], result["context_len"], result["accuracy"],
                 100 * frac if frac is not None else float("nan"), result["ttft_s"],
                 f"{result['decode_tokens_per_s']:.1f}" if result["decode_tokens_per_s"] else "n/a")
        print(f"results: {job.out_dir / 'result.json'}")
    if failed and hc.mode == RunMode.RUN:
        sys.exit(1)
    values = [objective(r, job.out_dir) for job, r in zip(jobs, results)]
    return values if cfg.atskv_group else values[0]


if __name__ == "__main__":
    sys.argv = quote_group_numbers(sys.argv)
    signal.signal(signal.SIGINT, _on_sigint)
    main()
