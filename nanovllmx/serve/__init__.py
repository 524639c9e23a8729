"""Ray Serve application exposing Nano-vLLM-X through the OpenAI HTTP API.

Serve config contract (`import_path: nanovllmx.serve:build_app`); see docs/serving.md.

Modules: `app` (the FastAPI app and the `LLMServer` deployment), `engine_deployment` (`LLMEngine`:
the shared engine behind several frontends), `builder` (`build_app`), `mapping`
(OpenAI request -> prompt ids and SamplingParams; engine results -> response), `streaming` (engine
deltas, SSE), `errors` (OpenAI's error JSON), `middleware`, `protocol` (pydantic models),
`model_resolver` (the `model` argument -> a checkpoint folder).
"""

from nanovllmx.serve.app import LLMServer
from nanovllmx.serve.builder import build_app
from nanovllmx.serve.model_resolver import ModelResolutionError, resolve_model

__all__ = ["build_app", "LLMServer", "ModelResolutionError", "resolve_model"]
