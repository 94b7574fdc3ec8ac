"""The one way to build a run configuration outside ``run.py``: Hydra's compose API over
``conf/`` (bench, the lm-eval bridge, the exporter, the tests). ``run.py`` composes the same
config through ``@hydra.main``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from atskv.core.types import ConfigError


def conf_dir() -> Path:
    """The Hydra ``conf/`` folder (repository root; ``ATSKV_CONF_DIR`` overrides)."""
    env = os.environ.get("ATSKV_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "conf"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"atskv's Hydra config folder {path} is missing (an editable install of "
                          f"the repository provides it; ATSKV_CONF_DIR=<repo>/conf points at it)")
    return path


def group_choices(group: str) -> list[str]:
    """The options of a config group: its YAML files (``a/b`` for nested ones) and, for
    ``method``, every registered method."""
    root = conf_dir() / group
    names = {str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")}
    if group == "method":
        from atskv.methods import METHODS

        names |= set(METHODS.names())
    return sorted(names)


def check_choice(kind: str, value: Any, choices: list[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{kind}={value!r} is unknown; choose one of: {', '.join(choices)}")
    return value


def compose_run_config(overrides: list[str], return_hydra_config: bool = False) -> Any:
    """The run config ``run.py`` would compose from ``overrides``. Works inside a running Hydra
    app too: its global state is set aside and restored."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf.errors import OmegaConfBaseException

    from atskv.experiments.config import register_configs

    register_configs()
    backup = get_gh_backup() if GlobalHydra.instance().is_initialized() else None
    if backup is not None:
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides),
                           return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"{' '.join(overrides)}: {e}") from e
    finally:
        if backup is not None:
            restore_gh_from_backup(backup)
