"""Sweeps that prefill once: grouping, bit-identical results with and without sharing, failure
isolation and resume per member (the launcher tests in test_sweeps.py run grouped sweeps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from atskv.experiments import runner
from atskv.experiments.compose import compose_run_config
from atskv.experiments.runner import Job, run_group
from atskv.methods import METHODS
from hydra_plugins.atskv_sweeper.grouped_sweeper import GROUP_KEY, decode, group_jobs

TINY = ["model=tiny_random", "warmup=false", "hardware.threads=1", "hardware.compile=false",
        "wandb.mode=disabled",
        "context_len='512'"]
COMPARED = ("prediction", "generated_tokens", "score", "score_parts", "stopped_by",
            "kv_cache_bytes", "kv_cache_bytes_after_compression", "kv_cache_bytes_uncompressed",
            "kv_cache_bytes_prefill", "decode_kv_read_bytes", "prompt_tokens_kept",
            "needle_recall", "prompt_tokens")


def test_jobs_that_differ_only_in_method_and_budget_form_one_group():
    batch = [["context_len=512", f"method={m}", f"budget={b}"]
             for m in ("full", "snapkv") for b in (0.1, 0.2)]
    batch += [["context_len=1024", "method=snapkv", "budget=0.1"],
              ["context_len=512", "method=snapkv", "method.window=16", "budget=0.1"]]
    launched = group_jobs(batch)
    assert len(launched) == 2  # the 1024 job is alone; method.window joins the 512 group
    first, alone = launched
    assert alone == ["context_len=1024", "method=snapkv", "budget=0.1"]
    token = next(o for o in first if o.startswith(f"{GROUP_KEY}="))[len(GROUP_KEY) + 1:]
    members = decode(token)
    assert members == [o[1:] for o in batch if o[0] == "context_len=512"]
    assert first[:3] == ["context_len=512", "method=full", "budget=0.1"]


def _jobs(root: Path, budgets=(0.1, 0.4), methods=None, extra=()) -> list[Job]:
    jobs = []
    for name in methods or METHODS.names():
        for b in budgets:
            cfg = compose_run_config([*TINY, f"method={name}", f"budget={b}",
                                      "benchmark.n_samples=2", *extra])
            jobs.append(Job(cfg, root / f"{name}_{b}"))
    return jobs


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shared_and_alone(tmp_path_factory, smollm2_path):
    root = tmp_path_factory.mktemp("shared")
    shared = run_group(_jobs(root / "shared"))
    alone = [run_group([job])[0] for job in _jobs(root / "alone")]
    return root, shared, alone


def test_shared_prefill_gives_identical_results_for_every_method(shared_and_alone):
    root, shared, alone = shared_and_alone
    assert len(shared) == len(alone) == 2 * len(METHODS.names())
    for s, a in zip(shared, alone):
        assert s["status"] == a["status"] == "ok", (s.get("error"), a.get("error"))
        assert s["prefill_shared"] is True and a["prefill_shared"] is False
        name = f"{s['method']}_{s['budget']}"
        rows_s, rows_a = _rows(root / "shared" / name), _rows(root / "alone" / name)
        assert len(rows_s) == len(rows_a) == 2
        for rs, ra in zip(rows_s, rows_a):
            for key in COMPARED:
                assert rs[key] == ra[key], (name, key)
            # TTFT = the shared prefill's time + this job's own compression
            assert rs["ttft_s"] == pytest.approx(rs["prefill_s"] + rs["compress_s"])
        for key in ("accuracy", "kv_cache_bytes", "prompt_tokens_kept", "needle_recall"):
            assert s[key] == a[key], (name, key)


def test_a_failing_member_is_recorded_and_the_others_finish(tmp_path, monkeypatch, smollm2_path):
    snap = METHODS.get("snapkv")

    def broken(self, *a, **k):
        raise RuntimeError("snapkv exploded")

    monkeypatch.setattr(snap, "attend", broken)
    jobs = _jobs(tmp_path, budgets=(0.2,), methods=["full", "snapkv", "sliding_window"])
    res = run_group(jobs)
    assert [r["status"] for r in res] == ["ok", "failed", "ok"]
    assert "snapkv exploded" in res[1]["error"] and res[1]["n_samples"] == 0
    assert res[0]["n_samples"] == res[2]["n_samples"] == 2
    assert (tmp_path / "snapkv_0.2" / "samples.jsonl").read_text() == ""


def test_resume_reruns_only_missing_or_failed_members(tmp_path, smollm2_path):
    jobs = _jobs(tmp_path, budgets=(0.2,), methods=["full", "snapkv", "sliding_window"])
    run_group(jobs)
    (tmp_path / "snapkv_0.2" / "result.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")}
    again = run_group(_jobs(tmp_path, budgets=(0.2,), methods=["full", "snapkv", "sliding_window"]))
    assert again[0] is None and again[2] is None  # finished: skipped
    assert again[1]["status"] == "ok"
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert run_group(_jobs(tmp_path, budgets=(0.2,), methods=["full", "snapkv"])) == [None, None]


def test_an_interrupted_run_resumes_at_its_first_unanswered_sample(tmp_path, monkeypatch,
                                                                   smollm2_path):
    def jobs(root: Path, *extra: str) -> list[Job]:
        return [Job(compose_run_config([*TINY, f"method={m}", "budget=0.2",
                                        "benchmark.n_samples=3", *extra]), root / m)
                for m in ("full", "snapkv")]

    reference = run_group(jobs(tmp_path / "ref"))
    assert [r["n_samples"] for r in reference] == [3, 3]
    real = runner.protocol.requests
    asked: list[str] = []
    interrupt = [True]

    def requests(engine, group, pre, method, *a, **k):
        if method.name == "snapkv":
            asked.extend(s.id for s in group)
            if interrupt and len(asked) == 2:  # snapkv's run stops on its second sample
                raise RuntimeError("interrupted")
        return real(engine, group, pre, method, *a, **k)

    monkeypatch.setattr(runner.protocol, "requests", requests)
    first = run_group(jobs(tmp_path / "run"))
    assert first[0]["status"] == "ok" and first[1]["status"] == "failed"
    folder = tmp_path / "run" / "snapkv"
    partial = (folder / "samples.partial.jsonl").read_text()
    assert len(partial.splitlines()) == 1
    assert not (tmp_path / "run" / "full" / "samples.partial.jsonl").exists()
    with (folder / "samples.partial.jsonl").open("a") as f:
        f.write('{"id": "cut short", "sco')  # a line the interruption cut
    interrupt.clear()
    shutil.copytree(tmp_path / "run", tmp_path / "afresh")
    asked.clear()
    afresh = run_group(jobs(tmp_path / "afresh", "overwrite=true"))[1]
    ids = [r["id"] for r in _rows(tmp_path / "ref" / "snapkv")]
    assert asked == ids and "segments" not in afresh  # overwrite=true answers everything again
    asked.clear()
    again = run_group(jobs(tmp_path / "run"))
    assert again[0] is None and again[1]["status"] == "ok"
    assert asked == ids[1:]  # the answered sample is not answered again
    rows = _rows(folder)
    assert rows[0] == json.loads(partial)  # kept as it was, timings included
    for got, want in zip(rows, _rows(tmp_path / "ref" / "snapkv"), strict=True):
        for key in COMPARED:
            assert got[key] == want[key], key
    assert again[1]["n_samples"] == 3 and again[1]["accuracy"] == reference[1]["accuracy"]
    assert [seg["rows_before"] for seg in again[1]["segments"]] == [0, 1]
    assert not (folder / "samples.partial.jsonl").exists() and not (folder / "progress.json").exists()


def test_jobs_that_cannot_share_are_refused(tmp_path, smollm2_path):
    a = Job(compose_run_config([*TINY, "method=full"]), tmp_path / "a")
    b = Job(compose_run_config([*TINY, "method=full", "seed=1"]), tmp_path / "b")
    with pytest.raises(ValueError, match="differ in more than method"):
        run_group([a, b])


@pytest.mark.slow
def test_shared_prefill_is_bit_identical_on_smollm2(tmp_path, smollm2_path):
    over = ["model=smollm2_135m", "warmup=false", "wandb.mode=disabled", "context_len='512'",
            "benchmark.n_samples=1"]

    def jobs(sub):
        return [Job(compose_run_config([*over, f"method={m}", f"budget={b}"]), tmp_path / sub / f"{m}_{b}")
                for m in METHODS.names() for b in (0.1, 0.3)]

    shared = run_group(jobs("shared"))
    for job, s in zip(jobs("alone"), shared):
        a = run_group([job])[0]
        assert s["status"] == a["status"] == "ok"
        rs, ra = _rows(Path(str(job.out_dir).replace("alone", "shared"))), _rows(job.out_dir)
        for key in COMPARED:
            assert rs[0][key] == ra[0][key], (job.out_dir.name, key)


def test_samples_decoded_together_give_the_same_results(tmp_path, smollm2_path):
    """benchmark.batch_size: samples (and the four questions of a multi-question context)
    prefilled one after another and decoded together with every member of the group give each
    member the rows it gets one sample at a time, in both protocols."""
    methods = ["full", "snapkv", "h2o", "atskv"]
    extra = ["benchmark.tasks=[single_needle,multi_question]"]
    for proto in ("question_aware", "question_agnostic"):
        one = run_group(_jobs(tmp_path / proto / "one", (0.2,), methods,
                              [*extra, f"protocol={proto}"]))
        two = run_group(_jobs(tmp_path / proto / "two", (0.2,), methods,
                              [*extra, f"protocol={proto}", "benchmark.batch_size=2"]))
        for a, b in zip(one, two, strict=True):
            assert a["status"] == b["status"] == "ok", (a.get("error"), b.get("error"))
            assert b["decode_batch_size"] > a["decode_batch_size"] > 1
            name = f"{a['method']}_0.2"
            rows_a = _rows(tmp_path / proto / "one" / name)
            rows_b = _rows(tmp_path / proto / "two" / name)
            assert len(rows_a) == len(rows_b) == 2 + 2 * 4
            for ra, rb in zip(rows_a, rows_b):
                for key in COMPARED:
                    assert ra[key] == rb[key], (proto, name, key)


def test_max_batch_bounds_the_copies_alive_and_changes_no_result(tmp_path, monkeypatch,
                                                                 smollm2_path):
    """hardware.max_batch rows decode together: members compress their copies as their rows
    enter a batch, so no more than a batch plus one member's copies of one sample group exist
    before a batch decodes, and every member gets the rows it gets with one big batch."""
    from atskv.core.engine import Engine
    from atskv.experiments import protocol

    made, biggest = [], []
    requests, generate = protocol.requests, Engine.generate_batch

    def counting_requests(*a, **k):
        rs = requests(*a, **k)
        made.extend(rs)
        biggest.append(len(rs))
        return rs

    def counting_generate(self, reqs):
        assert len(reqs) <= 3
        assert len(made) <= 3 + max(biggest)  # the copies made and not yet decoded
        del made[: len(reqs)]
        return generate(self, reqs)

    methods, extra = ["full", "snapkv", "atskv"], ["benchmark.batch_size=2"]
    big = run_group(_jobs(tmp_path / "big", (0.2,), methods, extra))
    monkeypatch.setattr(protocol, "requests", counting_requests)
    monkeypatch.setattr(Engine, "generate_batch", counting_generate)
    small = run_group(_jobs(tmp_path / "small", (0.2,), methods, [*extra, "hardware.max_batch=3"]))
    assert not made  # every copy was decoded
    for a, b in zip(big, small, strict=True):
        assert a["status"] == b["status"] == "ok", (a.get("error"), b.get("error"))
        assert a["decode_batch_size"] == 6 and b["decode_batch_size"] <= 3
        name = f"{a['method']}_0.2"
        for ra, rb in zip(_rows(tmp_path / "big" / name), _rows(tmp_path / "small" / name),
                          strict=True):
            for key in COMPARED:
                assert ra[key] == rb[key], (name, key)


def test_a_batch_that_fails_to_decode_fails_only_the_member_that_fails_alone(
        tmp_path, monkeypatch, smollm2_path):
    from atskv.core.engine import Engine

    generate = Engine.generate_batch

    def snapkv_breaks_decoding(self, reqs):
        if any(r.method.name == "snapkv" for r in reqs):
            raise RuntimeError("snapkv decode exploded")
        return generate(self, reqs)

    methods = ["full", "snapkv", "sliding_window"]
    run_group(_jobs(tmp_path / "ref", (0.2,), methods))
    monkeypatch.setattr(Engine, "generate_batch", snapkv_breaks_decoding)
    res = run_group(_jobs(tmp_path / "run", (0.2,), methods, ["hardware.max_batch=2"]))
    assert [r["status"] for r in res] == ["ok", "failed", "ok"]
    assert "snapkv decode exploded" in res[1]["error"] and res[1]["n_samples"] == 0
    for name in ("full_0.2", "sliding_window_0.2"):
        rows_ref, rows = _rows(tmp_path / "ref" / name), _rows(tmp_path / "run" / name)
        assert len(rows) == 2
        for ra, rb in zip(rows_ref, rows, strict=True):
            for key in COMPARED:
                assert ra[key] == rb[key], (name, key)
