"""Engine configuration: every `LLM(...)` argument, resolved once (device, dtype, context)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

ExecutorKind = Literal["auto", "local", "ray"]


logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    model: str
    device: str = "auto"  # "auto" | "cuda" | "cpu"
    dtype: str = "auto"  # "auto" | "bfloat16" | "float16" | "float32"
    gpu_memory_utilization: float = 0.9
    max_bs: int = 256  # most requests running at once
    # most requests waiting for a place in the batch: a client with max_bs + max_waiting_requests
    # requests outstanding refuses more (EngineOverloadedError; HTTP 503 + Retry-After)
    max_waiting_requests: int = 4096
    context_len: int | None = None  # longest prompt + output; default: the model's max positions
    enforce_eager: bool = False  # no CUDA graphs
    # per-step token budget (chunked prefill size). 16384 (as vLLM's offline default): half the
    # prefill steps of 8192 and larger GEMMs; +2% on the standard workload (H100), at the cost of
    # longer decode stalls while a chunk runs (set 2048-8192 where inter-token latency matters more)
    max_num_batched_tokens: int = 16384
    num_kv_slots: int | None = None  # KV pool size in tokens; default: from memory
    attention_backend: str = "auto"  # "auto" | "torch" | "flashinfer"
    enable_prefix_caching: bool = True
    # LLM.stream (and so every streamed HTTP response) sends a delta once this many new tokens
    # arrived, the first token and the last at once (vLLM's and SGLang's --stream-interval). 1:
    # every token. Larger: fewer, larger chunks, which Serve's proxy forwards faster under load
    stream_interval: int = 1
    # schedule step N+1 while step N runs; default on GPU only (on CPU the forward is synchronous,
    # so it only adds scheduler work competing for the same cores). Resolved once here. With
    # pp_size > 1 it needs pipeline lanes (pp_inflight_batches != 1): the last stage sends each
    # step's ids to the first stage (pipeline_overlap)
    overlap_scheduling: bool | None = None
    decode_tensor_cores: bool | None = None  # FlashInfer decode kernel; None: by batch size and GQA group
    tp_size: int = 1
    pp_size: int = 1
    seed: int = 0
    # per-request bounds, checked before the request costs anything (sampling_params.RequestLimits)
    max_stop_strings: int = 64
    max_stop_str_len: int = 1024  # characters
    max_stop_token_ids: int = 1024
    # where the engine runs: "local" (this process) or "ray" (a scheduler actor + one worker actor
    # per shard); "auto": see resolve_executor
    executor: ExecutorKind = "auto"
    # ---- Ray (executor="ray", the default when tp_size * pp_size > 1); see docs/distributed.md ----
    ray_address: str | None = None  # cluster to join; None: $RAY_ADDRESS if set, else start a local Ray
    ray_init_kwargs: dict[str, Any] | None = None  # extra ray.init() arguments when we start Ray (e.g. num_cpus)
    placement_strategy: str = "PACK"  # between PP stages: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    placement_timeout_s: float = 60.0  # raise if the grid cannot be placed by then
    # None: the engine creates its own placement group (one bundle per stage) and removes it at
    # shutdown. An int k: it runs in the placement group its process runs in (a Serve replica's:
    # build_app sets 1), stage s in bundle k + s, the scheduler actor in bundle 0; that group is
    # its creator's (Serve's) and is left in place. See distributed/placement.py
    placement_bundle_offset: int | None = None
    accelerator_type: str | None = None  # e.g. "H100": every shard on that accelerator type
    ray_num_cpus_per_worker: float | None = None  # None: 0.25 on CPU, 0 on CUDA (1 GPU per shard)
    ray_worker_resources: dict[str, float] | list[dict[str, float]] | None = (
        None  # extra Ray resources per shard; a list: one dict per stage
    )
    ray_step_mode: str = "socket"  # how each step reaches the workers: "socket" (fast) | "ray" (a call per worker)
    pp_microbatches: int | None = None  # most pipeline micro-batches per step; None: pp_size
    pp_microbatch_min_tokens: int = 256  # split a step only if each micro-batch gets this many tokens
    # FP8 checkpoints: "auto" / "dequant" (weights dequantized to dtype at load: on an H200 faster
    # than the FP8 kernel, docs/benchmarks.md), or "triton" (weights stay FP8: half the weight memory,
    # a weight-only FP8 Triton GEMM; CUDA GPUs of compute capability >= 8.9)
    fp8_gemm: str = "auto"
    # inter-step pipelining (pp_size > 1): batches of disjoint requests in flight at once, so stage 0
    # runs batch N+1 while stage 1 runs batch N. None: pp_size with overlap scheduling (the engine
    # sends one batch more, whose placeholders the first stage takes from the last stage), else
    # pp_size + 1 (the extra lane hides the scheduler's work between a result and the next batch); 1: off
    pp_inflight_batches: int | None = None
    # TP all-reduce: "one_shot": messages up to 4 MB (decode) through a one-shot all-reduce over NVLink
    # peer memory (PyTorch symmetric memory, no multicast), NCCL above that and wherever it cannot be
    # set up (distributed/one_shot_allreduce.py; CUDA only, ignored on CPU); "nccl": NCCL for all.
    # One-shot by default: 1.51x against NCCL's 1.47x for TP=2 on the 8B shape (docs/benchmarks.md)
    tp_allreduce: str = "one_shot"
    hf_config: Any = field(default=None, repr=False)
    checkpoint: Any = field(default=None, init=False, repr=False)  # models.checkpoint.CheckpointInfo
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model):
            raise FileNotFoundError(f"model folder not found: {self.model!r}")
        if not os.path.exists(os.path.join(self.model, "config.json")):
            raise FileNotFoundError(f"{self.model!r} has no config.json; expected a Hugging Face checkpoint folder")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in [0.05, 1], got {self.gpu_memory_utilization}")
        for name in (
            "max_bs",
            "max_num_batched_tokens",
            "tp_size",
            "pp_size",
            "stream_interval",
            "max_stop_strings",
            "max_stop_str_len",
            "max_stop_token_ids",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.tp_allreduce not in ("nccl", "one_shot"):
            raise ValueError(f"tp_allreduce must be 'nccl' or 'one_shot', got {self.tp_allreduce!r}")
        ib = self.pp_inflight_batches
        if ib is not None and (not isinstance(ib, int) or isinstance(ib, bool) or ib < 1):
            raise ValueError(f"pp_inflight_batches must be None or a positive integer, got {ib!r}")
        off = self.placement_bundle_offset
        if off is not None and (not isinstance(off, int) or isinstance(off, bool) or off < 0):
            raise ValueError(f"placement_bundle_offset must be None or an integer >= 0, got {off!r}")
        mw = self.max_waiting_requests
        if not isinstance(mw, int) or isinstance(mw, bool) or mw < 0:
            raise ValueError(f"max_waiting_requests must be an integer >= 0, got {mw!r}")
        if self.device == "auto":
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {self.device!r}")
        from transformers import AutoConfig

        from nanovllmx.errors import UnsupportedCheckpointError
        from nanovllmx.models.checkpoint import inspect_checkpoint

        try:
            self.hf_config = AutoConfig.from_pretrained(self.model)
        except (KeyError, ValueError) as e:  # unknown model_type, rope settings transformers rejects
            raise UnsupportedCheckpointError(f"{self.model}: config.json not understood: {e}") from e
        # refuses (UnsupportedCheckpointError) what the engine does not implement, before any weight is read
        self.checkpoint = inspect_checkpoint(self.model, self.hf_config)
        if self.dtype == "auto":
            self.dtype = "float32" if self.device == "cpu" else "bfloat16"
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        max_pos = self.checkpoint.max_positions  # max_position_embeddings, or longer with YaRN
        if self.context_len is None:
            self.context_len = max_pos
        if not 1 < self.context_len <= max_pos:
            raise ValueError(f"context_len must be in [2, {max_pos}] for this model, got {self.context_len}")
        if self.fp8_gemm not in ("auto", "triton", "dequant"):
            raise ValueError(f"fp8_gemm must be 'auto', 'triton' or 'dequant', got {self.fp8_gemm!r}")
        head_dim = getattr(self.hf_config, "head_dim", None)
        flashinfer_ok = head_dim in FLASHINFER_HEAD_DIMS  # else its prefill fails deep inside, at the first request
        if self.attention_backend == "auto":
            self.attention_backend = "flashinfer" if self.device == "cuda" and flashinfer_ok else "torch"
            if self.device == "cuda" and not flashinfer_ok:  # e.g. the demo model (head_dim 32) on a GPU
                logger.warning("head_dim %s: not a FlashInfer size; torch attention, no CUDA graphs (slow)", head_dim)
                self.enforce_eager = True
        if self.attention_backend == "flashinfer" and not flashinfer_ok:
            raise UnsupportedCheckpointError(
                f"{self.model}: head_dim {head_dim}: the flashinfer attention backend runs head_dim "
                f"{', '.join(map(str, FLASHINFER_HEAD_DIMS))} (every Qwen3 has 128); "
                "attention_backend='torch' (or 'auto') runs any head_dim, slowly"
            )
        if self.device == "cpu":
            self.enforce_eager = True
        if self.overlap_scheduling is None:
            self.overlap_scheduling = self.device == "cuda"
        # a pipeline overlaps through its lanes (pipeline_overlap); one batch at a time it cannot
        self.overlap_scheduling = bool(self.overlap_scheduling) and (self.pp_size == 1 or self.pp_inflight_batches != 1)
        self.executor = resolve_executor(self.executor, self.device, self.tp_size * self.pp_size)
        self.eos_token_ids = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        for src in (os.path.join(self.model, "generation_config.json"), os.path.join(self.model, "config.json")):
            if os.path.exists(src):
                with open(src) as f:
                    e = json.load(f).get("eos_token_id")
                for i in [e] if isinstance(e, int) else (e or []):
                    if i not in ids:
                        ids.append(i)
        return ids

    @property
    def max_len(self) -> int:
        """context_len as resolved by __post_init__ (never None on a constructed config)."""
        assert self.context_len is not None
        return self.context_len

    @property
    def pipeline_lanes(self) -> int:
        """Disjoint batches in flight at once: pp_inflight_batches resolved (1 without a pipeline)."""
        if self.pp_size == 1:
            return 1
        if self.pp_inflight_batches is not None:
            return self.pp_inflight_batches
        # with overlap the first stage gets the ids from the last stage, so pp_size lanes stay fed;
        # without, one more lane hides the scheduler's work between a result and the next batch
        return self.pp_size if self.overlap_scheduling else self.pp_size + 1

    @property
    def pipeline_overlap(self) -> bool:
        """pp_size > 1 with overlap scheduling: one batch more in flight than the lanes, whose
        placeholders the first stage takes from the last stage's ids (distributed/sample_channel.py)."""
        return bool(self.overlap_scheduling) and self.pipeline_lanes > 1

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)


FLASHINFER_HEAD_DIMS = (64, 128, 256)  # the head sizes FlashInfer's prefill and decode kernels take


def resolve_executor(
    executor: str, device: str, world_size: int, serving: bool = False, shared: bool = False
) -> ExecutorKind:
    """The executor "auto" stands for, decided here only. A grid of several shards needs Ray, and so
    does an engine `shared` by several HTTP frontends (they attach to its scheduler actor). A
    server on GPU runs the engine in Ray actors too, never in the replica's process: the replica's
    Python thread streams every token of every request, and sharing its GIL with the engine's step
    loop cost 2/3 of the throughput on an H100 (docs/benchmarks-history.md). Otherwise (offline, the CPU
    demo and tests) the in-process engine is cheaper."""
    if executor not in ("auto", "local", "ray"):
        raise ValueError(f"executor must be 'auto', 'local' or 'ray', got {executor!r}")
    if executor == "local" and world_size > 1:
        raise ValueError("the local executor runs one shard; tp_size * pp_size > 1 needs executor='ray'")
    if executor != "auto":
        return executor  # type: ignore[return-value]
    return "ray" if world_size > 1 or shared or (serving and device == "cuda") else "local"
