"""Helpers shared by the test areas (import as `from tests.helpers import ...`): the tiny model's
constants, the `transformers` reference, seeded prompts, waiting for an api_server subprocess."""

from __future__ import annotations

import random
import signal
import socket
from pathlib import Path

import torch

CONTEXT_LEN = 512  # small context: small KV pools and fast tests
EOS_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|> (generation_config of the tiny model)


class HFReference:
    """transformers' own Qwen3ForCausalLM on the tiny checkpoint (float32, CPU, eager attention),
    with memoised greedy continuations."""

    def __init__(self, model_dir: Path):
        from transformers import Qwen3ForCausalLM

        self.model = Qwen3ForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self._greedy: dict[tuple[tuple[int, ...], int], list[int]] = {}

    @torch.inference_mode()
    def logits(self, prompt: list[int]) -> torch.Tensor:
        """[len(prompt), vocab] float32 logits of every position."""
        return self.model(torch.tensor([prompt])).logits[0].float()

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Greedy continuation of exactly max_tokens tokens (EOS ignored), using HF's KV cache."""
        key = (tuple(prompt), max_tokens)
        if key not in self._greedy:
            out = self.model(torch.tensor([prompt]), use_cache=True)
            toks: list[int] = []
            while True:
                nxt = int(out.logits[0, -1].argmax())
                toks.append(nxt)
                if len(toks) == max_tokens:
                    break
                out = self.model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
            self._greedy[key] = toks
        return list(self._greedy[key])


def sigint_default() -> None:
    """`preexec_fn` of a child that is stopped with SIGINT (as Ctrl-C stops `serve run`): a shell
    starts a background job (`cmd &`) with SIGINT ignored and children inherit that, so without this
    the child would never stop on it (and its HAProxy would outlive the SIGKILL that follows)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_prompt(n: int, seed: int, vocab: int = 151643) -> list[int]:
    """n ordinary (non-special) token ids drawn from a seeded generator."""
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def wait_api_server(url: str, proc, log_path: Path, timeout: float = 150.0) -> None:
    """Wait until a `python -m nanovllmx.entrypoints.openai.api_server` subprocess answers /health;
    fail with the tail of its log if it exits or does not come up in time."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "api_server did not come up"
        time.sleep(0.5)
