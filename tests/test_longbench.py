"""LongBench: prompts from lm-eval, middle truncation, metrics, validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import bench_cfg, offline_hub, write_jsonl

from atskv.benchmarks.base import BENCHMARKS
from atskv.benchmarks.longbench import (
    ALL_TASKS,
    E_TASKS,
    FIRST_LINE_ONLY,
    NO_CHAT_TEMPLATE,
    TASK_METRIC,
    TASKS,
    LongBench,
    base_task,
    render_prompt,
    score_prediction,
    task_spec,
)
from atskv.benchmarks.textmetrics import encode, middle_truncate, prompt_wrapper
from atskv.core.types import ConfigError

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "longbench"
TREC_CLASSES = ["Abbreviation", "Animal", "Entity", "Description", "Human", "Location"]


def cfg(**kw):
    return bench_cfg("longbench", **kw)


def record(**kw):
    r = {
        "input": "What is the capital of France?",
        "context": "France is a country. Its capital is Paris. " * 3,
        "answers": ["Paris"],
        "length": 20,
        "dataset": "hotpotqa",
        "language": "en",
        "all_classes": None,
        "_id": "abc",
    }
    r.update(kw)
    return r


# -- task tables --------------------------------------------------------------------------------


def test_registered_and_task_lists():
    assert BENCHMARKS.get("longbench") is LongBench
    assert len(TASKS) == 16 and len(E_TASKS) == 13
    assert set(TASK_METRIC) == set(TASKS)
    assert all(base_task(t) in TASKS for t in E_TASKS)
    assert NO_CHAT_TEMPLATE >= FIRST_LINE_ONLY


@pytest.mark.parametrize("task", ALL_TASKS)
def test_lm_eval_yaml_agrees_with_metric_table(task):
    spec = task_spec(task)
    metric = TASK_METRIC[base_task(task)].removesuffix("_score")
    assert spec.process_results.endswith(f"get_{metric}_with_score")
    assert "{{context}}" in spec.prompt
    assert spec.max_new_tokens in (32, 64, 128, 512)


def test_official_generation_lengths():
    assert task_spec("gov_report").max_new_tokens == 512
    assert task_spec("hotpotqa").max_new_tokens == 32
    assert task_spec("narrativeqa").max_new_tokens == 128
    assert task_spec("trec").until == ("\n",)
    assert task_spec("samsum").until == ("\n",)
    assert task_spec("hotpotqa").until == ()


def test_prompt_question_is_thudm_input():
    text = render_prompt(task_spec("hotpotqa").prompt, record())
    assert "France is a country." in text
    assert text.rstrip().endswith("Question: What is the capital of France?\nAnswer:")
    assert "{{" not in text


# -- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task,answer,classes",
    [
        ("hotpotqa", "Barack Obama", None),
        ("gov_report", "The agency reviewed its budget and found waste.", None),
        ("trec", "Location", TREC_CLASSES),
        ("passage_retrieval_en", "Paragraph 12", None),
        ("passage_count", "7", None),
        ("lcc", "    return x + 1", None),
        ("samsum", "Anna will call Tom tomorrow.", None),
    ],
)
def test_perfect_prediction_scores_100(task, answer, classes):
    assert score_prediction(task, answer, [answer], classes) == pytest.approx(100.0)
    assert score_prediction(task + "_e", answer, [answer], classes) == pytest.approx(100.0)


def test_hand_computed_metric_values():
    # qa_f1: "cat sat on mat" vs "cat sat": P = 2/4, R = 1, F1 = 2/3.
    assert score_prediction("hotpotqa", "The cat sat on the mat", ["cat sat"]) == pytest.approx(
        200 / 3, abs=1e-4
    )
    # Max over references.
    assert score_prediction("hotpotqa", "Paris", ["London", "paris."]) == pytest.approx(100)
    # ROUGE-L (rouge 1.0.1, distinct words): LCS 2, P = 1, R = 2/4 -> F = 2/3.
    assert score_prediction("qmsum", "cat sat", ["cat sat on mat"]) == pytest.approx(
        200 / 3, abs=1e-3
    )
    assert score_prediction("qmsum", "dog", ["cat sat on mat"]) == 0.0
    # classification: two classes named, the gold among them -> 1/2.
    assert score_prediction("trec", "Animal or Location", ["Animal"], TREC_CLASSES) == 50.0
    # retrieval / count: share of the numbers in the answer that are right.
    assert score_prediction("passage_retrieval_en", "Paragraph 3 or 5", ["Paragraph 3"]) == 50.0
    assert score_prediction("passage_count", "7 or 8", ["7"]) == 50.0
    assert score_prediction("passage_count", "none", ["7"]) == 0.0
    # code similarity: first line that is not a comment or a fence, fuzz ratio.
    assert score_prediction("lcc", "```\n# next\nx = foo(1)\n", ["x = foo(1)"]) == 100.0
    assert score_prediction("lcc", "x = foo(2)", ["x = foo(1)"]) == 90.0


def test_first_line_postprocessing_only_where_official():
    pred = "\nParis\nand then a long digression about France"
    assert score_prediction("triviaqa", pred, ["Paris"]) == pytest.approx(100.0)
    assert score_prediction("triviaqa_e", pred, ["Paris"]) == pytest.approx(100.0)
    assert score_prediction("hotpotqa", pred, ["Paris"]) < 50.0
    assert score_prediction("trec", "Human\nLocation", ["Human"], TREC_CLASSES) == 100.0


# -- truncation ---------------------------------------------------------------------------------


def test_middle_truncate_is_token_exact():
    ids = list(range(100))
    assert middle_truncate(ids, 10) == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    out = middle_truncate(ids, 11)
    assert len(out) == 11 and out[:5] == ids[:5] and out[5:] == ids[-6:]
    assert middle_truncate(ids, 100) == ids and middle_truncate(ids, 500) == ids
    assert middle_truncate(ids, 0) == []
    assert middle_truncate(ids, 1) == [99]


def test_load_truncates_whole_prompt_to_context_len(tmp_path, smollm2_tokenizer):
    # context_len is the prompt length (THUDM's max_length); the generation comes on top.
    tok = smollm2_tokenizer
    long_ctx = " ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(400))
    write_jsonl(tmp_path / "hotpotqa.jsonl", [record(context=long_ctx)])
    bench = LongBench(cfg(data_dir=str(tmp_path)))
    bench.validate()
    (s,) = bench.load(tok, 512, None, 0)
    assert s.max_new_tokens == 32 and s.meta["truncated"] and s.meta["chat_template"]
    assert len(s.input_ids) == 512
    pre, post, _ = prompt_wrapper(tok, True)
    assert s.input_ids[: len(pre)] == pre and s.input_ids[-len(post) :] == post
    full = encode(tok, render_prompt(task_spec("hotpotqa").prompt, record(context=long_ctx)))
    budget = 512 - len(pre) - len(post)
    body = s.input_ids[len(pre) : len(s.input_ids) - len(post)]
    assert body == full[: budget // 2] + full[-(budget - budget // 2) :]
    assert tok.decode(body).rstrip().endswith("Question: What is the capital of France?\nAnswer:")
    assert s.stop == [] and s.meta["split"] == "test" and "length_bucket" not in s.meta
    # the question part: what the template puts after the context, whole (kvpress's split)
    question = tok.decode(s.input_ids[s.question_start :])
    assert question.startswith("\n\n") and "Question: What is the capital of France?" in question
    assert question.endswith("Answer:" + tok.decode(post))
    assert "Sentence number 399" in tok.decode(s.input_ids[: s.question_start])


def test_no_chat_template_for_fewshot_and_code(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    trec = record(
        input="Question: Where is Paris?\nType:", all_classes=TREC_CLASSES, answers=["Location"]
    )
    write_jsonl(tmp_path / "trec.jsonl", [trec])
    bench = LongBench(cfg(data_dir=str(tmp_path), max_new_tokens=8))
    (s,) = bench.load(tok, 4096, None, 0)
    assert not s.meta["chat_template"] and s.meta["first_line"] and not s.meta["truncated"]
    assert s.max_new_tokens == 8
    assert "<|im_start|>" not in tok.decode(s.input_ids)
    assert s.meta["all_classes"] == TREC_CLASSES
    assert bench.score("Location\nQuestion: next", s) == 100.0


def test_subset_is_deterministic(tmp_path, smollm2_tokenizer):
    rows = [record(_id=f"id{i}", context=f"Doc {i}.") for i in range(20)]
    write_jsonl(tmp_path / "hotpotqa.jsonl", rows)
    bench = LongBench(cfg(data_dir=str(tmp_path)))
    a = [s.id for s in bench.load(smollm2_tokenizer, 1024, 5, seed=3)]
    b = [s.id for s in bench.load(smollm2_tokenizer, 1024, 5, seed=3)]
    c = [s.id for s in bench.load(smollm2_tokenizer, 1024, 5, seed=4)]
    assert a == b and len(a) == 5 and a != c
    capped = LongBench(cfg(data_dir=str(tmp_path), n_samples=2))
    assert len(capped.load(smollm2_tokenizer, 1024, None, 0)) == 2


def test_generation_length_never_limits_the_prompt(tmp_path, smollm2_tokenizer):
    # gov_report generates 512 tokens; a 256-token prompt is still fine (the runner checks
    # prompt + generation against the model's positions).
    write_jsonl(tmp_path / "gov_report.jsonl", [record(context="Budget report. " * 300)])
    (s,) = LongBench(cfg(data_dir=str(tmp_path))).load(smollm2_tokenizer, 256, None, 0)
    assert len(s.input_ids) == 256 and s.max_new_tokens == 512


def test_context_len_below_the_chat_template_raises(tmp_path, smollm2_tokenizer):
    write_jsonl(tmp_path / "gov_report.jsonl", [record()])
    pre, post, _ = prompt_wrapper(smollm2_tokenizer, True)
    small = len(pre) + len(post)
    with pytest.raises(ConfigError, match=rf"context_len={small} .*template alone takes {small}"):
        LongBench(cfg(data_dir=str(tmp_path))).load(smollm2_tokenizer, small, None, 0)
    (s,) = LongBench(cfg(data_dir=str(tmp_path))).load(smollm2_tokenizer, small + 1, None, 0)
    assert len(s.input_ids) == small + 1


def test_max_new_tokens_without_data(tmp_path):
    # No file is read: the tasks' files do not even exist.
    assert LongBench(cfg(tasks=["hotpotqa", "gov_report"])).max_new_tokens() == 512
    assert LongBench(cfg(tasks=["trec", "hotpotqa_e"])).max_new_tokens() == 64
    assert LongBench(cfg(tasks=["trec"], max_new_tokens=7)).max_new_tokens() == 7
    assert LongBench(cfg()).max_new_tokens() == 512  # the 16 default tasks
    with pytest.raises(ConfigError, match=r"max_new_tokens=0 must be a positive integer"):
        LongBench(cfg(tasks=["trec"], max_new_tokens=0)).max_new_tokens()
    with pytest.raises(ConfigError, match="benchmark.tasks is empty"):
        LongBench(cfg(tasks=[])).max_new_tokens()


def test_max_new_tokens_is_the_max_over_loaded_samples(tmp_path, smollm2_tokenizer):
    trec = record(input="Question: Where is Paris?\nType:", all_classes=TREC_CLASSES,
                  answers=["Location"])
    write_jsonl(tmp_path / "trec.jsonl", [trec])
    write_jsonl(tmp_path / "hotpotqa.jsonl", [record()])
    write_jsonl(tmp_path / "qasper.jsonl", [record()])
    bench = LongBench(cfg(data_dir=str(tmp_path)))
    samples = bench.load(smollm2_tokenizer, 1024, None, 0)
    assert {s.task for s in samples} == {"trec", "hotpotqa", "qasper"}
    assert bench.max_new_tokens() == max(s.max_new_tokens for s in samples) == 128


@pytest.mark.parametrize("task", ["trec", "samsum", "triviaqa_e"])
def test_newline_stop_for_fewshot_tasks(tmp_path, smollm2_tokenizer, task):
    extra = {"all_classes": TREC_CLASSES, "answers": ["Location"]} if task == "trec" else {}
    write_jsonl(tmp_path / f"{task}.jsonl", [record(input="Dialogue: A: hi\nSummary:", **extra)])
    (s,) = LongBench(cfg(data_dir=str(tmp_path))).load(smollm2_tokenizer, 1024, None, 0)
    assert s.stop == ["\n"] and s.meta["stop"] == ["\n"]
    write_jsonl(tmp_path / "hotpotqa.jsonl", [record()])
    (h,) = LongBench(cfg(data_dir=str(tmp_path), tasks=["hotpotqa"])).load(
        smollm2_tokenizer, 1024, None, 0
    )
    assert h.stop == []


def test_stop_strings_follow_lm_eval_yaml():
    newline = {t for t in ALL_TASKS if task_spec(t).until == ("\n",)}
    assert newline == {"trec", "triviaqa", "samsum", "trec_e", "triviaqa_e", "samsum_e"}
    assert all(task_spec(t).until == () for t in set(ALL_TASKS) - newline)


def test_length_buckets_on_longbench_e(tmp_path, smollm2_tokenizer):
    lengths = {"a": 120, "b": 3999, "c": 4000, "d": 7999, "e": 8000, "f": 25000}
    rows = [record(_id=k, length=v) for k, v in lengths.items()]  # all in the test split
    write_jsonl(tmp_path / "hotpotqa_e.jsonl", rows)
    write_jsonl(tmp_path / "hotpotqa.jsonl", rows)
    bench = LongBench(cfg(data_dir=str(tmp_path)))
    got = {}
    for s in bench.load(smollm2_tokenizer, 1024, None, 0):
        if s.task == "hotpotqa_e":
            got[s.id.split("/")[1]] = s.meta["length_bucket"]
        else:
            assert "length_bucket" not in s.meta
    assert got == {"a": "0-4k", "b": "0-4k", "c": "4-8k", "d": "4-8k", "e": "8k+", "f": "8k+"}
    assert bench.aggregation("hotpotqa_e") == "mean"


def test_longbench_e_needs_length(tmp_path):
    bad = record()
    del bad["length"]
    write_jsonl(tmp_path / "qasper_e.jsonl", [bad])
    with pytest.raises(ConfigError, match=r"line 1: record is missing required field 'length'"):
        LongBench(cfg(data_dir=str(tmp_path))).validate()


def test_task_metric_names():
    bench = LongBench(cfg())
    assert bench.task_metric("hotpotqa") == "F1"
    assert bench.task_metric("gov_report_e") == "ROUGE-L"
    assert bench.task_metric("trec") == "classification accuracy"
    assert bench.task_metric("passage_retrieval_en") == "retrieval accuracy"
    assert bench.task_metric("passage_count") == "count accuracy"
    assert bench.task_metric("lcc") == "code edit similarity"
    with pytest.raises(ConfigError, match="hotpot_qa"):
        bench.task_metric("hotpot_qa")


def test_mean_aggregate():
    bench = LongBench(cfg())
    rows = [{"score": 100.0, "score_parts": {}}, {"score": 50.0, "score_parts": {}}]
    assert bench.aggregate("qmsum", rows) == 75.0


@pytest.mark.skipif(not (REAL_DIR / "multi_news.jsonl").is_file(), reason="no shared data")
def test_real_multi_news_at_512(smollm2_tokenizer):
    # multi_news generates 512 tokens; every record still loads, its prompt filling at most
    # (and, when longer, exactly) a 512-token context.
    loaded = 0
    for split in ("dev", "test"):
        bench = LongBench(cfg(data_dir=str(REAL_DIR), split=split))
        bench.validate()
        assert bench.tasks() == ["multi_news"] and bench.max_new_tokens() == 512
        samples = bench.load(smollm2_tokenizer, 512, None, seed=0)
        for s in samples:
            assert s.max_new_tokens == 512 and s.references and s.stop == []
            question = smollm2_tokenizer.decode(s.input_ids[s.question_start :])
            assert question.lstrip("\n").startswith(  # a newline of the context may join it
                "Now, write a one-page summary of all the news.\n\nSummary:")
            if s.meta["prompt_tokens_full"] > 512:
                assert s.meta["truncated"] and len(s.input_ids) == 512
            else:
                assert not s.meta["truncated"]
                assert len(s.input_ids) == s.meta["prompt_tokens_full"] <= 512
        assert any(s.meta["truncated"] for s in samples)
        assert bench.max_new_tokens() == max(s.max_new_tokens for s in samples)
        loaded += len(samples)
    assert loaded == 200


@pytest.mark.skipif(not (REAL_DIR / "multi_news.jsonl").is_file(), reason="no shared data")
def test_real_multi_news_fits_2048(smollm2_tokenizer):
    bench = LongBench(cfg(data_dir=str(REAL_DIR)))
    samples = bench.load(smollm2_tokenizer, 2048, 6, seed=0)
    assert len(samples) == 6
    for s in samples:
        assert len(s.input_ids) <= 2048
        if s.meta["truncated"]:
            assert len(s.input_ids) == 2048
    assert any(s.meta["truncated"] for s in samples)


# -- validation ---------------------------------------------------------------------------------


def test_unknown_task_names_choices():
    with pytest.raises(ConfigError, match=r"unknown longbench task 'hotpot_qa'.*hotpotqa"):
        LongBench(cfg(tasks=["hotpot_qa"])).validate()


def test_missing_data_dir_and_file(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        LongBench(cfg(data_dir=str(tmp_path / "nope"))).validate()
    with pytest.raises(ConfigError, match="holds no LongBench task file"):
        LongBench(cfg(data_dir=str(tmp_path))).validate()
    with pytest.raises(ConfigError, match=r"not found: .*qasper\.jsonl"):
        LongBench(cfg(data_dir=str(tmp_path), tasks=["qasper"])).validate()


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "qasper.jsonl", [record(), "{not json"])
    with pytest.raises(ConfigError) as e:
        LongBench(cfg(data_dir=str(tmp_path))).validate()
    assert str(path) in str(e.value) and "line 2" in str(e.value)


def test_missing_field_names_file_line_and_field(tmp_path):
    bad = record()
    del bad["answers"]
    path = write_jsonl(tmp_path / "qasper.jsonl", [record(), record(), bad])
    with pytest.raises(ConfigError) as e:
        LongBench(cfg(data_dir=str(tmp_path))).validate()
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and "'answers'" in msg
    write_jsonl(tmp_path / "qasper.jsonl", [record(context=5)])
    with pytest.raises(ConfigError, match=r"line 1: field 'context' should be str"):
        LongBench(cfg(data_dir=str(tmp_path))).validate()


def test_trec_needs_all_classes(tmp_path):
    write_jsonl(tmp_path / "trec.jsonl", [record(all_classes=None)])
    with pytest.raises(ConfigError, match=r"line 1: field 'all_classes'"):
        LongBench(cfg(data_dir=str(tmp_path))).validate()


def test_hub_failure_becomes_config_error(monkeypatch):
    offline_hub(monkeypatch)
    with pytest.raises(ConfigError, match=r"benchmark\.data_dir"):
        LongBench(cfg(tasks=["qasper"])).validate()
