"""Shared fixtures: the SmolLM2 tokenizer (real, offline), a tiny random Llama built in-process,
the real SmolLM2 model for the few `slow` tests, and Hydra composition helpers."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from atskv.experiments.models import ensure_smollm2_folder

    return ensure_smollm2_folder()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


TINY = SimpleNamespace(num_layers=3, hidden_size=64, intermediate_size=128, num_heads=4,
                       num_kv_heads=2, init_seed=0)


def tiny_cfg(**over):
    tiny = SimpleNamespace(**{**vars(TINY), **over})
    return SimpleNamespace(name="tiny_random", source="tiny_random", path="",
                           max_position_embeddings=8192, tiny=tiny)


@pytest.fixture(scope="session")
def make_tiny_model(smollm2_path):
    """make_tiny_model(**sizes) -> a new random tiny Llama (TINY's sizes, some overridden)."""
    from atskv.experiments.models import load_model

    def make(**over):
        torch.manual_seed(0)
        return load_model(tiny_cfg(**over), smollm2_path, "cpu", "float32")

    return make


@pytest.fixture(scope="session")
def tiny_model(make_tiny_model):
    """A 3-layer random Llama (4 query / 2 KV heads, head dim 16) with SmolLM2's vocabulary."""
    return make_tiny_model()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    from atskv.experiments.models import load_model

    return load_model(SimpleNamespace(source="smollm2_pypi"), smollm2_path, "cpu", "float32")


@pytest.fixture
def compose():
    """compose(*overrides) -> the run config, exactly as run.py would compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from atskv.experiments.config import register_configs

    register_configs()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))

    return _compose
