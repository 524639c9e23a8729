"""Turn the `model` argument of a Serve config into a local checkpoint folder.

`model` is one of:
- a local folder holding a Hugging Face checkpoint (config.json, *.safetensors, tokenizer files);
- the built-in demo name (`nanovllmx-demo`): a tiny random-weight Qwen3 checkpoint with the real
  Qwen3 tokenizer, materialized on first use into the nanovllmx cache folder
  (`$NANOVLLMX_CACHE`, default `~/.cache/nanovllmx`) by the same code as
  `scripts/make_tiny_model.py`. Its output is noise;
- a Hugging Face Hub id (`Qwen/Qwen3-0.6B`), downloaded with `huggingface_hub` into the HF cache
  (or found there when offline).
"""

from __future__ import annotations

import os
import re

from nanovllmx.utils.demo import DEMO_MODEL_NAME, demo_model_path

# weight, config and tokenizer files; never the *.bin / *.pth / original/ duplicates
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
DEMO_DESCRIPTION = (
    "Demo checkpoint with RANDOM weights (Qwen3 architecture, real Qwen3 tokenizer): "
    "its output is random noise, not language. It exists to exercise the serving stack."
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelResolutionError(RuntimeError):
    """The `model` argument names nothing this machine can load."""


def is_demo(model: str) -> bool:
    return model == DEMO_MODEL_NAME


def _looks_like_path(model: str) -> bool:
    """Anything that cannot be a hub id ('org/name' or 'name') is meant as a folder."""
    return model.startswith(("/", ".", "~")) or not _HUB_ID.match(model)


def kind_of(model: str) -> str:
    """'local' | 'demo' | 'hub' (without touching the network or writing anything)."""
    if not isinstance(model, str) or not model.strip():
        raise ModelResolutionError(
            f"`model` must be a non-empty string: a local folder, a Hugging Face Hub id or {DEMO_MODEL_NAME!r}"
        )
    if os.path.isdir(os.path.expanduser(model)):
        return "local"
    if is_demo(model):
        return "demo"
    if _looks_like_path(model):
        return "local"
    return "hub"


def default_served_name(model: str) -> str:
    """The name clients send as `model` when the config gives no served_model_name: the folder's
    name for a local checkpoint, the id itself for a hub id (as vLLM does), the demo name."""
    k = kind_of(model)
    if k == "local":
        return os.path.basename(os.path.normpath(os.path.expanduser(model))) or model
    return model


def check_model(model: str) -> str:
    """Cheap checks for the app builder (no download): returns the kind, raises for a missing folder."""
    k = kind_of(model)
    if k == "local":
        _check_folder(os.path.expanduser(model), model)
    return k


def _check_folder(path: str, model: str) -> str:
    if not os.path.isdir(path):
        raise ModelResolutionError(
            f"model {model!r}: no such folder. `model` is a local checkpoint folder, a Hugging Face Hub id "
            f"such as 'Qwen/Qwen3-0.6B', or {DEMO_MODEL_NAME!r} for the built-in random-weight demo model"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelResolutionError(
            f"model folder {model!r} has no config.json; expected a Hugging Face checkpoint "
            "folder (config.json, *.safetensors, tokenizer files)"
        )
    return os.path.abspath(path)


def resolve_model(model: str, revision: str | None = None) -> str:
    """A local folder for `model`, materializing the demo checkpoint or downloading a hub id as needed."""
    k = kind_of(model)
    if k == "local":
        return _check_folder(os.path.expanduser(model), model)
    if k == "demo":
        return str(demo_model_path())
    return _download(model, revision)


def _download(repo_id: str, revision: str | None) -> str:
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ModelResolutionError(
            f"model {repo_id!r} looks like a Hugging Face Hub id, but huggingface_hub "
            "is not installed (pip install huggingface_hub)"
        ) from e
    try:
        path = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as e:
        raise ModelResolutionError(
            f"model {repo_id!r}: no such repository{' or revision ' + repr(revision) if revision else ''} on the "
            f"Hugging Face Hub (or it is private: set HF_TOKEN). It is not a local folder either "
            f"(cwd: {os.getcwd()})."
        ) from e
    except hf_errors.GatedRepoError as e:
        raise ModelResolutionError(
            f"model {repo_id!r} is gated on the Hugging Face Hub: accept its terms and set HF_TOKEN"
        ) from e
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, OSError) as e:
        from huggingface_hub import constants

        raise ModelResolutionError(
            f"model {repo_id!r} could not be downloaded from the Hugging Face Hub (offline, or the Hub is "
            f"unreachable: {type(e).__name__}) and is not in the local HF cache ({constants.HF_HUB_CACHE}). "
            f"Connect this machine, or download it elsewhere (`hf download {repo_id} --local-dir DIR`), copy "
            f"DIR here and pass `model: DIR`. For an offline demo use model: {DEMO_MODEL_NAME}"
        ) from e
    except hf_errors.HfHubHTTPError as e:
        raise ModelResolutionError(f"model {repo_id!r}: the Hugging Face Hub answered with an error: {e}") from e
    return _check_folder(path, repo_id)
