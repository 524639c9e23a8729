"""FCFS continuous batching over a radix-cached, token-slot KV pool. Pure Python + numpy.

Each step: running requests first (one token each in decode, the next chunk if still prefilling),
then waiting requests in arrival order while the token budget, free slots and `max_bs` allow.
When decode runs out of slots the newest running request is preempted: its KV goes to the radix
tree (evictable) and it is recomputed later, mostly from cache if it survived eviction.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from nanovllmx.scheduler.allocator import SlotAllocator
from nanovllmx.scheduler.messages import (
    LogitsArrays,
    PromptLogprobsPlan,
    SamplingArrays,
    ScheduledBatch,
    StepLogprobs,
    TokenLogprobs,
)
from nanovllmx.scheduler.radix_cache import RadixCache
from nanovllmx.scheduler.request import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    Request,
    Status,
    TokenLogprob,
    check_prompt,
)

if TYPE_CHECKING:
    from nanovllmx.structured.grammar import GrammarCompiler, GrammarState

_I32 = np.int32
logger = logging.getLogger(__name__)


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preempted_total: int
    num_slots: int
    free_slots: int
    cached_slots: int  # held by the radix tree only (evictable)
    prompt_tokens_total: int
    cached_prompt_tokens_total: int
    generation_tokens_total: int = 0
    num_preempted: int = 0  # waiting requests that were preempted (to be recomputed)


class Scheduler:
    def __init__(
        self,
        num_slots: int,
        max_bs: int,
        context_len: int,
        max_num_batched_tokens: int,
        eos_ids: list[int],
        enable_prefix_caching: bool = True,
        vocab_size: int | None = None,
        grammar_compiler: Callable[[], GrammarCompiler] | None = None,
        lanes: int = 1,
        lanes_overlap: bool = False,
    ):
        """lanes > 1: inter-step pipelining (pp_size > 1). `lanes` batches of disjoint sampling
        requests are in flight: a request whose sampled token has not come back is not scheduled
        again, and each batch takes at most 1/lanes of the running requests, so the next one has
        work too. With `lanes_overlap` the engine sends one batch more: a request whose sample is
        in a step at least `lanes` launches old is scheduled with a placeholder, which the first
        stage takes from the last stage's ids of that step (ScheduledBatch.resolve_until)."""
        if num_slots < context_len:  # else a long request preempts itself forever
            raise ValueError(
                f"the KV pool ({num_slots} token slots) must hold at least one full context "
                f"({context_len} tokens): raise num_kv_slots or lower context_len"
            )
        self.allocator = SlotAllocator(num_slots)
        self.tree = RadixCache(self.allocator, enabled=enable_prefix_caching)
        self.num_slots, self.max_bs, self.context_len = num_slots, max_bs, context_len
        self.budget = max_num_batched_tokens
        if not isinstance(lanes, int) or lanes < 1:
            raise ValueError(f"lanes must be a positive integer, got {lanes!r}")
        self.lanes = lanes
        self.lanes_overlap = lanes_overlap and lanes > 1
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # scheduler-side mirror of the workers' req_to_token table: slots of each running request
        self.table = np.zeros((max_bs, context_len), dtype=_I32)
        self.free_rows = list(range(max_bs - 1, -1, -1))
        self.step_id = 0
        self.num_preempted_total = 0
        self.prompt_tokens_total = 0
        self.cached_prompt_tokens_total = 0
        self.generation_tokens_total = 0
        # per-step scratch: the requests of the batch in flight, in batch order
        # sampled requests of each batch not yet updated, and its prompt-logprob rows (request, count)
        self._inflight: deque[tuple[list[Request], list[tuple[Request, int]]]] = deque()
        self._inflight_steps: deque[int] = deque()  # their step ids
        self._pending: list[EngineOutput] = []  # outputs produced outside a step (aborts)
        # structured outputs: the compiler is made on the first constrained request (it loads the
        # tokenizer); grammar states of steps whose masks follow them (fill_deferred_masks)
        self._grammar_compiler_factory = grammar_compiler
        self._grammar: GrammarCompiler | None = None
        self._deferred: dict[int, list[Request]] = {}  # constrained requests of a step, by step
        # requests that use logprobs or logits processing: while none does, a step skips every check
        # for them (the standard workload's fast path)
        self._num_special = 0

    # ------------------------------------------------------------------ requests in / out
    def add_request(self, er: EngineRequest) -> None:
        check_prompt(er.prompt_token_ids, self.context_len, self.vocab_size)
        if er.request_id in self.requests:
            raise ValueError(f"request id {er.request_id!r} is already in use")
        req = Request(er, self.eos_ids)
        if er.params.structured is not None:  # StructuredError (a ValueError): the request fails alone
            req.grammar = self._compiler().matcher(er.params.structured)
        self.requests[req.request_id] = req
        if req.special:
            self._num_special += 1
        self.waiting.append(req)

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None or req.status == Status.FINISHED:
            return False
        if req.status == Status.WAITING:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
            self._release(req)
        self._finish(req, "abort")
        self._pending.append(EngineOutput(req.request_id, [], "abort", req.num_prompt, req.num_cached))
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._pending or self._inflight)

    def drop_inflight(self) -> None:
        """Forget steps whose results will never come (the engine failed a step)."""
        self._inflight.clear()
        self._deferred.clear()
        self._inflight_steps.clear()

    def _resolvable(self) -> int:
        """Pipeline overlap: the newest step whose samples the first stage may wait for without
        stalling the pipeline: `lanes` launches back (the last stage has finished it by the time
        the first stage gets to this batch), or everything applied already."""
        st = self._inflight_steps
        if len(st) >= self.lanes:
            return st[-self.lanes]
        return st[0] - 1 if st else self.step_id - 1

    # ------------------------------------------------------------------ structured outputs
    def _compiler(self) -> GrammarCompiler:
        if self._grammar is None:
            if self._grammar_compiler_factory is None:
                raise ValueError("structured outputs are not available in this engine")
            self._grammar = self._grammar_compiler_factory()
        return self._grammar

    def _fill(self, states: list[GrammarState]) -> np.ndarray:
        from nanovllmx.structured.grammar import fill_bitmasks

        g = self._compiler()
        return fill_bitmasks(states, g.vocab_size, g.stop_token_ids)

    def deferred_masks_ready(self, step: int) -> bool:
        """Every constrained request of a `mask_deferred` step has its earlier tokens applied."""
        return all(r.status == Status.FINISHED or r.pending <= 1 for r in self._deferred[step])

    def fill_deferred_masks(self, step: int) -> np.ndarray:
        """The bitmask of a step built with `mask_deferred`, once `deferred_masks_ready(step)`."""
        return self._fill([st for r in self._deferred.pop(step) if (st := r.grammar) is not None])

    def grammar_waits_on_inflight(self) -> bool:
        """A constrained running request has a token in flight: its next mask cannot be known yet."""
        return any(r.grammar is not None and r.pending for r in self.running)

    def take_pending_outputs(self) -> list[EngineOutput]:
        out, self._pending = self._pending, []
        return out

    # ------------------------------------------------------------------ slots
    def _alloc(self, n: int) -> np.ndarray | None:
        short = n - self.allocator.num_free
        if short > 0:
            self.tree.evict(short)
        return self.allocator.alloc(n)

    def _release(self, req: Request) -> None:
        """Give a running request's KV to the radix tree (finished, aborted or preempted). KV of
        positions whose token is still in flight (unknown here) is freed, not cached."""
        # a running request has a table row and a locked radix node (set together on admission)
        assert req.req_idx is not None and req.last_node is not None
        slots = self.table[req.req_idx, : req.num_computed]
        n = min(req.num_computed, len(req.tokens))
        self.tree.cache_request(req.tokens[:n], slots[:n], req.prefix_len, req.last_node, True)
        if req.num_computed > n:
            self.allocator.free(slots[n:])
        self.free_rows.append(req.req_idx)
        req.req_idx, req.last_node, req.prefix_len, req.num_computed = None, None, 0, 0

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preempted_total += 1
        self.waiting.appendleft(req)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.special:
            self._num_special -= 1
        req.status = Status.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]

    # ------------------------------------------------------------------ one step
    def schedule(self) -> ScheduledBatch | None:
        self.step_id += 1
        budget = self.budget
        plan: list[tuple[Request, int]] = []
        # with lanes, a batch takes its share of the running requests (the others go in the next
        # batches in flight); a request's prompt chunks may follow each other in consecutive
        # batches, since every stage runs the batches in step order and owns its layers' KV
        cap = -(-len(self.running) // self.lanes)
        resolve = self._resolvable() if self.lanes_overlap else 0
        # 1) running requests, oldest first
        for req in self.running:
            if budget <= 0 or len(plan) >= cap:
                break
            # lanes: a token still in flight is not the first stage's to feed, unless (overlap) its
            # step is old enough for the first stage to receive it from the last stage
            if req.pending and self.lanes > 1 and (not self.lanes_overlap or req.last_sample_step > resolve):
                continue
            total = len(req.tokens) + req.pending
            # its last token is already being sampled: nothing more to compute
            if req.pending and (req.num_output + req.pending >= req.params.max_tokens or total >= self.context_len):
                continue
            n = min(total - req.num_computed, budget)
            plan.append((req, n))
            budget -= n
        need = sum(n for _, n in plan)
        slots = self._alloc(need)
        preempted = False
        while slots is None:  # out of KV: preempt the newest running request and retry
            victim = self.running[-1]
            plan = [(r, n) for r, n in plan if r is not victim]
            self._preempt(victim)
            preempted = True
            need = sum(n for _, n in plan)
            budget = self.budget - need
            slots = self._alloc(need)
        parts = [slots]
        admitted: list[tuple[Request, np.ndarray]] = []
        history: list[Request] = []
        # 2) waiting requests in arrival order (none in a step that had to preempt)
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_bs:
            req = self.waiting[0]
            if req.pending:  # preempted while a step sampling for it is in flight: wait for it
                break
            # the last token is always recomputed: it produces the logits to sample from; a request
            # wanting prompt logprobs recomputes its prompt (cache hits have no logits)
            prefix_slots, node = self.tree.match_prefix([] if req.wants_prompt_logprobs else req.tokens[:-1])
            p = len(prefix_slots)
            n = min(len(req.tokens) - p, budget)
            # keep one slot per running request free for its next decode step
            room = self.allocator.num_free + self.tree.evictable_size - len(self.running)
            if n > room:
                break
            self.tree.inc_ref(node)  # lock the prefix before evicting for our own slots
            new = self._alloc(n)
            if new is None:
                self.tree.dec_ref(node)
                break
            self.waiting.popleft()
            req.req_idx = self.free_rows.pop()
            req.prefix_len = req.num_computed = p
            req.last_node = node
            if req.first_scheduled_time is None:
                req.num_cached = p
                req.first_scheduled_time = time.time()
                self.prompt_tokens_total += req.num_prompt
                self.cached_prompt_tokens_total += p
            self.table[req.req_idx, :p] = prefix_slots
            req.status = Status.RUNNING
            self.running.append(req)
            plan.append((req, n))
            parts.append(new)
            if p:
                admitted.append((req, prefix_slots))
            if req.params.needs_history:  # the sampler's token table (penalties) gets its ids
                history.append(req)
            budget -= n
        if not plan:
            return None
        # rows longest context first: without split-KV, attention runs a block per request and KV
        # head, started in row order, and a long block started last runs alone at the end (the
        # slots are all fresh, so which row takes which does not matter). H200, 13th session:
        # +0.7% on the standard workload (5 A/B pairs), attention +0.7-1.5% at 128-256 requests
        plan.sort(key=lambda rn: rn[0].num_computed + rn[1], reverse=True)
        batch = self._build(plan, np.concatenate(parts) if len(parts) > 1 else slots, admitted, resolve)
        if history:
            assert all(r.req_idx is not None for r in history)
            batch.hist_rows = np.concatenate([np.full(len(r.tokens), r.req_idx, _I32) for r in history])
            batch.hist_cols = np.concatenate([np.arange(len(r.tokens), dtype=_I32) for r in history])
            batch.hist_ids = np.concatenate([np.asarray(r.tokens, _I32) for r in history])
        return batch

    @staticmethod
    def _prompt_logprobs(
        plan: list[tuple[Request, int]],
    ) -> tuple[PromptLogprobsPlan | None, list[tuple[Request, int]]]:
        """The prompt positions of this step whose logprobs a request wants (before num_computed
        moves); a recomputed prefix (after preemption) is not scored twice."""
        rows, offs, counts, tops, targets, reqs = [], [], [], [], [], []
        for i, (r, n) in enumerate(plan):
            if not r.wants_prompt_logprobs:
                continue
            lo = max(r.num_computed, r.plp_done)
            hi = min(r.num_computed + n, r.num_prompt - 1)
            if hi <= lo:
                continue
            rows.append(i)
            offs.append(lo - r.num_computed)
            counts.append(hi - lo)
            tops.append(r.params.prompt_logprobs)
            targets.append(np.asarray(r.tokens[lo + 1 : hi + 1], _I32))
            reqs.append((r, hi - lo))
            r.plp_done = hi
        if not rows:
            return None, []
        return (
            PromptLogprobsPlan(
                rows=np.asarray(rows, _I32),
                offsets=np.asarray(offs, _I32),
                counts=np.asarray(counts, _I32),
                top=np.asarray(tops, _I32),
                targets=np.concatenate(targets),
            ),
            reqs,
        )

    def _build(
        self,
        plan: list[tuple[Request, int]],
        slots: np.ndarray,
        admitted: list[tuple[Request, np.ndarray]],
        resolve: int = 0,
    ) -> ScheduledBatch:
        B = len(plan)
        reqs = [r for r, _ in plan]
        q_lens = np.fromiter((n for _, n in plan), _I32, B)
        req_idx = np.fromiter((r.req_idx for r in reqs), _I32, B)
        start = np.fromiter((r.num_computed for r in reqs), _I32, B)
        T = int(q_lens.sum())
        if T == B:  # one token each: decodes, or 1-token prefill chunks (token at num_computed, not the last)
            input_ids = np.fromiter(
                (r.tokens[r.num_computed] if r.num_computed < len(r.tokens) else -1 for r in reqs), _I32, B
            )
            self.table[req_idx, start] = slots
        else:
            input_ids = np.fromiter((t for r, n in plan for t in self._inputs(r, n)), _I32, T)
            cu = np.zeros(B + 1, _I32)
            np.cumsum(q_lens, out=cu[1:])
            cols = np.repeat(start - cu[:-1], q_lens) + np.arange(T, dtype=_I32)
            self.table[np.repeat(req_idx, q_lens), cols] = slots
        # prefix slots that newly admitted requests took from the radix tree must reach the workers' tables
        tr = [np.full(len(ps), r.req_idx, _I32) for r, ps in admitted]
        tc = [np.arange(len(ps), dtype=_I32) for _, ps in admitted]
        ts = [ps for _, ps in admitted]
        plp, plp_reqs = self._prompt_logprobs(plan) if self._num_special else (None, [])
        # advance bookkeeping now, so the next schedule sees this step's tokens as computed
        end = start + q_lens
        sample_mask = np.fromiter((e == len(r.tokens) + r.pending for r, e in zip(reqs, end.tolist())), bool, B)
        for r, e in zip(reqs, end.tolist()):
            r.num_computed = e
        sample_rows = np.nonzero(sample_mask)[0].astype(_I32)
        sampled = [reqs[i] for i in sample_rows.tolist()]
        # before pending moves: seeded draws are keyed by output index
        sampling = self._sampling(sampled, bool(self._num_special))
        grammar_rows, bitmask, deferred = None, None, False
        if self._grammar is not None:
            g = [i for i, r in enumerate(sampled) if r.grammar is not None]
            if g:
                grammar_rows = np.asarray(g, dtype=_I32)
                if any(sampled[i].pending for i in g):  # a previous token still in flight
                    self._deferred[self.step_id] = [sampled[i] for i in g]
                    deferred = True
                else:
                    bitmask = self._fill([st for i in g if (st := sampled[i].grammar) is not None])
        for r in sampled:
            r.pending += 1
            r.last_sample_step = self.step_id
        self._inflight.append((sampled, plp_reqs))
        self._inflight_steps.append(self.step_id)
        return ScheduledBatch(
            step=self.step_id,
            req_indices=req_idx,
            start_pos=start,
            q_lens=q_lens,
            input_ids=input_ids,
            out_slots=slots,
            table_rows=np.concatenate(tr) if tr else np.zeros(0, _I32),
            table_cols=np.concatenate(tc) if tc else np.zeros(0, _I32),
            table_slots=np.concatenate(ts) if ts else np.zeros(0, _I32),
            sample_rows=sample_rows,
            sampling=sampling,
            has_placeholders=bool((input_ids < 0).any()),
            grammar_rows=grammar_rows,
            bitmask=bitmask,
            mask_deferred=deferred,
            prompt_logprobs=plp,
            resolve_until=resolve,
        )

    @staticmethod
    def _inputs(r: Request, n: int) -> list[int]:
        """Token ids at positions num_computed .. +n; -1 for the one still being sampled."""
        c = r.num_computed
        known = r.tokens[c : c + n]
        return known if len(known) == n else known + [-1] * (n - len(known))

    @staticmethod
    def _sampling(reqs: list[Request], special: bool = True) -> SamplingArrays:
        S = len(reqs)
        ps = [r.params for r in reqs]
        temperature = np.fromiter((p.temperature for p in ps), np.float32, S)
        top_p = np.fromiter((p.top_p for p in ps), np.float32, S)
        top_k = np.fromiter((min(max(p.top_k, 0), 2**31 - 1) for p in ps), _I32, S)  # >= vocab: no-op
        min_p = np.fromiter((p.min_p for p in ps), np.float32, S)
        # any Python int is a valid seed: fold it into int64's non-negative range (-1 marks unseeded)
        seeds = np.fromiter((-1 if p.seed is None else p.seed % (2**63) for p in ps), np.int64, S)
        out_lens = np.fromiter((r.num_output + r.pending for r in reqs), _I32, S)
        logprobs = None
        if special and any(p.logprobs is not None for p in ps):
            logprobs = np.fromiter((-1 if p.logprobs is None else p.logprobs for p in ps), _I32, S)
        return SamplingArrays(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seeds=seeds,
            output_lens=out_lens,
            needs_filter=bool((top_p < 1).any() or (top_k > 0).any() or (min_p > 0).any()),
            all_greedy=bool((temperature == 0).all()),
            logits=Scheduler._logits_arrays(reqs, out_lens) if special and any(p.adjusts_logits for p in ps) else None,
            logprobs=logprobs,
        )

    @staticmethod
    def _logits_arrays(reqs: list[Request], out_lens: np.ndarray) -> LogitsArrays:
        """Padded per-row arrays of the logits processing; built only for steps that use it."""
        S = len(reqs)
        ps = [r.params for r in reqs]
        banned_lists = [sorted(r.stop_ids) if r.params.min_tokens > n else [] for r, n in zip(reqs, out_lens.tolist())]
        banned = np.full((S, max(map(len, banned_lists), default=0)), -1, _I32)
        for i, b in enumerate(banned_lists):
            banned[i, : len(b)] = b
        biases = [p.logit_bias or {} for p in ps]
        k = max(map(len, biases), default=0)
        bias_ids, bias_values = np.full((S, k), -1, _I32), np.zeros((S, k), np.float32)
        for i, bias in enumerate(biases):
            bias_ids[i, : len(bias)] = list(bias.keys())
            bias_values[i, : len(bias)] = list(bias.values())
        return LogitsArrays(
            repetition=np.fromiter((p.repetition_penalty for p in ps), np.float32, S),
            presence=np.fromiter((p.presence_penalty for p in ps), np.float32, S),
            frequency=np.fromiter((p.frequency_penalty for p in ps), np.float32, S),
            num_prompt=np.fromiter((r.num_prompt for r in reqs), _I32, S),
            seq_lens=np.fromiter((len(r.tokens) + r.pending for r in reqs), _I32, S),
            banned=banned,
            bias_ids=bias_ids,
            bias_values=bias_values,
        )

    @staticmethod
    def _token_logprobs(lp: TokenLogprobs, i: int, k: int) -> TokenLogprob:
        top = list(zip(lp.top_ids[i, :k].tolist(), lp.top_logprobs[i, :k].tolist()))
        return TokenLogprob(int(lp.token_ids[i]), float(lp.logprobs[i]), int(lp.ranks[i]), top)

    def update(self, sampled: np.ndarray, logprobs: StepLogprobs | None = None) -> list[EngineOutput]:
        """Apply the sampled tokens (and logprobs) of the oldest batch in flight; returns this
        step's outputs."""
        outputs = self.take_pending_outputs()
        ctx = self.context_len
        finished: list[tuple[Request, FinishReason]] = []
        self._inflight_steps.popleft()
        reqs, plp_reqs = self._inflight.popleft()
        sample_lps: dict[int, int] = {}
        if logprobs is not None:
            if logprobs.prompt is not None:
                j = 0
                for req, count in plp_reqs:
                    k = req.params.prompt_logprobs or 0
                    req.prompt_lps.extend(self._token_logprobs(logprobs.prompt, j + i, k) for i in range(count))
                    j += count
            sample_lps = {int(row): j for j, row in enumerate(logprobs.sampled_rows.tolist())}
        for row, (req, tok) in enumerate(zip(reqs, sampled.tolist())):
            if req.status == Status.FINISHED:  # aborted, or stopped by an earlier token, while in flight
                continue
            req.pending -= 1
            req.tokens.append(tok)
            if req.grammar is not None and not req.grammar.accept(tok) and not req.grammar.terminated:
                logger.warning("request %s: token %d is outside its grammar", req.request_id, tok)
            self.generation_tokens_total += 1
            reason: FinishReason | None = None
            if tok in req.stop_ids:
                reason = "stop"
            elif req.num_output >= req.params.max_tokens or len(req.tokens) >= ctx:
                reason = "length"
            if reason is not None:
                req.finish_reason = reason
                finished.append((req, reason))
            out = EngineOutput(req.request_id, [tok], reason, req.num_prompt, req.num_cached)
            if req.num_output == 1:  # the first token: report how long the request queued
                assert req.first_scheduled_time is not None  # set when it was admitted
                out.queue_time = req.first_scheduled_time - req.arrival_time
                if req.params.prompt_logprobs is not None:
                    out.prompt_logprobs, req.prompt_lps = req.prompt_lps, []
            lp_row = sample_lps.get(row) if sample_lps else None
            if lp_row is not None:
                assert logprobs is not None and logprobs.sampled is not None
                out.logprobs = [self._token_logprobs(logprobs.sampled, lp_row, req.params.logprobs or 0)]
            outputs.append(out)
        for req, reason in finished:
            if req.status == Status.RUNNING:
                self.running.remove(req)
                self._release(req)
            else:  # preempted while its last token was in flight
                self.waiting.remove(req)
            self._finish(req, reason)
        return outputs

    # ------------------------------------------------------------------ introspection
    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preempted_total=self.num_preempted_total,
            num_slots=self.num_slots,
            free_slots=self.allocator.num_free,
            cached_slots=self.tree.evictable_size,
            prompt_tokens_total=self.prompt_tokens_total,
            cached_prompt_tokens_total=self.cached_prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            # list(): one C-level copy, safe while the engine thread mutates the deque
            num_preempted=sum(1 for r in list(self.waiting) if r.num_preemptions),
        )
