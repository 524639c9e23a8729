"""Shared by every test area: one tiny random-weight Qwen3 checkpoint per test session (real Qwen3
tokenizer, float32), the `transformers` reference model loaded from the same files (helpers.py), one
marker per area folder, and the process-exit workaround at the end."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

from tests.helpers import HFReference

# no .hypothesis/ example database in the working tree (failures print their reproducing example)
settings.register_profile("nanovllmx", database=None, print_blob=True)
settings.load_profile("nanovllmx")

# ---- one marker per area: tests/<area>/... carries the marker <area> (registered in pyproject.toml),
# so `pytest -m serve` runs one area and `pytest -m "not serve"` the rest
AREAS = ("unit", "engine", "distributed", "serve", "gpu")
_TESTS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            area = Path(item.fspath).resolve().relative_to(_TESTS_DIR).parts[0]
        except ValueError:  # not under tests/
            continue
        if area in AREAS:
            item.add_marker(getattr(pytest.mark, area))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nanovllmx.utils.make_model import make_model

    return make_model(tmp_path_factory.mktemp("tiny-qwen3"), preset="tiny", seed=0, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def hf_ref(tiny_model_dir: Path) -> HFReference:
    return HFReference(tiny_model_dir)


# ---- process exit ----
# Once in CI the interpreter died with SIGSEGV while finalising, after every test had passed and
# the summary was printed: exit code 139, a failed run. Not reproduced since; the likely cause:
# the suite starts and stops Ray in this process several times, and Ray's background threads can
# outlive ray.shutdown() (ray-project/ray#31145). The outcome is known once the session has
# finished, so the process ends there with pytest's own exit status instead of finalising the
# interpreter (crashes inside tests still fail and print their traceback: pytest's faulthandler
# is on). NANOVLLMX_TEST_FINALIZE=1 finalises as usual, to chase that crash.
_EXIT_STATUS: int | None = None


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _EXIT_STATUS
    _EXIT_STATUS = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _EXIT_STATUS is None or os.environ.get("NANOVLLMX_TEST_FINALIZE") == "1":
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # what Ray's own atexit hook would do
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS)
