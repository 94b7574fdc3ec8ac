"""Every config option composes; typos and bad values fail early with the choices named."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from atskv.config import CONTEXT_LENGTHS, validate
from atskv.runner import prepare
from atskv.types import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["method", "benchmark", "model", "hardware", "context_len"])
def test_every_option_composes(compose, group):
    names = options(group)
    assert names
    for name in names:
        cfg = compose(f"{group}='{name}'" if group == "context_len" else f"{group}={name}")
        if group == "context_len":
            assert cfg.context_len == int(name)
        else:
            assert cfg[group].name == name


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


def test_bad_wandb_mode(compose):
    with pytest.raises(ConfigError, match="wandb.mode='sometimes'.*online, offline, disabled"):
        validate(compose("wandb.mode=sometimes"))


def test_context_len_above_model_positions(compose, smollm2_path):
    cfg = compose("model=tiny_random", "model.max_position_embeddings=1024", "context_len='2048'")
    with pytest.raises(ConfigError, match="context_len=2048.*1024 positions"):
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
