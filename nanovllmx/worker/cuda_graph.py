"""Decode steps replayed from CUDA graphs captured for a ladder of batch sizes. A batch is padded
up to the next captured size; padded rows read and write the dummy slot 0 through a dummy
req_to_token row, so they cost a little compute and touch nothing real.

A graph covers the whole device side of a decode step: resolving the inputs the previous (still
running) step samples, this step's req_to_token entries, the KV slot lists, the forward, sampling
(temperature, no filters) and the record of the sampled ids. The host sends one packed int32 array
per step and plans the attention; a step's CPU cost no longer grows with the kernels it runs.

A pipeline stage captures its own layers: from the ids (first stage) or from the received hidden
states and residual, copied into static input buffers (later stages), to the sampled ids (last
stage) or to the hidden states and residual it sends on (static outputs: the send's wait orders
the next replay after it). The point-to-point transfers stay outside the graph."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from nanovllmx.attention.base import forward_context
from nanovllmx.attention.metadata import AttentionMetadata
from nanovllmx.scheduler.messages import ScheduledBatch
from nanovllmx.worker.logits_processing import DeviceLogprobs
from nanovllmx.worker.sampler import inverse_temperature

_FIELDS = 5  # packed per row: input id, position, KV slot, req_to_token row, 1/temperature (float32 bits)


def capture_sizes(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs] + list(range(16, max_bs + 1, 16))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class _EagerReplay:
    """Stands in for a CUDA graph off the GPU (CPU tests): replay() runs the step again and writes
    into the outputs of the first run, as a graph replay does."""

    def __init__(self, step, backend):
        self.step, self.backend = step, backend
        with forward_context(backend):
            self.outputs = step()

    def replay(self) -> None:
        with forward_context(self.backend):
            for dst, src in zip(self.outputs, self.step()):
                dst.copy_(src)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph | _EagerReplay
    wrapper: object  # the FlashInfer decode wrapper planned for this size
    inputs: torch.Tensor  # int32 [_FIELDS * bs]: the graph's static inputs, one H2D copy per step
    meta: AttentionMetadata
    # the last stage: logits [bs, vocab] and the ids sampled in the graph (int32 [bs]); an earlier
    # stage: the hidden states and residual [bs, hidden] it sends to the next stage
    outputs: tuple[torch.Tensor, torch.Tensor]


class DecodeGraphs:
    def __init__(self, runner):
        self.r = runner
        be = runner.backend
        cfg, dev = runner.cfg, runner.device
        if dev.type == "cuda":
            from nanovllmx.attention.flashinfer_backend import FlashInferBackend

            if not isinstance(be, FlashInferBackend):
                raise ValueError("CUDA graphs need the flashinfer attention backend (or enforce_eager=True)")
        self.max_bs = cfg.max_bs
        self.dummy_row = cfg.max_bs  # req_to_token row that stays all zeros -> slot 0
        self.sizes = capture_sizes(cfg.max_bs)
        # every size's static inputs are views of one buffer: only one graph runs at a time
        self.inputs = torch.zeros(_FIELDS * cfg.max_bs, dtype=torch.int32, device=dev)
        self.first, self.last = runner.model.is_first, runner.model.is_last
        # a later pipeline stage's inputs: the previous stage's hidden states and residual
        self.hidden_in: torch.Tensor | None = None
        self.residual_in: torch.Tensor | None = None
        if not self.first:
            shape = (cfg.max_bs, cfg.hf_config.hidden_size)
            self.hidden_in = torch.zeros(shape, dtype=cfg.torch_dtype, device=dev)
            self.residual_in = torch.zeros(shape, dtype=cfg.torch_dtype, device=dev)
        self.captured: dict[int, _Captured] = {}
        pool = None
        for bs in reversed(self.sizes):
            inputs = self.inputs[: _FIELDS * bs]
            inputs.copy_(torch.from_numpy(self._pack_padding(bs, 0).reshape(-1)))  # at set-up, not per step
            w = be.make_graph_wrapper(bs)
            meta = self._meta(inputs, bs, np.full(bs, self.dummy_row, np.int32), np.ones(bs, np.int32))
            be.plan_graph(w, meta)
            step = functools.partial(self._step, inputs, w, meta)
            if dev.type != "cuda":
                g = _EagerReplay(step, be)
                outputs = g.outputs
            else:
                torch.cuda.synchronize(dev)
                with forward_context(be):
                    step()  # warm up (and compile) outside the graph
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        outputs = step()
                pool = g.pool() if pool is None else pool
                torch.cuda.synchronize(dev)
            self.captured[bs] = _Captured(g, w, inputs, meta, outputs)

    def _pack_padding(self, gbs: int, bs: int) -> np.ndarray:
        """Host inputs for a padded batch of gbs rows whose first bs rows the caller fills."""
        host = np.zeros((_FIELDS, gbs), dtype=np.int32)
        host[3, bs:] = self.dummy_row
        return host

    def _meta(self, inputs: torch.Tensor, bs: int, req_idx_np: np.ndarray, kv_lens_np: np.ndarray) -> AttentionMetadata:
        rows = inputs.view(_FIELDS, bs)
        return AttentionMetadata(
            q_lens_np=np.ones(bs, np.int32),
            kv_lens_np=kv_lens_np,
            req_indices_np=req_idx_np,
            req_indices=rows[3],
            out_slots=rows[2],
            req_to_token=self.r.req_to_token,
            is_decode=True,
        )

    def _step(self, inputs: torch.Tensor, wrapper, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured device work of one decode step (of this stage's layers)."""
        r, be, model = self.r, self.r.backend, self.r.model
        ids, pos, slots, req, inv_t = inputs.view(_FIELDS, -1)
        rows = req.long()
        r.req_to_token[rows, pos.long()] = slots
        be.gather_graph_indices(wrapper, meta)
        if self.first:
            ids = torch.where(ids < 0, r.next_tokens[rows], ids)  # -1: the token the previous step samples
            out = model(ids, pos)
        else:
            assert self.hidden_in is not None and self.residual_in is not None
            bs = ids.shape[0]
            out = model(None, pos, self.hidden_in[:bs], self.residual_in[:bs])
        if not self.last:
            return out  # (hidden, residual) for the next stage
        logits = model.compute_logits(out)
        tokens = r.sampler.sample_unfiltered(logits, inv_t.view(torch.float32))
        r.next_tokens[rows] = tokens
        return logits, tokens

    def logits_of(self, b: ScheduledBatch, rows: np.ndarray) -> torch.Tensor:
        """A copy of the logits of the given rows of b (indices into the batch) from the step just
        replayed; taken before the next replay overwrites the graph's output. The index goes up
        without blocking: a blocking copy would wait for the whole forward (a stream sync)."""
        c = self.captured[next(s for s in self.sizes if s >= b.num_reqs)]
        logits = c.outputs[0]  # the last stage's
        return logits[torch.from_numpy(rows.astype(np.int64)).to(self.r.device, non_blocking=True)]

    def can_run(self, bs: int) -> bool:
        return bs <= self.max_bs

    def run(
        self, b: ScheduledBatch, hidden: torch.Tensor | None = None, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, tuple[np.ndarray, DeviceLogprobs] | None]:
        """One step of one token per request; a later pipeline stage also takes the previous
        stage's (hidden, residual). The last stage returns the ids sampled for b.sample_rows
        (int32, on the device) and the logprobs asked for: from the graph when every row samples
        and none has filters, a seed, logprobs or logits processing, else from the eager sampler
        over the graph's logits (the graph then samples greedily, cheap, and its ids are
        overwritten). An earlier stage returns its (hidden, residual)."""
        r = self.r
        bs = b.num_reqs
        gbs = next(s for s in self.sizes if s >= bs)
        c = self.captured[gbs]
        if not self.first:
            assert self.hidden_in is not None and self.residual_in is not None
            assert hidden is not None and residual is not None
            self.hidden_in[:bs].copy_(hidden)
            self.residual_in[:bs].copy_(residual)
        sa = b.sampling
        in_graph = len(b.sample_rows) == bs and sa.plain and not sa.needs_filter and not (sa.seeds >= 0).any()
        if len(b.table_rows):  # prefix slots of newly admitted requests (radix-cache hits)
            r.write_table(b.table_rows, b.table_cols, b.table_slots)
        host = self._pack_padding(gbs, bs)
        host[0, :bs] = b.input_ids
        host[1, :bs] = b.start_pos
        host[2, :bs] = b.out_slots
        host[3, :bs] = b.req_indices
        if in_graph:
            host[4, :bs] = inverse_temperature(sa.temperature).view(np.int32)
        # a pageable source is staged before copy_ returns, so `host` may go at once
        c.inputs.copy_(torch.from_numpy(host.reshape(-1)), non_blocking=True)
        kv_lens = np.ones(gbs, np.int32)
        kv_lens[:bs] = b.start_pos + 1
        c.meta.kv_lens_np, c.meta.req_indices_np = kv_lens, host[3]
        r.backend.plan_graph(c.wrapper, c.meta)
        c.graph.replay()
        a, tokens = c.outputs
        if not self.last:
            return a[:bs], tokens[:bs]  # hidden, residual
        if in_graph:
            return tokens[:bs], None
        rows = torch.from_numpy(b.sample_rows.astype(np.int64)).to(r.device, non_blocking=True)
        return r.sample(a[rows], b)  # a: the logits
