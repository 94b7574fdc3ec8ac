"""Equal-effort hyperparameter tuning of one KV-cache method on the dev split.

    python -m atskv.experiments.tune --method snapkv [--trials N] [--samples-per-task K] [--dry-run] [overrides]

Runs ``run.py -m`` with hydra-optuna-sweeper (seeded TPE, the same trial budget for every
method) over the method's ``search_space`` (declared on its class), maximising the run's accuracy
on ``benchmark.split=dev`` (disjoint from the test split the reports use). The best trial becomes
``conf/method/tuned/<name>.yaml`` (``method=tuned/<name>``), with its provenance as comments and
in ``<name>.provenance.json``. A method without a search space (``full``) gets its defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from atskv.core.types import ConfigError

ROOT = Path(__file__).resolve().parents[3]
#: the ``hydra/sweeper`` option: hydra-optuna-sweeper's ``optuna`` with ``params: {}``
#: (conf/hydra/sweeper/optuna_tune.yaml); every sweeper key is set in :func:`sweeper_overrides`
SWEEPER = "optuna_tune"
DEFAULT_TRIALS = 12  # the trial budget of every method (equal effort)
DEFAULT_SAMPLES_PER_TASK = 3
SAMPLER_SEED = 0
BATCH_SIZE = 4  # trials asked of the sampler at a time (hydra.sweeper.n_jobs)
SWEEP_ROOT = Path("outputs/tune")
#: the protocol every method is tuned under; an extra override may replace one (not the split)
PROTOCOL: dict[str, str] = {
    "benchmark": "synthetic",
    "benchmark.split": "dev",
    "benchmark.tasks": "[single_needle,multi_key,multi_value,variable_tracking]",
    "budget": "0.2",
    "context_len": "2048",
    "model": "smollm2_135m",
    "wandb.mode": "disabled",
    # trials decode 16-48 tokens: compiling each trial's decode step would cost more than it saves
    "hardware.compile": "false",
}
#: keys an extra override may not set (nor any hydra.sweeper.*), and what to use instead
RESERVED = {"method": "--method", "benchmark.n_samples": "--samples-per-task",
            "hydra.sweep.dir": "--sweep-root", "hydra.sweep.subdir": "run.py's default",
            "hydra/sweeper": "the tuner's own"}
GROUP_NUMBERS = ("context_len",)  # config groups whose options are numbers (quoted for Hydra)
VERSIONS = ("optuna", "hydra-optuna-sweeper", "hydra-core")


def method_class(name: str | None) -> type:
    from atskv.methods import METHODS

    if not name or name not in METHODS:
        what = f"--method={name} is unknown" if name else "--method is missing"
        raise ConfigError(f"{what}; choose one of: {', '.join(METHODS)}")
    return METHODS.get(name)


def parse_space(cls: type) -> dict[str, Any]:
    """The class's search space as parsed Hydra sweeps (choice / range / interval), checked:
    every key a hyperparameter field of the class."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    from atskv.experiments.config import method_fields

    fields = [f.name for f in method_fields(cls)]
    out = {}
    for key, spec in cls.search_space.items():
        if key not in fields:
            raise ConfigError(f"{cls.name}.search_space names {key!r}, not a hyperparameter; "
                              f"choose among: {', '.join(fields)}")
        value = OverridesParser.create().parse_override(f"method.{key}={spec}").value()
        if not isinstance(value, (ChoiceSweep, IntervalSweep, RangeSweep)):
            raise ConfigError(f"{cls.name}.search_space[{key!r}]={spec!r} is not a choice(...), "
                              f"range(...) or interval(...)")
        out[key] = value
    return out


def job_overrides(method: str, extra: list[str], samples: int) -> dict[str, str]:
    """The fixed overrides of every trial, by key: :data:`PROTOCOL`, ``--samples-per-task``,
    then ``extra`` (replacing a default of the same key). Reserved keys, searched fields, sweeps
    and a split other than dev are errors."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space = method_class(method).search_space
    out = {k: f"{k}={v}" for k, v in {**PROTOCOL, "benchmark.n_samples": samples}.items()}
    for o in OverridesParser.create().parse_overrides(extra):
        key, line = o.key_or_group, o.input_line
        if key.startswith("method.") and key[7:] in space:
            raise ConfigError(f"{line!r}: {key[7:]} is in {method}'s search space "
                              f"({space[key[7:]]}); the tuner chooses it")
        if key in RESERVED or key.startswith("hydra.sweeper"):
            raise ConfigError(f"{line!r}: {key} is set by the tuner; use "
                              f"{RESERVED.get(key, 'the constants in src/atskv/tune.py')}")
        if o.is_sweep_override():
            raise ConfigError(f"{line!r} is a sweep; the tuner searches only the method's "
                              f"search_space (give one value)")
        if key == "benchmark.split" and o.value() != "dev":
            raise ConfigError(f"benchmark.split={o.value()} is not allowed: tuning uses the dev "
                              f"split (test is for the reported results)")
        out[key] = str(line)
    return out


def value_of(jobs: dict[str, str], key: str) -> str:
    return jobs[key].partition("=")[2].strip("'\"") if key in jobs else ""


def sweeper_overrides(method: str, space: dict[str, str], trials: int) -> list[str]:
    """Every ``hydra.sweeper`` key the tuner sets (a sweeper with the same keys is a drop-in
    replacement for :data:`SWEEPER`)."""
    params = ",".join(f'method.{k}:"{v}"' for k, v in space.items())
    return [f"hydra/sweeper={SWEEPER}", "hydra/sweeper/sampler=tpe",
            f"hydra.sweeper.sampler.seed={SAMPLER_SEED}", "hydra.sweeper.direction=maximize",
            f"hydra.sweeper.n_trials={trials}", f"hydra.sweeper.n_jobs={BATCH_SIZE}",
            "hydra.sweeper.max_failure_rate=0.0", f"hydra.sweeper.study_name=tune-{method}",
            f"++hydra.sweeper.params={{{params}}}"]


@dataclass
class Plan:
    """A checked tuning run: what :func:`tune` executes and its provenance records."""

    method: str
    trials: int
    samples: int
    space: dict[str, str]
    jobs: dict[str, str]  # the fixed overrides of every trial, by key
    sweep_dir: Path
    command: list[str]  # the run.py -m command line
    invocation: str  # the python -m atskv.experiments.tune command line


def build_plan(method: str | None, trials: int = DEFAULT_TRIALS,
               samples: int = DEFAULT_SAMPLES_PER_TASK, extra: list[str] | None = None,
               sweep_root: Path = SWEEP_ROOT, script: Path = ROOT / "run.py") -> Plan:
    """Check the input (nothing runs) and build the sweep's command line."""
    cls = method_class(method)
    parse_space(cls)
    if trials < 1:
        raise ConfigError(f"--trials={trials} must be >= 1 (default {DEFAULT_TRIALS})")
    if samples < 1:
        raise ConfigError(f"--samples-per-task={samples} must be >= 1 "
                          f"(default {DEFAULT_SAMPLES_PER_TASK})")
    extra = list(extra or [])
    jobs = job_overrides(cls.name, extra, samples)
    sweep_dir = Path(sweep_root) / cls.name / datetime.now().strftime("%Y%m%d-%H%M%S")
    command = [sys.executable, str(script), "-m",
               *sweeper_overrides(cls.name, cls.search_space, trials),
               f"hydra.sweep.dir={sweep_dir}",
               f"method={cls.name}", *jobs.values()]
    invocation = shlex.join(["python", "-m", "atskv.experiments.tune", "--method", cls.name, "--trials",
                             str(trials), "--samples-per-task", str(samples), *extra])
    return Plan(cls.name, trials, samples, dict(cls.search_space), jobs, sweep_dir, command,
                invocation)


def preflight(plan: Plan) -> None:
    """Compose and check one trial's config (the method's defaults) before any trial runs."""
    from atskv.benchmarks import BENCHMARKS
    from atskv.experiments.compose import compose_run_config
    from atskv.experiments.config import validate

    overrides = [f"{k}='{value_of(plan.jobs, k)}'" if k in GROUP_NUMBERS else o
                 for k, o in plan.jobs.items()]  # run.py quotes these itself
    cfg = compose_run_config([f"method={plan.method}", *overrides])
    validate(cfg)
    BENCHMARKS.get(cfg.benchmark.name)(cfg.benchmark).validate()


def best_params(sweep_dir: Path, space: dict[str, str]) -> tuple[dict[str, Any], float]:
    """(field -> value, best accuracy) from the sweeper's ``optimization_results.yaml``."""
    from omegaconf import OmegaConf

    path = sweep_dir / "optimization_results.yaml"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing (no trial finished?); nothing written")
    res = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(res, dict)
    params = {k.removeprefix("method."): v for k, v in res["best_params"].items()}
    if set(params) != set(space):
        raise RuntimeError(f"{path}: best_params {sorted(params)} are not the search space "
                           f"{sorted(space)}")
    return {k: params[k] for k in space}, float(res["best_value"])


def provenance(plan: Plan, trials_run: int, best: float | None, params: dict[str, Any],
               note: str = "") -> dict[str, Any]:
    from atskv.experiments.results import git_commit, now_iso

    v = {k: value_of(plan.jobs, k) for k in PROTOCOL}
    runs = [json.loads(p.read_text()) for p in plan.sweep_dir.rglob("result.json")]
    return {
        "method": plan.method, "note": note, "date": now_iso(), "git_commit": git_commit(),
        "trials": trials_run, "trial_budget": plan.trials, "default_trial_budget": DEFAULT_TRIALS,
        "sampler": f"TPE, seed {SAMPLER_SEED}, batches of {BATCH_SIZE} (sweeper {SWEEPER})",
        "objective": (f"accuracy (mean over tasks, 0-100, maximized) on the dev split of "
                      f"{v['benchmark']} {v['benchmark.tasks']}, {plan.samples} samples per task, "
                      f"budget {v['budget']}, context_len {v['context_len']}, model {v['model']}"),
        "best_value": best, "best_params": params, "search_space": plan.space,
        "sweep_dir": str(plan.sweep_dir) if trials_run else None,
        "runs": {"folders": len(runs), "ok": sum(r.get("status") == "ok" for r in runs)},
        "command": plan.invocation,
        "sweep_command": shlex.join(portable(plan.command)) if trials_run else None,
        "overrides": list(plan.jobs.values()),
        "versions": {p: metadata.version(p) for p in VERSIONS},
    }


def portable(command: list[str]) -> list[str]:
    """``command`` with paths inside the repository made relative to it (a committed preset
    names no folder of the machine that tuned it)."""
    root = f"{ROOT}{os.sep}"
    return [a[len(root):] if a.startswith(root) else a for a in command]


def write_tuned(out_dir: Path, method: str, params: dict[str, Any], prov: dict[str, Any]) -> Path:
    """``<out_dir>/<method>.yaml`` (a preset extending ``<method>_schema``; the provenance as
    comments) and ``<method>.provenance.json``, each written atomically."""
    from omegaconf import OmegaConf

    from atskv.experiments.results import atomic_write_text, write_json

    shown = {**prov, "search_space": "; ".join(f"{k}={v}" for k, v in prov["search_space"].items())}
    lines = [f"tuned by src/atskv/tune.py (`make tune METHOD={method}`); machine-readable: "
             f"{method}.provenance.json"]
    lines += [f"{k.replace('_', ' ')}: {shown[k]}" for k in
              ("note", "date", "git_commit", "trials", "trial_budget", "default_trial_budget",
               "sampler", "objective", "best_value", "search_space", "sweep_dir", "command",
               "sweep_command") if shown[k] not in ("", None)]
    body = OmegaConf.to_yaml(OmegaConf.create(params)) if params else ""
    text = ("".join(f"# {line}\n" for line in lines)
            + f"defaults:\n  - {method}_schema\nname: {method}\n" + body)
    write_json(Path(out_dir) / f"{method}.provenance.json", prov)
    atomic_write_text(Path(out_dir) / f"{method}.yaml", text)
    return Path(out_dir) / f"{method}.yaml"


def tune(plan: Plan, dry_run: bool = False, tuned_dir: Path | None = None) -> Path | None:
    """Run the sweep and write the winner; returns the tuned YAML (None for a dry run)."""
    from atskv.experiments.compose import conf_dir

    out_dir = Path(tuned_dir) if tuned_dir else conf_dir() / "method" / "tuned"
    if not plan.space:
        note = f"{plan.method} has no hyperparameters: nothing to tune, defaults, no trials run"
        print(note)
        return None if dry_run else write_tuned(out_dir, plan.method, {},
                                                provenance(plan, 0, None, {}, note))
    preflight(plan)
    print(shlex.join(plan.command), flush=True)
    if dry_run:
        return None
    rc = subprocess.run(plan.command).returncode
    if rc != 0:
        raise RuntimeError(f"the sweep exited with {rc} (see {plan.sweep_dir}); nothing written")
    params, best = best_params(plan.sweep_dir, plan.space)
    path = write_tuned(out_dir, plan.method, params, provenance(plan, plan.trials, best, params))
    print(f"best dev accuracy {best:.2f} with {params}\ntuned: {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m atskv.experiments.tune", description=__doc__.split("\n")[0])
    ap.add_argument("--method", help="a registered method (--list prints them)")
    ap.add_argument("--trials", type=int, default=DEFAULT_TRIALS,
                    help=f"trial budget (default {DEFAULT_TRIALS}, the same for every method)")
    ap.add_argument("--samples-per-task", type=int, default=DEFAULT_SAMPLES_PER_TASK)
    ap.add_argument("--dry-run", action="store_true", help="check and print the command only")
    ap.add_argument("--tuned-dir", type=Path, help="default: conf/method/tuned")
    ap.add_argument("--sweep-root", type=Path, default=SWEEP_ROOT)
    ap.add_argument("--list", action="store_true", help="print the registered methods")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every trial")
    args = ap.parse_intermixed_args(argv)
    if args.list:
        from atskv.methods import METHODS

        print("\n".join(METHODS))
        return 0
    try:
        tune(build_plan(args.method, args.trials, args.samples_per_task, args.overrides,
                        args.sweep_root), args.dry_run, args.tuned_dir)
    except (ConfigError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
