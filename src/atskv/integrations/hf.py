"""atskv inside a transformers script: a KV-cache method under the model's own ``generate()``,
and a pipeline that answers several questions of one compressed context.

The drop-in::

    from atskv import compress

    press = compress(model, method="atskv", budget=0.2)
    with press:
        out = model.generate(**inputs, max_new_tokens=64)  # greedy, sampling, any processors
    press.stats[0].kv_bytes_peak, press.stats[0].prompt_tokens_kept  # per batch row

Inside the block ``model.generate`` prefills the prompt exactly, compresses it with the method
once the prompt is in and decodes through the method's stores
(:class:`atskv.core.hf_session.GenerateSession`); sampling, logits processors, stopping criteria
and streamers are transformers' own. Outside the block the model is untouched (its ``generate``,
attention implementation and layers are restored), and inside it everything but ``generate``
(a plain forward pass) runs as before.

The pipeline (registered as ``"atskv-text-generation"`` when this module is imported)::

    pipe = pipeline("atskv-text-generation", model=model, tokenizer=tok, method="snapkv",
                    budget=0.3)
    pipe(context, questions=["...", "..."], protocol="question_agnostic", max_new_tokens=32)
    # -> {"answers": [...], "token_ids": [...], "kv": [KVStats, ...]}

``question_agnostic`` compresses the context once, without any question; each question is
appended on top of its own copy of the compression, uncompressed, and answered.
``question_aware`` compresses the context with the first question in view; the later questions
are answered from that compression with the first question removed (as
:mod:`atskv.experiments.protocol` does for ``run.py``). Answers are decoded by ``generate()``
with the call's generation settings (greedy unless it asks for sampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from atskv.core.engine import Engine
from atskv.core.hf_session import GenerateSession, KVStats, check_unpadded
from atskv.core.method import Method
from atskv.core.types import ConfigError
from atskv.experiments.protocol import PROTOCOLS, check_protocol

TASK = "atskv-text-generation"

#: generate() arguments a KV-cache method cannot serve, with the value that is fine
_REFUSED = {"num_beams": 1, "penalty_alpha": None, "prompt_lookup_num_tokens": None,
            "assistant_early_exit": None, "dola_layers": None, "cache_implementation": None,
            "use_cache": True}
_REFUSED_KWARGS = ("assistant_model", "custom_generate", "inputs_embeds", "cache",
                   "past_key_values")


def make_method(method: str | Method = "atskv", budget: float | None = None,
                kv_size: int | None = None, **hyperparameters: Any) -> Method:
    """A registered method by name with the shared budget (``budget``: the fraction of the
    prompt's KV kept; or ``kv_size``: prompt tokens kept per layer and KV head) and its
    hyperparameters (paper defaults otherwise), or a :class:`Method` as it is."""
    if isinstance(method, Method):
        if budget is not None or kv_size is not None or hyperparameters:
            raise ConfigError(f"method={method!r} is a Method already: give its budget and "
                              f"hyperparameters when making it, not to compress()")
        return method
    from atskv.methods import METHODS

    cls = METHODS.get(str(method))  # an unknown name fails here, naming the choices
    if cls.compresses and budget is None and kv_size is None:
        raise ConfigError(f"method={method!r} needs budget= (the fraction of the prompt's KV "
                          f"cache it keeps, e.g. 0.2) or kv_size= (prompt tokens kept per layer "
                          f"and KV head)")
    return cls(budget=budget, kv_size=kv_size, **hyperparameters)


def _setting(name: str, model: Any, generation_config: Any, kwargs: dict[str, Any]) -> Any:
    """A generation setting as generate() resolves it: the call's keyword, its
    ``generation_config``, the model's generation config (None when none sets it)."""
    for source in (kwargs, vars(generation_config) if generation_config is not None else {},
                   vars(model.generation_config)):
        if source.get(name) is not None:
            return source[name]
    return None


def generation_length(model: Any, prompt_len: int, generation_config: Any,
                      kwargs: dict[str, Any]) -> int:
    """The tokens a generate() call makes at most (``max_new_tokens``, or ``max_length`` less
    the prompt): the method's stores are built with room for them."""
    new = _setting("max_new_tokens", model, generation_config, kwargs)
    if new is not None:
        return int(new)
    total = _setting("max_length", model, generation_config, kwargs)
    if total is None:
        raise ConfigError("compress() needs the generation length before generate() starts: "
                          "pass max_new_tokens=N (or max_length=N, prompt included)")
    if total - prompt_len < 1:
        raise ConfigError(f"max_length={total} leaves no room to generate after the prompt of "
                          f"{prompt_len} tokens; pass max_new_tokens=N")
    return int(total) - prompt_len


def check_call(model: Any, ids: Any, generation_config: Any,
               kwargs: dict[str, Any]) -> list[list[int]]:
    """Refuse, naming the argument, a generate() call the drop-in cannot serve; the prompts of
    the sequences its forward passes carry (each ``num_return_sequences`` times)."""
    given = [k for k in _REFUSED_KWARGS if kwargs.get(k) is not None]
    if given:
        raise ConfigError(f"generate({given[0]}=...) is not supported inside compress(): it "
                          f"supplies the cache and needs token ids (input_ids)")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        raise ConfigError(f"compress() needs input_ids as a (batch, tokens) LongTensor, got "
                          f"{type(ids).__name__}")
    for name, fine in _REFUSED.items():
        value = _setting(name, model, generation_config, kwargs)
        if value is not None and value != fine:
            raise ConfigError(f"{name}={value!r} is not supported inside compress() (greedy "
                              f"decoding and sampling, with any logits processors and stopping "
                              f"criteria, are)")
    check_unpadded(kwargs.get("attention_mask"))
    copies = _setting("num_return_sequences", model, generation_config, kwargs) or 1
    return ids.repeat_interleave(int(copies), dim=0).tolist()


class Compress:
    """The context manager :func:`compress` returns; see the module docstring. ``stats`` holds
    the last generation's :class:`KVStats`, one per batch row (empty before one)."""

    def __init__(self, model: Any, method: Method, tokenizer: Any = None):
        if method.uses_tokenizer and tokenizer is None:
            raise ConfigError(f"method {method.name!r} builds prompts of its own with the "
                              f"model's tokenizer: pass it, compress(model, method="
                              f"{method.name!r}, budget=..., tokenizer=tokenizer)")
        self.model, self.method = model, method
        self.engine = Engine(model, tokenizer)  # a model the engine cannot run fails here
        self.stats: list[KVStats] = []
        self._saved: Any = None

    def __enter__(self) -> Compress:
        if getattr(self.model.generate, "_atskv", False):
            raise RuntimeError("this model is inside a compress() block already")
        self._saved = self.model.__dict__.get("generate")  # an instance attribute, if any
        original = self.model.generate

        def generate(inputs: Any = None, generation_config: Any = None, **kwargs: Any) -> Any:
            return self.generate(original, inputs, generation_config, **kwargs)

        generate._atskv = True  # type: ignore[attr-defined]
        generate.__doc__ = original.__doc__
        self.model.generate = generate
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._saved is None:
            del self.model.generate
        else:
            self.model.generate = self._saved

    def generate(self, original: Any, inputs: Any, generation_config: Any,
                 **kwargs: Any) -> Any:
        """``original(inputs, generation_config, **kwargs)`` with this method's cache."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        prompts = check_call(self.model, ids, generation_config, kwargs)
        new = generation_length(self.model, ids.shape[1], generation_config, kwargs)
        self.engine.check_fits(ids.shape[1], new)
        session = GenerateSession.prefilling(self.engine, self.method, prompts, new)
        return self.run(session, original, inputs, generation_config, kwargs)

    def run(self, session: GenerateSession, original: Any, inputs: Any, generation_config: Any,
            kwargs: dict[str, Any]) -> Any:
        self.stats = []
        try:
            with session.running(self.model) as cache:
                return original(inputs, generation_config=generation_config, cache=cache,
                                **kwargs)
        finally:
            self.stats = session.stats()


def compress(model: Any, method: str | Method = "atskv", budget: float | None = None,
             kv_size: int | None = None, tokenizer: Any = None,
             **hyperparameters: Any) -> Compress:
    """A context manager in which ``model.generate()`` runs with a KV-cache method (module
    docstring): ``method`` a registered name (``atskv.methods.METHODS.names()``) or a
    :class:`Method`; ``budget`` the fraction of the prompt's KV cache it keeps (or ``kv_size``:
    prompt tokens per layer and KV head); ``tokenizer`` the model's, for a method that builds
    prompts of its own (kvzip); ``hyperparameters`` the method's own fields."""
    return Compress(model, make_method(method, budget, kv_size, **hyperparameters), tokenizer)


class KVCompressionPipeline(Pipeline):
    """``pipeline("atskv-text-generation", model=..., tokenizer=..., method=..., budget=...)``:
    ``pipe(context, questions=[...] | question="...", protocol="question_agnostic",
    max_new_tokens=..., **generate_kwargs)`` -> ``{"answers": [...], "token_ids": [...],
    "kv": [KVStats, ...]}`` (``"answer"``, one list of ids and one KVStats for a single
    ``question``). See the module docstring.

    Prompts: with a chat template, the context and the question form one user turn
    (``context + "\\n\\n" + question``), the assistant's turn opened; the context's part (the
    template's head and the context) and the question's part (the question and the template's
    tail) are tokenized apart, so the context's tokens are the same for every question.
    Without one, the context (with the tokenizer's special tokens) and ``"\\n\\n" + question``."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    _PARAMS = ("method", "budget", "kv_size", "hyperparameters", "protocol", "max_new_tokens")

    def _sanitize_parameters(self, questions: Sequence[str] | None = None,
                             question: str | None = None, **kwargs: Any) -> tuple[dict, dict, dict]:
        pre: dict[str, Any] = {}
        if question is not None and questions is not None:
            raise ConfigError("give question= or questions=, not both")
        if question is not None:
            pre["questions"], pre["single"] = [question], True
        elif questions is not None:
            if isinstance(questions, str) or not questions:
                raise ConfigError(f"questions= takes a non-empty list of strings, got "
                                  f"{questions!r}")
            pre["questions"], pre["single"] = list(questions), False
        forward = {k: kwargs.pop(k) for k in self._PARAMS if k in kwargs}
        if "protocol" in forward:
            check_protocol(forward["protocol"])
        if kwargs:  # generate() settings: the call's on top of the pipeline's
            earlier = getattr(self, "_forward_params", {}).get("generate_kwargs", {})
            forward["generate_kwargs"] = {**earlier, **kwargs}
        return pre, forward, {}

    def preprocess(self, context: str, questions: Sequence[str] = (),
                   single: bool = False) -> dict[str, Any]:
        if not isinstance(context, str) or not context:
            raise ConfigError(f"the pipeline takes a context string, got {context!r}")
        if not questions:
            raise ConfigError("ask something: pipe(context, questions=[...]) or question=...")
        tok = self.tokenizer
        marker = "\x00QUESTION\x00"
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": f"{context}\n\n{marker}"}],
                                           tokenize=False, add_generation_prompt=True)
            head, tail = text.split(marker)
            context_ids = tok(head, add_special_tokens=False)["input_ids"]
        else:
            head, tail = context, ""
            context_ids = tok(head)["input_ids"]
            questions = ["\n\n" + q for q in questions]
        question_ids = [tok(q + tail, add_special_tokens=False)["input_ids"] for q in questions]
        return {"context_ids": list(context_ids), "question_ids": [list(q) for q in question_ids],
                "single": single}

    def _forward(self, inputs: dict[str, Any], method: str | Method = "atskv",
                 budget: float | None = None, kv_size: int | None = None,
                 hyperparameters: dict[str, Any] | None = None,
                 protocol: str = "question_agnostic", max_new_tokens: int = 64,
                 generate_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        check_protocol(protocol)
        m = make_method(method, budget, kv_size, **(hyperparameters or {}))
        press = Compress(self.model, m, self.tokenizer)
        answers = QuestionAnswering(press, inputs["context_ids"], inputs["question_ids"],
                                    max_new_tokens, dict(generate_kwargs or {}))
        outs = answers.run(protocol)
        return {"tokens": outs, "stats": answers.stats, "single": inputs["single"]}

    def postprocess(self, outputs: dict[str, Any]) -> dict[str, Any]:
        tokens = outputs["tokens"]
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        if outputs["single"]:
            return {"answer": texts[0], "token_ids": tokens[0], "kv": outputs["stats"][0]}
        return {"answers": texts, "token_ids": tokens, "kv": outputs["stats"]}


class QuestionAnswering:
    """Questions answered from one compression of their context (the pipeline's protocols):
    each question a generate() call that continues a copy of the compression."""

    def __init__(self, press: Compress, context: list[int], questions: list[list[int]],
                 max_new_tokens: int, generate_kwargs: dict[str, Any]):
        self.press, self.engine, self.method = press, press.engine, press.method
        self.context, self.questions = context, questions
        self.max_new, self.kwargs = max_new_tokens, generate_kwargs
        self.stats: list[KVStats] = []
        check_call(press.model, torch.tensor([context]), None, generate_kwargs)
        longest = len(context) + max(map(len, questions))
        self.engine.check_fits(longest, max_new_tokens)

    @torch.inference_mode()
    def run(self, protocol: str) -> list[list[int]]:
        """The answers' tokens, in the questions' order."""
        q = self.questions
        start = len(self.context)
        if protocol == "question_agnostic":
            room = max(map(len, q)) + self.max_new
            pre = self.engine.prefill(self.context, self.method.queries_needed())
            comp = self.engine.compress(pre, self.method, room, consume=True,
                                        question_follows=True)
            return [self.answer(comp if i == len(q) - 1 else comp.copy(), q[i], room)
                    for i in range(len(q))]
        room = max([self.max_new] + [len(x) + self.max_new for x in q[1:]])
        prompt = self.context + q[0]
        first = GenerateSession.prefilling(self.engine, self.method, [prompt], room)
        first.keep_copy = len(q) > 1
        outs = [self.generate(first, prompt)]
        for i in range(1, len(q)):
            comp = self.engine.forget(first.copies[0], self.method, start, copy=i < len(q) - 1)
            outs.append(self.answer(comp, q[i], room))
        return outs

    def answer(self, comp: Any, question: list[int], room: int) -> list[int]:
        session = GenerateSession.resume(self.engine, self.method, comp, len(self.context),
                                         len(question), room)
        return self.generate(session, self.context + question)

    def generate(self, session: GenerateSession, prompt: list[int]) -> list[int]:
        ids = torch.tensor([prompt], device=self.engine.device)
        generate = self.press.model.generate
        if getattr(generate, "_atskv", False):
            raise RuntimeError("the atskv pipeline compresses by itself: call it outside a "
                               "compress() block")
        out = self.press.run(session, generate, ids, None,
                             {**self.kwargs, "max_new_tokens": self.max_new})
        self.stats += self.press.stats
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        return sequences[0, len(prompt):].tolist()


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=KVCompressionPipeline,
                                    pt_model=AutoModelForCausalLM)

__all__ = ["PROTOCOLS", "TASK", "Compress", "KVCompressionPipeline", "compress", "make_method"]
