"""Start the OpenAI-compatible server (the Ray Serve app of `nanovllmx.serve`) and serve until interrupted.

    python -m nanovllmx.entrypoints.openai.api_server --model Qwen/Qwen3-0.6B --port 8000
    python -m nanovllmx.entrypoints.openai.api_server --model nanovllmx-demo   # offline CPU demo

It starts (or, with --address, joins) a Ray instance, starts Serve's HTTP proxy on --host/--port,
and deploys the same application as `serve run serve_configs/*.yaml`. Ctrl-C or SIGTERM drain
(requests in flight finish, up to --graceful-shutdown-timeout), then shut Serve and Ray down.
Flags that vLLM users know are accepted as aliases (--tensor-parallel-size, --max-model-len,
--max-num-seqs, ...).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from nanovllmx.config import EngineConfig
from nanovllmx.utils.demo import DEMO_MODEL_NAME


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nanovllmx.entrypoints.openai.api_server",
        description="Nano-vLLM-X OpenAI-compatible server on Ray Serve",
    )
    p.add_argument(
        "--model",
        required=True,
        help=f"local checkpoint folder, Hugging Face Hub id, or {DEMO_MODEL_NAME!r} (random weights)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="name(s) clients use as `model` (default: the folder / repo name)",
    )
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only); --host 0.0.0.0 listens on all "
        "interfaces: then put an authenticating proxy in front, or set --api-key (docs/serving.md)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=1)
    p.add_argument("--pp-size", "--pipeline-parallel-size", dest="pp_size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=EngineConfig.gpu_memory_utilization)
    p.add_argument("--max-bs", "--max-num-seqs", dest="max_bs", type=int, default=EngineConfig.max_bs)
    p.add_argument("--context-len", "--max-model-len", dest="context_len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--num-kv-slots", type=int, default=None)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--stream-interval",
        type=int,
        default=None,
        help="stream a delta every N tokens (the first at once; default 1: every token)",
    )
    p.add_argument("--executor", default=None, choices=["auto", "local", "ray"])
    p.add_argument(
        "--generation-config",
        default="auto",
        choices=["auto", "none"],
        help="'auto': sampling defaults from the checkpoint's generation_config.json",
    )
    p.add_argument("--num-replicas", type=int, default=1, help="engines behind the route (one per replica)")
    p.add_argument(
        "--api-server-count",
        "--frontends",
        dest="frontends",
        type=int,
        default=None,
        help="HTTP frontend processes in front of one engine (build_app's frontends; the engine on Ray)",
    )
    p.add_argument("--max-ongoing-requests", type=int, default=None, help="per replica")
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="per engine: beyond max_bs running + this many waiting, requests get 503 + Retry-After",
    )
    p.add_argument("--max-request-body-bytes", type=int, default=None, help="larger bodies get 413 (0: no limit)")
    p.add_argument(
        "--api-key",
        default=None,
        help="every route but /health wants `Authorization: Bearer <key>` (else 401); default: "
        "$NANOVLLMX_API_KEY (better: a command line is visible to every user of the machine), else no key",
    )
    p.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        default=None,
        help="let clients send their own chat template (chat_template_kwargs.chat_template); by default "
        "it is refused (400). Rendered in Jinja's sandbox within --chat-template-timeout",
    )
    p.add_argument(
        "--reasoning-parser",
        default=None,
        choices=["auto", "qwen3", "none"],
        help="split Qwen3's <think> block into reasoning_content (default auto: qwen3 when the tokenizer has "
        "the think tags); none leaves it in content",
    )
    p.add_argument(
        "--tool-call-parser",
        default=None,
        choices=["auto", "hermes", "none"],
        help="parse <tool_call> blocks into tool_calls (default auto: hermes when the tokenizer has the tags)",
    )
    p.add_argument(
        "--chat-template-timeout",
        dest="chat_template_timeout_s",
        type=float,
        default=None,
        help="seconds a client's chat template may render (default 5); past it: 400",
    )
    p.add_argument(
        "--prompt-job-stuck-after",
        dest="prompt_job_stuck_after_s",
        type=float,
        default=None,
        help="a chat render or prompt encoding running longer (seconds, default 60) fails the replica's "
        "health check, so Serve replaces it",
    )
    p.add_argument(
        "--graceful-shutdown-timeout",
        dest="graceful_shutdown_timeout_s",
        type=float,
        default=None,
        help="on Ctrl-C / SIGTERM (and whenever Serve removes a replica), seconds that requests in flight may "
        "take to finish (default: build_app's graceful_shutdown_timeout_s, 120)",
    )
    p.add_argument(
        "--direct-ingress-port",
        type=int,
        default=None,
        help="also serve HTTP from the replica itself (Serve's direct ingress, no proxy hop) on this port "
        "(next ports for more replicas on a node): ~0.95 of offline throughput against 0.76-0.89 "
        "through the proxy on an H100 (docs/benchmarks.md). Only when this command starts Ray",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster to join, e.g. 'auto' (default: start a new local instance)"
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("NANOVLLMX_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO (one line per finished request, engine stats while busy), WARNING, ... "
        "(default: $NANOVLLMX_LOG_LEVEL or INFO)",
    )
    return p.parse_args(argv)


def app_args(ns: argparse.Namespace) -> dict:
    """The `args` of the Serve config this command line stands for."""
    args = {
        "model": ns.model,
        "tp_size": ns.tp_size,
        "pp_size": ns.pp_size,
        "gpu_memory_utilization": ns.gpu_memory_utilization,
        "max_bs": ns.max_bs,
        "context_len": ns.context_len,
        "enforce_eager": ns.enforce_eager,
        "device": ns.device,
        "dtype": ns.dtype,
        "generation_config": ns.generation_config,
        "num_replicas": ns.num_replicas,
        "log_level": ns.log_level.upper(),
    }
    if ns.served_model_name:
        args["served_model_name"] = ns.served_model_name if len(ns.served_model_name) > 1 else ns.served_model_name[0]
    for k in (
        "revision",
        "max_num_batched_tokens",
        "num_kv_slots",
        "attention_backend",
        "enable_prefix_caching",
        "seed",
        "executor",
        "max_ongoing_requests",
        "max_waiting_requests",
        "max_request_body_bytes",
        "graceful_shutdown_timeout_s",
        "reasoning_parser",
        "tool_call_parser",
        "stream_interval",
        "api_key",
        "trust_request_chat_template",
        "chat_template_timeout_s",
        "prompt_job_stuck_after_s",
        "frontends",
    ):
        v = getattr(ns, k)
        if v is not None:
            args[k] = v
    return args


def graceful_shutdown_timeout(ns: argparse.Namespace) -> float:
    from nanovllmx.serve.builder import DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S

    t = ns.graceful_shutdown_timeout_s
    return float(DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S if t is None else t)


def drain(log: logging.Logger, timeout: float) -> None:
    """Replace the app by `Draining` on the same route: Serve stops routing to the LLMServer replicas,
    which finish what is in flight (up to `timeout`, their graceful_shutdown_timeout_s) while the
    proxy still delivers their responses; new requests meanwhile get a JSON 503 from `Draining`.
    Returns once the LLMServer replicas are gone (or a little after `timeout`)."""
    from ray import serve

    from nanovllmx.serve.drain import Draining

    t0 = time.monotonic()
    serve.run(Draining.bind(), name="nanovllmx", route_prefix="/", blocking=False)  # type: ignore[attr-defined]
    log.info("draining: new requests get 503; waiting up to %.0fs for the requests in flight", timeout)
    deadline = t0 + timeout + 10  # Serve kills the replicas at `timeout`; then they are gone within seconds
    while time.monotonic() < deadline:
        app = serve.status().applications.get("nanovllmx")
        if app is None or "LLMServer" not in app.deployments:
            break
        time.sleep(0.5)
    log.info("drained in %.1fs", time.monotonic() - t0)
    serve.delete("nanovllmx")


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("nanovllmx.api_server")

    from nanovllmx.serve.model_resolver import ModelResolutionError, resolve_model

    try:  # fail fast with a clear message (and download once, here, with progress bars)
        folder = resolve_model(ns.model, ns.revision)
    except ModelResolutionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("model %s -> %s", ns.model, folder)
    if ns.direct_ingress_port is not None:
        if ns.address is not None:  # the controller reads these when it starts, i.e. with the cluster
            print(
                "error: --direct-ingress-port needs the Ray instance this command starts; for a cluster, start it "
                "with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 (see docs/serving.md)",
                file=sys.stderr,
            )
            return 2
        os.environ.update(
            RAY_SERVE_ENABLE_DIRECT_INGRESS="1",
            RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(ns.direct_ingress_port),
            RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(ns.direct_ingress_port + 1000),
        )

    import ray
    from ray import serve

    from nanovllmx.serve import build_app

    def _terminate(signum, frame):  # SIGTERM: the same orderly shutdown as Ctrl-C
        raise KeyboardInterrupt

    started_ray = not ray.is_initialized() and ns.address is None
    ray.init(address=ns.address or "local", namespace="serve", ignore_reinit_error=True)
    # after ray.init, which installs a crash-report handler for SIGTERM that ends the process with SIGABRT
    signal.signal(signal.SIGTERM, _terminate)
    serve_started = False
    try:
        try:  # after ray.init: the builder looks at the cluster's GPUs
            app = build_app(app_args(ns))
        except (ValueError, TypeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        serve.start(http_options={"host": ns.host, "port": ns.port})
        serve_started = True
        try:
            serve.run(app, name="nanovllmx", route_prefix="/", blocking=False)
        except RuntimeError as e:  # a replica failed to start: Serve's message carries its traceback
            print(f"error: deploying the app failed: {e}", file=sys.stderr)
            return 1
        host = "127.0.0.1" if ns.host in ("0.0.0.0", "::") else ns.host
        print(f"Nano-vLLM-X is serving {ns.model} at http://{host}:{ns.port}/v1 (Ctrl-C to stop)", flush=True)
        if ns.direct_ingress_port is not None:
            print(f"  and without the proxy at http://{host}:{ns.direct_ingress_port}/v1 (first replica)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        try:
            if serve_started:
                try:  # drain first: serve.shutdown() alone would kill the proxy and cut responses off
                    drain(log, graceful_shutdown_timeout(ns))
                except BaseException as e:  # noqa: BLE001 - a second Ctrl-C / SIGTERM: stop now
                    log.warning("draining the app was interrupted: %r", e)
                serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
