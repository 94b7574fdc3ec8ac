"""The real default model end to end (slow: SmolLM2-135M on CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from atskv.benchmarks.synthetic import SyntheticBenchmark
from atskv.core.engine import Engine
from atskv.methods import METHODS

pytestmark = pytest.mark.slow


def needle_samples(tokenizer, context_len, n):
    cfg = SimpleNamespace(name="synthetic", n_samples=n, tasks=["single_needle"], data_dir=None,
                          haystack="generated", max_new_tokens=None)
    bench = SyntheticBenchmark(cfg)
    return bench, bench.load(tokenizer, context_len, n, seed=0)


def test_full_cache_finds_the_needle_at_512(smollm2_model, smollm2_tokenizer):
    bench, samples = needle_samples(smollm2_tokenizer, 512, 4)
    eng, full = Engine(smollm2_model, smollm2_tokenizer), METHODS.get("full")()
    scores = [bench.score(eng.generate(s.input_ids, full, s.max_new_tokens).text, s)
              for s in samples]
    assert sum(scores) / len(scores) >= 75, scores


def test_sliding_window_loses_early_needles_but_saves_memory(smollm2_model, smollm2_tokenizer):
    bench, samples = needle_samples(smollm2_tokenizer, 512, 4)
    eng = Engine(smollm2_model, smollm2_tokenizer)
    early = samples[1]  # needle at about a third of the context: outside the recent window
    out = eng.generate(early.input_ids, METHODS.get("sliding_window")(budget=0.25),
                       early.max_new_tokens)
    assert bench.score(out.text, early) == 0
    # evicts while decoding: a quarter of the prompt's KV, whatever was generated
    assert out.stats["prompt_tokens_kept"]["mean"] == 128
    assert out.kv_bytes_peak == out.kv_bytes_after_compression
