"""lm-eval bridge: the ``atskv`` model for EleutherAI's lm-evaluation-harness (0.4.x).

Any ``generate_until`` task of lm-eval runs through :class:`atskv.core.engine.Engine` with a KV-cache
method (greedy; ``--batch_size N`` decodes N requests together, each as alone), e.g. ::

    atskv-lm-eval --model atskv \\
        --model_args method=rocket_kv,budget=0.25,model=smollm2_135m,context_len=4096 \\
        --tasks atskv_niah_single --include_path src/atskv/integrations/lm_eval_tasks --device cpu

``atskv-lm-eval`` is lm-eval's own command line with this module imported first: lm-eval 0.4.13
does not load model plugins from package entry points, so the plain ``lm_eval`` command does not
know ``--model atskv``. In Python, importing this module registers the model::

    import atskv.integrations.lm_eval  # noqa: F401
    lm_eval.simple_evaluate(model="atskv", model_args="method=snapkv,budget=0.5", tasks=[...])

Model arguments (``--model_args``): see :data:`MODEL_ARGS`. Method hyperparameters are passed
as ``method.<field>=value`` (the spelling ``run.py`` uses, e.g. ``method.window=16``); their
defaults come from ``conf/method/<name>.yaml``. Unknown keys are errors that name the choices.

Prompts longer than ``context_len`` (default: what fits the model's positions next to
``max_gen_toks``) are middle-truncated at token level, as LongBench does. Stop strings
(``until``) end generation: the engine checks them incrementally on the decoded text and stops
at the first one (or at EOS or ``max_gen_toks``), and the returned text is cut there, so timings
and KV bytes cover only the tokens a stopping decoder makes. ``loglikelihood`` requests are refused: the
methods compress the cache after prefill and act on generation.

The run's method, hyperparameters and KV-cache statistics land in lm-eval's results under
``results["config"]["atskv"]`` (see :meth:`AtsKVLM.get_model_info`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

# lm-eval imports its built-in models (hf, vllm, ...) only when its registry is empty; register
# them before ours so that `--model hf` keeps working in a process that imported this module.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from atskv.core.types import ConfigError, GenerationOutput, Sample

log = logging.getLogger("atskv.lm_eval")

#: ``--model_args`` keys (besides ``method.<field>``) and what they mean.
MODEL_ARGS: dict[str, str] = {
    "method": "KV-cache method name (default full)",
    "budget": "fraction of the prompt's KV cache the method keeps, in (0, 1] (default 0.25)",
    "kv_size": "alternatively, prompt tokens kept per layer and KV head (not with budget)",
    "model": "model preset name from conf/model (default smollm2_135m)",
    "model_path": "local Hugging Face folder for presets that load from the hub (model.path)",
    "context_len": "max prompt tokens; longer prompts are middle-truncated (default: all that "
                   "fits the model's positions)",
    "device": "cpu, cuda, cuda:N (default: lm-eval's --device, cpu when CUDA is missing)",
    "dtype": "float32, bfloat16 or float16 (default: the hardware preset's)",
    "prefill_chunk": "tokens per prefill chunk, 0 = one pass (default: the hardware preset's)",
    "threads": "CPU threads for torch (default: all)",
    "compile": "true or false: compile the static decode step (default: the hardware preset's: "
               "on a CPU, when the requests decode enough steps to repay the compile)",
    "max_gen_toks": "generation length when a task sets none (default 256)",
    "protocol": "question_aware (default) or question_agnostic: compress the context without "
                "the question (prompts from atskv's exported tasks, which know where it starts)",
}
METHOD_PREFIX = "method."
DEFAULT_MAX_GEN_TOKS = 256
#: generation kwargs that greedy decoding ignores (they only shape sampling)
SAMPLING_ONLY = ("top_p", "top_k", "min_p", "typical_p", "seed")


def split_until(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string (the whole text if none occurs)."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if 0 <= at < cut:
                cut = at
    return text[:cut]


def greedy_gen_kwargs(gen_kwargs: dict[str, Any], default_max: int) -> tuple[list[str], int]:
    """``(until, max_gen_toks)`` from lm-eval's generation kwargs; anything that asks for a
    decoding other than greedy is an error (the engine decodes greedily)."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not (isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until)):
        raise ConfigError(f"until={until!r}: expected a string or a list of strings")
    max_gen = kw.pop("max_gen_toks", None)
    max_gen = default_max if max_gen is None else max_gen
    if not isinstance(max_gen, int) or isinstance(max_gen, bool) or max_gen < 1:
        raise ConfigError(f"max_gen_toks={max_gen!r} must be a positive integer")
    do_sample = kw.pop("do_sample", None)
    temperature = kw.pop("temperature", None)
    hint = ("the atskv model decodes greedily only; use do_sample=false (or temperature=0) "
            "in the task's generation_kwargs / --gen_kwargs")
    if do_sample:
        raise ConfigError(f"do_sample={do_sample!r}: {hint}")
    if temperature is not None and float(temperature) > 0 and do_sample is not False:
        raise ConfigError(f"temperature={temperature!r} asks for sampling: {hint}")
    for key, neutral in (("num_beams", 1), ("num_return_sequences", 1), ("repetition_penalty", 1.0)):
        value = kw.pop(key, None)
        if value is not None and value != neutral:
            raise ConfigError(f"{key}={value!r} is not supported: {hint}")
    for key in SAMPLING_ONLY:
        kw.pop(key, None)
    if kw:
        raise ConfigError(f"unsupported generation kwargs {sorted(kw)}; the atskv model takes "
                          f"until, max_gen_toks and greedy settings (do_sample=false, "
                          f"temperature=0, num_beams=1)")
    return list(until), max_gen


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@register_model("atskv")
class AtsKVLM(LM):
    """lm-eval model that generates with an atskv KV-cache method; see the module docstring."""

    def __init__(
        self,
        method: str = "full",
        budget: float | None = None,
        kv_size: int | None = None,
        model: str = "smollm2_135m",
        model_path: str | None = None,
        context_len: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        prefill_chunk: int | None = None,
        threads: int | None = None,
        compile: bool | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        protocol: str = "question_aware",
        _harness: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__()
        harness = dict(_harness or {})
        cfg, device, fell_back = self.compose(method, budget, kv_size, model, model_path, device,
                                              dtype, prefill_chunk, threads, extra, harness,
                                              compile)
        cfg.protocol = protocol
        self.batch_size = self.check(cfg, device, fell_back, max_gen_toks,
                                     harness.get("batch_size"))
        self.build(cfg, method, context_len, device, max_gen_toks)

    @classmethod
    def compose(cls, method: str, budget: float | None, kv_size: int | None, model: str,
                model_path: str | None, device: str | None, dtype: str | None,
                prefill_chunk: int | None, threads: int | None, extra: dict[str, Any],
                harness: dict[str, Any], compile: bool | None = None) -> tuple[Any, str, bool]:
        """The run config ``run.py`` would compose for these model_args (unknown keys and
        mistyped values are errors naming the choices), the device and whether it fell back
        to the CPU."""

        from atskv.experiments.compose import check_choice, compose_run_config, group_choices
        from atskv.methods import METHODS

        cls_ = METHODS.get(str(method))  # unknown names fail here, naming the choices
        fields = [f.name for f in dataclasses.fields(cls_) if f.name not in ("budget", "kv_size")]
        method_over = cls._method_overrides(method, fields, extra)
        check_choice("model", model, group_choices("model"))
        device, fell_back = cls._pick_device(device, harness.get("device"))
        hw = "cuda" if device.startswith("cuda") else "cpu"
        cfg = compose_run_config([f"method={method}", f"model={model}", f"hardware={hw}"])
        try:
            cfg.budget, cfg.kv_size = budget, kv_size
            for key, value in method_over.items():
                cfg.method[key] = value
            cfg.hardware.device = device
            for key, value in (("dtype", dtype), ("prefill_chunk", prefill_chunk),
                               ("threads", threads), ("compile", compile)):
                if value is not None:
                    cfg.hardware[key] = value
            if compile is not None:  # said outright: whatever the number of steps
                cfg.hardware.compile_min_steps = 0
            if model_path is not None:
                cfg.model.path = str(model_path)
        except OmegaConfBaseException as e:  # a value of the wrong type for its field
            raise ConfigError(f"atskv model_args: {e}") from e
        return cfg, device, fell_back

    @staticmethod
    def check(cfg: Any, device: str, fell_back: bool, max_gen_toks: Any, batch_size: Any) -> int:
        """Every check that needs no model (run.py's and the bridge's own); returns the batch
        size (``--batch_size``: requests decoded together; ``auto`` is 1)."""
        import torch

        from atskv.experiments.config import validate

        if not fell_back and device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={device} but CUDA is not available here; use device=cpu")
        validate(cfg)
        if not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise ConfigError(f"max_gen_toks={max_gen_toks!r} must be a positive integer")
        if batch_size is None or str(batch_size).startswith("auto"):
            return 1
        try:
            size = int(batch_size)
        except ValueError:
            size = 0
        if size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer (requests "
                              f"decoded together) or auto")
        return size

    def build(self, cfg: Any, method: str, context_len: Any, device: str, max_gen_toks: int) -> None:
        """Load the tokenizer and model, and build the method and the engine."""
        import torch

        from atskv.core.engine import Engine
        from atskv.experiments import models
        from atskv.experiments.config import build_method

        path = models.resolve_path(cfg.model)
        self.max_positions = models.max_positions(cfg.model, path)
        if context_len is not None:
            if not isinstance(context_len, int) or isinstance(context_len, bool) or context_len < 1:
                raise ConfigError(f"context_len={context_len!r} must be a positive integer")
            if context_len >= self.max_positions:
                raise ConfigError(f"context_len={context_len} does not fit model {cfg.model.name}'s "
                                  f"{self.max_positions} positions (prompt plus generated tokens)")
        if cfg.hardware.threads:
            torch.set_num_threads(int(cfg.hardware.threads))
        self.cfg = cfg
        self.path = path
        self.method_name = method
        self.context_len = context_len
        self.max_gen_toks = max_gen_toks
        self.tokenizer = models.load_tokenizer(cfg.model, path)
        self.model = models.load_model(cfg.model, path, device, cfg.hardware.dtype,
                                       cfg.hardware.device_map)
        self.method = build_method(cfg)
        self.engine = Engine.for_hardware(self.model, self.tokenizer, cfg.hardware)
        self._device = torch.device(device)
        self.last_output: GenerationOutput | None = None
        self.records: list[dict[str, Any]] = []
        self.truncated = 0  # prompts cut to fit context_len / the model's positions
        self.pretokenized = 0  # prompts whose exact ids came from an atskv benchmark export

    # -- construction from lm-eval's arguments ----------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None):
        """lm-eval passes ``--device``/``--batch_size`` as extra keyword arguments next to
        ``--model_args``; they are kept apart so that ``model_args`` ``device=`` wins."""
        harness = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**dict(arg_dict), _harness=harness)

    @staticmethod
    def _method_overrides(method: str, fields: list[str], extra: dict[str, Any]) -> dict[str, Any]:
        over: dict[str, Any] = {}
        valid = ", ".join(list(MODEL_ARGS) + [f"{METHOD_PREFIX}<field>"])
        fields_txt = ", ".join(f"{METHOD_PREFIX}{f}" for f in fields) or "(none)"
        for key, value in extra.items():
            if key.startswith(METHOD_PREFIX):
                name = key[len(METHOD_PREFIX):]
                if name == "budget":
                    raise ConfigError(f"{key}: the budget is the model_arg budget=<fraction>")
                if name not in fields:
                    raise ConfigError(f"{key!r} is not a hyperparameter of method {method}; "
                                      f"valid: {fields_txt}")
                over[name] = value
            elif key in fields:
                raise ConfigError(f"unknown model_args key {key!r}; method hyperparameters are "
                                  f"passed as {METHOD_PREFIX}{key}={value}")
            else:
                raise ConfigError(f"unknown model_args key {key!r}; valid keys: {valid} "
                                  f"(method {method}: {fields_txt})")
        return over

    @staticmethod
    def _pick_device(device: str | None, harness_device: str | None) -> tuple[str, bool]:
        """``(device, fell_back)``. ``model_args`` ``device=`` wins over lm-eval's ``--device``,
        whose default is cuda:0 even on machines without CUDA: that default falls back to cpu."""
        import torch

        if device is not None:
            return str(device), False
        if harness_device is None:
            return ("cuda" if torch.cuda.is_available() else "cpu"), False
        harness_device = str(harness_device)
        if harness_device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("--device %s: CUDA is not available here; atskv runs on cpu", harness_device)
            return "cpu", True
        if not harness_device.startswith(("cpu", "cuda")):
            raise ConfigError(f"device={harness_device!r}: atskv runs on cpu or cuda[:N]")
        return harness_device, False

    # -- lm-eval interface ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.max_positions

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            if chat_template:
                raise ConfigError(f"--apply_chat_template: model {self.cfg.model.name}'s "
                                  f"tokenizer has no chat template")
            return None
        if isinstance(template, dict):  # named templates
            name = chat_template if isinstance(chat_template, str) else "default"
            if name not in template:
                raise ConfigError(f"chat template {name!r} not found; choices: {sorted(template)}")
            return template[name]
        if isinstance(chat_template, str):
            log.warning("the tokenizer has a single chat template; %r is ignored", chat_template)
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"--apply_chat_template: model {self.cfg.model.name}'s tokenizer "
                              f"has no chat template")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        raise NotImplementedError(
            "the atskv model supports generate_until tasks only: KV-cache compression acts after "
            "prefill, on generation. For loglikelihood / multiple-choice tasks use lm-eval's "
            "hf model (a full cache)")

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        raise NotImplementedError(
            "the atskv model supports generate_until tasks only (perplexity / "
            "loglikelihood_rolling tasks need no KV-cache compression; use lm-eval's hf model)")

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Every request's answer. Requests whose prompts came from atskv's exported tasks and
        share a context (the multi-question task) are answered together, in question order,
        from one compression of it, as ``run.py`` answers them
        (:mod:`atskv.experiments.protocol`); the others one by one."""
        from atskv.experiments import protocol

        # check every request before the first (slow) generation
        parsed = [greedy_gen_kwargs(req.args[1], self.max_gen_toks) for req in requests]
        samples = [self.sample(req.args[0], until, max_gen, i)
                   for i, (req, (until, max_gen)) in enumerate(zip(requests, parsed))]
        protocol.check_splits(samples, {self.cfg.protocol})
        # compiled only for as many steps as repay it (the hardware preset's compile_min_steps)
        from atskv.core.engine import compile_pays

        self.engine.use_compile(compile_pays(self.cfg.hardware, sum(m for _, m in parsed)))
        groups: dict[Any, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(s.meta.get("context_id") or ("request", i), []).append(i)
        outputs: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc=f"atskv {self.method_name}", unit="req",
                   disable=disable_tqdm or self.rank != 0)
        order = [sorted(idxs, key=lambda i: samples[i].meta.get("question_position") or 0)
                 for idxs in groups.values()]
        for at in range(0, len(order), self.batch_size):  # --batch_size groups decoded together
            chunk = order[at : at + self.batch_size]
            outs = self.answer([[samples[i] for i in idxs] for idxs in chunk])
            for i, out in zip((i for idxs in chunk for i in idxs), outs, strict=True):
                outputs[i] = split_until(out.text, samples[i].stop)
                self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
            bar.update(sum(len(idxs) for idxs in chunk))
        bar.close()
        return outputs

    # -- generation -------------------------------------------------------------------------
    def encode(self, context: str) -> list[int]:
        """Token ids of a prompt (one that did not come from an atskv export): the tokenizer's,
        adding special tokens unless the text already starts with BOS (a chat template put it
        there)."""
        bos = getattr(self.tokenizer, "bos_token", None)
        special = not (bos and context.startswith(bos))
        return list(self.tokenizer(context, add_special_tokens=special)["input_ids"])

    def sample(self, context: str, until: list[str], max_gen_toks: int, index: int) -> Sample:
        """The request as a sample: the one an atskv benchmark built for this prompt (its exact
        ids, where its question starts, the context it shares; see
        :mod:`atskv.integrations.lm_eval_tasks`), else the tokenized text; with this request's
        stop strings and generation length, middle-truncated to what fits."""
        from atskv.benchmarks.textmetrics import kept_index, middle_truncate
        from atskv.integrations.lm_eval_tasks.export import lookup_sample

        if max_gen_toks >= self.max_positions:
            raise ConfigError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in the "
                              f"model's {self.max_positions} positions")
        found = lookup_sample(self.tokenizer, context)
        if found is not None:
            self.pretokenized += 1
            sample = dataclasses.replace(found, stop=list(until), max_new_tokens=max_gen_toks)
        else:
            sample = Sample(id=f"request/{index}", task="lm_eval", input_ids=self.encode(context),
                            references=[], max_new_tokens=max_gen_toks, stop=list(until))
        ids = sample.input_ids
        room = self.max_positions - max_gen_toks
        limit = min(self.context_len, room) if self.context_len else room
        if len(ids) > limit:
            self.truncated += 1
            q = sample.question_start
            sample = dataclasses.replace(
                sample, input_ids=middle_truncate(ids, limit),
                question_start=None if q is None else kept_index(q, len(ids), limit))
        if not sample.input_ids:
            sample.input_ids = [self.tokenizer.eos_token_id if self.tokenizer.bos_token_id is None
                                else self.tokenizer.bos_token_id]
        return sample

    def answer(self, groups: list[list[Sample]]) -> list[GenerationOutput]:
        """The method's answers to groups of samples sharing a context (one sample: a plain
        request), each group prefilled and compressed, all decoded together."""
        from atskv.experiments import protocol

        proto, reqs = self.cfg.protocol, []
        for group in groups:
            pre = protocol.Prefills.make(self.engine, group, {proto}, self.method.queries_needed())
            reqs += protocol.requests(self.engine, group, pre, self.method, proto, consume=True)
        outs = self.engine.generate_batch(reqs)
        for out in outs:
            self.last_output = out
            self.records.append({
                "prompt_tokens": out.prompt_tokens,
                "prompt_tokens_kept": out.stats["prompt_tokens_kept"]["mean"],
                "generated_tokens": len(out.token_ids),
                "kv_bytes_peak": out.kv_bytes_peak,
                "kv_bytes_after_compression": out.kv_bytes_after_compression,
                "kv_bytes_uncompressed": out.kv_bytes_uncompressed,
                "ttft_s": out.ttft_s,
                "decode_tokens_per_s": out.decode_tokens_per_s,
            })
        return outs

    def get_model_info(self) -> dict[str, Any]:
        """Added by lm-eval to ``results["config"]``: the method and the KV-cache statistics
        of every generation this model ran (means over requests)."""
        from omegaconf import OmegaConf

        from atskv.experiments.config import resolved_budget

        r = self.records
        ratios = [x["kv_bytes_peak"] / x["kv_bytes_uncompressed"] for x in r
                  if x["kv_bytes_uncompressed"]]
        return {"atskv": {
            "method": self.method_name,
            "protocol": self.cfg.protocol,
            **resolved_budget(self.cfg),
            "budget_of": "prompt",
            "hyperparameters": OmegaConf.to_container(self.cfg.method, resolve=True),
            "model": self.cfg.model.name,
            "path": str(self.path),
            "device": str(self._device),
            "dtype": self.cfg.hardware.dtype,
            "prefill_chunk": int(self.cfg.hardware.prefill_chunk),
            "compile": bool(self.engine.compile),
            "context_len": self.context_len,
            "batch_size": self.batch_size,
            "n_generations": len(r),
            "truncated_prompts": self.truncated,
            "pretokenized_prompts": self.pretokenized,
            "prompt_tokens_mean": _mean([x["prompt_tokens"] for x in r]),
            "generated_tokens_mean": _mean([x["generated_tokens"] for x in r]),
            "prompt_tokens_kept_mean": _mean([x["prompt_tokens_kept"] for x in r]),
            "kv_bytes_peak_mean": _mean([x["kv_bytes_peak"] for x in r]),
            "kv_bytes_after_compression_mean": _mean([x["kv_bytes_after_compression"] for x in r]),
            "kv_bytes_uncompressed_mean": _mean([x["kv_bytes_uncompressed"] for x in r]),
            "kv_ratio_mean": _mean(ratios),
            "ttft_s_mean": _mean([x["ttft_s"] for x in r]),
            "decode_tokens_per_s_mean": _mean([x["decode_tokens_per_s"] for x in r
                                               if x["decode_tokens_per_s"] is not None]),
        }}


def main(argv: list[str] | None = None) -> None:
    """``atskv-lm-eval``: lm-eval's command line with the ``atskv`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
