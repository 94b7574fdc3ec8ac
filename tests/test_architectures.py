"""Every registered method on the architectures people use, built tiny and random in-process:
Llama, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms), Mistral with a sliding window shorter
than the prompt, Gemma 3 (sliding-window layers interleaved with global ones, its own attention
scale, scaled embeddings) and Phi-3 (fused q/k/v). At budget 1 the engine decodes what plain
transformers' ``generate()`` decodes; at budget 0.2 every layer the method should compress is
compressed, sliding-window layers keep exactly their window, and the bytes reported are the bytes
the stores hold. Models the engine cannot run exactly are refused by name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import transformers as tf
from helpers import generate

from atskv.core import seam
from atskv.core.engine import Engine
from atskv.core.method import Method, PrefillContext, State
from atskv.methods import METHODS

VOCAB = 256
PROMPT = [int(t) for t in torch.randint(3, VOCAB, (160,), generator=torch.Generator().manual_seed(1))]
NEW = 8
WINDOW = 16  # < the prompt: the sliding layers' rings wrap
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _build(arch: str, **over):
    if arch == "llama":
        cls, cfg = tf.LlamaForCausalLM, tf.LlamaConfig(**SMALL)
    elif arch == "qwen2":
        cls, cfg = tf.Qwen2ForCausalLM, tf.Qwen2Config(**SMALL)
    elif arch == "qwen3":
        cls, cfg = tf.Qwen3ForCausalLM, tf.Qwen3Config(**SMALL, head_dim=16)
    elif arch == "mistral":
        cls, cfg = tf.MistralForCausalLM, tf.MistralConfig(**SMALL, sliding_window=WINDOW)
    elif arch == "gemma3":
        # sliding, sliding, full, sliding; query_pre_attn_scalar != head_dim: its own scale
        cls, cfg = tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(
            **SMALL, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                         "sliding_attention"])
    elif arch == "phi3":
        cls, cfg = tf.Phi3ForCausalLM, tf.Phi3Config(**SMALL)
    else:
        raise ValueError(arch)
    for k, v in over.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger weights than the default init: decisive logits
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3"]
#: the layers each tiny model runs over a sliding window shorter than PROMPT + NEW
SLIDING = {"llama": [], "qwen2": [], "qwen3": [], "mistral": [0, 1, 2, 3], "gemma3": [0, 1, 3],
           "phi3": []}


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, _build(request.param)


@pytest.fixture(scope="module")
def reference(arch_model):
    arch, model = arch_model
    return seam.reference_greedy(model, torch.tensor([PROMPT]), NEW)


def test_the_models_are_what_the_tests_claim(arch_model):
    arch, model = arch_model
    windows = seam.layer_windows(model)
    assert [i for i, w in enumerate(windows) if w is not None] == SLIDING[arch]
    assert all(w == WINDOW for w in windows if w is not None)
    attn = model.model.layers[0].self_attn
    if arch == "qwen2":
        assert attn.q_proj.bias is not None and attn.k_proj.bias is not None
    if arch == "qwen3":
        assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    if arch == "phi3":
        assert hasattr(attn, "qkv_proj") and not hasattr(attn, "q_proj")
    if arch == "gemma3":
        assert attn.scaling == 24**-0.5 != model.config.head_dim**-0.5


def _assert_same_greedy(out, ref_tokens, ref_logits, tol=1e-4):
    """Per step, logits within ``tol`` of the reference's; tokens equal up to the first step
    whose reference top-2 margin is within 2 ``tol`` (where float order may pick either)."""
    logits = out.stats["logits"]
    assert len(out.token_ids) == len(ref_tokens) == NEW
    for step, (got, want) in enumerate(zip(logits, ref_logits)):
        assert (got - want.float()).abs().max() < tol, f"step {step}"
        top2 = want.float().topk(2).values
        if top2[0] - top2[1] < 2 * tol:
            return
        assert out.token_ids[step] == ref_tokens[step], f"step {step}"


@pytest.mark.parametrize("name", METHODS.names())
def test_budget_one_equals_transformers_generate(arch_model, reference, name):
    _, model = arch_model
    method = METHODS.get(name)(budget=1.0)
    out = generate(model, method, PROMPT, NEW, return_logits=True)
    _assert_same_greedy(out, *reference)


@pytest.mark.parametrize("chunk", [12, 40])
def test_chunked_prefill_over_sliding_windows_equals_generate(arch_model, reference, chunk):
    """Chunks shorter and longer than the window: each chunk sees the window's last tokens."""
    _, model = arch_model
    out = Engine(model, None, prefill_chunk=chunk).generate(
        PROMPT, METHODS.get("full")(), NEW, stop_at_eos=False, return_logits=True)
    _assert_same_greedy(out, *reference)


@pytest.mark.parametrize("name", METHODS.names())
def test_budget_02_compresses_every_global_layer_and_windows_stay_windows(arch_model, name):
    arch, model = arch_model
    cls = METHODS.get(name)
    out = generate(model, cls(budget=0.2), PROMPT, NEW, return_logits=True)
    state, kept = out.stats["state"], out.stats["kept_tokens"]
    n_layers, h_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    d = seam.model_dims(model)["head_dim"]
    assert out.stats["window_layers"] == SLIDING[arch] == sorted(state.windows)
    assert len(kept) == n_layers and len(state.stores) == n_layers - len(SLIDING[arch])
    target = cls(budget=0.2).prompt_target(len(PROMPT))
    for layer in range(n_layers):
        if layer in SLIDING[arch]:  # exactly the window, as a ring: not compressed further
            assert kept[layer] == [WINDOW] * h_kv
            assert state.windows[layer].k.shape == (h_kv, WINDOW, d)
        elif cls.compresses:  # about budget x prompt per layer on average, never all of it
            assert max(kept[layer]) < len(PROMPT), (layer, kept[layer])
        else:
            assert kept[layer] == [len(PROMPT)] * h_kv
    glob = [n for i, layer in enumerate(kept) if i not in SLIDING[arch] for n in layer]
    if cls.compresses and glob:
        assert max(1, target - 16) <= sum(glob) / len(glob) <= target
    # the bytes reported are the bytes the stores hold (windows included), less rows reserved
    # for generated tokens not made; the generation ran to NEW tokens, so every row is made
    held = sum(t.numel() * t.element_size() for t in state.tensors())
    assert out.kv_bytes_peak == held == state.allocated_bytes()
    rings = sum(2 * h_kv * WINDOW * d * 4 for _ in SLIDING[arch])  # fp32 K and V
    assert sum(s.k.numel() * 8 for s in state.windows.values()) == rings
    assert out.kv_bytes_after_compression <= out.kv_bytes_peak


SEEN: list = []


@dataclass(frozen=True)
class _Spy(Method[State]):
    """Keeps every token; records what its select saw."""

    def select(self, state: State, ctx: PrefillContext):
        SEEN[:] = [ctx.n_layers, [k.shape[1] for k in ctx.keys], ctx.scale]
        return None


def test_the_method_sees_the_global_layers_only_with_the_model_scale():
    model = _build("gemma3")
    generate(model, _Spy(), PROMPT, NEW)
    assert SEEN == [1, [len(PROMPT)], 24**-0.5]


def test_a_window_that_covers_the_generation_is_compressed_like_a_global_layer():
    """A window as long as the prompt and the new tokens fed back never excludes anything: the
    method compresses those layers like global ones (never a silent full cache)."""
    model = _build("mistral", sliding_window=len(PROMPT) + NEW - 1)
    out = generate(model, METHODS.get("snapkv")(budget=0.2), PROMPT, NEW)
    assert out.stats["window_layers"] == []
    assert max(n for layer in out.stats["kept_tokens"] for n in layer) < len(PROMPT)
    one_short = _build("mistral", sliding_window=len(PROMPT) + NEW - 2)
    out = generate(one_short, METHODS.get("snapkv")(budget=0.2), PROMPT, NEW)
    assert out.stats["window_layers"] == [0, 1, 2, 3]


def test_full_kv_bytes_count_each_window_once():
    model = _build("gemma3")
    eng = Engine(model, None)
    per_token = 2 * 2 * 16 * 4  # K and V, 2 KV heads of 16 dims, fp32
    assert eng.full_kv_bytes(100) == per_token * (100 + 3 * WINDOW)
    assert eng.full_kv_bytes(10) == per_token * 10 * 4


def test_a_layer_whose_window_differs_from_its_config_is_refused():
    model = _build("gemma3")
    model.model.layers[1].self_attn.sliding_window = 8  # what the config does not say
    with pytest.raises(seam.UnsupportedModel, match="layer 1 .* 8 tokens.* declares 16"):
        generate(model, METHODS.get("full")(), PROMPT, 2)


def _tiny(cls, cfg):
    torch.manual_seed(0)
    return cls(cfg).eval()


UNSUPPORTED = {
    "Gemma2ForCausalLM": (lambda: _tiny(tf.Gemma2ForCausalLM, tf.Gemma2Config(
        **SMALL, head_dim=16)), "soft-caps its attention logits"),
    "GptOssForCausalLM": (lambda: _tiny(tf.GptOssForCausalLM, tf.GptOssConfig(
        **{**SMALL, "num_hidden_layers": 2}, head_dim=16, num_local_experts=2,
        num_experts_per_tok=1)), "attention sinks"),
    "DeepseekV3ForCausalLM": (lambda: _tiny(tf.DeepseekV3ForCausalLM, tf.DeepseekV3Config(
        **{**SMALL, "num_hidden_layers": 1}, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=2,
        num_experts_per_tok=1, first_k_dense_replace=1)), "latent"),
    "T5ForConditionalGeneration": (lambda: _tiny(tf.T5ForConditionalGeneration, tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)),
        "encoder-decoder"),
    "Gemma3ForCausalLM": (lambda: _build("gemma3", use_bidirectional_attention=True),
                          "bidirectionally"),
}


@pytest.mark.parametrize("arch", sorted(UNSUPPORTED))
def test_unsupported_architectures_are_refused_by_name(arch):
    make, what = UNSUPPORTED[arch]
    model = make()
    with pytest.raises(seam.UnsupportedModel, match=f"{arch}.*{what}"):
        Engine(model, None)


def test_attention_arguments_that_change_the_math_are_refused():
    """What a model passes to the attention function that the engine does not implement (sinks,
    soft-capping, dropout) stops the forward pass with its name."""
    model = _build("llama")
    module = model.model.layers[0].self_attn
    q = k = v = torch.zeros(1, 2, 3, 16)
    with seam.active(object()):  # refused before the session is reached
        for kw, what in (({"s_aux": torch.zeros(2)}, "s_aux"), ({"softcap": 50.0}, "soft-caps"),
                         ({"dropout": 0.1}, "dropout")):
            with pytest.raises(seam.UnsupportedModel, match=f"LlamaAttention.*{what}"):
                seam._attention(module, q, k, v, None, **kw)


def test_a_multimodal_gemma3_checkpoint_runs_on_its_text():
    """Gemma-3-12B-it loads as Gemma3ForConditionalGeneration (a vision tower beside the
    language model): the engine reads the text config and feeds token ids only."""
    text = tf.Gemma3TextConfig(**SMALL, head_dim=16, query_pre_attn_scalar=24,
                               sliding_window=WINDOW, layer_types=["sliding_attention"] * 2
                               + ["full_attention", "sliding_attention"])
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, image_size=28, patch_size=14)
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=250, boi_token_index=251, eoi_token_index=252)
    cfg._attn_implementation = "sdpa"
    model = _tiny(tf.Gemma3ForConditionalGeneration, cfg)
    ref = seam.reference_greedy(model, torch.tensor([PROMPT]), NEW)
    out = generate(model, METHODS.get("snapkv")(budget=1.0), PROMPT, NEW, return_logits=True)
    _assert_same_greedy(out, *ref)
    assert out.stats["window_layers"] == [0, 1, 3]


@pytest.mark.parametrize("name", ["full", "snapkv"])
def test_compiled_decoding_with_window_rings_equals_eager(name):
    """The rings are static stores: the compiled step (fullgraph) decodes what eager decodes."""
    model = _build("gemma3")
    method = METHODS.get(name)(budget=0.2)
    eager = Engine(model, None).generate(PROMPT, method, NEW, stop_at_eos=False,
                                         return_logits=True)
    compiled = Engine(model, None, compile=True).generate(PROMPT, method, NEW, stop_at_eos=False,
                                                          return_logits=True)
    assert compiled.stats["compiled"] is True
    assert compiled.token_ids == eager.token_ids
    assert max(float((a - b).abs().max()) for a, b in
               zip(compiled.stats["logits"], eager.stats["logits"])) < 1e-4
    assert compiled.kv_bytes_peak == eager.kv_bytes_peak
