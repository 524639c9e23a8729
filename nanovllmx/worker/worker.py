"""One worker per GPU shard (or one CPU process): owns the model slice, its KV pool and the model
runner. Driven by plain method calls, so a Ray actor can wrap it unchanged."""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from nanovllmx.attention.metadata import KVPool
from nanovllmx.config import EngineConfig
from nanovllmx.distributed.parallel_state import (
    destroy_parallel,
    get_parallel_info,
    init_one_shot_allreduce,
    init_parallel,
)
from nanovllmx.distributed.sample_channel import SampleChannel, new_channel_groups
from nanovllmx.layers.fp8 import quantize_model_fp8, use_fp8_gemm
from nanovllmx.models.loader import load_weights
from nanovllmx.models.registry import build_model
from nanovllmx.scheduler.messages import ScheduledBatch, StepOutput
from nanovllmx.worker.busy_meter import BusyMeter
from nanovllmx.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, cfg: EngineConfig, rank: int = 0, init_method: str | None = None, local_device: int = 0):
        self.cfg, self.rank = cfg, rank
        if cfg.device == "cuda":
            torch.cuda.set_device(local_device)
            self.device = torch.device("cuda", local_device)
        else:
            self.device = torch.device("cpu")
        world = cfg.tp_size * cfg.pp_size
        if world > 1:
            backend = "nccl" if cfg.device == "cuda" else "gloo"
            init_parallel(cfg.tp_size, cfg.pp_size, rank, backend, init_method)
        self.info = get_parallel_info()
        # pipeline overlap: the last stage's sampled ids go to the first stage
        self.channel: SampleChannel | None = None
        if cfg.pipeline_overlap:
            groups = new_channel_groups(cfg.tp_size, cfg.pp_size)
            if self.info.is_first_stage or self.info.is_last_stage:
                self.channel = SampleChannel(self.info, groups[self.info.tp_rank], self.device)
        # TP all-reduces of small messages over peer memory (opt-in; NCCL when it cannot be set up)
        self.one_shot_allreduce = (
            cfg.tp_allreduce == "one_shot"
            and cfg.tp_size > 1
            and self.device.type == "cuda"
            and init_one_shot_allreduce(self.device, cfg.torch_dtype)
        )
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        prev = torch.get_default_dtype()
        torch.set_default_dtype(cfg.torch_dtype)
        try:
            with torch.device(self.device):
                self.model = build_model(cfg.hf_config)
        finally:
            torch.set_default_dtype(prev)
        fp8 = cfg.checkpoint.fp8
        fast_fp8 = fp8 is not None and use_fp8_gemm(cfg.fp8_gemm, self.device)
        progress = rank == 0 and cfg.device == "cuda"
        load_weights(self.model, cfg.model, progress=progress, fp8=fp8, keep_fp8_scales=fast_fp8)
        if fast_fp8:
            quantize_model_fp8(self.model, fp8)
        self.model.eval()
        logger.info("rank %d: model built and weights loaded in %.1f s", rank, time.perf_counter() - t0)
        self.runner: ModelRunner | None = None
        self.busy = BusyMeter(self.device)  # this stage's device time per step and busy share

    # ---- KV pool sizing: every worker proposes, the scheduler takes the minimum ----
    def _layer_shape(self) -> tuple[int, int, int]:
        attn = next(iter(self.model.layers.values())).self_attn
        return self.model.num_local_layers, attn.num_kv_heads, attn.head_dim

    def available_kv_slots(self) -> int:
        if self.cfg.num_kv_slots is not None:
            return self.cfg.num_kv_slots
        n_layers, kvh, hd = self._layer_shape()
        per_slot = KVPool.bytes_per_slot(n_layers, kvh, hd, self.cfg.torch_dtype)
        if self.device.type == "cpu":
            # CPU: enough for a few full contexts, bounded so tests stay small
            return max(4 * self.cfg.max_len, 4096)
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        # activations of the largest prefill chunk, plus logits, with headroom for the allocator
        cfg = self.cfg.hf_config
        act = (
            self.cfg.max_num_batched_tokens * (cfg.hidden_size * 8 + cfg.intermediate_size * 6) * 2
            + self.cfg.max_bs * cfg.vocab_size * 4 * 4
            + (1 << 30)
        )
        budget = total * self.cfg.gpu_memory_utilization - used - act
        n = int(budget // per_slot)
        if n < self.cfg.max_len:
            gib = 1 << 30
            mine = torch.cuda.memory_reserved(self.device)  # the rest of `used` is other processes'
            raise RuntimeError(
                f"not enough GPU memory for the KV cache: room for {max(n, 0)} tokens, a full context needs "
                f"{self.cfg.max_len}; of {total / gib:.1f} GiB, this process holds {mine / gib:.1f} and other "
                f"processes {(used - mine) / gib:.1f}; raise gpu_memory_utilization or lower context_len"
            )
        return n

    def init_kv_cache(self, num_slots: int) -> None:
        n_layers, kvh, hd = self._layer_shape()
        # start-up phases by name, logged: on a fresh machine the kernels' JIT compiles dominate
        t0 = time.perf_counter()
        self.kv = KVPool(n_layers, num_slots, kvh, hd, self.cfg.torch_dtype, self.device)
        t1 = time.perf_counter()
        self.runner = ModelRunner(self.cfg, self.model, self.kv, self.device)  # captures the decode graphs
        t2 = time.perf_counter()
        self.runner.warmup()  # compile the prefill path now, not on the first request
        t3 = time.perf_counter()
        logger.info(
            "rank %d: KV pool of %d token slots (%d layers, %d KV heads) in %.1f s; model runner (decode graphs: "
            "%s) in %.1f s; prefill warm-up in %.1f s",
            self.rank,
            num_slots,
            n_layers,
            kvh,
            t1 - t0,
            "off" if self.runner.graphs is None else len(self.runner.graphs.sizes),
            t2 - t1,
            t3 - t2,
        )

    # ---- one step ----
    def execute(self, batch: ScheduledBatch) -> StepOutput | None:
        """Run a step and wait for it: sampled ids on the last stage, None elsewhere."""
        out = self.execute_async(batch)
        return None if out is None else out.result()

    def execute_async(self, batch: ScheduledBatch):
        """Launch a step; on the last stage returns a SampledTokens handle (result() waits)."""
        info = self.info
        ch = self.channel
        if ch is not None and info.is_first_stage:  # the placeholders' ids, from the last stage
            ch.resolve(batch.resolve_until, self.runner.next_tokens)
        hidden = residual = None
        if not info.is_first_stage:
            h = self.cfg.hf_config.hidden_size
            hidden = torch.empty((batch.num_tokens, h), dtype=self.cfg.torch_dtype, device=self.device)
            residual = torch.empty_like(hidden)
            dist.recv(hidden, src=info.prev_rank)
            dist.recv(residual, src=info.prev_rank)
        self.busy.begin()  # on CUDA after the recv on the stream: waiting for the previous stage is idle
        out = self.runner.execute(batch, hidden, residual)
        self.busy.end()
        if ch is not None and info.is_first_stage:
            ch.expect(batch.step, batch.req_indices[batch.sample_rows])
        if ch is not None and info.is_last_stage and len(batch.sample_rows):
            ch.send(out.device_ids)
        if not info.is_last_stage:
            dist.send(out[0].contiguous(), dst=info.next_rank)
            dist.send(out[1].contiguous(), dst=info.next_rank)
            return None
        return out

    def shutdown(self) -> None:
        """Release the model, KV pool and graphs (so another engine fits in this process) and leave
        the process group."""
        import gc

        self.runner = None
        self.kv = None
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        destroy_parallel()
