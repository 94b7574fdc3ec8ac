"""`python -m atskv.bench`: the files, the table's shape and the ratio arithmetic (never the
timings themselves: no timed assertions)."""

from __future__ import annotations

import json

import pytest

from atskv.bench import main as bench

VARIANT = "atskv:max_pages=1:min_pages=1:dense_small=false"  # ranked, one page read a step
METHODS = ["full", "sliding_window", "snapkv", "quest", "atskv", VARIANT]


@pytest.fixture(scope="module")
def quick(tmp_path_factory, smollm2_path):
    out = tmp_path_factory.mktemp("bench")
    # methods listed without full first: full is still run, and first
    rc = bench.main(["--quick", "--methods", ",".join(METHODS[1:]), "--new-tokens", "4",
                     "--out", str(out), "hardware.threads=1"])
    data = json.loads((out / "bench.json").read_text())
    return rc, out, data


def test_files_and_one_row_per_method_and_length(quick, capsys):
    rc, out, data = quick
    assert rc == 0
    assert (out / "bench.md").is_file() and not list(out.glob(".*.tmp"))
    assert data["protocol"]["methods"] == METHODS
    assert data["protocol"]["context_lens"] == bench.QUICK_LENS
    assert data["protocol"]["model"] == "tiny_random" and data["protocol"]["reps"] == 1
    pairs = [(r["method"], r["context_len"]) for r in data["rows"]]
    assert sorted(pairs) == sorted((m, c) for m in METHODS for c in bench.QUICK_LENS)
    assert all(r["n_reps"] == 1 for r in data["rows"])
    # every entrant (methods + generate()) measured once per length, no failures
    assert len(data["samples"]) == (len(METHODS) + 1) * len(bench.QUICK_LENS)
    assert not [s for s in data["samples"] if s.get("error")]
    # 4 new tokens, no early stop: 3 decode steps, less any step that compiled (timed apart)
    assert all(s["decode_tokens"] + s.get("compile_steps", 0) == 3 for s in data["samples"])
    assert all(s["decode_tokens"] >= 1 for s in data["samples"])
    md = (out / "bench.md").read_text()
    assert ("| Method | ctx | TTFT s | TTFT ×full | decode tok/s | decode ×full | step tok/s "
            "| step ×full | floor ×full | step/floor | KV MiB |") in md
    main = md.split("## Sweep")[0]
    table = [ln for ln in main.splitlines() if ln.startswith("| ") and not ln.startswith("| Method")]
    assert sum(ln.split(" | ")[1].isdigit() for ln in table) == len(METHODS) * 2
    m = data["machine"]
    assert m["git_commit"] and m["versions"]["torch"] and m["cpu_count"] >= 1
    assert m["torch_threads"] == 1 and m["date"]


def test_full_ratios_are_exactly_one(quick):
    _, _, data = quick
    for r in data["rows"]:
        if r["method"] == "full":
            for ratio in ("ttft_x_full", "decode_x_full", "decode_step_x_full", "kv_x_full",
                          "kv_read_x_full", "peak_memory_x_full", "floor_x_full"):
                assert r[ratio] == 1.0, (ratio, r)


def test_compressing_kv_ratio_is_bytes_over_full(quick):
    _, _, data = quick
    rows = {(r["method"], r["context_len"]): r for r in data["rows"]}
    for ctx in bench.QUICK_LENS:
        full = rows[("full", ctx)]
        assert full["kv_bytes"] > 0
        for m in ("sliding_window", "snapkv", "atskv"):
            r = rows[(m, ctx)]
            assert r["kv_x_full"] < 1.0
            assert r["kv_x_full"] == r["kv_bytes"] / full["kv_bytes"]
            assert r["kv_read_x_full"] == r["kv_read_bytes_per_step"] / full["kv_read_bytes_per_step"]
            assert r["ttft_x_full"] == r["ttft_s"] / full["ttft_s"]
            assert r["decode_x_full"] == r["decode_tokens_per_s"] / full["decode_tokens_per_s"]
        # a variant is its own entrant: the same budget (page summaries paid out of it, where
        # the default's small budget decodes densely without them), its decode reads one page
        variant = rows[(VARIANT, ctx)]
        assert variant["kv_x_full"] < 1.0
        assert variant["kv_read_bytes_per_step"] < rows[("atskv", ctx)]["kv_read_bytes_per_step"]
        # quest keeps every token (plus its page min/max) but reads fewer of them
        assert rows[("quest", ctx)]["kv_x_full"] > 1.0
        assert rows[("quest", ctx)]["kv_read_x_full"] < 1.0


def test_step_rate_is_one_over_the_pooled_median_step(quick):
    _, _, data = quick
    for s in data["samples"]:  # one time per timed step (a step that compiled is not one)
        assert len(s["decode_step_s"]) == s["decode_tokens"] and min(s["decode_step_s"]) > 0
    rows = {(r["method"], r["context_len"]): r for r in data["rows"]}
    for (m, ctx), r in rows.items():
        steps = sorted(x for s in data["samples"] if (s["method"], s["context_len"]) == (m, ctx)
                       for x in s["decode_step_s"])
        n = len(steps)
        median = (steps[n // 2] + steps[(n - 1) // 2]) / 2
        assert r["decode_step_tokens_per_s"] == pytest.approx(1 / median, rel=1e-12)
        full = rows[("full", ctx)]["decode_step_tokens_per_s"]
        assert r["decode_step_x_full"] == pytest.approx(r["decode_step_tokens_per_s"] / full)


def test_read_floor_per_sample_and_its_ratios(quick):
    _, _, data = quick
    for s in data["samples"]:  # each rep of our engine timed its floor; generate() has none
        assert (s.get("read_floor_s", 0) > 0) == (s["method"] != bench.HF), s["method"]
    rows = {(r["method"], r["context_len"]): r for r in data["rows"]}
    weights = {s["step_bytes"] - s["kv_read_bytes_per_step"] for s in data["samples"]
               if "step_bytes" in s}
    assert len(weights) == 1 and weights.pop() > 0  # every method reads the same weights
    for (m, ctx), r in rows.items():
        got = [s for s in data["samples"] if (s["method"], s["context_len"]) == (m, ctx)]
        assert r["step_of_floor"] == pytest.approx(bench._median(
            [s["read_floor_s"] / bench._median(s["decode_step_s"]) for s in got]))
        full = rows[("full", ctx)]
        assert r["floor_x_full"] == pytest.approx(full["step_bytes"] / r["step_bytes"])
        # fewer KV bytes read, a higher floor; but never above what the KV alone would give
        if r["kv_read_x_full"] < 1:
            assert 1 < r["floor_x_full"] < 1 / r["kv_read_x_full"]


def test_growth_and_overhead(quick):
    _, out, data = quick
    full = next(g for g in data["growth"] if g["method"] == "full")
    lo, hi = bench.QUICK_LENS
    assert (full["ctx_min"], full["ctx_max"]) == (lo, hi)
    rows = {(r["method"], r["context_len"]): r for r in data["rows"]}
    assert full["kv_bytes"]["factor"] == rows[("full", hi)]["kv_bytes"] / rows[("full", lo)]["kv_bytes"]
    assert full["kv_bytes"]["loglog_slope"] == pytest.approx(1.0, abs=0.05)  # full KV is linear
    ov = data["overhead"]
    assert [p["context_len"] for p in ov["per_context"]] == bench.QUICK_LENS
    for p in ov["per_context"]:
        assert p["ratio"] > 0
        assert p["ratio"] == p["ours_tokens_per_s"] / p["generate_tokens_per_s"]
    assert ov["ratio_geomean"] > 0
    assert "Framework overhead" in (out / "bench.md").read_text()


def test_bad_input_fails_before_loading(tmp_path, capsys):
    assert bench.main(["--quick", "--methods", "snapkvv", "--out", str(tmp_path)]) == 2
    assert "did you mean 'snapkv'" in capsys.readouterr().err.lower()
    assert bench.main(["--quick", "--out", str(tmp_path), "budget=0"]) == 2
    assert "budget=0" in capsys.readouterr().err
    assert bench.main(["--quick", "--out", str(tmp_path), "model=nope"]) == 2
    assert "tiny_random" in capsys.readouterr().err
    assert bench.main(["--quick", "--out", str(tmp_path), "hardware.threads=-1"]) == 2
    assert "hardware.threads=-1" in capsys.readouterr().err
    assert bench.main(["--quick", "--out", str(tmp_path), "--methods", "atskv:max_pages"]) == 2
    assert "'max_pages' is not KEY=VALUE" in capsys.readouterr().err
    assert bench.main(["--quick", "--out", str(tmp_path), "--methods", "atskv:max_page=2"]) == 2
    assert "max_page" in capsys.readouterr().err
    assert bench.main(["--quick", "--out", str(tmp_path), "--methods", "atskvv:max_pages=2"]) == 2
    assert "did you mean 'atskv'" in capsys.readouterr().err.lower()
    assert not (tmp_path / "bench.json").exists()


def test_slope_and_ratio_helpers():
    assert bench._slope([1.0, 2.0, 4.0], [3.0, 6.0, 12.0]) == pytest.approx(1.0)
    assert bench._slope([1.0, 2.0, 4.0], [5.0, 5.0, 5.0]) == pytest.approx(0.0)
    assert bench._slope([1.0], [1.0]) is None
    assert bench._ratio(1.0, None) is None and bench._ratio(1.0, 0.0) is None
    assert bench._median([3.0, None, 1.0, 2.0]) == 2.0 and bench._median([None]) is None


def test_sweep_section_compares_shared_and_unshared_prefill(quick):
    _, out, data = quick
    sweep = data["sweep"]
    from atskv.methods import METHODS

    assert sweep["methods"] == METHODS.names() and sweep["budgets"] == [0.1, 0.2]  # the registry
    (row,) = sweep["rows"]
    assert row["context_len"] == 256 and row["jobs"] == 2 * len(METHODS.names())
    assert row["identical"] is True and row["different"] == []
    assert row["speedup"] == row["unshared_s"] / row["shared_s"]
    assert "## Sweep with a shared prefill" in (out / "bench.md").read_text()


@pytest.fixture(scope="module")
def paired(tmp_path_factory, smollm2_path):
    out = tmp_path_factory.mktemp("bench_paired")
    rc = bench.main(["--quick", "--sections", "paired", "--methods", "sliding_window,atskv",
                     "--paired-ref", "sliding_window", "--context-lens", "256", "--out", str(out),
                     "hardware.threads=1"])
    return rc, out, json.loads((out / "bench.json").read_text())


def test_paired_section_pairs_each_step_with_the_references(paired):
    import statistics

    rc, out, data = paired
    assert rc == 0 and "rows" not in data  # the main section did not run
    section = data["paired"]
    assert section["reference"] == "sliding_window" and section["rounds"] == 2
    rows = {r["method"]: r for r in section["rows"]}
    assert set(rows) == {"full", "sliding_window", "atskv"}
    ref = rows["sliding_window"]
    assert ref["minus_reference_ms"] == 0 and ref["rate_x_reference"] == 1
    for r in rows.values():
        assert len(r["step_s"]) == 2 and all(len(rd) == 3 for rd in r["step_s"])
        diffs = [(b - a) * 1e3 for ra, rb in zip(ref["step_s"], r["step_s"])
                 for a, b in zip(ra, rb)]
        assert r["minus_reference_ms"] == pytest.approx(statistics.median(diffs))
        assert r["interval_ms"][0] <= r["interval_ms"][1]
    # the floor: the reference's bytes per step (weights + KV read) over the method's
    assert ref["floor_x_reference"] == 1
    full = rows["full"]
    assert full["kv_read_bytes_per_step"] > ref["kv_read_bytes_per_step"] > 0
    x = full["floor_x_reference"]  # = (W + ref's KV) / (W + full's KV): solve for W
    weights = (ref["kv_read_bytes_per_step"] - x * full["kv_read_bytes_per_step"]) / (x - 1)
    model = bench.load(bench.parse_args(["--quick"])).model  # the same tiny model, rebuilt
    emb = model.get_input_embeddings().weight
    expect = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:  # a step reads one row of untied embeddings
        expect -= emb.numel() * emb.element_size()
    assert weights == pytest.approx(expect, rel=1e-6)
    assert 1 / full["floor_x_reference"] < full["kv_read_bytes_per_step"] / ref[
        "kv_read_bytes_per_step"]  # the weights, read by both, narrow the KV's ratio
    md = (out / "bench.md").read_text()
    assert "## Paired decode steps" in md and "| atskv | 256 |" in md and "(reference)" in md


def test_paired_interval_resamples_rounds():
    from atskv.bench.paired import round_interval

    assert round_interval([[1.0, 1.0], [1.0, 1.0, 1.0]], 0) == (1.0, 1.0)
    lo, hi = round_interval([[0.0] * 5, [2.0] * 5, [4.0] * 5], 0)
    assert lo == 0.0 and hi == 4.0  # whole rounds move together: no interval narrower than them


def test_paired_bad_input_fails_before_loading(tmp_path, capsys):
    assert bench.main(["--quick", "--sections", "paired", "--methods", "atskv",
                       "--paired-ref", "sliding_window", "--out", str(tmp_path)]) == 2
    assert "--paired-ref='sliding_window'" in capsys.readouterr().err
    assert bench.main(["--quick", "--sections", "paired", "--paired-rounds", "1",
                       "--out", str(tmp_path)]) == 2
    assert "--paired-rounds=1" in capsys.readouterr().err
    assert bench.main(["--quick", "--sections", "paired", "--context-lens", "8180",
                       "--paired-steps", "10", "--new-tokens", "2", "--out", str(tmp_path)]) == 2
    assert "--context-lens [8180]" in capsys.readouterr().err


def test_batch_section_scales_with_the_batch_and_fills_a_memory_budget(tmp_path, smollm2_path):
    """The batch section: every method at each batch size, its rate against itself alone, and
    at a memory budget of 3 full-cache sequences the largest batch that fits, by bytes measured
    from the tensors (a method that keeps a quarter of the prompt fits more rows than full)."""
    rc = bench.main(["--quick", "--sections", "batch", "--methods", "snapkv,sliding_window",
                     "--batch-sizes", "1,2", "--budget-seqs", "3", "--max-batch", "16",
                     "--new-tokens", "4", "--out", str(tmp_path), "hardware.threads=1",
                     "budget=0.25"])
    assert rc == 0
    section = json.loads((tmp_path / "bench.json").read_text())["batch"]
    scaling, budget = section["rows"]["scaling"], section["rows"]["budget"]
    assert {(r["method"], r["batch"]) for r in scaling} == {
        (m, b) for m in ("full", "snapkv", "sliding_window") for b in (1, 2)}
    for r in scaling:
        assert r["tokens_per_s"] > 0 and (r["batch"] != 1 or r["x_batch_1"] == 1.0)
    fits = {r["method"]: r for r in budget}
    assert fits["full"]["batch"] == 3 and fits["full"]["x_full"] == 1.0
    for name in ("snapkv", "sliding_window"):
        row = fits[name]
        want = min(16, int(3 * fits["full"]["kv_bytes_per_seq"] // row["kv_bytes_per_seq"]))
        assert row["batch"] == want > 3 and row["x_full"] > 0
        assert row["budget_bytes"] == 3 * fits["full"]["kv_bytes_per_seq"]
    assert (tmp_path / "batch.png").stat().st_size > 0
    assert "## Decoding sequences together" in (tmp_path / "bench.md").read_text()
