"""The lm-eval bridge: the ``atskv`` model, our synthetic tasks and exports as lm-eval tasks,
and the ``atskv-lm-eval`` command line (tiny random model, offline)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from atskv.core.types import ConfigError  # noqa: E402
from atskv.integrations.lm_eval import AtsKVLM, greedy_gen_kwargs, split_until  # noqa: E402
from atskv.integrations.lm_eval_tasks import TASK_DIR, export_samples  # noqa: E402

FILLER = "The sky is blue and the grass is green. " * 20


@pytest.fixture(scope="module")
def local_task(tmp_path_factory) -> Path:
    """A plain lm-eval task over a local json file (about 200-token prompts)."""
    d = tmp_path_factory.mktemp("lm_eval_task")
    with open(d / "tiny.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"question": f"{FILLER}Question {i}: what color is the sky?",
                                "answer": "blue"}) + "\n")
    (d / "tiny_local.yaml").write_text(f"""task: tiny_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(d / "tiny.jsonl"))}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return d


@pytest.fixture(scope="module")
def snap_lm():
    return AtsKVLM(model="tiny_random", method="snapkv", budget=0.5, device="cpu")


@pytest.fixture(scope="module")
def full_lm():
    return AtsKVLM(model="tiny_random", method="full", device="cpu")


def tasks_in(folder, **kw) -> TaskManager:
    """Only the tasks in ``folder`` (indexing lm-eval's built-in tasks takes seconds)."""
    return TaskManager(include_path=str(folder), include_defaults=False, **kw)


def gen_request(context: str, **gen_kwargs) -> Instance:
    return Instance(request_type="generate_until", doc={}, arguments=(context, gen_kwargs), idx=0)


# -- runs through lm-eval ----------------------------------------------------------------------
def test_local_json_task_by_model_name(local_task):
    """`model="atskv"` + model_args: registered, and the requested method really ran."""
    res = lm_eval.simple_evaluate(
        model="atskv", model_args="model=tiny_random,method=snapkv,budget=0.5,method.window=16",
        tasks=["tiny_local"], task_manager=tasks_in(local_task), limit=2,
        device="cpu")
    assert res["results"]["tiny_local"]["exact_match,none"] in (0.0, 1.0)
    assert res["results"]["tiny_local"]["sample_len"] == 2
    info = res["config"]["atskv"]
    assert info["method"] == "snapkv" and info["budget"] == 0.5
    assert info["hyperparameters"]["window"] == 16
    assert info["n_generations"] == 2 and info["prompt_tokens_mean"] > 150
    # budget 0.5: the cache holds half of what a full one would (prompt + generated tokens)
    assert info["kv_bytes_peak_mean"] <= 0.55 * info["kv_bytes_uncompressed_mean"]
    assert info["kv_ratio_mean"] == pytest.approx(0.5, abs=0.05)


def test_method_really_changes_the_cache(local_task, snap_lm, full_lm):
    tm = tasks_in(local_task)
    out = {}
    for name, lm in (("snap", snap_lm), ("full", full_lm)):
        res = lm_eval.simple_evaluate(model=lm, tasks=["tiny_local"], task_manager=tm, limit=1)
        assert "exact_match,none" in res["results"]["tiny_local"]
        out[name] = lm.last_output
    assert out["snap"].prompt_tokens == out["full"].prompt_tokens
    assert out["snap"].kv_bytes_peak < 0.75 * out["full"].kv_bytes_peak


def test_synthetic_task_from_include_path():
    """Our synthetic task generated offline by lm-eval; the exact benchmark ids are fed."""
    tm = tasks_in(TASK_DIR, metadata={"model": "tiny_random", "context_len": 256, "n_samples": 2})
    res = lm_eval.simple_evaluate(
        model="atskv", model_args="model=tiny_random,method=sliding_window,budget=0.5",
        tasks=["atskv_niah_single"], task_manager=tm, limit=2, device="cpu")
    r = res["results"]["atskv_niah_single"]
    assert 0.0 <= r["score,none"] <= 100.0 and r["sample_len"] == 2
    info = res["config"]["atskv"]
    assert info["method"] == "sliding_window"
    assert info["pretokenized_prompts"] == 2 and info["truncated_prompts"] == 0
    assert info["prompt_tokens_mean"] == 256
    assert info["generated_tokens_mean"] <= 16


def test_multi_question_task_by_position_in_both_protocols():
    """The multi-question task through lm-eval: a task per question position; the atskv model
    answers each context's four questions from one compression of it, as run.py does, and in
    the question-agnostic protocol compresses the context alone. The full cache answers the same
    in both protocols."""
    tasks = [f"atskv_mq_q{j}" for j in range(4)]
    meta = {"model": "tiny_random", "context_len": 256, "n_samples": 2}
    answers = {}
    for proto in ("question_aware", "question_agnostic"):
        lm = AtsKVLM(model="tiny_random", method="full", device="cpu", protocol=proto)
        res = lm_eval.simple_evaluate(model=lm, tasks=["atskv_multi_question"],
                                      task_manager=tasks_in(TASK_DIR, metadata=meta),
                                      log_samples=True)
        assert all(res["results"][t]["sample_len"] == 2 for t in tasks)
        assert res["config"]["atskv"]["protocol"] == proto
        assert res["config"]["atskv"]["pretokenized_prompts"] == 8
        answers[proto] = {t: [s["resps"] for s in res["samples"][t]] for t in tasks}
    assert answers["question_aware"] == answers["question_agnostic"]


def test_the_agnostic_protocol_needs_prompts_that_say_where_the_question_starts(local_task):
    lm = AtsKVLM(model="tiny_random", method="snapkv", budget=0.5, device="cpu",
                 protocol="question_agnostic")
    with pytest.raises(ConfigError, match="protocol=question_agnostic needs every prompt split"):
        lm.generate_until([gen_request("a prompt from no atskv export", max_gen_toks=4)])
    with pytest.raises(ConfigError, match="protocol='sideways'.*question_aware"):
        AtsKVLM(model="tiny_random", method="full", device="cpu", protocol="sideways")


def test_export_roundtrip_and_chat_template(tmp_path, local_task, snap_lm, smollm2_tokenizer):
    from atskv.benchmarks.synthetic import SyntheticBenchmark
    from atskv.integrations.lm_eval_tasks.export import record_sample, score_doc

    samples = SyntheticBenchmark(None).load(smollm2_tokenizer, 200, 1, 0)
    names = export_samples(samples, smollm2_tokenizer, "synthetic", tmp_path)
    assert names == ["atskv_synthetic_single_needle"]
    rec = json.loads((tmp_path / f"{names[0]}.jsonl").read_text().splitlines()[0])
    assert record_sample(rec).input_ids == samples[0].input_ids
    assert score_doc(rec, f"it is {rec['references'][0]}.") == 100.0
    assert score_doc(rec, "no idea") == 0.0

    before = snap_lm.pretokenized
    res = lm_eval.simple_evaluate(model=snap_lm, tasks=names, limit=1,
                                  task_manager=tasks_in(tmp_path))
    assert "score,none" in res["results"][names[0]]
    assert snap_lm.pretokenized == before + 1
    assert snap_lm.last_output.prompt_tokens == 200

    # --apply_chat_template: lm-eval renders the prompt with the tokenizer's template
    res = lm_eval.simple_evaluate(model=snap_lm, tasks=["tiny_local"], limit=1,
                                  apply_chat_template=True,
                                  task_manager=tasks_in(local_task))
    assert "exact_match,none" in res["results"]["tiny_local"]
    text = snap_lm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "hi" in text and text.rstrip().endswith("assistant")
    assert snap_lm.chat_template(True) and snap_lm.tokenizer_name


def test_cli_console_script(tmp_path, local_task):
    """`atskv-lm-eval --model atskv ...` (lm-eval's CLI; its --device default cuda:0 falls back
    to cpu when CUDA is missing)."""
    script = Path(sys.executable).with_name("atskv-lm-eval")
    cmd = ([str(script)] if script.exists()
           else [sys.executable, "-c", "from atskv.integrations.lm_eval import main; main()"])
    cmd += ["--model", "atskv", "--model_args", "model=tiny_random,method=snapkv,budget=0.5",
            "--tasks", "tiny_local", "--include_path", str(local_task), "--limit", "1",
            "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_local" in proc.stdout
    files = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    assert files, proc.stdout[-2000:]
    res = json.loads(Path(files[0]).read_text())
    assert res["config"]["atskv"]["method"] == "snapkv"
    assert res["config"]["atskv"]["n_generations"] == 1


# -- arguments and errors --------------------------------------------------------------------
def test_unknown_model_args_name_the_choices():
    with pytest.raises(ConfigError, match="unknown model_args key 'bogus'.*context_len"):
        AtsKVLM.create_from_arg_string("model=tiny_random,method=snapkv,bogus=1")
    with pytest.raises(ConfigError, match="method.window=16"):
        AtsKVLM.create_from_arg_string("model=tiny_random,method=snapkv,window=16")
    with pytest.raises(ConfigError, match="method.windw.*method.window, method.kernel"):
        AtsKVLM.create_from_arg_string("model=tiny_random,method=snapkv,method.windw=16")
    with pytest.raises(ConfigError, match="unknown method 'snapk'.*snapkv"):
        AtsKVLM.create_from_arg_string("model=tiny_random,method=snapk")
    with pytest.raises(ConfigError, match="model='tiny'.*tiny_random"):
        AtsKVLM.create_from_arg_string("model=tiny,method=full")
    with pytest.raises(ConfigError, match="budget=1.5"):
        AtsKVLM.create_from_arg_string("model=tiny_random,method=snapkv,budget=1.5")
    with pytest.raises(ConfigError, match="window"):
        AtsKVLM.create_from_arg_string("model=tiny_random,method=snapkv,method.window=abc")


def test_device_from_model_args_wins_over_harness_default():
    lm = AtsKVLM.create_from_arg_obj({"model": "tiny_random", "method": "full", "device": "cpu"},
                                     {"device": "cuda:0", "batch_size": 1})
    assert str(lm.device) == "cpu"


def test_sampling_args_rejected(snap_lm):
    with pytest.raises(ConfigError, match="greedily"):
        snap_lm.generate_until([gen_request("hello", until=["\n"], do_sample=True)])
    with pytest.raises(ConfigError, match="temperature"):
        snap_lm.generate_until([gen_request("hello", temperature=0.7)])
    with pytest.raises(ConfigError, match="num_beams"):
        greedy_gen_kwargs({"num_beams": 4}, 8)
    with pytest.raises(ConfigError, match="unsupported generation kwargs"):
        greedy_gen_kwargs({"max_new_tokens": 4}, 8)
    assert greedy_gen_kwargs({"until": "\n", "do_sample": False, "temperature": 0.0, "top_p": 1.0},
                             8) == (["\n"], 8)
    assert greedy_gen_kwargs({"temperature": 0.7, "do_sample": False, "max_gen_toks": 3}, 8) == ([], 3)


def test_generate_until_truncation_and_stops(snap_lm):
    out = snap_lm.generate_until([gen_request(FILLER, until=[], max_gen_toks=5)])
    assert snap_lm.last_output.prompt_tokens > 64 and len(snap_lm.last_output.token_ids) <= 5
    assert out[0] == snap_lm.last_output.text
    short = AtsKVLM(model="tiny_random", method="snapkv", budget=0.5, device="cpu", context_len=64)
    short.generate_until([gen_request(FILLER, max_gen_toks=4)])
    assert short.last_output.prompt_tokens == 64 and short.truncated == 1
    assert split_until("abc\n\ndef STOP x", ["STOP", "\n\n"]) == "abc"
    assert split_until("abc", ["", "z"]) == "abc"


def test_loglikelihood_not_supported(snap_lm):
    req = Instance(request_type="loglikelihood", doc={}, arguments=("a", " b"), idx=0)
    with pytest.raises(NotImplementedError, match="generate_until"):
        snap_lm.loglikelihood([req])
    with pytest.raises(NotImplementedError, match="generate_until"):
        snap_lm.loglikelihood_rolling([req])


def test_until_stops_generation_in_the_engine(full_lm, tmp_path):
    """lm-eval's ``until`` ends generation inside the engine (fewer tokens made, fewer KV bytes),
    not only cuts the returned text; an exported task keeps its stop strings."""
    context = f"{FILLER}Question 7: what color is the grass?"
    free = full_lm.generate_until([gen_request(context, max_gen_toks=24)])[0]
    free_out = full_lm.last_output
    assert len(free_out.token_ids) == 24
    stop = free[len(free) // 2:][:2]  # a string the unconstrained output contains mid-way
    assert stop and stop in free
    cut = full_lm.generate_until([gen_request(context, until=[stop], max_gen_toks=24)])[0]
    out = full_lm.last_output
    assert cut == free[: free.find(stop)]
    assert out.stats["stopped_by"] == "stop"
    assert len(out.token_ids) < 24 and out.token_ids == free_out.token_ids[: len(out.token_ids)]
    assert out.kv_bytes_peak < free_out.kv_bytes_peak
    # an exported benchmark task keeps its samples' stop strings in its YAML
    from atskv.core.types import Sample

    s = Sample(id="t/0", task="trec", input_ids=[1, 2, 3], references=["x"], max_new_tokens=8,
               stop=["\n"])
    (name,) = export_samples([s], full_lm.tokenizer, "longbench", tmp_path)
    assert 'until: ["\\n"]' in (tmp_path / f"{name}.yaml").read_text()


def test_batch_size_decodes_requests_together_with_the_same_answers():
    """--batch_size: requests decoded together, each answered as alone."""
    meta = {"model": "tiny_random", "context_len": 256, "n_samples": 3}
    answers = {}
    for size in (1, 3):
        lm = AtsKVLM.create_from_arg_obj({"model": "tiny_random", "method": "snapkv",
                                          "budget": 0.5, "device": "cpu"}, {"batch_size": size})
        assert lm.batch_size == size
        res = lm_eval.simple_evaluate(model=lm, tasks=["atskv_niah_multikey"], log_samples=True,
                                      task_manager=tasks_in(TASK_DIR, metadata=meta))
        assert res["config"]["atskv"]["batch_size"] == size
        answers[size] = [s["resps"] for s in res["samples"]["atskv_niah_multikey"]]
        assert lm.last_output.stats["decode_batch_size"] == min(size, 3)
    assert answers[1] == answers[3]
    with pytest.raises(ConfigError, match="batch_size='x'"):
        AtsKVLM.create_from_arg_obj({"model": "tiny_random", "method": "full"}, {"batch_size": "x"})
