"""ZeroSCROLLS: document-only truncation, metrics, validation errors, the shared real files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import bench_cfg, offline_hub, write_jsonl

from atskv.benchmarks.base import BENCHMARKS
from atskv.benchmarks.zeroscrolls import (
    DEFAULT_MAX_NEW_TOKENS,
    TASK_METRIC,
    TASKS,
    ZeroScrolls,
    concordance_index,
    corpus_rouge,
    exp_similarity,
    rouge_geometric_mean,
    score_prediction,
)
from atskv.core.types import ConfigError, Sample

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "zero_scrolls"
SEP = "... [The rest of the story is omitted]\n\n"


def cfg(**kw):
    return bench_cfg("zeroscrolls", **kw)


def make_record(doc: str, query: str, rid: str = "quality-0-0", output: str = "(B)") -> dict:
    instruction = "You are given a story and a question. Answer with a letter.\n\nStory:\n"
    text = instruction + doc + "\n\n" + query + "\n\nAnswer:\n"
    ds = len(instruction)
    de = ds + len(doc)
    qs = de + 2
    return {
        "id": rid,
        "pid": rid,
        "input": text,
        "output": output,
        "document_start_index": ds,
        "document_end_index": de,
        "query_start_index": qs,
        "query_end_index": qs + len(query),
        "truncation_seperator": SEP,
    }


def write_task(root: Path, task: str, rows) -> Path:
    return write_jsonl(root / task / "validation.jsonl", rows)


LONG_DOC = " ".join(f"On day {i} the sailor counted {i * 3} gulls." for i in range(300))
QUERY = (
    "Question and Possible Answers:\nWhat did the sailor count?\n\n (A) Fish\n (B) Gulls\n"
    " (C) Stars\n (D) Waves"
)


# -- metrics ------------------------------------------------------------------------------------


def test_registered_and_tables():
    assert BENCHMARKS.get("zeroscrolls") is ZeroScrolls
    assert len(TASKS) == 10 and set(TASK_METRIC) == set(TASKS) == set(DEFAULT_MAX_NEW_TOKENS)


@pytest.mark.parametrize(
    "task,answer",
    [
        ("gov_report", "The report reviews federal spending on roads."),
        ("squality", "A crew lands on a strange planet and meets its people."),
        ("qasper", "a BiLSTM encoder"),
        ("narrative_qa", "He hides in the barn."),
        ("quality", "(C)"),
        ("space_digest", "62.5%"),
        ("book_sum_sort", "3, 1, 4, 2, 5"),
    ],
)
def test_perfect_prediction_scores_100(task, answer):
    assert score_prediction(task, answer, [answer]) == pytest.approx(100.0)


def test_rouge_geometric_mean_hand_computed():
    # "the cat sat" vs "the cat sat on the mat": R1 P=1 R=1/2; R2 P=1 R=2/5; RL = R1.
    r1 = 2 * 1 * 0.5 / 1.5
    r2 = 2 * 1 * 0.4 / 1.4
    expected = 100 * (r1 * r2 * r1) ** (1 / 3)
    got = rouge_geometric_mean("the cat sat", ["the cat sat on the mat"])
    assert got == pytest.approx(expected, abs=1e-6)
    assert score_prediction("qmsum", "the cat sat", ["the cat sat on the mat"]) == got
    # No shared bigram: the geometric mean is 0.
    assert rouge_geometric_mean("mat cat", ["the cat sat on the mat"]) == 0.0


def test_corpus_rouge_aggregate_hand_computed():
    # Reference "the cat sat on the mat" (6 tokens) for both samples.
    # "the cat sat": R1 = RL = F(P=1, R=1/2) = 2/3; R2 = F(P=1, R=2/5) = 4/7.
    # "mat cat": R1 = F(1, 1/3) = 1/2; R2 = 0; RL = F(P=1/2, R=1/6) (LCS 1) = 1/4.
    ref = ["the cat sat on the mat"]
    preds = ["the cat sat", "mat cat"]
    samples = [Sample(f"s{i}", "qmsum", [], ref, 8) for i in range(2)]
    bench = ZeroScrolls(cfg())
    rows = [
        {"score": bench.score(p, s), "score_parts": bench.score_parts(p, s)}
        for p, s in zip(preds, samples, strict=True)
    ]
    assert rows[0]["score_parts"] == pytest.approx(
        {"rouge1": 200 / 3, "rouge2": 400 / 7, "rougeL": 200 / 3}
    )
    assert rows[1]["score_parts"] == pytest.approx({"rouge1": 50, "rouge2": 0, "rougeL": 25})
    r1, r2, rl = (200 / 3 + 50) / 2, (400 / 7 + 0) / 2, (200 / 3 + 25) / 2
    corpus = (r1 * r2 * rl) ** (1 / 3)  # upstream: geometric mean of the corpus means, ~42.4
    mean_of_geomeans = ((200 / 3 * 400 / 7 * 200 / 3) ** (1 / 3) + 0) / 2  # ~31.5
    assert bench.aggregation("qmsum") == "geomean_of_part_means"
    assert bench.aggregate("qmsum", rows) == pytest.approx(corpus, abs=1e-9)
    assert corpus_rouge(preds, samples) == pytest.approx(corpus, abs=1e-9)
    assert sum(r["score"] for r in rows) / 2 == pytest.approx(mean_of_geomeans, abs=1e-9)
    assert corpus - mean_of_geomeans > 10


def test_mean_aggregate_and_metric_names():
    bench = ZeroScrolls(cfg())
    s = Sample("q", "qasper", [], ["a BiLSTM encoder"], 8)
    assert bench.score_parts("a BiLSTM encoder", s) == {}
    assert bench.aggregation("qasper") == "mean"
    rows = [{"score": 100.0, "score_parts": {}}, {"score": 0.0, "score_parts": {}}]
    assert bench.aggregate("quality", rows) == 50.0
    assert math.isnan(bench.aggregate("quality", []))
    names = {t: bench.task_metric(t) for t in TASKS}
    assert names["gov_report"] == names["squality"] == "ROUGE geometric mean"
    assert names["qasper"] == names["musique"] == "F1"
    assert names["quality"] == "accuracy"
    assert names["space_digest"] == "exponential similarity"
    assert names["book_sum_sort"] == "concordance index"
    with pytest.raises(ConfigError, match="quality_hard"):
        bench.task_metric("quality_hard")


def test_upstream_generation_lengths_and_no_stop():
    # tau-nlp/zero_scrolls experiments/api/api.py, dataset_to_leave_tokens_for_generations
    assert DEFAULT_MAX_NEW_TOKENS == {
        "gov_report": 1024, "summ_screen_fd": 512, "qmsum": 512, "squality": 512,
        "qasper": 128, "narrative_qa": 64, "quality": 10, "musique": 32,
        "space_digest": 36, "book_sum_sort": 256,
    }
    assert ZeroScrolls(cfg()).max_new_tokens() == 1024
    assert ZeroScrolls(cfg(tasks=["quality", "qasper"])).max_new_tokens() == 128
    assert ZeroScrolls(cfg(tasks=["gov_report"], max_new_tokens=20)).max_new_tokens() == 20


def test_f1_hand_computed():
    # "cat sat on mat" vs "cat sat": P = 1/2, R = 1 -> 2/3.
    got = score_prediction("qasper", "The cat sat on the mat.", ["cat sat"])
    assert got == pytest.approx(200 / 3, abs=1e-6)
    assert score_prediction("musique", "Paris", ["London", "Paris"]) == 100.0


def test_quality_compares_option_letters():
    assert score_prediction("quality", "B", ["(B)"]) == 100.0
    assert score_prediction("quality", "(B) Gulls", ["(B)"]) == 100.0
    assert score_prediction("quality", "The answer is (C).", ["(B)"]) == 0.0
    assert score_prediction("quality", "I do not know", ["(B)"]) == 0.0


def test_exp_similarity():
    assert exp_similarity("45%", "55%") == pytest.approx(0.5)
    assert exp_similarity("About 35% of reviews", "55%") == pytest.approx(0.25)
    assert exp_similarity("no idea", "55%") == 0.0
    assert score_prediction("space_digest", "55.0%", ["55%"]) == 100.0


def test_concordance_index_known_permutations():
    gold = "1, 2, 3, 4"
    assert concordance_index("1, 2, 3, 4", gold) == 1.0
    assert concordance_index("4, 3, 2, 1", gold) == 0.0
    # One adjacent swap: 5 of the 6 pairs in order.
    assert concordance_index("2, 1, 3, 4", gold) == pytest.approx(5 / 6)
    # Id 4 missing: its 3 pairs are discordant.
    assert concordance_index("1, 2, 3", gold) == pytest.approx(3 / 6)
    # Repeats keep the first mention; unknown ids are ignored.
    assert concordance_index("1, 9, 2, 1, 3, 4", gold) == 1.0
    assert score_prediction("book_sum_sort", "2, 1, 3, 4", [gold]) == pytest.approx(500 / 6)
    assert math.isclose(concordance_index("3, 1, 2", "3, 1, 2"), 1.0)


# -- truncation ---------------------------------------------------------------------------------


def test_truncation_keeps_query_and_inserts_separator(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    write_task(tmp_path, "quality", [make_record(LONG_DOC, QUERY)])
    bench = ZeroScrolls(cfg(data_dir=str(tmp_path)))
    bench.validate()
    (s,) = bench.load(tok, 300, None, 0)
    assert s.meta["truncated"] and s.references == ["(B)"] and s.stop == []
    assert len(s.input_ids) == 300 and s.max_new_tokens == 10
    text = tok.decode(s.input_ids)
    assert QUERY in text and SEP in text
    assert "Answer with a letter.\n\nStory:\nOn day 0 the sailor" in text
    assert text.index("On day 0") < text.index(SEP) < text.index(QUERY)
    assert "On day 299" not in text
    assert text.endswith("Answer:\n<|im_end|>\n<|im_start|>assistant\n")
    # the question part: the query and what follows it; the separator ends the context
    assert tok.decode(s.input_ids[s.question_start :]).startswith(QUERY)
    assert tok.decode(s.input_ids[: s.question_start]).rstrip().endswith(SEP.strip())


def test_generation_length_never_limits_the_prompt(tmp_path, smollm2_tokenizer):
    rec = make_record(LONG_DOC, "Summary:", rid="gov_report-2-0", output="A summary.")  # a test-split id
    write_task(tmp_path, "gov_report", [rec])
    bench = ZeroScrolls(cfg(data_dir=str(tmp_path)))
    (s,) = bench.load(smollm2_tokenizer, 512, None, 0)
    assert len(s.input_ids) == 512 and s.max_new_tokens == 1024 == bench.max_new_tokens()


def test_short_input_is_untouched(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    rec = make_record("A short tale about gulls.", QUERY)
    write_task(tmp_path, "quality", [rec])
    bench = ZeroScrolls(cfg(data_dir=str(tmp_path), chat_template=False, max_new_tokens=4))
    (s,) = bench.load(tok, 1024, None, 0)
    assert not s.meta["truncated"] and not s.meta["chat_template"] and s.max_new_tokens == 4
    assert tok.decode(s.input_ids) == rec["input"]
    assert tok.decode(s.input_ids[s.question_start :]).startswith(QUERY)


def test_query_that_cannot_fit_is_a_config_error(tmp_path, smollm2_tokenizer):
    write_task(tmp_path, "quality", [make_record(LONG_DOC, QUERY * 20)])
    with pytest.raises(
        ConfigError, match=r"context_len=300 .*instruction and query alone take \d+ tokens"
    ):
        ZeroScrolls(cfg(data_dir=str(tmp_path))).load(smollm2_tokenizer, 300, None, 0)


def test_records_sharing_an_id_are_one_sample(tmp_path, smollm2_tokenizer):
    rows = [
        make_record("Doc.", "Question:\nWho?", rid="narrative_qa-0", output=o)
        for o in ("The captain", "Captain Ahab")
    ]
    rows.append(make_record("Doc two.", "Question:\nWhere?", rid="narrative_qa-1", output="Sea"))
    write_task(tmp_path, "narrative_qa", rows)
    samples = ZeroScrolls(cfg(data_dir=str(tmp_path))).load(smollm2_tokenizer, 1024, None, 0)
    assert [s.id for s in samples] == ["narrative_qa/narrative_qa-0", "narrative_qa/narrative_qa-1"]
    assert samples[0].references == ["The captain", "Captain Ahab"]


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason="no shared data")
@pytest.mark.parametrize("context_len", [512, 2048])
def test_real_files_fit_and_keep_queries(smollm2_tokenizer, context_len):
    tok = smollm2_tokenizer
    bench = ZeroScrolls(cfg(data_dir=str(REAL_DIR), n_samples=2))
    bench.validate()
    tasks = bench.tasks()
    assert set(tasks) == {"gov_report", "summ_screen_fd", "qmsum", "qasper", "quality"}
    records = {}
    for task in tasks:
        for line in (REAL_DIR / task / "validation.jsonl").read_text().splitlines():
            r = json.loads(line)
            records[f"{task}/{r['id']}"] = r
    samples = bench.load(tok, context_len, None, seed=0)
    assert len(samples) == 2 * len(tasks)
    assert bench.max_new_tokens() == max(s.max_new_tokens for s in samples) == 1024
    for s in samples:
        assert s.max_new_tokens == DEFAULT_MAX_NEW_TOKENS[s.task]
        r = records[s.id]
        text = tok.decode(s.input_ids)
        query = r["input"][r["query_start_index"] : r["query_end_index"]]
        assert query in text
        if s.meta["truncated"]:
            assert r["truncation_seperator"] in text
            assert len(s.input_ids) == context_len
        else:
            assert len(s.input_ids) <= context_len


# -- validation ---------------------------------------------------------------------------------


def test_unknown_task_names_choices():
    with pytest.raises(ConfigError, match=r"unknown zeroscrolls task 'quality_hard'.*quality"):
        ZeroScrolls(cfg(tasks=["quality_hard"])).validate()


def test_missing_dir_and_files(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        ZeroScrolls(cfg(data_dir=str(tmp_path / "nope"))).validate()
    with pytest.raises(ConfigError, match="holds no ZeroSCROLLS task file"):
        ZeroScrolls(cfg(data_dir=str(tmp_path))).validate()
    with pytest.raises(ConfigError, match=r"not found: .*qmsum/validation\.jsonl"):
        ZeroScrolls(cfg(data_dir=str(tmp_path), tasks=["qmsum"])).validate()


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_task(tmp_path, "qasper", [make_record("d", "q"), '{"id": 3,'])
    with pytest.raises(ConfigError) as e:
        ZeroScrolls(cfg(data_dir=str(tmp_path))).validate()
    assert str(path) in str(e.value) and "line 2" in str(e.value)


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("document_end_index", None, r"line 2: field 'document_end_index' should be int"),
        (
            "truncation_seperator",
            ...,
            r"line 2: record is missing required field "
            r"'truncation_seperator'",
        ),
        ("output", None, r"line 2: field 'output' is null"),
        ("query_start_index", 1, r"line 2: field 'query_start_index'"),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path, field, value, pattern):
    bad = make_record("doc", "query")
    if value is ...:
        del bad[field]
    else:
        bad[field] = value
    path = write_task(tmp_path, "qasper", [make_record("d", "q"), bad])
    with pytest.raises(ConfigError, match=pattern) as e:
        ZeroScrolls(cfg(data_dir=str(tmp_path))).validate()
    assert str(path) in str(e.value)


def test_hub_failure_becomes_config_error(monkeypatch):
    offline_hub(monkeypatch)
    with pytest.raises(ConfigError, match=r"tau/zero_scrolls.*benchmark\.data_dir"):
        ZeroScrolls(cfg(tasks=["quality"])).validate()
