"""The transformers drop-in (``with compress(model, ...): model.generate(...)``) and the
``atskv-text-generation`` pipeline: at budget 1 every method decodes what plain ``generate()``
decodes; at any budget the drop-in decodes bit for bit what the engine decodes, with the same
KV bytes; sampling, logits processors, stopping criteria and batches of equal-length prompts
work; the model is untouched outside the block; the pipeline answers several questions of one
compression under both protocols as the engine's protocols do."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import small_llama
from test_architectures import _build
from transformers import StoppingCriteria, StoppingCriteriaList, pipeline

from atskv import compress
from atskv.core import seam
from atskv.core.engine import Engine
from atskv.core.types import ConfigError, Sample
from atskv.experiments import protocol
from atskv.integrations.hf import TASK, make_method
from atskv.methods import METHODS

PROMPT_LEN, NEW = 160, 10
TOL = 1e-4  # logits against plain generate() (another attention kernel: float32 rounding)


def prompt(n: int = PROMPT_LEN, rows: int = 1, seed: int = 1, vocab: int = 96) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    """A 2-layer random Llama whose greedy tokens vary (vocabulary 96)."""
    return small_llama(tie=False)


@pytest.fixture(scope="module")
def tok():
    """A character tokenizer over the model's 96 ids ("\\n" and printable ASCII), for methods
    that build prompts of their own (kvzip's reconstruction)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(i) for i in range(32, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, merges=[])))


def greedy(model, ids, **kw):
    kw.setdefault("max_new_tokens", NEW)
    return model.generate(ids, do_sample=False, pad_token_id=0, output_logits=True,
                          output_scores=True, return_dict_in_generate=True, **kw)


@pytest.fixture(scope="module")
def plain(model):
    return greedy(model, prompt())


def assert_same_tokens(tokens, ref, tol=TOL, row=0):
    """``tokens`` are the reference's up to the first step whose top-2 margin (of the scores
    greedy decoding picks from, after logits processors that scale by at most 1.5) is within
    ``3 tol``, where logits ``tol`` apart may pick either."""
    start = ref.sequences.shape[1] - len(ref.scores)
    assert len(tokens) == len(ref.scores)
    for step, scores in enumerate(ref.scores):
        assert tokens[step] == ref.sequences[row, start + step], f"step {step}"
        top2 = scores[row].topk(2).values
        if top2[0] - top2[1] < 3 * tol:
            return


def assert_same_greedy(out, ref, tol=TOL, row=0, ref_row=0):
    """Per step, logits within ``tol`` of the reference's, and the same tokens
    (:func:`assert_same_tokens`)."""
    for step, (got, want) in enumerate(zip(out.logits, ref.logits, strict=True)):
        assert (got[row] - want[ref_row]).abs().max() < tol, f"step {step}"
    start = out.sequences.shape[1] - len(out.logits)
    assert_same_tokens(out.sequences[row, start:].tolist(), ref, tol, ref_row)


def untouched(model) -> None:
    """No trace of the drop-in: generate, attention, hooks and linear layers as they were."""
    assert "generate" not in vars(model)
    assert seam.attn_implementation(model) == "sdpa"
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not [m for m in model.modules() if "forward" in vars(m)]


@pytest.mark.parametrize("name", METHODS.names())
def test_budget_one_equals_plain_generate_and_leaves_the_model_untouched(model, tok, plain,
                                                                         name):
    with compress(model, name, budget=1.0, tokenizer=tok):
        out = greedy(model, prompt())
    assert_same_greedy(out, plain)
    untouched(model)
    after = greedy(model, prompt())
    assert torch.equal(after.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, plain.logits))


@pytest.mark.parametrize("name", METHODS.names())
def test_drop_in_decodes_what_the_engine_decodes(model, tok, name):
    """Same prefill, compression (kvzip's reconstruction passes included) and decode steps as
    :meth:`Engine.generate`: the same tokens and logits bit for bit, the same prompt tokens kept
    and the same KV bytes."""
    method = METHODS.get(name)(budget=0.2)
    ref = Engine(model, tok).generate(prompt()[0].tolist(), method, NEW, stop_at_eos=False,
                                      return_logits=True)
    press = compress(model, method, tokenizer=tok)
    with press:
        out = greedy(model, prompt())
    assert out.sequences[0, PROMPT_LEN:].tolist() == ref.token_ids
    assert all(torch.equal(a[0], b) for a, b in zip(out.logits, ref.stats["logits"]))
    (stats,) = press.stats
    assert stats.kept_tokens == [[int(n) for n in layer] for layer in
                                 ([k.numel() for k in heads] for heads in ref.stats["kept_indices"])]
    assert stats.kv_bytes_after_compression == ref.kv_bytes_after_compression
    assert stats.kv_bytes_peak == ref.kv_bytes_peak
    assert stats.kv_bytes_uncompressed == ref.kv_bytes_uncompressed
    assert stats.decode_kv_read_bytes == ref.decode_kv_read_bytes
    assert stats.tokens_seen == PROMPT_LEN + NEW - 1 and stats.decode_steps == NEW - 1


@pytest.fixture(scope="module")
def llama4():
    """A 4-layer random Llama (quest reads its first two layers whole)."""
    return _build("llama")


@pytest.mark.parametrize("name", ["atskv", "snapkv", "sliding_window", "h2o", "quest"])
def test_budget_02_compresses_what_the_tensors_show(llama4, name):
    n = 480
    press = compress(llama4, name, budget=0.2)
    with press:
        greedy(llama4, prompt(n, vocab=256))
    (s,) = press.stats
    kept = s.prompt_tokens_kept
    method = make_method(name, budget=0.2)
    if method.compresses:
        assert kept["max"] <= n // 2 and kept["mean"] <= round(0.2 * n)
        assert kept["mean"] >= 0.5 * 0.2 * n  # atskv pays its page summaries out of it
        assert s.kv_bytes_peak < 0.5 * s.kv_bytes_uncompressed
    else:  # quest keeps everything and reads a part of it per step
        assert kept["min"] == n
        assert s.decode_kv_read_bytes < 0.8 * s.kv_bytes_end
    if method.evicts_while_decoding:  # h2o, sliding_window: the cache stays at its size
        assert s.kv_bytes_end == s.kv_bytes_after_compression
    else:
        assert s.kv_bytes_end > s.kv_bytes_after_compression
    assert s.prompt_tokens == n


def test_sampling_is_reproducible_and_processors_and_stopping_apply(model, plain):
    ids = prompt()
    press = compress(model, "snapkv", budget=0.2)
    with press:
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            runs.append(model.generate(ids, max_new_tokens=NEW, do_sample=True, temperature=1.0,
                                       pad_token_id=0))
        assert torch.equal(*runs)
        several = model.generate(ids, max_new_tokens=NEW, do_sample=True, pad_token_id=0,
                                 num_return_sequences=2)
        assert several.shape == (2, PROMPT_LEN + NEW) and len(press.stats) == 2
        # top_k=1 sampling draws the argmax: greedy, whatever the seed
        top1 = model.generate(ids, max_new_tokens=NEW, do_sample=True, top_k=1, pad_token_id=0)
        assert torch.equal(top1, greedy(model, ids).sequences)

        class AfterFour(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), input_ids.shape[1] >= PROMPT_LEN + 4)

        out = model.generate(ids, max_new_tokens=NEW, pad_token_id=0,
                             stopping_criteria=StoppingCriteriaList([AfterFour()]))
        assert out.shape[1] == PROMPT_LEN + 4
        assert press.stats[0].decode_steps == 3 and press.stats[0].tokens_seen == PROMPT_LEN + 3
        # one token: no decode step, the prompt compressed all the same
        assert model.generate(ids, max_new_tokens=1, pad_token_id=0).shape[1] == PROMPT_LEN + 1
        assert press.stats[0].decode_steps == 0 and press.stats[0].tokens_seen == PROMPT_LEN
        assert press.stats[0].prompt_tokens_kept["max"] == round(0.2 * PROMPT_LEN)
        # max_length instead of max_new_tokens
        assert model.generate(ids, max_length=PROMPT_LEN + 3, pad_token_id=0).shape[1] == \
            PROMPT_LEN + 3
    with compress(model, "full"):
        penalised = greedy(model, ids, repetition_penalty=1.5)
    assert_same_greedy(penalised, greedy(model, ids, repetition_penalty=1.5))


def test_a_batch_of_equal_length_prompts_decodes_each_as_alone(model):
    ids = prompt(rows=2)
    press = compress(model, "h2o", budget=0.2)
    with press:
        both = greedy(model, ids)
        assert len(press.stats) == 2
        alone = [greedy(model, ids[i : i + 1]) for i in range(2)]
    for i in range(2):  # (the batch's prefill is one matrix product: float32 rounding)
        assert_same_greedy(both, alone[i], row=i)


def test_padding_and_unsupported_calls_are_refused_by_name(model, plain):
    ids = prompt(rows=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with compress(model, "snapkv", budget=0.2):
        with pytest.raises(ConfigError, match="without padding"):
            model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
        padded = ids.clone()
        padded[0, :3] = 0  # generate() infers the mask from the pad token
        with pytest.raises(ConfigError, match="without padding"):
            model.generate(padded, max_new_tokens=4, pad_token_id=0)
        with pytest.raises(ConfigError, match="num_beams=2"):
            model.generate(ids, max_new_tokens=4, num_beams=2, pad_token_id=0)
        with pytest.raises(ConfigError, match="max_new_tokens"):
            model.generate(ids, pad_token_id=0)
        with pytest.raises(RuntimeError, match="already"):
            compress(model, "full").__enter__()
    untouched(model)  # also after errors inside the block
    with pytest.raises(ConfigError, match="Choices"):
        compress(model, "snapkvv", budget=0.2)
    with pytest.raises(ConfigError, match="budget"):
        compress(model, "snapkv")
    with pytest.raises(ConfigError, match=r"'kvzip'.*tokenizer=tokenizer\)"):
        compress(model, "kvzip", budget=0.2)
    assert torch.equal(greedy(model, prompt()).sequences, plain.sequences)


def test_chunked_prefill_and_sliding_window_layers():
    """``prefill_chunk_size`` chunks the prefill as the engine's ``prefill_chunk`` does; Gemma 3's
    sliding-window layers keep their windows (rings the method never sees)."""
    gemma = _build("gemma3")
    ids = prompt(vocab=256)
    ref = greedy(gemma, ids)
    with compress(gemma, "snapkv", budget=1.0):
        assert_same_greedy(greedy(gemma, ids, prefill_chunk_size=48), ref)
    method = METHODS.get("snapkv")(budget=0.2)
    engine = Engine(gemma, None, prefill_chunk=48)
    want = engine.generate(ids[0].tolist(), method, NEW, stop_at_eos=False)
    press = compress(gemma, method)
    with press:
        out = greedy(gemma, ids, prefill_chunk_size=48)
    assert out.sequences[0, PROMPT_LEN:].tolist() == want.token_ids
    assert press.stats[0].window_layers == [0, 1, 3] == want.stats["window_layers"]
    assert press.stats[0].kv_bytes_peak == want.kv_bytes_peak


def test_import_atskv_is_cheap():
    code = ("import sys, atskv; assert 'torch' not in sys.modules and "
            "'transformers' not in sys.modules; atskv.compress; "
            "assert 'atskv.integrations.hf' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the pipeline ---------------------------------------------------------------------------
CONTEXT = ("Mira keeps bees on a hill above the harbour. Her brother Tomas repairs boats and "
           "sells rope. Every spring the two of them paint the lighthouse blue. ") * 6
QUESTIONS = ["What does Mira keep?", "What colour is the lighthouse?"]


@pytest.fixture(scope="module")
def chat_model(make_tiny_model):
    """The tiny random Llama with SmolLM2's vocabulary (for prompts made with SmolLM2's
    tokenizer and chat template), its layers' weights scaled up so that its answers vary with
    the question and from token to token (as built, it repeats one token)."""
    m = make_tiny_model()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(6.0)
    return m


def test_pipeline_prompts_are_one_chat_turn_split_at_the_question(chat_model,
                                                                  smollm2_tokenizer):
    tok = smollm2_tokenizer
    pipe = pipeline(TASK, model=chat_model, tokenizer=tok, method="full")
    pre = pipe.preprocess(CONTEXT, questions=QUESTIONS)
    for q, ids in zip(QUESTIONS, pre["question_ids"]):
        turn = [{"role": "user", "content": f"{CONTEXT}\n\n{q}"}]
        want = tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        assert tok.decode(pre["context_ids"] + ids) == want
        assert tok.decode(ids).startswith(q)


def engine_answers(model, tokenizer, pre, method, proto, new):
    """The engine's own protocol (``run.py``'s) on the pipeline's token ids."""
    ctx = pre["context_ids"]
    group = [Sample(id=f"q{i}", task="t", input_ids=ctx + q, references=[], max_new_tokens=new,
                    meta={"context_id": "c"}, question_start=len(ctx))
             for i, q in enumerate(pre["question_ids"])]
    engine = Engine(model, tokenizer)
    pres = protocol.Prefills.make(engine, group, {proto}, method.queries_needed())
    return [o.token_ids for o in protocol.answer(engine, group, pres, method, proto)]


@pytest.mark.parametrize("proto", protocol.PROTOCOLS)
@pytest.mark.parametrize("name", ["snapkv", "h2o", "atskv", "kvzip"])
def test_pipeline_answers_two_questions_as_the_engine_protocol_does(
        chat_model, smollm2_tokenizer, monkeypatch, proto, name):
    calls = []
    compress_once = Engine.compress
    monkeypatch.setattr(Engine, "compress", lambda *a, **k: calls.append(1) or
                        compress_once(*a, **k))
    pipe = pipeline(TASK, model=chat_model, tokenizer=smollm2_tokenizer, method=name, budget=0.3)
    out = pipe(CONTEXT, questions=QUESTIONS, protocol=proto, max_new_tokens=8)
    assert len(calls) == 1  # one compression of the context serves both questions
    with pytest.raises(ConfigError, match="question_agnostic"):
        pipe(CONTEXT, questions=QUESTIONS, protocol="aware")
    assert len(out["answers"]) == len(out["kv"]) == 2
    pre = pipe.preprocess(CONTEXT, questions=QUESTIONS)
    method = make_method(name, budget=0.3)
    assert out["token_ids"] == engine_answers(chat_model, smollm2_tokenizer, pre, method, proto, 8)
    n_ctx = len(pre["context_ids"])
    for s in out["kv"]:
        assert s.prompt_tokens_kept["max"] < n_ctx and s.kv_bytes_peak < s.kv_bytes_uncompressed
    if proto == "question_agnostic":  # both from copies of one compression of the context
        assert out["kv"][0].kept_tokens == out["kv"][1].kept_tokens
        assert out["kv"][0].prompt_tokens == out["kv"][1].prompt_tokens == n_ctx
    else:  # the first question compressed with the context, then removed
        assert out["kv"][0].prompt_tokens == n_ctx + len(pre["question_ids"][0])
        assert out["kv"][1].prompt_tokens == n_ctx


@pytest.mark.parametrize("proto", protocol.PROTOCOLS)
def test_pipeline_with_the_full_cache_answers_as_plain_generate(chat_model, smollm2_tokenizer,
                                                               proto):
    pipe = pipeline(TASK, model=chat_model, tokenizer=smollm2_tokenizer, method="full")
    kw = {"max_new_tokens": 8, "repetition_penalty": 1.3}  # generate()'s settings pass through
    out = pipe(CONTEXT, questions=QUESTIONS, protocol=proto, **kw)
    pre = pipe.preprocess(CONTEXT, questions=QUESTIONS)
    for q, got in zip(pre["question_ids"], out["token_ids"]):
        ref = greedy(chat_model, torch.tensor([pre["context_ids"] + q]), **kw)
        assert_same_tokens(got, ref)
    single = pipe(CONTEXT, question=QUESTIONS[1], protocol=proto, **kw)
    assert single["token_ids"] == out["token_ids"][1] and single["answer"] == out["answers"][1]
    untouched(chat_model)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "atskv"])
def test_readme_snippet_finds_the_needle_on_smollm2(smollm2_model, smollm2_tokenizer, name):
    from types import SimpleNamespace

    from atskv.benchmarks.synthetic import SyntheticBenchmark

    cfg = SimpleNamespace(name="synthetic", n_samples=1, tasks=["single_needle"], data_dir=None,
                          haystack="generated", max_new_tokens=None)
    bench = SyntheticBenchmark(cfg)
    (sample,) = bench.load(smollm2_tokenizer, 1024, 1, seed=0)
    model, inputs = smollm2_model, {"input_ids": torch.tensor([sample.input_ids])}
    press = compress(model, method=name, budget=0.2)
    with press:
        out = model.generate(**inputs, max_new_tokens=sample.max_new_tokens, do_sample=False)
    answer = smollm2_tokenizer.decode(out[0, 1024:], skip_special_tokens=True)
    assert bench.score(answer, sample) == 100, answer
    (s,) = press.stats
    if name == "atskv":
        assert s.prompt_tokens_kept["mean"] <= round(0.2 * 1024)  # the budget: prompt_keep
        assert s.kv_bytes_peak < 0.3 * s.kv_bytes_uncompressed
