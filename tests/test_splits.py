"""Dev and test splits: disjoint for every benchmark, stable, and validated."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import bench_cfg, write_jsonl

from atskv.benchmarks.longbench import LongBench
from atskv.benchmarks.synthetic import (
    TASKS,
    SyntheticBenchmark,
    _read_essays,
    essay_files,
    filler_vocabulary,
    key_words,
)
from atskv.benchmarks.textmetrics import hash_split
from atskv.benchmarks.zeroscrolls import ZeroScrolls
from atskv.core.types import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ESSAYS = SHARED / "haystack" / "paul_graham_essays"
MULTI_NEWS = SHARED / "longbench" / "multi_news.jsonl"
ZS_DIR = SHARED / "zero_scrolls"
ZS_TASKS = sorted(p.parent.name for p in ZS_DIR.glob("*/validation.jsonl"))
SPLITS = ("dev", "test")
WORD = re.compile(r"[A-Za-z]+")


def synthetic(split, **kw):
    kw.setdefault("tasks", list(TASKS))
    kw.setdefault("haystack", "generated")
    return SyntheticBenchmark(bench_cfg("synthetic", split=split, **kw))


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda split: synthetic(split),
        lambda split: LongBench(bench_cfg("longbench", tasks=["trec"], split=split)),
        lambda split: ZeroScrolls(bench_cfg("zeroscrolls", tasks=["quality"], split=split)),
    ],
)
def test_split_is_validated(make):
    for bad in ("train", "validation", "Test", ""):
        with pytest.raises(ConfigError, match=rf"benchmark\.split={bad!r} .*dev, test"):
            make(bad).validate()
    assert make(None).split() == "test"


def test_bad_split_fails_before_any_data(smollm2_tokenizer):
    with pytest.raises(ConfigError, match="benchmark.split='train'"):
        synthetic("train").load(smollm2_tokenizer, 512, 1, 0)


def test_config_default_split(compose):
    for name in ("synthetic", "longbench", "zeroscrolls"):
        assert compose(f"benchmark={name}").benchmark.split == "test"
    assert compose("benchmark=synthetic", "benchmark.split=dev").benchmark.split == "dev"


def test_hash_split_is_stable():
    assert hash_split("abc", 4) == "test" and hash_split("id13", 4) == "dev"
    shares = [hash_split(f"record-{i}", 4) == "dev" for i in range(4000)]
    assert 0.22 < sum(shares) / len(shares) < 0.28


# -- synthetic ------------------------------------------------------------------------------


def test_synthetic_vocabularies_are_disjoint():
    dev_fill, test_fill = filler_vocabulary("dev"), filler_vocabulary("test")
    dev_keys, test_keys = key_words("dev"), key_words("test")
    assert dev_fill and test_fill and dev_keys and test_keys
    assert not dev_fill & test_fill
    assert not dev_keys & test_keys
    assert not (dev_fill | test_fill) & (dev_keys | test_keys)


def test_synthetic_generated_splits_are_disjoint(smollm2_tokenizer):
    loaded = {
        split: synthetic(split).load(smollm2_tokenizer, 1024, 3, seed=0) for split in SPLITS
    }
    ids = {split: {s.id for s in samples} for split, samples in loaded.items()}
    assert not ids["dev"] & ids["test"]
    assert all(i.startswith("synthetic/dev/") for i in ids["dev"])
    assert not {tuple(s.input_ids) for s in loaded["dev"]} & {
        tuple(s.input_ids) for s in loaded["test"]
    }
    for split, other in (("dev", "test"), ("test", "dev")):
        own_words = set()
        for s in loaded[split]:
            words = set(WORD.findall(smollm2_tokenizer.decode(s.input_ids)))
            own_words |= words
            assert not words & filler_vocabulary(other), (s.id, words & filler_vocabulary(other))
            assert not words & key_words(other), (s.id, words & key_words(other))
        assert len(own_words & filler_vocabulary(split)) > 40
        used_keys = {w for s in loaded[split] for n in s.meta["needles"] for w in WORD.findall(n)}
        assert used_keys & key_words(split)


@pytest.mark.skipif(not ESSAYS.is_dir(), reason="shared essays folder is absent")
def test_synthetic_essay_splits_are_disjoint(smollm2_tokenizer):
    files = {split: essay_files(str(ESSAYS), split) for split in SPLITS}
    every = sorted(p.name for p in ESSAYS.glob("*.txt"))
    assert not set(files["dev"]) & set(files["test"])
    assert sorted(files["dev"] + files["test"]) == every
    assert 0.2 < len(files["dev"]) / len(every) < 0.5
    sentences = {
        split: {x for x in _read_essays(str(ESSAYS), names) if len(x) > 60}
        for split, names in files.items()
    }
    only = {"dev": sentences["dev"] - sentences["test"], "test": sentences["test"] - sentences["dev"]}
    loaded = {
        split: synthetic(split, tasks=["single_needle", "multi_key"], haystack=str(ESSAYS)).load(
            smollm2_tokenizer, 2048, 2, seed=0
        )
        for split in SPLITS
    }
    assert not {s.id for s in loaded["dev"]} & {s.id for s in loaded["test"]}
    for split, other in (("dev", "test"), ("test", "dev")):
        for s in loaded[split]:
            text = smollm2_tokenizer.decode(s.input_ids)
            assert sum(x in text for x in only[split]) >= 5, s.id
            assert not [x for x in only[other] if x in text], s.id


def test_synthetic_folder_without_dev_files_errors(tmp_path):
    names = [f"essay{i}.txt" for i in range(40)]
    test_only = [n for n in names if hash_split(n, 3) == "test"][:3]
    for name in test_only:
        (tmp_path / name).write_text("A sentence about essays. Another one follows here.")
    synthetic("test", haystack=str(tmp_path)).validate()
    with pytest.raises(ConfigError, match=r"no text in the \.txt files of split 'dev'.*dev, test"):
        synthetic("dev", haystack=str(tmp_path)).validate()


# -- LongBench ------------------------------------------------------------------------------


def _longbench_record(i: int) -> dict:
    return {"input": f"Question {i}?", "context": f"Document {i}.", "answers": [f"a{i}"],
            "length": 10, "all_classes": None, "_id": f"rec{i}"}


def test_longbench_subset_is_drawn_within_the_split(tmp_path, smollm2_tokenizer):
    write_jsonl(tmp_path / "hotpotqa.jsonl", [_longbench_record(i) for i in range(40)])
    ids = {}
    for split in SPLITS:
        bench = LongBench(bench_cfg("longbench", data_dir=str(tmp_path), split=split))
        full = {s.id for s in bench.load(smollm2_tokenizer, 256, None, 0)}
        capped = [s.id for s in bench.load(smollm2_tokenizer, 256, 3, seed=1)]
        assert len(capped) == 3 and set(capped) <= full
        assert all(hash_split(i.split("/")[1], 4) == split for i in full)
        ids[split] = full
    assert not ids["dev"] & ids["test"]
    assert len(ids["dev"] | ids["test"]) == 40


def test_longbench_empty_split_errors(tmp_path):
    write_jsonl(tmp_path / "hotpotqa.jsonl", [{**_longbench_record(0), "_id": "abc"}])  # test
    LongBench(bench_cfg("longbench", data_dir=str(tmp_path))).validate()
    with pytest.raises(ConfigError, match=r"hotpotqa: none of the 1 items .*split='dev'"):
        LongBench(bench_cfg("longbench", data_dir=str(tmp_path), split="dev")).validate()


@pytest.mark.skipif(not MULTI_NEWS.is_file(), reason="no shared data")
def test_longbench_multi_news_splits_are_disjoint(smollm2_tokenizer):
    records = [json.loads(line) for line in MULTI_NEWS.read_text().splitlines() if line.strip()]
    loaded = {
        split: LongBench(
            bench_cfg("longbench", data_dir=str(MULTI_NEWS.parent), split=split)
        ).load(smollm2_tokenizer, 256, None, 0)
        for split in SPLITS
    }
    ids = {split: {s.id for s in samples} for split, samples in loaded.items()}
    refs = {split: {tuple(s.references) for s in samples} for split, samples in loaded.items()}
    assert not ids["dev"] & ids["test"] and not refs["dev"] & refs["test"]
    assert ids["dev"] | ids["test"] == {f"multi_news/{r['_id']}" for r in records}
    assert 0.15 < len(ids["dev"]) / len(records) < 0.35


# -- ZeroSCROLLS ----------------------------------------------------------------------------


@pytest.mark.skipif(not ZS_TASKS, reason="no shared data")
@pytest.mark.parametrize("task", ZS_TASKS or ["none"])
def test_zeroscrolls_fixture_splits_are_disjoint(task, smollm2_tokenizer):
    rows = [json.loads(x) for x in (ZS_DIR / task / "validation.jsonl").read_text().splitlines()]
    items, pids = {}, {}
    for split in SPLITS:
        bench = ZeroScrolls(bench_cfg("zeroscrolls", data_dir=str(ZS_DIR), tasks=[task],
                                      split=split))
        bench.validate()
        chosen = bench.split_items(task)
        items[split] = {record["id"] for _, (record, _refs) in chosen}
        pids[split] = {r["pid"] for r in rows if r["id"] in items[split]}
        (sample,) = bench.load(smollm2_tokenizer, 512, 1, seed=0)
        assert sample.id in {f"{task}/{i}" for i in items[split]}
        assert sample.meta["split"] == split
    assert items["dev"] and items["test"]
    assert not items["dev"] & items["test"] and not pids["dev"] & pids["test"]
    assert items["dev"] | items["test"] == {r["id"] for r in rows}
    assert all(hash_split(i, 4) == "dev" for i in items["dev"])


def test_zeroscrolls_groups_split_together(tmp_path):
    # Records sharing an id (several references) are one item and never straddle the splits.
    row = {"input": "Do.\n\nDoc.\n\nQ?\n\nA:", "document_start_index": 4,
           "document_end_index": 8, "query_start_index": 10, "query_end_index": 12,
           "truncation_seperator": "...\n\n"}
    rows = [{**row, "id": f"q{i}", "pid": f"q{i}-{j}", "output": f"o{j}"}
            for i in range(12) for j in range(2)]
    write_jsonl(tmp_path / "narrative_qa" / "validation.jsonl", rows)
    seen = []
    for split in SPLITS:
        bench = ZeroScrolls(bench_cfg("zeroscrolls", data_dir=str(tmp_path), split=split))
        for _, (record, refs) in bench.split_items("narrative_qa"):
            assert refs == ["o0", "o1"]
            seen.append(record["id"])
    assert sorted(seen) == sorted(f"q{i}" for i in range(12))


def test_split_rule_is_documented():
    import atskv.benchmarks.longbench as lb
    import atskv.benchmarks.synthetic as syn
    import atskv.benchmarks.zeroscrolls as zs

    for mod in (lb, zs, syn):
        assert "SHA-1" in mod.__doc__ and "dev" in mod.__doc__
    conf = Path(__file__).resolve().parents[1] / "conf" / "benchmark"
    for name in ("synthetic", "longbench", "zeroscrolls"):
        text = (conf / f"{name}.yaml").read_text()
        assert re.search(r"^split: test$", text, re.M), name
        assert "SHA-1" in text, name
