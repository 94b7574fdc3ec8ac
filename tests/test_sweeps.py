"""Sweeps as subprocesses of run.py on the tiny model: launchers (basic, submitit local, joblib)
write each job into its deterministic folder; resume skips finished jobs and reruns failed or
missing ones; a failing job is recorded and the rest of the sweep goes on; Ctrl-C leaves only
complete files. Plus composition of the launcher and hardware configs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_random", "context_len=512", "benchmark.n_samples=1", "warmup=false",
        "hardware.threads=1", "hardware.compile=false", "wandb.mode=disabled"]
# the overrides that name the folder (through its key)
KEYED = ["benchmark.n_samples=1", "hardware.compile=false", "hardware.threads=1"]


def run_py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def job_dir(method: str, extra: tuple[str, ...] = (), variant: tuple[str, ...] = ()) -> str:
    """The folder of a TINY job: its key is 8 hex digits of the SHA-1 of the method's variant
    and the other overrides, as result.json's run_key spells them (docs/outputs.md)."""
    key = {"method": list(variant), "overrides": sorted([*KEYED, *extra])}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"synthetic/tiny_random/cpu/{method}/ctx512_pb0.25_s0_{digest}"


def results(folder: Path) -> dict[str, dict]:
    """Relative folder -> parsed result.json, for every job folder under ``folder``."""
    return {p.parent.relative_to(folder).as_posix(): json.loads(p.read_text())
            for p in folder.rglob("result.json")}


def snapshot(folder: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes())
            for name in ("result.json", "samples.jsonl") for p in folder.rglob(name)}


def hydra_compose(*overrides: str):
    from atskv.experiments.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


# -- configs ----------------------------------------------------------------------------------

# run.py silences this one: our submitit_local.yaml is checked against the plugin's schema of the
# same name (see the comment in run.py)
@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/submitit_local' is validated")
def test_launcher_configs_compose_and_take_overrides():
    slurm = hydra_compose("hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                          "hydra.launcher.gpus_per_node=4", "hydra.launcher.timeout_min=600",
                          "hydra.launcher.mem_gb=256", "hydra.launcher.cpus_per_task=16").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.partition, slurm.gpus_per_node, slurm.timeout_min, slurm.mem_gb,
            slurm.cpus_per_task) == ("gpu", 4, 600, 256, 16)
    local = hydra_compose("hydra/launcher=submitit_local").hydra.launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher") and local.timeout_min > 0
    par = hydra_compose("hydra/launcher=local_parallel", "hydra.launcher.n_jobs=3").hydra.launcher
    assert par._target_.endswith("JoblibLauncher") and par.n_jobs == 3
    # typed: a misspelt key or a mistyped value fails at composition, before any submission
    for bad in ("hydra.launcher.partiton=gpu", "hydra.launcher.timeout_min=soon"):
        with pytest.raises(ConfigCompositionException):
            hydra_compose("hydra/launcher=slurm", bad)
    # every launcher keeps the deterministic job folders of the default one
    subdirs = {OmegaConf.to_container(hydra_compose(f"hydra/launcher={name}").hydra.sweep)["subdir"]
               for name in ("basic", "slurm", "submitit_local", "local_parallel")}
    assert len(subdirs) == 1


def test_hardware_profiles_for_one_and_several_gpus():
    one = hydra_compose("hardware=cuda").hardware
    assert one.device == "cuda" and one.device_map is None
    several = hydra_compose("hardware=multi_gpu").hardware
    assert several.device == "cuda" and several.device_map == "auto" and not several.cuda_graph


# -- launchers --------------------------------------------------------------------------------

@pytest.mark.parametrize("launcher", ["basic", "submitit_local", "local_parallel"])
def test_each_launcher_writes_every_job_into_its_folder(tmp_path, launcher):
    proc = run_py("-m", f"hydra/launcher={launcher}", "method=full,sliding_window", *TINY,
                  f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(tmp_path)
    assert set(res) == {job_dir("full"), job_dir("sliding_window")}
    assert all(r["status"] == "ok" and r["error"] is None and r["n_samples"] == 1
               for r in res.values())
    for folder in res:
        rows = (tmp_path / folder / "samples.jsonl").read_text().splitlines()
        assert len(rows) == 1 and json.loads(rows[0])["prediction"] is not None
    # one sweep, one id (it is resolved when the sweep starts, not when each job does)
    assert len({r["sweep_id"] for r in res.values()}) == 1
    # the two jobs differ only in method: one unit of work for the launcher, one prefill each
    assert all(r["prefill_shared"] for r in res.values())
    assert "2 jobs in 1 prefill-sharing unit(s) of work" in proc.stderr + proc.stdout
    assert "deprecated" not in proc.stderr
    if launcher == "submitit_local":  # submitit's pickles and logs stay inside the sweep folder
        assert list((tmp_path / ".submitit").rglob("*_result.pkl"))


def test_grouped_members_differing_in_hyperparameters_write_their_own_folders(tmp_path):
    """Members of a group that differ only in a method hyperparameter: each one's result is in
    the folder its own configuration names (the launcher pins the group job's folder; members
    must not inherit it)."""
    proc = run_py("-m", "method=snapkv", "method.window=8,16", "reference=none", *TINY,
                  f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(tmp_path)
    assert len(res) == 2
    for folder, r in res.items():
        window = f"window={r['config']['method']['window']}"
        assert r["run_key"] == {"method": [window], "overrides": KEYED}
        assert folder == job_dir("snapkv", variant=(window,))
        assert r["prefill_shared"] is True


def test_a_sweep_adds_its_full_reference_once_per_setting(tmp_path):
    """Two methods x two budgets x two context lengths, no `full`: one full run per context
    length is added, shares the group's prefill, is found by the next sweep, and is what the
    report compares against (and what the kvpress export calls no_press)."""
    from atskv.analysis import report
    from atskv.analysis.export_kvpress import export

    args = ["-m", "method=sliding_window,snapkv", "budget=0.2,0.5", "context_len=512,1024",
            *[a for a in TINY if not a.startswith("context_len")], f"hydra.sweep.dir={tmp_path}"]
    proc = run_py(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 setting(s) of this sweep had no `full` run" in proc.stderr + proc.stdout
    res = results(tmp_path)
    fulls = [r for r in res.values() if r["method"] == "full"]
    assert len(res) == 10 and sorted(r["context_len"] for r in fulls) == [512, 1024]
    assert job_dir("full") in res  # no budget override: the default folder, found again
    assert all(r["prefill_shared"] and r["status"] == "ok" for r in res.values())
    again = run_py(*args)  # everything, the reference included, is found and skipped
    assert again.returncode == 0 and again.stdout.count("results:") == 0, again.stderr[-2000:]
    rep = report.generate_report([tmp_path], tmp_path / "report")
    pc = rep.per_context[rep.per_context["method"] != "full"]
    assert len(pc) == 8 and set(pc["memory_reduction_ref"]) == {"full"}
    assert pc["delta"].notna().all()
    folders = export([tmp_path], tmp_path / "kvpress")
    assert len(folders) == 10
    assert sum(f.name.split("__")[3] == "no_press" for f in folders) == 2


def test_reference_none_adds_nothing_and_keeps_the_folder(tmp_path):
    proc = run_py("-m", "method=sliding_window", "reference=none", *TINY,
                  f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(results(tmp_path)) == {job_dir("sliding_window")}  # `reference` is not in the key
    bad = run_py("-m", "method=sliding_window", "reference=some", *TINY,
                 f"hydra.sweep.dir={tmp_path / 'bad'}")
    assert bad.returncode != 0 and "reference='some'; choose one of full, none" in bad.stderr


def test_share_prefill_false_launches_every_job_alone(tmp_path):
    proc = run_py("-m", "method=full,sliding_window", "share_prefill=false", *TINY,
                  f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results(tmp_path)
    assert len(res) == 2 and not any(r["prefill_shared"] for r in res.values())
    assert "prefill-sharing" not in proc.stderr + proc.stdout


# -- failures and resume ----------------------------------------------------------------------

def test_failed_job_is_recorded_the_rest_goes_on_and_rerun_resumes(tmp_path):
    # A natural failure after every check passed: a model too large for this machine's memory
    # (a 2^20-wide tiny Llama's embedding alone needs ~200 GB), so building it runs out of
    # memory, as a real OOM in a sweep would.
    args = ["-m", "model.tiny.hidden_size=1048576,64,32", *TINY, f"hydra.sweep.dir={tmp_path}"]
    bad, good, also_good = (job_dir("full", (f"model.tiny.hidden_size={n}",))
                            for n in (1048576, 64, 32))
    proc = run_py(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the sweep finishes; the failure is a record
    res = results(tmp_path)
    assert set(res) == {bad, good, also_good}
    failed = res[bad]
    assert failed["status"] == "failed" and failed["n_samples"] == 0
    assert failed["error"].startswith("RuntimeError") and "Traceback" in failed["traceback"]
    assert failed["config"]["model"]["tiny"]["hidden_size"] == 1048576 and failed["provenance"]
    assert (tmp_path / bad / "samples.jsonl").read_text() == ""
    assert res[good]["status"] == res[also_good]["status"] == "ok"  # jobs after it still ran
    assert len({r["sweep_id"] for r in res.values()}) == 1

    # Resume: finished jobs are skipped (files untouched), the failed one and a missing one rerun.
    (tmp_path / also_good / "result.json").unlink()
    kept = snapshot(tmp_path / good)
    failed_before = (tmp_path / bad / "result.json").stat().st_mtime_ns
    again = run_py(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipping" in again.stderr + again.stdout
    assert snapshot(tmp_path / good) == kept
    res2 = results(tmp_path)
    assert set(res2) == {bad, good, also_good}
    assert res2[also_good]["status"] == "ok"
    assert res2[bad]["status"] == "failed"
    assert (tmp_path / bad / "result.json").stat().st_mtime_ns != failed_before


def test_config_error_in_a_sweep_skips_that_job_and_runs_the_rest(tmp_path):
    # tiny_random has 8192 positions, so context_len=8192 fails before the model loads
    args = ["-m", "context_len=8192,512", *[a for a in TINY if not a.startswith("context_len")],
            f"hydra.sweep.dir={tmp_path}"]
    proc = run_py(*args)
    assert proc.returncode != 0  # reported at the end of the sweep
    assert "context_len=8192 (the prompt) + 16 new tokens" in proc.stderr
    assert set(results(tmp_path)) == {job_dir("full")}  # the 512 job after it still ran


# -- Ctrl-C -----------------------------------------------------------------------------------

def test_ctrl_c_leaves_only_complete_files_and_rerun_completes(tmp_path):
    # two prefill-sharing groups (one per seed) of two jobs each: the interrupt lands after the
    # first group has written its results
    args = ["-m", "method=full,sliding_window", "seed=0,1", *TINY,
            "benchmark.n_samples=2", f"hydra.sweep.dir={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    log = (tmp_path / "sweep.log").open("w")
    # its own process group, so that SIGINT reaches it the way a terminal's Ctrl-C does
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not list(tmp_path.rglob("result.json")):
            assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            assert time.time() < deadline, "no job finished in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert proc.returncode != 0
    done = results(tmp_path)  # every result.json present parses completely
    assert 1 <= len(done) < 4, "the interrupt should land mid-sweep"
    assert all(r["status"] == "ok" for r in done.values())
    for p in tmp_path.rglob("samples.jsonl"):
        for line in p.read_text().splitlines():
            json.loads(line)
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files
                 if f.endswith(".tmp")]
    assert not leftovers

    finished = {p.parent for p in tmp_path.rglob("result.json")}
    kept = {p: v for p, v in snapshot(tmp_path).items() if p.parent in finished}
    proc = run_py(*args)  # the rerun finishes the sweep and leaves the finished jobs alone
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = results(tmp_path)
    assert len(final) == 4 and all(r["status"] == "ok" for r in final.values())
    assert {p: v for p, v in snapshot(tmp_path).items() if p in kept} == kept
