"""The per-step control plane between the scheduler actor and the worker actors: plain TCP sockets.

Every worker opens one connection to the scheduler actor. Each step the scheduler pickles the
ScheduledBatch once and writes the same bytes to every connection; the worker that returns sampled
tokens (tp_rank 0 of the last pipeline stage) writes them back on its own connection. Any worker
can report a failure on its connection, and a dead process closes its socket, so the scheduler
never waits on a worker that is gone.

Why sockets and not Ray calls, Ray Compiled Graphs or a gloo broadcast: measured round trips on
CPU are in docs/distributed.md; sockets were the cheapest by 3-10x and need no timeouts while idle.

Frame: 16-byte header (kind: int64, payload length: int64), then the payload.
"""

from __future__ import annotations

import pickle
import select
import socket
import struct
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from nanovllmx.scheduler.messages import StepOutput
import time

_HDR = struct.Struct("<qq")

# frame kinds
STEP = 1  # scheduler -> workers: a pickled ScheduledBatch
STOP = 2  # scheduler -> workers: leave the loop
RESULT = 3  # worker -> scheduler: sampled ids and step timings
ERROR = 4  # worker -> scheduler: a traceback; the engine is broken
HELLO = 5  # worker -> scheduler: first frame, payload = rank as int64
GRAMMAR = 6  # scheduler -> workers: the grammar bitmask of a step sent with mask_deferred

# RESULT payload: step, gap_ns, busy_ns, n, then n int32 token ids
_RES = struct.Struct("<qqqq")


class ControlError(RuntimeError):
    """A worker failed or went away; the engine cannot run further steps."""


def _nodelay(s: socket.socket) -> None:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _send(sock: socket.socket, kind: int, payload: bytes | memoryview = b"") -> None:
    if len(payload) <= 65536:
        sock.sendall(_HDR.pack(kind, len(payload)) + bytes(payload))
    else:  # no copy of big prefill batches
        sock.sendall(_HDR.pack(kind, len(payload)))
        sock.sendall(payload)


def pack_result(step: int, out: StepOutput, gap_ns: int, busy_ns: int) -> bytes:
    """The ids as raw int32; the step's logprobs (when a request asked) pickled after them."""
    import numpy as np

    t = np.ascontiguousarray(out.tokens, dtype=np.int32)
    tail = b"" if out.logprobs is None else dumps(out.logprobs)
    return _RES.pack(step, gap_ns, busy_ns, len(t)) + t.tobytes() + tail


def unpack_result(payload: bytes) -> tuple[int, StepOutput, int, int]:
    """-> (step, sampled ids and logprobs, gap_ns, busy_ns)"""
    import numpy as np

    from nanovllmx.scheduler.messages import StepOutput

    step, gap_ns, busy_ns, n = _RES.unpack_from(payload)
    end = _RES.size + 4 * n
    tokens = np.frombuffer(payload, dtype=np.int32, count=n, offset=_RES.size).copy()
    return step, StepOutput(tokens, loads(payload[end:]) if len(payload) > end else None), gap_ns, busy_ns


# GRAMMAR payload: step, rows, words, then rows x words int32 (a packed token bitmask)
_MASK = struct.Struct("<qqq")


def pack_grammar(step: int, bitmask: NDArray[np.int32]) -> bytes:
    import numpy as np

    m = np.ascontiguousarray(bitmask, dtype=np.int32)
    return _MASK.pack(step, m.shape[0], m.shape[1]) + m.tobytes()


def unpack_grammar(payload: bytes) -> tuple[int, NDArray[np.int32]]:
    """-> (step, bitmask [rows, words])"""
    import numpy as np

    step, rows, words = _MASK.unpack_from(payload)
    m = np.frombuffer(payload, dtype=np.int32, count=rows * words, offset=_MASK.size)
    return step, m.reshape(rows, words)


class _Reader:
    """Frames from a socket, with our own buffer so that a complete frame already read from the
    kernel is never missed by select()."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(1 << 16, n - len(self.buf)))
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk

    def has_frame(self) -> bool:
        if len(self.buf) < _HDR.size:
            return False
        n: int = _HDR.unpack_from(self.buf)[1]
        return len(self.buf) >= _HDR.size + n

    def read(self) -> tuple[int, bytes]:
        self._fill(_HDR.size)
        kind, n = _HDR.unpack_from(self.buf)
        self._fill(_HDR.size + n)
        data = bytes(self.buf[_HDR.size : _HDR.size + n])
        del self.buf[: _HDR.size + n]
        return kind, data

    def close(self) -> None:
        self.sock.close()


class ControlServer:
    """Scheduler side: listens, accepts one connection per worker rank, broadcasts steps and waits
    for the result frame of one rank while watching all the others for errors."""

    def __init__(self, host: str, bind: str = ""):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((bind, 0))
        self.listener.listen(256)
        self.address = (host, self.listener.getsockname()[1])
        self.conns: dict[int, socket.socket] = {}
        self.readers: dict[int, _Reader] = {}
        self._by_fd: dict[int, int] = {}

    def accept(self, world: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.listener.settimeout(1.0)
        while len(self.conns) < world:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(self.conns)} of {world} workers connected to the control "
                    f"socket {self.address} within {timeout:.0f}s"
                )
            try:
                s, _ = self.listener.accept()
            except TimeoutError:
                continue
            s.settimeout(None)
            _nodelay(s)
            r = _Reader(s)
            kind, payload = r.read()
            if kind != HELLO:
                s.close()
                continue
            (rank,) = struct.unpack("<q", payload)
            self.conns[rank], self.readers[rank] = s, r
            self._by_fd[s.fileno()] = rank
        self.listener.close()

    def broadcast(self, kind: int, payload: bytes = b"") -> None:
        for rank, s in self.conns.items():
            try:
                _send(s, kind, payload)
            except OSError as e:
                raise ControlError(f"worker rank {rank} is gone ({e})") from e

    def wait_result(self, rank: int) -> bytes:
        """Block until `rank` sends RESULT; an ERROR frame or a closed connection from any rank raises."""
        socks = list(self.conns.values())
        while True:
            buffered = [r for r, rd in self.readers.items() if rd.has_frame()]
            if buffered:
                ready_ranks = buffered
            else:
                ready, _, _ = select.select(socks, [], [])
                ready_ranks = [self._by_fd[s.fileno()] for s in ready]
            # the wanted rank last, so errors from the others win
            order = sorted(ready_ranks, key=lambda r: r == rank)
            for r in order:
                try:
                    kind, payload = self.readers[r].read()
                except (EOFError, OSError) as e:
                    raise ControlError(
                        f"worker rank {r} closed its control connection ({e}); the worker process probably died"
                    ) from e
                if kind == ERROR:
                    raise ControlError(f"worker rank {r} failed:\n{payload.decode(errors='replace')}")
                if kind == RESULT and r == rank:
                    return payload

    def close(self) -> None:
        for r in self.readers.values():
            try:
                r.close()
            except OSError:
                pass
        try:
            self.listener.close()
        except OSError:
            pass


class ControlClient:
    """Worker side: one connection to the scheduler actor."""

    def __init__(self, address: tuple[str, int], rank: int, timeout: float = 60.0):
        # tuple(): the address may arrive as a list (it crossed Ray)
        self.sock = socket.create_connection(cast("tuple[str, int]", tuple(address)), timeout=timeout)
        self.sock.settimeout(None)
        _nodelay(self.sock)
        self.reader = _Reader(self.sock)
        _send(self.sock, HELLO, struct.pack("<q", rank))

    def recv(self) -> tuple[int, bytes]:
        return self.reader.read()

    def send(self, kind: int, payload: bytes = b"") -> None:
        _send(self.sock, kind, payload)

    def close(self) -> None:
        self.reader.close()


def dumps(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


loads = pickle.loads
