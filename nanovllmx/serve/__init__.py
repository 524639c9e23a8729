"""Ray Serve application exposing Nano-vLLM-X through the OpenAI HTTP API.

Serve config contract (`import_path: nanovllmx.serve:build_app`); see docs/serving.md.
"""

from nanovllmx.serve.app import LLMServer, build_app
from nanovllmx.serve.model_resolver import ModelResolutionError, resolve_model

__all__ = ["build_app", "LLMServer", "ModelResolutionError", "resolve_model"]
