"""Every config option composes; typos and bad values fail early with the choices named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from atskv.core.types import ConfigError
from atskv.experiments.config import CONTEXT_LENGTHS, validate
from atskv.experiments.runner import prepare

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    from atskv.experiments.compose import group_choices

    return group_choices(group)


@pytest.mark.parametrize("group", ["method", "benchmark", "model", "hardware", "context_len"])
def test_every_option_composes(compose, group):
    names = options(group)
    assert names
    for name in names:
        cfg = compose(f"{group}='{name}'" if group == "context_len" else f"{group}={name}")
        if group == "context_len":
            assert cfg.context_len == int(name)
        else:
            assert cfg[group].name == name.rpartition("/")[2]


def test_context_len_presets_cover_cpu_and_gpu():
    assert {512, 1024, 2048, 4096} <= {int(n) for n in options("context_len")}
    assert sorted(int(n) for n in options("context_len")) == CONTEXT_LENGTHS


def test_defaults(compose):
    cfg = compose()
    assert (cfg.method.name, cfg.benchmark.name, cfg.model.name, cfg.hardware.name) == (
        "full", "synthetic", "smollm2_135m", "cpu")
    assert cfg.context_len == 2048 and cfg.wandb.mode == "offline"


def test_unknown_option_names_the_choices(compose):
    with pytest.raises(ConfigCompositionException) as e:
        compose("method=snapkvv")
    assert "snapkvv" in str(e.value) and "sliding_window" in str(e.value)


def test_typo_key_fails_at_compose(compose):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose("method.n_sinks=3", "method=sliding_window")


def test_mistyped_value_fails_at_compose(compose):
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose("method=sliding_window", "method.n_sink=abc")
    assert "abc" in str(e.value)
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose("budget=lots")


@pytest.mark.parametrize("budget", [0, -0.1, 1.5])
def test_budget_out_of_range(compose, budget):
    with pytest.raises(ConfigError, match=f"budget={budget}"):
        validate(compose(f"budget={budget}"))


def test_budget_and_kv_size(compose):
    from atskv.experiments.config import build_method, resolved_budget

    cfg = compose("method=snapkv")
    assert resolved_budget(cfg) == {"budget": 0.25, "kv_size": None}  # the default
    assert build_method(compose("method=snapkv", "kv_size=256")).kv_size == 256
    with pytest.raises(ConfigError, match="budget=0.2 and kv_size=256 are both set"):
        validate(compose("method=snapkv", "budget=0.2", "kv_size=256"))
    for bad in ("0", "-3", "4096"):
        with pytest.raises(ConfigError, match=f"kv_size={bad} must be between 1 and the prompt "
                                              f"length context_len=2048"):
            validate(compose("method=snapkv", f"kv_size={bad}"))


@pytest.mark.parametrize("override,message", [
    ("hardware.threads=-2", "hardware.threads=-2 must be >= 1"),
    ("hardware.threads=0", "hardware.threads=0 must be >= 1"),
    ("hardware.prefill_chunk=-5", "hardware.prefill_chunk=-5 must be >= 0"),
    ("hardware.device=tpu", "hardware.device='tpu'; choose one of cpu, cuda, cuda:<index>"),
    ("hardware.dtype=float8", "hardware.dtype='float8'; choose one of float32, bfloat16"),
    ("hardware.device_map=everywhere", "hardware.device_map='everywhere'"),
    ("model.path=/some/folder", "model.path='/some/folder' is set, but model=smollm2_135m"),
    ("model.max_position_embeddings=0", "model.max_position_embeddings=0 must be >= 1"),
])
def test_every_hardware_and_model_field_is_checked_before_loading(compose, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        prepare(compose(override))


def test_run_folder_names_say_what_the_budget_means(compose):
    """pb<fraction>: a budget of the prompt's KV; kv<tokens>; non-default method
    hyperparameters (from the command line or a preset) and the other overrides make a short
    hash, spelt out in full in the run key."""
    from atskv.experiments.config import budget_tag, key_hash, method_variant, run_key

    assert budget_tag(None, None) == "pb0.25" and budget_tag(0.2, None) == "pb0.2"
    assert budget_tag(None, 512) == "kv512"
    snapkv = compose("method=snapkv").method
    narrow = compose("method=snapkv", "method.window=16").method
    assert method_variant(snapkv) == [] and method_variant(narrow) == ["window=16"]
    tuned = compose("method=tuned/snapkv").method
    assert method_variant(tuned) and all(k.split("=")[0] in {"window", "kernel", "pooling"}
                                         for k in method_variant(tuned))
    over = ["method=snapkv", "method.window=16", "budget=0.2", "hardware.threads=1",
            "benchmark.n_samples=4", "benchmark.data_dir=/home/someone/data", "wandb.mode=disabled"]
    assert run_key(narrow, over) == {
        "method": ["window=16"],
        "overrides": ["benchmark.data_dir=/home/someone/data", "benchmark.n_samples=4",
                      "hardware.threads=1"]}
    assert key_hash(snapkv, ["method=snapkv", "budget=0.2", "seed=0"]) == ""
    short = key_hash(narrow, over)
    assert len(short) == 9 and short.startswith("_") and "/" not in short
    assert short != key_hash(snapkv, over) != key_hash(narrow, over[:-3])
    assert key_hash(narrow, list(reversed(over))) == short  # the order of overrides is not a run


def test_run_folders_are_short_and_hold_no_path():
    from hydra.core.hydra_config import HydraConfig

    from atskv.experiments.compose import compose_run_config

    cfg = compose_run_config(["method=tuned/atskv", "context_len='131072'", "kv_size=512",
                              "benchmark.data_dir=/very/long/absolute/path/to/the/data/folder",
                              "benchmark.tasks=[single_needle,multi_key,multi_value]"],
                             return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as inside run.py, where ${hydra:...} resolves
    name = str(cfg.hydra.run.dir).rsplit("/", 1)[-1]
    assert name.startswith("ctx131072_kv512_s0_") and len(name) <= 40
    assert "very" not in str(cfg.hydra.run.dir)


def test_a_bad_cpu_kernel_switch_fails_before_loading(compose, monkeypatch):
    monkeypatch.setenv("ATSKV_CPU_KERNEL", "maybe")
    with pytest.raises(ConfigError, match="ATSKV_CPU_KERNEL='maybe': use 1 .the default., 0 .off. or no-avx512"):
        prepare(compose())


def test_bad_wandb_mode(compose):
    with pytest.raises(ConfigError, match="wandb.mode='sometimes'.*online, offline, disabled"):
        validate(compose("wandb.mode=sometimes"))


def test_context_len_above_model_positions(compose, smollm2_path):
    cfg = compose("model=tiny_random", "model.max_position_embeddings=1024", "context_len='2048'")
    with pytest.raises(ConfigError, match="context_len=2048 .the prompt. \\+ 16 new tokens.*1024 positions"):
        prepare(cfg)


def test_missing_model_folder(compose, tmp_path):
    cfg = compose("model=llama31_8b_instruct", f"model.path={tmp_path}/nope")
    with pytest.raises(ConfigError, match="does not exist"):
        prepare(cfg)


def test_hub_id_offline_says_how_to_use_a_folder(compose, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose("model=qwen25_7b_instruct")
    with pytest.raises(ConfigError, match="model.path=/path/to/folder"):
        prepare(cfg)


def test_unreadable_haystack_folder(compose, tmp_path):
    cfg = compose("model=tiny_random", f"benchmark.haystack={tmp_path}/missing")
    with pytest.raises(ConfigError, match="missing"):
        prepare(cfg)
