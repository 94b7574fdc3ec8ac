"""Hyperparameter tuning (src/atskv/tune.py): every method's search space is valid, the sweep
command runs the dev protocol with the same trial budget for every method, bad input fails
before anything runs, and a 2-trial optuna sweep on the tiny model writes a tuned preset that
composes as ``method=tuned/<name>``."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from omegaconf import OmegaConf

from atskv.experiments import tune
from atskv.experiments.compose import compose_run_config, conf_dir
from atskv.experiments.config import build_method, method_fields, register_configs
from atskv.methods import METHODS

TINY = ["model=tiny_random", "context_len=512", "warmup=false", "hardware.threads=1"]


def key_hash_of(result: dict) -> str:
    """The run folder's key of a result (its run_key hashed, docs/outputs.md)."""
    digest = hashlib.sha1(json.dumps(result["run_key"], sort_keys=True).encode()).hexdigest()
    return "_" + digest[:8]


def space_values(sweep) -> list:
    """The values a test tries: every choice; an interval's ends and middle."""
    if isinstance(sweep, ChoiceSweep):
        return list(sweep.list)
    assert isinstance(sweep, IntervalSweep)
    return [sweep.start, (sweep.start + sweep.end) / 2, sweep.end]


def compose_tuned(conf: Path, name: str):
    """``method=tuned/<name>`` from the preset under ``conf/method/tuned``: composed from a copy
    of the repository's conf/ with that preset in it (so a committed preset of the same name
    cannot shadow it)."""
    import os
    import shutil
    from unittest import mock

    from atskv.experiments.compose import conf_dir

    merged = conf.parent / "conf_merged"
    shutil.copytree(conf_dir(), merged, dirs_exist_ok=True)
    (merged / "method" / "tuned").mkdir(parents=True, exist_ok=True)
    shutil.copy(conf / "method" / "tuned" / f"{name}.yaml", merged / "method" / "tuned")
    with mock.patch.dict(os.environ, {"ATSKV_CONF_DIR": str(merged)}):
        return compose_run_config([f"method=tuned/{name}"])


@pytest.fixture
def no_subprocess(monkeypatch):
    """Fail the test if run.py is started (other commands, e.g. git, go through)."""
    real = subprocess.run

    def guarded(cmd, *a, **k):
        assert not any(str(c).endswith("run.py") for c in cmd), f"nothing may run: {cmd}"
        return real(cmd, *a, **k)

    monkeypatch.setattr(subprocess, "run", guarded)


# -- search spaces ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS.names())
def test_search_space_names_fields_and_every_value_composes_and_validates(name):
    cls = METHODS.get(name)
    fields = {f.name for f in method_fields(cls)}
    assert set(cls.search_space) <= fields
    assert (name == "full") == (not cls.search_space)  # only full has nothing to tune
    assert len(cls.search_space) <= 7
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for field, sweep in tune.parse_space(cls).items():
            for value in space_values(sweep):
                # the override exactly as the optuna sweeper writes a trial's parameter
                cfg = compose(config_name="config",
                              overrides=[f"method={name}", f"method.{field}={value}"])
                method = build_method(cfg)  # the method's own checks
                assert getattr(method, field) == value


def test_h2o_never_tries_the_quadratic_prefill_window():
    values = space_values(tune.parse_space(METHODS.get("h2o"))["prefill_window"])
    assert min(values) > 0


def test_a_space_naming_no_field_is_an_error():
    class Bad(METHODS.get("snapkv")):
        search_space = {"windw": "choice(8, 16)"}

    with pytest.raises(tune.ConfigError, match="windw.*window"):
        tune.parse_space(Bad)


# -- the command ------------------------------------------------------------------------------

def test_command_runs_the_dev_protocol_with_one_trial_budget_for_every_method(tmp_path):
    plans = [tune.build_plan(m, sweep_root=tmp_path) for m in ("snapkv", "h2o")]
    for plan in plans:
        cmd = plan.command
        assert cmd[2] == "-m" and Path(cmd[1]).name == "run.py"
        for item in ("benchmark=synthetic", "benchmark.split=dev", "budget=0.2",
                     "context_len=2048", "model=smollm2_135m", "wandb.mode=disabled",
                     "benchmark.tasks=[single_needle,multi_key,multi_value,variable_tracking]",
                     f"hydra.sweeper.n_trials={tune.DEFAULT_TRIALS}", f"method={plan.method}",
                     f"hydra/sweeper={tune.SWEEPER}", "hydra.sweeper.direction=maximize",
                     f"hydra.sweeper.sampler.seed={tune.SAMPLER_SEED}",
                     f"hydra.sweep.dir={plan.sweep_dir}"):
            assert item in cmd, item
        assert plan.sweep_dir.parent == tmp_path / plan.method
        # the sweeper overrides compose, and the params are the class's search space
        hydra_cfg = compose_run_config(
            [o for o in cmd[3:] if o.startswith(("hydra", "++hydra"))]
            + [f"method={plan.method}", "context_len='2048'"], return_hydra_config=True).hydra
        assert OmegaConf.to_container(hydra_cfg.sweeper.params) == {
            f"method.{k}": v for k, v in METHODS.get(plan.method).search_space.items()}
        assert hydra_cfg.sweeper.n_trials == tune.DEFAULT_TRIALS
        assert hydra_cfg.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert tune.build_plan("snapkv", trials=5).command.count("hydra.sweeper.n_trials=5") == 1


def test_extra_overrides_replace_defaults_and_stay_on_dev():
    plan = tune.build_plan("quest", samples=2, extra=["model=tiny_random", "benchmark.split=dev",
                                                      "method.token_budget=64"])
    assert "model=tiny_random" in plan.command and "model=smollm2_135m" not in plan.command
    assert "benchmark.n_samples=2" in plan.command and "method.token_budget=64" in plan.command


@pytest.mark.parametrize("argv, message", [
    (["--method", "snapk"], r"--method=snapk is unknown; choose one of: .*atskv, .*snapkv"),
    ([], r"--method is missing; choose one of: .*full"),
    (["--method", "snapkv", "--trials", "0"], r"--trials=0 must be >= 1"),
    (["--method", "snapkv", "--samples-per-task", "0"], r"--samples-per-task=0 must be >= 1"),
    (["--method", "snapkv", "benchmark.split=test"], r"benchmark.split=test is not allowed"),
    (["--method", "snapkv", "budget=0.1,0.2"], r"'budget=0.1,0.2' is a sweep"),
    (["--method", "snapkv", "method.window=8"], r"window is in snapkv's search space"),
    (["--method", "snapkv", "benchmark.n_samples=2"], r"use --samples-per-task"),
    (["--method", "snapkv", "hydra.sweeper.n_trials=3"], r"set by the tuner"),
    (["--method", "snapkv", "model=tny"], r"model/tny"),
])
def test_bad_input_is_a_clear_error_before_anything_runs(argv, message, capsys, tmp_path,
                                                         no_subprocess):
    assert tune.main([*argv, "--tuned-dir", str(tmp_path), "--sweep-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert not any(tmp_path.iterdir())


def test_dry_run_prints_the_command_and_writes_nothing(capsys, tmp_path, no_subprocess):
    assert tune.main(["--method", "quest", "--dry-run", "--tuned-dir", str(tmp_path),
                      "--sweep-root", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert "run.py -m" in out and "method.page_size:" in out and "benchmark.split=dev" in out
    assert not any(tmp_path.iterdir())


# -- the tuned preset -------------------------------------------------------------------------

def test_full_gets_its_defaults_and_a_note_without_trials(tmp_path, no_subprocess):
    assert tune.main(["--method", "full", "--tuned-dir", str(tmp_path / "method/tuned")]) == 0
    text = (tmp_path / "method/tuned/full.yaml").read_text()
    assert "nothing to tune" in text and "defaults:\n  - full_schema\nname: full\n" in text
    prov = json.loads((tmp_path / "method/tuned/full.provenance.json").read_text())
    assert prov["trials"] == 0 and prov["default_trial_budget"] == tune.DEFAULT_TRIALS
    assert prov["best_params"] == {} and prov["sweep_dir"] is None
    assert compose_tuned(tmp_path, "full").method.name == "full"


def test_tuned_values_of_every_type_round_trip_through_compose(tmp_path):
    params = {"window": 16, "chunk": 8, "span": 0, "consensus": 0.3741, "signal": "attn",
              "min_share": 0.125, "adaptive": False}
    plan = tune.build_plan("atskv", sweep_root=tmp_path / "sweeps")
    tune.write_tuned(tmp_path / "method/tuned", "atskv", params,
                     tune.provenance(plan, 0, None, params))
    method = build_method(compose_tuned(tmp_path, "atskv"))
    assert {k: getattr(method, k) for k in params} == params


def test_two_trial_sweep_on_the_tiny_model_writes_a_tuned_preset(tmp_path):
    """End to end: run.py -m with the optuna sweeper (run.py returns the accuracy)."""
    out = tmp_path / "conf/method/tuned"
    rc = tune.main(["--method", "snapkv", "--trials", "2", "--samples-per-task", "1",
                    "--tuned-dir", str(out), "--sweep-root", str(tmp_path / "sweeps"), *TINY])
    assert rc == 0
    prov = json.loads((out / "snapkv.provenance.json").read_text())
    assert prov["trials"] == 2 and prov["runs"]["ok"] >= 1
    assert prov["search_space"] == METHODS.get("snapkv").search_space
    assert 0 <= prov["best_value"] <= 100 and "dev split" in prov["objective"]
    assert " run.py -m " in prov["sweep_command"]  # no folder of this machine in the preset
    assert str(tune.ROOT) not in prov["sweep_command"]
    space = tune.parse_space(METHODS.get("snapkv"))
    assert set(prov["best_params"]) == set(space)
    for field, value in prov["best_params"].items():
        assert value in space_values(space[field])
    folders = {p.parent: json.loads(p.read_text())
               for p in Path(prov["sweep_dir"]).rglob("result.json")}
    assert folders and all(r["config"]["benchmark"]["split"] == "dev" for r in folders.values())
    # every trial's result sits in the folder its own hyperparameters name
    for folder, r in folders.items():
        assert folder.parent.name == "snapkv"
        differs = [f"{field}={value}" for field, value in r["config"]["method"].items()
                   if field != "name" and value != getattr(METHODS.get("snapkv")(), field, None)]
        assert r["run_key"]["method"] == differs and folder.name.endswith(key_hash_of(r))
    text = (out / "snapkv.yaml").read_text()
    assert "# objective: accuracy" in text and "defaults:\n  - snapkv_schema\n" in text
    method = build_method(compose_tuned(tmp_path / "conf", "snapkv"))
    assert {k: getattr(method, k) for k in space} == prov["best_params"]
