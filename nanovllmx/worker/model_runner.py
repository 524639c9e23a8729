"""Turns a ScheduledBatch into device tensors, runs the model (eagerly or through a captured CUDA
graph), and samples. Knows nothing of requests beyond the arrays in the batch."""

from __future__ import annotations

import numpy as np
import torch

from nanovllmx.attention.base import AttentionBackend, forward_context
from nanovllmx.attention.metadata import AttentionMetadata, KVPool
from nanovllmx.config import EngineConfig
from nanovllmx.models.qwen3 import Qwen3ForCausalLM
from nanovllmx.scheduler.messages import SamplingArrays, ScheduledBatch, StepLogprobs, StepOutput
from nanovllmx.utils.timing import PhaseTimer
from nanovllmx.worker.logits_processing import (
    DeviceLogprobs,
    TokenHistory,
    apply_logits_processing,
    cat_logprobs,
    prompt_positions,
    token_logprobs,
)
from nanovllmx.worker.sampler import Sampler


class SampledTokens:
    """Sampled ids (and logprobs) of one step, copied to the host without blocking; `result()`
    waits for them. Lets the engine schedule the next step while this one runs on the GPU."""

    def __init__(
        self,
        host: torch.Tensor,
        event: torch.cuda.Event | None,
        device_ids: torch.Tensor | None = None,
        sampled_lp: tuple[np.ndarray, DeviceLogprobs] | None = None,
        prompt_lp: DeviceLogprobs | None = None,
    ):
        self.host, self.event = host, event
        self.device_ids = device_ids  # the same ids on the device (pipeline overlap sends them on)
        self.sampled_lp, self.prompt_lp = sampled_lp, prompt_lp

    def result(self) -> StepOutput:
        if self.event is not None:
            self.event.synchronize()
        tokens = self.host.numpy().copy()
        if self.sampled_lp is None and self.prompt_lp is None:
            return StepOutput(tokens)
        rows = self.sampled_lp[0] if self.sampled_lp is not None else np.zeros(0, np.int32)
        return StepOutput(
            tokens,
            StepLogprobs(
                sampled_rows=rows,
                sampled=self.sampled_lp[1].numpy() if self.sampled_lp is not None else None,
                prompt=self.prompt_lp.numpy() if self.prompt_lp is not None else None,
            ),
        )


class DeferredTokens:
    """A launched step with rows under a grammar whose masks follow it (ScheduledBatch.mask_deferred):
    the forward and the other rows' samples are on the device; `apply_grammar` samples the
    constrained rows once their bitmask is known and starts the host copy; then `result()` waits."""

    def __init__(
        self,
        runner: ModelRunner,
        b: ScheduledBatch,
        tokens: torch.Tensor,
        logits: torch.Tensor,
        sampled_lp: tuple[np.ndarray, DeviceLogprobs] | None = None,
        prompt_lp: DeviceLogprobs | None = None,
    ):
        self.runner, self.batch, self.tokens, self.logits = runner, b, tokens, logits
        # the other rows' logprobs (a constrained row asks for none: SamplingParams refuses them)
        self.sampled_lp, self.prompt_lp = sampled_lp, prompt_lp
        self._out: SampledTokens | None = None

    @torch.inference_mode()
    def apply_grammar(self, bitmask: np.ndarray) -> None:
        r = self.runner
        r.constrain(self.logits, self.batch, self.tokens, bitmask)
        self._out = r.to_host(self.tokens, self.sampled_lp, self.prompt_lp)

    def result(self) -> StepOutput:
        if self._out is None:
            raise RuntimeError(f"step {self.batch.step}: its grammar masks never came")
        return self._out.result()


def make_backend(name: str, kv: KVPool, model: Qwen3ForCausalLM, cfg: EngineConfig) -> AttentionBackend:
    layer0 = next(iter(model.layers.values())).self_attn
    args = (kv, layer0.num_heads, layer0.num_kv_heads, layer0.head_dim)
    if name == "torch":
        from nanovllmx.attention.torch_backend import TorchBackend

        return TorchBackend(*args)
    if name == "flashinfer":
        from nanovllmx.attention.flashinfer_backend import FlashInferBackend

        return FlashInferBackend(
            *args, max_bs=cfg.max_bs, context_len=cfg.max_len, decode_tensor_cores=cfg.decode_tensor_cores
        )
    raise ValueError(f"unknown attention backend {name!r}")


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model: Qwen3ForCausalLM, kv: KVPool, device: torch.device):
        self.cfg, self.model, self.kv, self.device = cfg, model, kv, device
        # +1 row: padded CUDA-graph entries point at a dummy request row
        self.req_to_token = torch.zeros((cfg.max_bs + 1, cfg.max_len), dtype=torch.int32, device=device)
        self.backend = make_backend(cfg.attention_backend, kv, model, cfg)
        self.sampler = Sampler(device)
        self.history = TokenHistory(cfg.max_bs + 1, cfg.max_len, device)  # penalties' token ids
        # last token sampled for each req_to_token row: the input of the next decode step when the
        # scheduler runs a step ahead (its -1 placeholders)
        self.next_tokens = torch.zeros(cfg.max_bs + 1, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        # two per micro-batch of a step: the worker may launch step N+1 before step N's ids are read
        # (worker_actor._HOST_BUFFERS), so step N+2's copy is the first to reuse step N's buffers
        m = (cfg.pp_microbatches or cfg.pp_size) if cfg.pp_size > 1 else 1
        self._host_bufs = [torch.empty(cfg.max_bs, dtype=torch.int32, pin_memory=pin) for _ in range(2 * m)]
        self._flip = 0
        self.timer = PhaseTimer()  # prepare / forward (launch) / sample+wait, per step
        self.graphs = None
        # decode steps of this stage's layers (a pipeline stage captures its own part of the model)
        if not cfg.enforce_eager and device.type == "cuda":
            from nanovllmx.worker.cuda_graph import DecodeGraphs

            self.graphs = DecodeGraphs(self)

    def _to_dev(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device, non_blocking=True)

    def write_table(self, rows: np.ndarray, cols: np.ndarray, slots: np.ndarray) -> None:
        """req_to_token[rows, cols] = slots on the device."""
        self.req_to_token[self._to_dev(rows).long(), self._to_dev(cols).long()] = self._to_dev(slots)

    def sample(
        self, logits: torch.Tensor, b: ScheduledBatch
    ) -> tuple[torch.Tensor, tuple[np.ndarray, DeviceLogprobs] | None]:
        """Sample b.sample_rows' tokens from their logits (one row each) and record them as those
        requests' next inputs (the placeholders of a step scheduled ahead). Returns int32 ids and,
        for the rows that ask, (their indices, the logprobs of the raw logits)."""
        sa = b.sampling
        rows = self._to_dev(b.req_indices[b.sample_rows]).long()
        raw = logits
        if sa.logits is not None:
            logits = apply_logits_processing(logits, sa.logits, self.history, rows)
        tokens = self.sampler(logits, sa).to(torch.int32)
        self.next_tokens[rows] = tokens
        if sa.logits is not None:
            self.history.record(rows, sa.logits.seq_lens, tokens)
        lp = None
        if sa.logprobs is not None:
            sel = np.nonzero(sa.logprobs >= 0)[0].astype(np.int32)
            sel_t = self._to_dev(sel).long()
            lp = (sel, token_logprobs(raw[sel_t], tokens[sel_t], int(sa.logprobs.max())))
        return tokens, lp

    def prompt_logprobs(self, hidden: torch.Tensor, b: ScheduledBatch) -> DeviceLogprobs:
        """Logprobs of the prompt tokens that b.prompt_logprobs lists (each position scored against
        the next prompt token), the LM head applied to 1024 positions at a time."""
        plan = b.prompt_logprobs
        assert plan is not None
        starts = (np.cumsum(b.q_lens) - b.q_lens)[plan.rows] + plan.offsets
        idx = self._to_dev(prompt_positions(starts, plan.counts))
        targets = self._to_dev(plan.targets)
        k, chunk = int(plan.top.max()), 1024
        parts = [
            token_logprobs(self.model.compute_logits(hidden[idx[lo : lo + chunk]]), targets[lo : lo + chunk], k)
            for lo in range(0, len(idx), chunk)
        ]
        return cat_logprobs(parts) if parts else token_logprobs(hidden[:0], targets, k)

    def constrain(self, logits: torch.Tensor, b: ScheduledBatch, tokens: torch.Tensor, bitmask: np.ndarray) -> None:
        """Resample b's grammar rows from their logits (`logits`: those rows only) under their bitmask;
        the new ids replace theirs in `tokens` (one per sampled row) and in next_tokens."""
        assert b.grammar_rows is not None
        g = b.grammar_rows
        new = self.sampler.sample_constrained(logits, b.sampling.take(g), self._to_dev(bitmask)).to(torch.int32)
        tokens[self._to_dev(g).long()] = new
        self.next_tokens[self._to_dev(b.req_indices[b.sample_rows[g]]).long()] = new

    def to_host(
        self,
        tokens: torch.Tensor,
        sampled_lp: tuple[np.ndarray, DeviceLogprobs] | None = None,
        prompt_lp: DeviceLogprobs | None = None,
    ) -> SampledTokens:
        """Start the copy of a step's sampled ids to pinned host memory (its ring of buffers)."""
        host = self._host_bufs[self._flip][: len(tokens)]
        self._flip = (self._flip + 1) % len(self._host_bufs)
        host.copy_(tokens, non_blocking=True)
        return SampledTokens(host, self._event(), tokens, sampled_lp, prompt_lp)

    def prepare(self, b: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        q_lens = b.q_lens
        cu = np.zeros(len(q_lens) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=cu[1:])
        if b.is_decode:
            positions = b.start_pos
            rows = b.req_indices
        else:
            positions = (np.repeat(b.start_pos - cu[:-1], q_lens) + np.arange(b.num_tokens, dtype=np.int32)).astype(
                np.int32
            )
            rows = np.repeat(b.req_indices, q_lens)
        if len(b.table_rows):
            rows = np.concatenate([b.table_rows, rows])
            cols = np.concatenate([b.table_cols, positions])
            slots = np.concatenate([b.table_slots, b.out_slots])
        else:
            cols, slots = positions, b.out_slots
        out_slots = self._to_dev(b.out_slots)
        self.write_table(rows, cols, slots)
        kv_lens = (b.start_pos + q_lens).astype(np.int32)
        meta = AttentionMetadata(
            q_lens_np=q_lens,
            kv_lens_np=kv_lens,
            req_indices_np=b.req_indices,
            req_indices=self._to_dev(b.req_indices),
            out_slots=out_slots,
            req_to_token=self.req_to_token,
            is_decode=b.is_decode,
        )
        ids = self._to_dev(b.input_ids)
        if b.has_placeholders:
            tok_rows = b.req_indices if b.is_decode else np.repeat(b.req_indices, q_lens)
            ids = torch.where(ids < 0, self.next_tokens[self._to_dev(tok_rows).long()], ids)
        return ids, self._to_dev(positions), meta

    @torch.inference_mode()
    def execute(self, b: ScheduledBatch, hidden=None, residual=None):
        """Run one step. First stage embeds input ids; later stages take (hidden, residual).
        Returns SampledTokens on the last stage, else (hidden, residual)."""
        tm = self.timer
        tm.steps += 1
        tm.start()
        g_logits: torch.Tensor | None = None  # the grammar rows' logits (structured outputs)
        if b.hist_rows is not None and len(b.hist_rows) and self.model.is_last:
            # admitted requests' ids for the penalties' token table (also in a step that samples nothing)
            assert b.hist_cols is not None and b.hist_ids is not None  # set together
            self.history.write(b.hist_rows, b.hist_cols, b.hist_ids)
        sampled_lp = prompt_lp = None
        if self.graphs is not None and b.is_decode and b.prompt_logprobs is None and self.graphs.can_run(b.num_reqs):
            # the graph takes the batch as it comes and samples (and records the samples) itself
            res = self.graphs.run(b, hidden, residual)
            tm.lap("forward_launch")
            if not self.model.is_last:
                return res  # (hidden, residual) for the next stage
            tokens, sampled_lp = res
            if b.grammar_rows is not None:  # grammar_rows index sample_rows
                g_logits = self.graphs.logits_of(b, b.sample_rows[b.grammar_rows])
        else:
            ids, positions, meta = self.prepare(b)
            tm.lap("prepare")
            self.backend.prepare(meta)
            with forward_context(self.backend):
                out = self.model(ids, positions, hidden, residual)
            if not self.model.is_last:
                return out
            if b.prompt_logprobs is not None:
                prompt_lp = self.prompt_logprobs(out, b).to_host()
            if len(b.sample_rows) == 0:  # nothing to wait for, but prompt logprobs' host copies
                event = self._event() if prompt_lp is not None else None
                return SampledTokens(torch.zeros(0, dtype=torch.int32), event, prompt_lp=prompt_lp)
            last_tok = self._to_dev((np.cumsum(b.q_lens) - 1)[b.sample_rows]).long()
            logits = self.model.compute_logits(out[last_tok])
            tm.lap("forward_launch")
            tokens, sampled_lp = self.sample(logits, b)
            if b.grammar_rows is not None:
                g_logits = logits[self._to_dev(b.grammar_rows).long()]
        if sampled_lp is not None:
            sampled_lp = (sampled_lp[0], sampled_lp[1].to_host())
        if b.grammar_rows is not None:  # structured outputs: only batches with a constrained row
            assert g_logits is not None  # taken above, by the graph or the eager path
            if b.mask_deferred:
                tm.lap("sample_launch")
                return DeferredTokens(self, b, tokens, g_logits, sampled_lp, prompt_lp)
            assert b.bitmask is not None
            self.constrain(g_logits, b, tokens, b.bitmask)
        sampled = self.to_host(tokens, sampled_lp, prompt_lp)
        tm.lap("sample_launch")
        return sampled

    @torch.inference_mode()
    def warmup(self) -> None:
        """Two prefill steps on scratch rows before the engine takes requests, one per sampler path
        (temperature only; top-k/top-p/min-p), with token counts off and on a multiple of 16 (Triton
        specializes on it). On a fresh machine the prefill path's kernels (Triton, the MoE kernel)
        compile on first use: the first request after `serve run` waited ~60 s on an H200 (11th
        session) while the server already reported ready. (FlashInfer's JIT modules are built
        earlier, when the attention backend is made: FlashInferBackend._build_modules.) The batches use
        the dummy req_to_token row of the decode graphs, all zeros: every token reads and writes the
        dummy slot 0, nothing real."""
        row = self.cfg.max_bs
        for q_lens, filtered in (([31, 2], False), ([16, 16], True)):
            q = np.minimum(np.array(q_lens, np.int32), self.cfg.max_len - 1)
            t, n = int(q.sum()), len(q)
            zeros = np.zeros(t, np.int32)
            b = ScheduledBatch(
                step=-1,
                req_indices=np.full(n, row, np.int32),
                start_pos=np.zeros(n, np.int32),
                q_lens=q,
                input_ids=zeros,
                out_slots=zeros,
                table_rows=zeros[:0],
                table_cols=zeros[:0],
                table_slots=zeros[:0],
                sample_rows=np.arange(n, dtype=np.int32),
                sampling=SamplingArrays(
                    temperature=np.full(n, 0.7, np.float32),
                    top_p=np.full(n, 0.95 if filtered else 1.0, np.float32),
                    top_k=np.full(n, 20 if filtered else 0, np.int32),
                    min_p=np.full(n, 0.05 if filtered else 0.0, np.float32),
                    seeds=np.full(n, -1, np.int64),
                    output_lens=np.zeros(n, np.int32),
                    needs_filter=filtered,
                    all_greedy=False,
                ),
            )
            hidden = residual = None
            if not self.model.is_first:  # a later pipeline stage: any hidden states will do
                h = self.cfg.hf_config.hidden_size
                hidden = torch.zeros((t, h), dtype=self.cfg.torch_dtype, device=self.device)
                residual = torch.zeros_like(hidden)
            out = self.execute(b, hidden, residual)
            if self.model.is_last:
                out.result()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timer = PhaseTimer()  # the engine's step statistics start with its first real step

    def _event(self) -> torch.cuda.Event | None:
        """A CUDA event after the work queued so far (None on CPU, where it is done already)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event
