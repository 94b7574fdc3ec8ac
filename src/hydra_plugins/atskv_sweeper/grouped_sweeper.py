"""A Hydra sweeper that groups the jobs of a sweep that can share one prefill per sample.

It expands ``-m`` overrides exactly as Hydra's basic sweeper does (cartesian product, batches).
Jobs of a batch that differ only in ``method``, ``method.<hyperparameter>``, ``budget``,
``kv_size`` and ``protocol`` (same model, benchmark, tasks, samples, context length, hardware, dtype, seed) form a
group, and each group is handed to the configured launcher as **one** job: the first member's
overrides plus ``atskv_group=<the members>``. ``run.py`` sees that key and runs the members
together (:func:`atskv.experiments.runner.run_group`): one prefill per sample, each member compressing its
own copy, each writing its own run folder exactly as if it had run alone. So every launcher
(basic, joblib, submitit local, SLURM: one array element per group) works unchanged, resume and
failure handling stay per member, and the command line does not change. ``share_prefill=false``
launches every job on its own.

A sweep brings its own reference: every setting of a batch (the overrides that are not member
keys) with no job running ``full`` gets one ``method=full`` job (no budget override: the full
cache ignores the budget, so one run serves every budget, and its folder is found again by the
next sweep of that setting). With prefill sharing it joins the setting's group and costs one
decode per sample. ``reference=none`` turns this off (:func:`with_reference`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins import basic_sweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from atskv.core.types import ConfigError

log = logging.getLogger(__name__)

GROUP_KEY = "atskv_group"
#: override keys that members of a group may differ in (plus any ``method.<field>``)
MEMBER_KEYS = ("method", "budget", "kv_size", "protocol")
REFERENCE_KEY = "reference"
REFERENCES = ("full", "none")
FULL = "full"


def member_key(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key in MEMBER_KEYS or key.startswith("method.")


def _value(job: Sequence[str], key: str) -> str | None:
    """The value the job's overrides give ``key`` (the last one wins), or None."""
    out = None
    for o in job:
        k, sep, v = o.partition("=")
        if sep and k.lstrip("+~") == key:
            out = v.strip().strip("'\"")
    return out


def with_reference(batch: Sequence[Sequence[str]], default_method: str | None,
                   default_reference: str = FULL) -> tuple[list[list[str]], int]:
    """``batch`` plus one ``method=full`` job for every setting (the job's overrides that are
    not member keys) and protocol that has no job running ``full`` (``method=full``,
    ``method=tuned/full``, or no method override while the config's method is ``full``), unless
    the setting says ``reference=none``. Returns (jobs, number added)."""
    settings: dict[tuple[str, ...], list[Sequence[str]]] = {}
    for job in batch:
        settings.setdefault(tuple(o for o in job if not member_key(o)), []).append(job)
    out = [list(j) for j in batch]
    for shared, jobs in settings.items():
        ref = _value(shared, REFERENCE_KEY) or default_reference
        if ref not in REFERENCES:
            raise ConfigError(f"{REFERENCE_KEY}={ref!r}; choose one of {', '.join(REFERENCES)} "
                              "(full: a sweep adds the full-cache run its settings lack)")
        # one reference per protocol the setting's jobs run (the report never mixes protocols)
        by_protocol: dict[str | None, set[str]] = {}
        for j in jobs:
            method = (_value(j, "method") or default_method or "").rpartition("/")[2]
            by_protocol.setdefault(_value(j, "protocol"), set()).add(method)
        for protocol, methods in by_protocol.items():
            if ref == FULL and FULL not in methods:
                given = [f"protocol={protocol}"] if protocol is not None else []
                out.append([*shared, *given, f"method={FULL}"])
    return out, len(out) - len(batch)


def encode(members: list[list[str]]) -> str:
    """The members' own overrides as one Hydra-safe token (URL-safe base64 of JSON)."""
    return base64.urlsafe_b64encode(json.dumps(members).encode()).decode().rstrip("=")


def decode(token: str) -> list[list[str]]:
    return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))


def group_jobs(batch: Sequence[Sequence[str]]) -> list[list[str]]:
    """Launchable override lists for ``batch``: jobs that differ only in member keys become one
    job carrying ``atskv_group`` (groups of one stay plain jobs), in order of first appearance."""
    return plan(batch)[0]


def plan(batch: Sequence[Sequence[str]]) -> tuple[list[list[str]], list[tuple[int, int | None]]]:
    """:func:`group_jobs`, and for every job of ``batch`` where it went: (launched job, member
    index; None for a job launched alone)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, job in enumerate(batch):
        groups.setdefault(tuple(o for o in job if not member_key(o)), []).append(i)
    launched: list[list[str]] = []
    where: list[tuple[int, int | None]] = [(0, None)] * len(batch)
    for shared, jobs in groups.items():
        members = [[o for o in batch[i] if member_key(o)] for i in jobs]
        if len(jobs) == 1:
            where[jobs[0]] = (len(launched), None)
            launched.append([*shared, *members[0]])
            continue
        for m, i in enumerate(jobs):
            where[i] = (len(launched), m)
        launched.append([*shared, *members[0], f"{GROUP_KEY}={encode(members)}"])
    return launched, where


class GroupingLauncher(Launcher):
    """Wraps the configured launcher: each batch it is given is launched as prefill-sharing
    groups (:func:`plan`), and one :class:`JobReturn` per original job comes back (a group job
    returns its members' values as a list, which is split up here), so a sweeper, the basic one
    or optuna's, sees the jobs it asked for."""

    def __init__(self, inner: Launcher) -> None:
        self.inner = inner

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.inner.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        launched, where = plan(job_overrides)
        if len(launched) < len(job_overrides):
            log.info("%d jobs in %d prefill-sharing unit(s) of work (share_prefill=false "
                     "gives one prefill per job)", len(job_overrides), len(launched))
        rets = self.inner.launch(launched, initial_job_idx=initial_job_idx)
        out = []
        for overrides, (li, member) in zip(job_overrides, where):
            ret = rets[li]
            if member is None:
                out.append(ret)
                continue
            one = dataclasses.replace(ret, overrides=list(overrides))
            if ret.status == JobStatus.COMPLETED:
                one.return_value = ret.return_value[member]
            out.append(one)
        return out


class GroupedSweeper(Sweeper):
    """Hydra's basic sweeper with prefill-sharing groups (see the module docstring). Its
    override expansion is the basic sweeper's own (called, not inherited: Hydra's plugin scan
    re-executes its module, which breaks subclasses of its classes)."""

    def __init__(self, max_batch_size: int | None = None,
                 params: dict[str, str] | None = None) -> None:
        super().__init__()
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        if OmegaConf.select(config, "share_prefill", default=False):
            self.launcher = GroupingLauncher(self.launcher)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        assert self.hydra_context is not None
        params = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        batches = basic_sweeper.BasicSweeper.split_arguments(parser.parse_overrides(params),
                                                             self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns: list[Sequence[JobReturn]] = []
        initial_job_idx = 0
        method = OmegaConf.select(self.config, "method.name", default=None)
        reference = OmegaConf.select(self.config, REFERENCE_KEY, default=FULL)
        for batch in batches:
            batch, added = with_reference(batch, method, reference)
            if added:
                log.info("reference: %d setting(s) of this sweep had no `full` run; one each is "
                         "added (reference=none turns this off)", added)
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            for r in results:
                _ = r.return_value  # re-raises a job's failure
            initial_job_idx += len(batch)
            returns.append(results)
        return returns
