"""A host-to-device copy without `non_blocking=True` synchronizes the CUDA stream: in the step
path it makes the host wait for the step's own forward, and nothing on a CPU shows it. One such
copy (the grammar rows' index) halved the throughput of structured outputs on an H200
(docs/benchmarks.md, "Structured outputs"). This scans the modules a step runs through."""

from __future__ import annotations

import re
from pathlib import Path

import nanovllmx

STEP_MODULES = (
    "worker/model_runner.py",
    "worker/cuda_graph.py",
    "worker/sampler.py",
    "worker/logits_processing.py",
    "structured/bitmask.py",
    "attention/flashinfer_backend.py",
)
# a copy to a device (`.to(dev...)`, `.to(self.device...)`, `.copy_(torch.from_numpy(...))`)
COPY = re.compile(r"\.to\((?:[\w.]*dev(?:ice)?\b|\"cuda\")|\.copy_\(torch\.from_numpy")


def test_step_path_copies_to_the_device_do_not_block() -> None:
    root = Path(nanovllmx.__file__).parent
    blocking = []
    for mod in STEP_MODULES:
        for n, line in enumerate((root / mod).read_text().splitlines(), 1):
            code, _, comment = line.partition("#")
            if COPY.search(code) and "non_blocking=True" not in code and "not per step" not in comment:
                blocking.append(f"{mod}:{n}: {line.strip()}")
    assert not blocking, "blocking host-to-device copies in the step path:\n" + "\n".join(blocking)
