"""nanovllmx: a lightweight, fast LLM serving system for Qwen3 models, built on Ray."""

from nanovllmx.errors import (
    EngineOverloadedError,
    EngineRequestError,
    EngineUnavailableError,
    UnsupportedCheckpointError,
)
from nanovllmx.llm import LLM
from nanovllmx.outputs import RequestOutput, StreamDelta
from nanovllmx.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "StreamDelta",
    "EngineRequestError",
    "EngineOverloadedError",
    "EngineUnavailableError",
    "UnsupportedCheckpointError",
    "__version__",
]
