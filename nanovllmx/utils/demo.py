"""The built-in demo model's name, importable without torch or the checkpoint maker.

The serving path (model resolution, the API server's command line) needs the name at import time;
the checkpoint itself is made by `nanovllmx.utils.make_model` (torch, tokenizer files), imported
only when the demo checkpoint is asked for.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_NAME = "nanovllmx-demo"


def demo_model_path(name: str = DEMO_MODEL_NAME) -> Path:
    """The cached demo checkpoint's folder, made on first use (see `make_model.demo_model_path`)."""
    from nanovllmx.utils import make_model

    return make_model.demo_model_path(name)
