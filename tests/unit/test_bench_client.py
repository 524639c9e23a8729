"""bench.py's HTTP load generator (`_http_run`), against a fake OpenAI streaming server that paces
its chunks: the numbers every online row of docs/benchmarks.md rests on."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import pytest

import bench

CHUNKS, GAP_S = 20, 0.02  # text chunks per response, and the server's pause between them


def _sse(obj: dict) -> bytes:
    body = b"data: " + json.dumps(obj).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(body), body)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One keep-alive connection: every POST gets a role chunk, CHUNKS text chunks GAP_S apart,
    a usage chunk and [DONE]; a body with max_tokens 0 gets a 400."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            size = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
            body = json.loads(await reader.readexactly(size))
            if body.get("max_tokens") == 0:
                err = b'{"error": {"message": "bad"}}'
                writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n%s" % (len(err), err))
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(_sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}))
            for _ in range(CHUNKS):
                writer.write(_sse({"choices": [{"index": 0, "text": " tok", "finish_reason": None}]}))
                await writer.drain()
                await asyncio.sleep(GAP_S)
            usage = {"prompt_tokens": 7, "completion_tokens": CHUNKS, "total_tokens": 7 + CHUNKS}
            writer.write(_sse({"choices": [], "usage": usage}) + b"%x\r\n%s\r\n" % (14, b"data: [DONE]\n\n"))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(_handle, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)


@pytest.mark.parametrize("procs", [1, 2])
def test_counts_and_latencies_match_the_server(fake_server: str, procs: int) -> None:
    """Every token counted once whatever the number of client processes; TTFT and ITL are the
    server's pacing (a client reading in bursts would show ITL p50 near 0)."""
    reqs = [("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 5})] * 12
    res = bench._http_run(fake_server, reqs, None, None, procs)
    assert (res["completed"], res["errors"], res["client_procs"]) == (12, 0, procs)
    assert (res["completion_tokens"], res["prompt_tokens"]) == (12 * CHUNKS, 12 * 7)
    assert res["itl_ms"]["p50"] == pytest.approx(1e3 * GAP_S, rel=0.5)
    assert res["ttft_ms"]["p50"] < 1e3 * GAP_S * CHUNKS / 2  # the first chunk, not the whole response
    # all requests at once: the run lasts about one response, not one per process or request
    assert res["seconds"] < 3 * GAP_S * CHUNKS
    assert 0 < res["client_cpu"] < 1


def test_errors_are_counted_not_timed(fake_server: str) -> None:
    ok = ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 5})
    bad = ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 0})
    res = bench._http_run(fake_server, [ok, bad, ok, bad], None, None, 2)
    assert (res["completed"], res["errors"]) == (2, 2)
    assert res["first_error"].startswith("400")
    assert res["completion_tokens"] == 2 * CHUNKS
