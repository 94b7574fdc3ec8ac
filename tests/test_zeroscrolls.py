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
from atskv.types import ConfigError, Sample

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


def test_corpus_rouge_is_geometric_mean_of_means():
    preds = ["the cat sat", "a dog ran home"]
    refs = [["the cat sat on the mat"], ["a dog ran home fast"]]
    samples = [Sample(f"s{i}", "qmsum", [], r, 8) for i, r in enumerate(refs)]
    per_sample = sum(score_prediction("qmsum", p, r) for p, r in zip(preds, refs, strict=True)) / 2
    assert corpus_rouge(preds, samples) >= per_sample > 0


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
    assert s.meta["truncated"] and s.references == ["(B)"]
    assert len(s.input_ids) == 300 - DEFAULT_MAX_NEW_TOKENS["quality"]
    text = tok.decode(s.input_ids)
    assert QUERY in text and SEP in text
    assert "Answer with a letter.\n\nStory:\nOn day 0 the sailor" in text
    assert text.index("On day 0") < text.index(SEP) < text.index(QUERY)
    assert "On day 299" not in text
    assert text.endswith("Answer:\n<|im_end|>\n<|im_start|>assistant\n")


def test_short_input_is_untouched(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    rec = make_record("A short tale about gulls.", QUERY)
    write_task(tmp_path, "quality", [rec])
    bench = ZeroScrolls(cfg(data_dir=str(tmp_path), chat_template=False, max_new_tokens=4))
    (s,) = bench.load(tok, 1024, None, 0)
    assert not s.meta["truncated"] and not s.meta["chat_template"] and s.max_new_tokens == 4
    assert tok.decode(s.input_ids) == rec["input"]


def test_query_that_cannot_fit_is_a_config_error(tmp_path, smollm2_tokenizer):
    write_task(tmp_path, "quality", [make_record(LONG_DOC, QUERY * 20)])
    with pytest.raises(ConfigError, match="instruction and query alone"):
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
def test_real_files_fit_2048_and_keep_queries(smollm2_tokenizer):
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
    samples = bench.load(tok, 2048, None, seed=0)
    assert len(samples) == 2 * len(tasks)
    for s in samples:
        assert len(s.input_ids) <= 2048
        r = records[s.id]
        text = tok.decode(s.input_ids)
        query = r["input"][r["query_start_index"] : r["query_end_index"]]
        assert query in text
        if s.meta["truncated"]:
            assert r["truncation_seperator"] in text
            assert len(s.input_ids) == 2048 - s.max_new_tokens


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
