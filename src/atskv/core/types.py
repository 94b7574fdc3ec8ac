"""Plain data types shared by the engine, the benchmarks and the results writer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """Bad user input, detected before any expensive work (model load, generation)."""


@dataclass
class Sample:
    """One benchmark item, ready for the model.

    ``input_ids`` is the exact token sequence fed to the model (chat template and truncation
    already applied by the benchmark); ``references`` are the gold answers the scorer compares
    against; ``task`` names the sub-task (a LongBench dataset, a synthetic task type, ...).
    ``max_new_tokens`` is the generation length, on top of the prompt; generation ends at EOS,
    after ``max_new_tokens`` tokens, or as soon as the generated text contains one of the
    ``stop`` strings (empty: no stop string). ``question_start`` is where the question part of
    the prompt begins (the question, the template's tail and the answer prefix; the context is
    everything before it): the question-agnostic protocol compresses the context alone (None: the
    benchmark does not split its prompts). Samples whose ``meta["context_id"]`` is equal share
    their context (several questions asked of one document) and come one after another.
    """

    id: str
    task: str
    input_ids: list[int]
    references: list[str]
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    question_start: int | None = None


@dataclass
class GenerationOutput:
    """What one call of :meth:`atskv.core.engine.Engine.generate` returns. Sizes are in bytes,
    measured from the tensors the cache holds; times in seconds (device-synchronised)."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    ttft_s: float  # prefill + compression + first token
    decode_s: float  # time for the tokens after the first
    decode_tokens: int  # tokens generated after the first
    kv_bytes_after_compression: int
    kv_bytes_peak: int  # largest cache footprint seen during decoding
    kv_bytes_uncompressed: int  # what a full cache would hold for the same tokens (peak)
    decode_kv_read_bytes: float | None  # mean KV bytes read per decode step (None: no step)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.decode_tokens == 0 or self.decode_s <= 0:
            return None
        return self.decode_tokens / self.decode_s
