"""The scheduler actor's clients (several `RayCoreClient`s on one engine: HTTP frontends): each gets
exactly its own requests' outputs with the tokens of a lone run; unregistering (or going silent)
aborts only that client's requests; a request id used by two clients fails the second.

The `SchedulerActor` class runs in this process on a local EngineCore (its Ray methods are plain
methods): no Ray needed. The Ray path (attached `LLM`s) is in test_distributed.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from nanovllmx.config import EngineConfig
from nanovllmx.distributed import ray_engine
from nanovllmx.distributed.ray_engine import SchedulerActor
from nanovllmx.errors import EngineUnavailableError
from nanovllmx.sampling_params import SamplingParams
from nanovllmx.scheduler.request import AbortRequest, EngineOutput, EngineRequest
from tests.helpers import CONTEXT_LEN, HFReference, random_prompt

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)


@pytest.fixture
def actor(tiny_model_dir: Path):
    from nanovllmx.engine.core import EngineCore
    from nanovllmx.engine.executor import LocalExecutor

    cfg = EngineConfig(str(tiny_model_dir), device="cpu", context_len=CONTEXT_LEN, max_bs=8)
    a = SchedulerActor(cfg)
    a.core = EngineCore(cfg, LocalExecutor(cfg), a._sink)  # what start() does with Ray workers
    yield a
    a.shutdown()


class Client:
    """A client of the actor as RayCoreClient drives it: numbered messages, a polling thread."""

    def __init__(self, actor: SchedulerActor):
        self.actor, self.id, self.seq = actor, actor.register_client(), 0
        self.outs: dict[str, list[EngineOutput]] = {}
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def send(self, msg: EngineRequest | AbortRequest) -> None:
        self.actor.submit(self.id, self.seq, msg)
        self.seq += 1

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.actor.get_outputs(self.id, 0.1)
            except EngineUnavailableError as e:
                self.error = str(e)
                return
            for o in got or []:
                self.outs.setdefault(o.request_id, []).append(o)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def finished(self, rid: str) -> bool:
        return any(o.finish_reason is not None for o in self.outs.get(rid, []))

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outs[rid] for t in o.new_token_ids]


def _wait(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_two_clients_get_their_own_outputs(actor: SchedulerActor, hf_ref: HFReference) -> None:
    a, b = Client(actor), Client(actor)
    prompts = {f"r{i}": random_prompt(5 + 3 * i, seed=i) for i in range(6)}
    # interleaved; b's messages arrive out of order (the actor applies each client's in its order)
    a.send(EngineRequest("r0", prompts["r0"], GREEDY))
    actor.submit(b.id, 1, EngineRequest("r3", prompts["r3"], GREEDY))
    actor.submit(b.id, 0, EngineRequest("r1", prompts["r1"], GREEDY))
    b.seq = 2
    a.send(EngineRequest("r2", prompts["r2"], GREEDY))
    b.send(EngineRequest("r5", prompts["r5"], GREEDY))
    a.send(EngineRequest("r4", prompts["r4"], GREEDY))
    mine = {a: ["r0", "r2", "r4"], b: ["r1", "r3", "r5"]}
    _wait(lambda: all(c.finished(r) for c, rids in mine.items() for r in rids))
    for c, rids in mine.items():
        assert sorted(c.outs) == rids  # nothing of the other client's
        for r in rids:
            assert c.tokens(r) == hf_ref.greedy(prompts[r], GREEDY.max_tokens), r
            assert [o.finish_reason for o in c.outs[r]][-1] == "length"
    assert actor._owner == {}  # forgotten with the final outputs
    counts = actor.stats()["clients"]
    assert counts == {
        str(a.id): {"num_requests": 3, "num_unfinished": 0},
        str(b.id): {"num_requests": 3, "num_unfinished": 0},
    }
    a.stop()
    b.stop()


def test_request_id_clash_fails_the_second(actor: SchedulerActor, hf_ref: HFReference) -> None:
    a, b = Client(actor), Client(actor)
    p, q = random_prompt(8, seed=20), random_prompt(9, seed=21)
    a.send(EngineRequest("same", p, GREEDY))
    b.send(EngineRequest("same", q, GREEDY))
    _wait(lambda: a.finished("same") and b.finished("same"))
    assert a.tokens("same") == hf_ref.greedy(p, GREEDY.max_tokens)  # the first is untouched
    (failed,) = b.outs["same"]
    assert failed.finish_reason == "error" and "in use by another client" in (failed.error or "")
    # an abort names a request of its own client only: b's abort leaves a's next request alone
    a.send(EngineRequest("x", p, GREEDY))
    b.send(AbortRequest("x"))
    _wait(lambda: a.finished("x"))
    assert a.tokens("x") == hf_ref.greedy(p, GREEDY.max_tokens) and "x" not in b.outs
    a.stop()
    b.stop()


def test_unregister_aborts_only_that_clients_requests(actor: SchedulerActor, hf_ref: HFReference) -> None:
    a, b = Client(actor), Client(actor)
    p, q = random_prompt(6, seed=30), random_prompt(7, seed=31)
    a.send(EngineRequest("a1", p, LONG))
    b.send(EngineRequest("b1", q, GREEDY))
    _wait(lambda: "a1" in a.outs)  # a's request is running
    actor.unregister_client(a.id)
    _wait(lambda: b.finished("b1"))
    assert b.tokens("b1") == hf_ref.greedy(q, GREEDY.max_tokens)
    _wait(lambda: a.error is not None)  # its poll says it is gone
    assert "not registered" in (a.error or "")
    _wait(lambda: not actor._core().scheduler.has_work())
    assert actor._core().stats()["generation_tokens_total"] < LONG.max_tokens  # a1 stopped early
    assert actor._owner == {} and str(a.id) not in actor.stats()["clients"]
    b.stop()


def test_a_silent_client_is_dropped(actor: SchedulerActor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_engine, "CLIENT_TIMEOUT_S", 0.3)
    monkeypatch.setattr(ray_engine, "_REAP_EVERY_S", 0.0)
    silent = actor.register_client()  # submits, never polls (a crashed frontend)
    live = Client(actor)
    actor.submit(silent, 0, EngineRequest("s1", random_prompt(6, seed=40), LONG))
    _wait(lambda: str(silent) not in actor.stats()["clients"], timeout=10)
    _wait(lambda: not actor._core().scheduler.has_work(), timeout=10)
    assert actor._core().stats()["generation_tokens_total"] < LONG.max_tokens and actor._owner == {}
    with pytest.raises(EngineUnavailableError, match="without polling"):
        actor.get_outputs(silent, 0.0)
    assert live.error is None and str(live.id) in actor.stats()["clients"]
    live.stop()


def test_abort_while_its_grammar_compiles_ends_the_route(actor: SchedulerActor) -> None:
    """A constrained request aborted before its grammar is compiled (not in the scheduler yet) still
    ends with an "abort" output, so the actor forgets whose it was."""
    from nanovllmx.structured.spec import GrammarSpec

    c = Client(actor)
    spec = GrammarSpec("regex", "[a-z]{3,9}-only-here")  # a grammar no other test compiles: not cached
    c.send(EngineRequest("g1", random_prompt(5, seed=50), SamplingParams(max_tokens=5, structured=spec)))
    c.send(AbortRequest("g1"))
    _wait(lambda: c.finished("g1"))
    assert [o.finish_reason for o in c.outs["g1"]] == ["abort"] and actor._owner == {}
    c.stop()
