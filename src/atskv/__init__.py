"""atskv: KV-cache compression for long-context LLM inference.

``from atskv import compress`` is the drop-in for a transformers script
(:mod:`atskv.integrations.hf`); it is imported on first use, so ``import atskv`` stays cheap."""

from typing import Any

__all__ = ["compress"]


def __getattr__(name: str) -> Any:
    if name == "compress":
        from atskv.integrations.hf import compress

        return compress
    raise AttributeError(f"module 'atskv' has no attribute {name!r}")
