"""Fixtures shared by the Ray engine tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray instance of 4 CPUs for one module (a grid of up to 4 CPU shards)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()
