"""The question-agnostic protocol in the engine: a context prefilled and compressed alone, the
question appended on top of the compressed cache, uncompressed, with exact attention. With the
full cache this is the same computation as prefilling the whole prompt; a compressed context
serves several questions, each from its own copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atskv.core.engine import Engine
from atskv.methods import METHODS

PROMPT = list(range(100, 400))  # 300 tokens
SPLIT = 262  # the question part: the last 38 tokens


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("chunk", [0, 64])
def test_continuing_a_prefill_equals_prefilling_the_whole_prompt(tiny_model, chunk):
    eng = Engine(tiny_model, None, prefill_chunk=chunk)
    whole = eng.prefill(PROMPT, queries=16)
    context = eng.prefill(PROMPT[:SPLIT], queries=16)
    keys_before = [k.clone() for k in context.keys]
    both = eng.prefill(PROMPT[SPLIT:], queries=16, base=context)
    assert both.prompt_len == whole.prompt_len == len(PROMPT)
    for a, b in zip(both.keys, whole.keys):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-5
    for a, b in zip(both.queries, whole.queries):
        assert a.shape == b.shape == (4, 16, 16) and (a - b).abs().max() < 1e-5
    assert (both.logits - whole.logits).abs().max() < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(context.keys, keys_before))  # base untouched
    assert both.seconds >= context.seconds


def test_full_cache_agnostic_equals_aware(tiny_model):
    """The full cache compresses nothing, so appending the question on top of the context's
    cache is exact attention over the whole prompt, as a prefill of the whole prompt is."""
    eng = Engine(tiny_model, None)
    full = METHODS.get("full")()
    aware = eng.generate(PROMPT, full, 8, stop_at_eos=False, return_logits=True)
    pre = eng.prefill(PROMPT[:SPLIT])
    agnostic = eng.generate_from(pre, full, 8, stop_at_eos=False, return_logits=True,
                                 question=PROMPT[SPLIT:])
    assert agnostic.token_ids == aware.token_ids
    assert max_diff(agnostic.stats["logits"], aware.stats["logits"]) < 1e-4
    assert agnostic.prompt_tokens == aware.prompt_tokens == len(PROMPT)
    assert agnostic.stats["question_tokens"] == len(PROMPT) - SPLIT
    assert agnostic.kv_bytes_uncompressed == aware.kv_bytes_uncompressed
    assert agnostic.ttft_s >= agnostic.stats["extend_s"] > 0


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_compresses_the_context_and_keeps_the_question(tiny_model, name):
    """The method keeps budget x the context (not the prompt), the question's tokens go in
    whole (the store holds them after the extension: they are counted), and decoding goes on
    from the right position."""
    eng = Engine(tiny_model, None)
    method = METHODS.get(name)(budget=0.3)
    pre = eng.prefill(PROMPT[:SPLIT], method.queries_needed())
    comp = eng.compress(pre, method, len(PROMPT) - SPLIT + 6)
    kept = max(int(i.numel()) for layer in comp.keep for i in layer)
    assert kept <= SPLIT
    if method.compresses:
        mean = sum(int(i.numel()) for layer in comp.keep for i in layer) / sum(
            len(layer) for layer in comp.keep)
        assert mean <= round(0.3 * SPLIT)
    before = comp.state.nbytes()
    out = eng.generate_from(pre, method, 6, stop_at_eos=False, question=PROMPT[SPLIT:],
                            compressed=comp)
    assert len(out.token_ids) == 6 and out.stats["question_tokens"] == len(PROMPT) - SPLIT
    if not method.evicts_while_decoding:  # the question's rows are stored, and counted
        token = 2 * tiny_model.config.num_key_value_heads * 16 * 4  # K+V, heads, d, fp32
        assert out.kv_bytes_peak >= before + (len(PROMPT) - SPLIT) * token * 3  # 3 layers


def test_a_compressed_context_serves_several_questions_from_copies(tiny_model):
    """Each question starts from its own copy of the compressed context: answering one leaves
    the others' starting point as it was, so the answer to a question does not depend on the
    questions asked before it."""
    eng = Engine(tiny_model, None)
    method = METHODS.get("atskv")(budget=0.3, window=16)
    pre = eng.prefill(PROMPT[:SPLIT], method.queries_needed())
    q1, q2 = PROMPT[SPLIT:], list(range(500, 530))
    comp = eng.compress(pre, method, max(len(q1), len(q2)) + 6)
    k0 = [t.clone() for t in comp.state.tensors()]
    a1 = eng.generate_from(pre, method, 6, stop_at_eos=False, question=q1, compressed=comp.copy())
    a2 = eng.generate_from(pre, method, 6, stop_at_eos=False, question=q2, compressed=comp.copy())
    assert all(torch.equal(a, b) for a, b in zip(k0, comp.state.tensors()))
    alone = eng.generate_from(pre, method, 6, stop_at_eos=False, question=q2,
                              compressed=eng.compress(pre, method, len(q1) + 6))
    assert a2.token_ids == alone.token_ids and a1.token_ids != []


ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_random", "context_len=512", "benchmark.n_samples=2", "warmup=false",
        "hardware.threads=1", "hardware.compile=false", "wandb.mode=disabled"]


def run_py(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def results(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in folder.rglob("result.json")]


def test_the_sweep_runs_both_protocols_from_one_prefill_per_sample(tmp_path):
    """The user's sweep over protocols: both protocols' jobs share one prefill of each context
    (one group), each result says its protocol and lives in its own folder, and the full cache
    gives the same predictions in both (it compresses nothing); the multi-question task
    records accuracy by question position."""
    proc = run_py("-m", "protocol=question_aware,question_agnostic", "method=full,snapkv",
                  "budget=0.2", "benchmark.tasks=[single_needle,multi_question]", *TINY,
                  f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 jobs in 1 prefill-sharing unit(s) of work" in proc.stderr + proc.stdout
    res = {(r["method"], r["protocol"]): r for r in results(tmp_path)}
    assert set(res) == {(m, p) for m in ("full", "snapkv")
                        for p in ("question_aware", "question_agnostic")}
    assert len({r["config"]["protocol"] for r in res.values()}) == 2
    preds = {}
    for path in tmp_path.rglob("samples.jsonl"):
        r = json.loads((path.parent / "result.json").read_text())
        preds[(r["method"], r["protocol"])] = [json.loads(x)["prediction"]
                                               for x in path.read_text().splitlines()]
    assert preds[("full", "question_aware")] == preds[("full", "question_agnostic")]
    for r in res.values():
        assert r["status"] == "ok" and r["n_samples"] == 2 + 2 * 4
        assert set(r["accuracy_by_position"]) == {"0", "1", "2", "3"}


def group_of_questions(n_questions: int = 3):
    """One context and ``n_questions`` questions of different lengths, as a multi-question
    benchmark gives them."""
    from atskv.core.types import Sample

    context = PROMPT[:SPLIT]
    return [Sample(id=f"c/q{i}", task="t", input_ids=context + list(range(600 + 40 * i,
                                                                          630 + 47 * i)),
                   references=[], max_new_tokens=5, question_start=SPLIT,
                   meta={"context_id": "c", "question_position": i})
            for i in range(n_questions)]


@pytest.mark.parametrize("name", METHODS.names())
def test_a_later_question_sees_the_context_without_the_first(tiny_model, name):
    """Question-aware, several questions: the first question is compressed with the context;
    before each later one, its kept tokens are removed (every head's last, as stored in position
    order), so that the full cache answers a later question exactly as it answers its own prompt
    (context + that question), and every method's stores hold only context tokens plus the
    question, counted."""
    from atskv.experiments import protocol

    eng = Engine(tiny_model, None)
    method = METHODS.get(name)(budget=0.3)
    group = group_of_questions()
    pre = protocol.Prefills.make(eng, group, {"question_aware"}, method.queries_needed())
    reqs = protocol.requests(eng, group, pre, method, "question_aware")
    outs = eng.generate_batch(reqs)
    for r in reqs[1:]:
        assert all(int(k.max()) < SPLIT for layer in r.compressed.keep for k in layer if k.numel())
    for s, out in zip(group[1:], outs[1:]):
        assert out.prompt_tokens == len(s.input_ids)
        if name == "full":
            alone = eng.generate(s.input_ids, method, 5, stop_at_eos=False)
            assert out.token_ids == alone.token_ids
            assert out.kv_bytes_peak == alone.kv_bytes_peak
    state = reqs[-1].compressed.state
    assert state.nbytes() <= state.allocated_bytes()


@pytest.mark.parametrize("protocol", ["question_aware", "question_agnostic"])
def test_the_method_is_told_whether_the_question_follows(tiny_model, protocol, monkeypatch):
    """A method compressing the context alone (question-agnostic) is told that a question it
    does not see follows (``PrefillContext.question_follows``); one compressing the whole prompt
    is not. The runner's requests and the engine's own ``question=`` path say the same."""
    from atskv.experiments import protocol as runner

    told = []
    method = METHODS.get("snapkv")(budget=0.3)
    select = type(method).select

    def spy(self, state, ctx):
        told.append(ctx.question_follows)
        return select(self, state, ctx)

    monkeypatch.setattr(type(method), "select", spy)
    eng = Engine(tiny_model, None)
    group = group_of_questions(1)
    pre = runner.Prefills.make(eng, group, {protocol}, method.queries_needed())
    runner.answer(eng, group, pre, method, protocol)
    agnostic = protocol == "question_agnostic"
    question = runner.question(group[0]) if agnostic else ()
    p = pre.context if agnostic else pre.aware
    eng.generate_from(p, method, 2, stop_at_eos=False, question=question)
    assert told == [agnostic, agnostic]
