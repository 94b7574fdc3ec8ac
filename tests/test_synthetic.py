"""Synthetic needle-in-a-haystack benchmark: exact lengths, determinism, placement, scoring."""

from __future__ import annotations

import copy
import os

import pytest
from helpers import bench_cfg

from atskv.benchmarks.base import BENCHMARKS
from atskv.benchmarks.synthetic import TASKS, SyntheticBenchmark, essay_files
from atskv.core.types import ConfigError, Sample

ESSAYS = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "haystack", "paul_graham_essays"
)
ALL_TASKS = [t for t in TASKS if t != "multi_question"]  # one sample per prompt (the other: below)


def make(tasks=None, haystack="generated", max_new_tokens=None, n_samples=None, split=None):
    cfg = bench_cfg(
        "synthetic",
        n_samples=n_samples,
        tasks=tasks,
        haystack=haystack,
        max_new_tokens=max_new_tokens,
        split=split,
    )
    return SyntheticBenchmark(cfg)


def test_registered():
    assert BENCHMARKS.get("synthetic") is SyntheticBenchmark


@pytest.mark.parametrize("context_len", [512, 2048])
def test_exact_length_every_task(smollm2_tokenizer, context_len):
    samples = make(ALL_TASKS).load(smollm2_tokenizer, context_len, 3, seed=0)
    assert [s.task for s in samples] == [t for t in ALL_TASKS for _ in range(3)]
    assert len({s.id for s in samples}) == len(samples)
    assert samples[0].id == f"synthetic/test/single_needle/{context_len}/0/0"
    for s in samples:
        assert len(s.input_ids) == context_len, s.id
        assert s.stop == [] and s.meta["split"] == "test"
        # the ids are what the tokenizer itself produces for the decoded prompt
        text = smollm2_tokenizer.decode(s.input_ids)
        assert smollm2_tokenizer(text, add_special_tokens=False)["input_ids"] == s.input_ids
        assert text.startswith("<|im_start|>")
        assert text.endswith("<|im_start|>assistant\n" + s.meta["answer_prefix"])
        assert s.meta["question"] in text
        for needle, (a, b) in zip(s.meta["needles"], s.meta["needle_spans"], strict=True):
            assert smollm2_tokenizer.decode(s.input_ids[a:b]).strip() == needle
        for ref in s.references:
            assert ref in text
        # the context holds the instruction and every needle; the question part the rest
        context = smollm2_tokenizer.decode(s.input_ids[: s.question_start])
        question = smollm2_tokenizer.decode(s.input_ids[s.question_start :])
        assert question.startswith("\n\n" + s.meta["question"])
        assert all(needle in context for needle in s.meta["needles"])
        assert max(b for _, b in s.meta["needle_spans"]) <= s.question_start


def test_multi_question_asks_every_needle_of_one_context(smollm2_tokenizer):
    """Four samples per context, one per needle in turn: the same context ids, consecutive,
    their own question and answer; the first prompt has exactly context_len tokens."""
    samples = make(["multi_question"]).load(smollm2_tokenizer, 1024, 2, seed=0)
    assert len(samples) == 8 and {s.task for s in samples} == {"multi_question"}
    for c in range(2):
        group = samples[4 * c : 4 * c + 4]
        assert len({s.meta["context_id"] for s in group}) == 1
        assert [s.meta["question_position"] for s in group] == [0, 1, 2, 3]
        assert len(group[0].input_ids) == 1024
        start = group[0].question_start
        assert all(s.question_start == start and s.input_ids[:start] == group[0].input_ids[:start]
                   for s in group)
        needles = group[0].meta["needles"]
        assert sorted(s.meta["answer_needles"][0] for s in group) == [0, 1, 2, 3]
        for s in group:
            (ref,) = s.references
            asked = needles[s.meta["answer_needles"][0]]
            assert asked.endswith(ref + ".")
            key = asked.split(" for ", 1)[1].split(" is: ")[0]
            assert key in smollm2_tokenizer.decode(s.input_ids[start:])
            assert s.meta["depth"] == s.meta["depths"][s.meta["answer_needles"][0]]
    assert samples[4].meta["context_id"] != samples[0].meta["context_id"]


def test_defaults_and_max_new_tokens(smollm2_tokenizer):
    samples = make().load(smollm2_tokenizer, 512, None, seed=0)
    assert len(samples) == 8 and {s.task for s in samples} == {"single_needle"}
    assert all(s.max_new_tokens == TASKS["single_needle"] for s in samples)
    assert sorted(s.meta["depth"] for s in samples) == pytest.approx(
        [0.05 + 0.9 * i / 7 for i in range(8)], abs=1e-3
    )
    over = make(["multi_value"], max_new_tokens=5, n_samples=2).load(
        smollm2_tokenizer, 512, None, 0
    )
    assert len(over) == 2 and all(s.max_new_tokens == 5 for s in over)


def test_determinism(smollm2_tokenizer):
    a = make(ALL_TASKS).load(smollm2_tokenizer, 512, 2, seed=1)
    b = make(ALL_TASKS).load(smollm2_tokenizer, 512, 2, seed=1)
    c = make(ALL_TASKS).load(smollm2_tokenizer, 512, 2, seed=2)
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    assert [s.references for s in a] == [s.references for s in b]
    for x, y in zip(a, c, strict=True):
        assert x.input_ids != y.input_ids
        assert x.references != y.references


def test_generated_filler_varies(smollm2_tokenizer):
    (s,) = make().load(smollm2_tokenizer, 2048, 1, seed=0)
    text = smollm2_tokenizer.decode(s.input_ids)
    sentences = [p.strip() for p in text.split(".") if len(p.strip()) > 10]
    assert len(set(sentences)) > 0.8 * len(sentences)
    assert not any(ch.isdigit() for ch in text.replace(s.references[0], ""))


@pytest.mark.parametrize("task", ["single_needle", "multi_key"])
def test_needle_at_requested_depth(smollm2_tokenizer, task):
    samples = make([task]).load(smollm2_tokenizer, 2048, 5, seed=3)
    for s in samples:
        i = next(j for j, n in enumerate(s.meta["needles"]) if s.references[0] in n)
        start, _ = s.meta["needle_spans"][i]
        rel = start / len(s.input_ids)
        # head and tail of the prompt take ~100 tokens of 2048: allow a 10% band
        assert abs(rel - s.meta["depth"]) < 0.1, (s.id, rel, s.meta["depth"])
    text = smollm2_tokenizer.decode(samples[-1].input_ids)
    assert text.find(samples[-1].references[0]) > 0.8 * len(text)
    text = smollm2_tokenizer.decode(samples[0].input_ids)
    assert text.find(samples[0].references[0]) < 0.2 * len(text)


@pytest.mark.parametrize("split", ["test", "dev"])
def test_answer_needles_decode_to_the_answers(smollm2_tokenizer, split):
    expected = {
        "single_needle": lambda s: [0],
        "multi_key": lambda s: [next(j for j, n in enumerate(s.meta["needles"])
                                     if s.references[0] in n)],
        "multi_value": lambda s: [0, 1, 2, 3],
        "variable_tracking": lambda s: [0, 1, 2, 3, 4],
    }
    for s in make(ALL_TASKS, split=split).load(smollm2_tokenizer, 1024, 3, seed=5):
        answer = s.meta["answer_needles"]
        assert answer == expected[s.task](s), s.id
        texts = []
        for j in answer:
            a, b = s.meta["needle_spans"][j]
            texts.append(smollm2_tokenizer.decode(s.input_ids[a:b]).strip())
            assert texts[-1] == s.meta["needles"][j]
        # every reference is in an answer needle, and no other needle holds one
        assert all(any(ref in t for t in texts) for ref in s.references), s.id
        if s.task == "multi_key":
            others = [n for j, n in enumerate(s.meta["needles"]) if j not in answer]
            assert len(others) == 3 and not any(s.references[0] in n for n in others)


def test_max_new_tokens_and_metric_names(smollm2_tokenizer):
    bench = make(ALL_TASKS)
    assert bench.max_new_tokens() == 48
    assert make().max_new_tokens() == 16
    assert make(["multi_key"], max_new_tokens=3).max_new_tokens() == 3
    samples = bench.load(smollm2_tokenizer, 512, 1, seed=0)
    assert bench.max_new_tokens() == max(s.max_new_tokens for s in samples)
    assert bench.task_metric("single_needle") == bench.task_metric("multi_key") == "string match"
    assert bench.task_metric("multi_value") == "recall of values"
    assert bench.task_metric("variable_tracking") == "recall of variables"
    assert bench.aggregation("multi_value") == "mean"
    with pytest.raises(ConfigError, match="needle_haystack"):
        bench.task_metric("needle_haystack")


def test_variable_tracking_chain_in_order(smollm2_tokenizer):
    for s in make(["variable_tracking"]).load(smollm2_tokenizer, 1024, 4, seed=0):
        starts = [a for a, _ in s.meta["needle_spans"]]
        assert starts == sorted(starts)
        names = s.references
        assert s.meta["needles"][1] == f"VAR {names[1]} = VAR {names[0]}."


def _sample(task, refs):
    return Sample(id="x", task=task, input_ids=[1], references=refs, max_new_tokens=8)


def test_scoring():
    bench = make(ALL_TASKS)
    one = _sample("single_needle", ["1234567"])
    assert bench.score(" 1234567.", one) == 100.0
    assert bench.score(" 1234576.", one) == 0.0
    assert bench.score("", one) == 0.0
    assert bench.score(" 123 4567", one) == 0.0
    many = _sample("multi_value", ["1111111", "2222222", "3333333", "4444444"])
    assert bench.score("1111111, 3333333", many) == 50.0
    assert bench.score("4444444 3333333 2222222 1111111", many) == 100.0
    vt = _sample("variable_tracking", ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"])
    assert bench.score(" ABCDE, KLMNO, UVWXY", vt) == pytest.approx(60.0)


def test_essay_haystack(smollm2_tokenizer):
    if not os.path.isdir(ESSAYS):
        pytest.skip("shared essays folder is absent")
    bench = make(["single_needle", "variable_tracking"], haystack=ESSAYS)
    bench.validate()
    samples = bench.load(smollm2_tokenizer, 1024, 2, seed=0)
    generated = make(["single_needle", "variable_tracking"]).load(smollm2_tokenizer, 1024, 2, 0)

    def squeeze(text):  # sentence splitting may add spaces where a title ran into the text
        return "".join(text.split())

    corpus = squeeze(" ".join(
        open(os.path.join(ESSAYS, f), encoding="utf-8").read()
        for f in essay_files(ESSAYS, "test")
    ))
    for s, g in zip(samples, generated, strict=True):
        assert len(s.input_ids) == 1024
        assert s.input_ids != g.input_ids
        text = smollm2_tokenizer.decode(s.input_ids)
        assert all(n in text for n in s.meta["needles"])
        if s.task == "single_needle":  # the tokens after the needle are test-split essay text
            end = s.meta["needle_spans"][0][1]
            after = smollm2_tokenizer.decode(s.input_ids[end : end + 12]).strip()
            assert len(after) > 20 and squeeze(after) in corpus, after


def test_bad_task_raises():
    with pytest.raises(ConfigError, match="'needle_haystack'.*single_needle"):
        make(["single_needle", "needle_haystack"]).validate()
    with pytest.raises(ConfigError, match="empty"):
        make([]).validate()


def test_bad_haystack_raises(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="nope.*generated"):
        make(haystack=missing).validate()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    (tmp_path / "empty" / "b.md").write_text("Not a txt file.")
    with pytest.raises(ConfigError, match="empty"):
        make(haystack=str(tmp_path / "empty")).validate()
    a_file = tmp_path / "file.txt"
    a_file.write_text("Some text.")
    with pytest.raises(ConfigError, match="file.txt"):
        make(haystack=str(a_file)).validate()


def test_too_small_context_raises(smollm2_tokenizer):
    with pytest.raises(ConfigError, match=r"context_len=120 .*minimum is (\d+)") as info:
        make(["multi_key"]).load(smollm2_tokenizer, 120, 2, seed=0)
    minimum = int(info.value.args[0].split("minimum is ")[1].split()[0])
    samples = make(["multi_key"]).load(smollm2_tokenizer, minimum, 2, seed=0)
    assert all(len(s.input_ids) == minimum for s in samples)


def test_without_chat_template(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    (s,) = make().load(tok, 512, 1, seed=0)
    assert len(s.input_ids) == 512
    text = tok.decode(s.input_ids)
    assert "<|im_start|>" not in text
    assert text.endswith(s.meta["question"] + "\n" + s.meta["answer_prefix"])
