"""Helpers shared by the benchmark tests: config namespaces, JSONL files, an offline hub."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace


def bench_cfg(name: str, **kw) -> SimpleNamespace:
    """A ``benchmark`` config with every field unset but ``name`` (``kw`` overrides)."""
    base = dict(
        name=name,
        n_samples=None,
        tasks=None,
        data_dir=None,
        max_new_tokens=None,
        haystack=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def write_jsonl(path: Path, rows) -> Path:
    """One line per row (dicts as JSON, strings verbatim, for malformed lines); makes parents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def offline_hub(monkeypatch) -> None:
    """Make ``datasets.load_dataset`` fail as it does without a network."""
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)


def generate(model, method, prompt, n, tokenizer=None, **kw):
    """One greedy generation through the engine (no early stop unless asked)."""
    from atskv.engine import Engine

    kw.setdefault("stop_at_eos", False)
    return Engine(model, tokenizer).generate(prompt, method, n, **kw)


def small_llama(tie: bool = True):
    """A 2-layer random Llama (vocabulary 96) built in-process with seed 0, in eval mode; its
    input embeddings tied to its output layer or not."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()
