"""The engine: config, scheduling, paged KV, model runner, parallel ranks and their coordinator."""

from typing import Any

__all__ = ["LLM", "SamplingParams", "EngineConfig"]


def __getattr__(name: str) -> Any:
    # lazy, so that light processes (coordinator, API server) import no model code
    if name == "LLM":
        from runtime.llm import LLM

        return LLM
    if name == "SamplingParams":
        from runtime.sampling_params import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from runtime.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
