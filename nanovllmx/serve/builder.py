"""`build_app(args)`: the Serve application from a config's `args` (`import_path:
nanovllmx.serve:build_app`). Splits `args` into the app's own keys, engine arguments (`LLM(...)`
keywords) and Serve deployment options, and sets the deployment's defaults; see docs/serving.md."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from typing import Any

from ray import serve

from nanovllmx.serve import model_resolver
from nanovllmx.serve.app import LLMBackend, LLMServer
from nanovllmx.serve.mapping import DEFAULT_CHAT_TEMPLATE_TIMEOUT_S, DEFAULT_PROMPT_JOB_STUCK_AFTER_S
from nanovllmx.serve.middleware import DEFAULT_MAX_REQUEST_BODY_BYTES

logger = logging.getLogger(__name__)

# Keys of `args` that configure the app itself rather than the engine or the Serve deployment.
APP_KEYS = (
    "model",
    "served_model_name",
    "generation_config",
    "revision",
    "log_level",
    "max_request_body_bytes",
    "trust_request_chat_template",
    "reasoning_parser",
    "tool_call_parser",
    "chat_template_timeout_s",
    "prompt_job_stuck_after_s",
    "api_key",
    "prefix_routing",
    "ingress_options",
    "frontends",
)
API_KEY_ENV = "NANOVLLMX_API_KEY"  # the api_key when `args` gives none
# Serve deployment defaults of build_app (see the comments where they are set)
DEFAULT_HEALTH_CHECK_PERIOD_S = 2.0
DEFAULT_HEALTH_CHECK_TIMEOUT_S = 15.0
DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S = 120.0
# Serve deployment options that may be given in `args` (applied with Deployment.options).
DEPLOYMENT_KEYS = tuple(
    p
    for p in inspect.signature(serve.Deployment.options).parameters
    if not p.startswith("_") and p not in ("self", "func_or_class", "name", "version", "user_config")
)


def engine_arg_names() -> dict[str, str]:
    """Every engine argument (`EngineConfig` field, so every `LLM(...)` keyword) by name, with its
    annotation as text."""
    from nanovllmx.config import EngineConfig

    names = {f.name: str(f.type) for f in dataclasses.fields(EngineConfig) if f.init}
    for internal in ("model", "hf_config", "eos_token_ids"):
        names.pop(internal, None)
    return names


def _coerce(value: Any, annotation: str) -> Any:
    """`serve run nanovllmx.serve:build_app key=value` passes strings: give them their field's type."""
    if not isinstance(value, str) or "str" in annotation:
        return value
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _cluster_resources() -> dict[str, float] | None:
    """The connected Ray cluster's total resources; None when not connected (or Ray cannot say)."""
    try:
        import ray

        if ray.is_initialized():
            return dict(ray.cluster_resources())
    except Exception:  # noqa: BLE001 - build_app only reads them for defaults and hints
        pass
    return None


def _cluster_has_gpus() -> bool:
    res = _cluster_resources()
    if res is not None:
        return res.get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


def _positive_seconds(name: str, value: Any) -> float:
    value = _coerce(value, "float")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


def _gang_placement(deploy_opts: dict[str, Any], engine_kwargs: dict[str, Any], actor_opts: dict[str, Any]) -> None:
    """Gang placement when the engine runs on Ray: the replica's own placement group holds the
    replica (bundle 0) and its grid (one bundle per pipeline stage), so Serve places a replica and
    its workers together or not at all, counts the grid in the replica's resources (autoscaling,
    `serve status`), and removes the group with the replica; the engine runs inside it
    (placement_bundle_offset=1, distributed/placement.py). `placement_bundle_offset: null` in the
    args opts out: the engine then creates a group of its own, as offline."""
    from nanovllmx.distributed import placement

    if "placement_bundle_offset" in engine_kwargs and engine_kwargs["placement_bundle_offset"] is None:
        return
    if deploy_opts.get("placement_group_bundles"):  # the operator's own bundles: stage s in bundle offset + s
        engine_kwargs.setdefault("placement_bundle_offset", 1)
        return
    if deploy_opts.get("max_replicas_per_node") is not None:
        raise ValueError(
            "max_replicas_per_node cannot be combined with the gang placement group build_app gives a replica "
            "whose engine runs on Ray (Serve allows one or the other): drop it (the placement strategy decides "
            "where replicas go), or set placement_bundle_offset: null to place the grid outside the replica's group"
        )
    bundles, strategy = placement.replica_placement(
        placement.EngineArgsGrid.from_kwargs(engine_kwargs), actor_opts, engine_kwargs.get("placement_strategy")
    )
    deploy_opts["placement_group_bundles"] = bundles
    deploy_opts.setdefault("placement_group_strategy", strategy)
    engine_kwargs["placement_bundle_offset"] = 1


def build_app(args: dict[str, Any]) -> serve.Application:
    """Build the Serve application from a config's `args`.

    args: `model` (local folder, hub id or the demo name; required), `served_model_name` (str or list;
    default: the folder / repo name), `generation_config` ("auto": sampling defaults from the
    checkpoint's generation_config.json, "none": OpenAI's defaults), `revision` (hub revision),
    every `LLM(...)` argument by name (tp_size, pp_size, context_len, max_bs, gpu_memory_utilization,
    ...), and Serve deployment options (num_replicas, autoscaling_config, ray_actor_options,
    max_ongoing_requests, health_check_period_s, ...).
    """
    args = dict(args or {})
    if "model" not in args:
        raise ValueError(
            "build_app: `model` is required (a local checkpoint folder, a Hugging Face Hub id, or 'nanovllmx-demo')"
        )
    model = str(args.pop("model"))
    model_resolver.check_model(model)
    served = args.pop("served_model_name", None) or model_resolver.default_served_name(model)
    served_names = [served] if isinstance(served, str) else [str(s) for s in served]
    if not served_names or not all(served_names):
        raise ValueError("served_model_name must be a non-empty string or list of strings")
    generation_config = str(args.pop("generation_config", "auto"))
    if generation_config not in ("auto", "none"):
        raise ValueError(f"generation_config must be 'auto' or 'none', got {generation_config!r}")
    revision = args.pop("revision", None)
    log_level = str(args.pop("log_level", None) or os.environ.get("NANOVLLMX_LOG_LEVEL") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {log_level!r}")

    max_body = _coerce(args.pop("max_request_body_bytes", DEFAULT_MAX_REQUEST_BODY_BYTES), "int")
    if max_body is None:
        max_body = 0
    if not isinstance(max_body, int) or isinstance(max_body, bool) or max_body < 0:
        raise ValueError(f"max_request_body_bytes must be an integer >= 0 (0: no limit), got {max_body!r}")

    trust = _coerce(args.pop("trust_request_chat_template", False), "bool")
    if not isinstance(trust, bool):
        raise ValueError(f"trust_request_chat_template must be true or false, got {trust!r}")
    reasoning_parser = args.pop("reasoning_parser", "auto")
    if reasoning_parser not in ("auto", "qwen3", "none"):
        raise ValueError(f"reasoning_parser must be auto, qwen3 or none, got {reasoning_parser!r}")
    tool_call_parser = args.pop("tool_call_parser", "auto")
    if tool_call_parser not in ("auto", "hermes", "none"):
        raise ValueError(f"tool_call_parser must be auto, hermes or none, got {tool_call_parser!r}")
    template_timeout = _positive_seconds(
        "chat_template_timeout_s", args.pop("chat_template_timeout_s", DEFAULT_CHAT_TEMPLATE_TIMEOUT_S)
    )
    stuck_after = _positive_seconds(
        "prompt_job_stuck_after_s", args.pop("prompt_job_stuck_after_s", DEFAULT_PROMPT_JOB_STUCK_AFTER_S)
    )
    prefix_routing = _coerce(args.pop("prefix_routing", "auto"), "Any")
    if prefix_routing not in ("auto", True, False):
        raise ValueError(f"prefix_routing must be auto, true or false, got {prefix_routing!r}")
    ingress_options = dict(_coerce(args.pop("ingress_options", None), "Any") or {})
    frontends = _frontends(args.pop("frontends", 1))
    api_key = args.pop("api_key", None) or os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not isinstance(api_key, str):
        raise ValueError("api_key must be a string")  # the value itself is never shown

    engine_names = engine_arg_names()
    deploy_opts = {k: _coerce(args.pop(k), "Any") for k in DEPLOYMENT_KEYS if k in args}
    engine_kwargs = {}
    for k in list(args):
        if k in engine_names:
            engine_kwargs[k] = _coerce(args.pop(k), engine_names[k])
    if args:
        raise ValueError(
            f"build_app: unknown argument(s) {sorted(args)}. Known: app {list(APP_KEYS)}, "
            f"engine {sorted(engine_names)}, deployment {sorted(DEPLOYMENT_KEYS)}"
        )

    # GPUs: on GPU the engine runs in Ray actors, never in the replica (resolve_executor says why)
    from nanovllmx.config import EngineConfig, resolve_executor

    device = engine_kwargs.get("device", "auto")
    if device == "auto":  # decide here: a replica without a GPU of its own would otherwise pick the CPU
        device = engine_kwargs["device"] = "cuda" if _cluster_has_gpus() else "cpu"
    tp = int(engine_kwargs.get("tp_size", EngineConfig.tp_size))
    pp = int(engine_kwargs.get("pp_size", EngineConfig.pp_size))
    executor = engine_kwargs["executor"] = resolve_executor(
        engine_kwargs.get("executor", EngineConfig.executor), device, tp * pp, serving=True, shared=frontends > 1
    )
    own_workers = executor == "ray"
    if frontends > 1:
        _check_frontends(executor, deploy_opts, prefix_routing)
    actor_opts = dict(deploy_opts.get("ray_actor_options") or {})
    actor_opts.setdefault("num_gpus", 1 if (device == "cuda" and not own_workers) else 0)
    actor_opts.setdefault("num_cpus", 1)
    deploy_opts["ray_actor_options"] = actor_opts
    if own_workers:
        _gang_placement(deploy_opts, engine_kwargs, actor_opts)
    # one log line per request, ours (EngineStream._report); Serve's access log would be a second one
    deploy_opts.setdefault("logging_config", {"enable_access_log": False})
    # Serve's default (5 at once) would starve continuous batching: let the engine see the queue. It
    # sees all of it (max_bs running + max_waiting_requests waiting), so the engine's own bound applies
    # (503 + Retry-After, OpenAI's error JSON) rather than an unbounded queue in Serve's router.
    max_bs = int(engine_kwargs.get("max_bs", EngineConfig.max_bs))
    max_waiting = int(engine_kwargs.get("max_waiting_requests", EngineConfig.max_waiting_requests))
    deploy_opts.setdefault("max_ongoing_requests", max(64, max_bs + max_waiting + 1))
    auto = deploy_opts.get("autoscaling_config")
    if isinstance(auto, dict) and "target_ongoing_requests" not in auto:
        # Serve's default target (2 per replica) suits one-request-at-a-time models, not a batching engine
        deploy_opts["autoscaling_config"] = {**auto, "target_ongoing_requests": max(1, max_bs // 2)}

    # Failure and drain defaults (docs/reliability.md, "Actor deaths and drains"). Serve 2.60 marks a
    # replica unhealthy after 3 consecutive failed health checks (REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD)
    # and then stops it and starts a replacement: with a check every 2 s a dead engine's replica is
    # replaced ~6 s after its actor died (10 s, Serve's default, made that ~30 s). A check is one small
    # Ray call to the scheduler actor (and a ping per worker actor).
    deploy_opts.setdefault("health_check_period_s", DEFAULT_HEALTH_CHECK_PERIOD_S)
    deploy_opts.setdefault("health_check_timeout_s", DEFAULT_HEALTH_CHECK_TIMEOUT_S)
    # Removing a replica (downscale, redeploy, delete, shutdown): Serve stops routing to it, waits for
    # its ongoing requests (polling every graceful_shutdown_wait_loop_s), then calls __del__; it kills
    # the replica graceful_shutdown_timeout_s after the stop began. Serve's 20 s cuts long generations.
    deploy_opts.setdefault("graceful_shutdown_timeout_s", DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S)
    deploy_opts.setdefault("graceful_shutdown_wait_loop_s", 1.0)
    shutdown_timeout = float(deploy_opts["graceful_shutdown_timeout_s"])

    # Several replicas: LLMIngress in front and the prefix-cache router (docs/serving.md, "Routing
    # across replicas"); one replica: LLMServer serves HTTP itself, no extra hop, Serve's router
    routed = prefix_routing is True or (prefix_routing == "auto" and can_have_replicas(deploy_opts))
    if routed and "request_router_config" not in deploy_opts:
        from nanovllmx.serve.router import SUMMARY_PERIOD_S

        deploy_opts["request_router_config"] = {
            "request_router_class": "nanovllmx.serve.router.PrefixCacheRouter",
            "request_routing_stats_period_s": SUMMARY_PERIOD_S,
            "request_routing_stats_timeout_s": 10.0,
        }

    server_kwargs: dict[str, Any] = dict(
        max_request_body_bytes=max_body,
        shutdown_timeout_s=shutdown_timeout,
        trust_request_chat_template=trust,
        chat_template_timeout_s=template_timeout,
        prompt_job_stuck_after_s=stuck_after,
        api_key=api_key,
        reasoning_parser=reasoning_parser,
        tool_call_parser=tool_call_parser,
    )
    server_args = (model, served_names, engine_kwargs, generation_config, revision, log_level)
    if frontends > 1:
        from nanovllmx.serve.engine_deployment import LLMEngine

        # the engine: one replica with the gang placement (deploy_opts), no HTTP
        engine_app = LLMEngine.options(**deploy_opts).bind(
            model, served_names[0], engine_kwargs, revision, log_level, shutdown_timeout
        )
        front_opts = _frontend_options(deploy_opts, frontends, ingress_options)
        _warn_if_short_of_cpus(deploy_opts, front_opts)
        # each frontend admits its share of the engine's queue bound (LLM's `clients`)
        shares = front_opts["num_replicas"] if isinstance(front_opts.get("num_replicas"), int) else frontends
        frontend: serve.Application = LLMServer.options(**front_opts).bind(
            *server_args, **server_kwargs, engine=engine_app, frontends=max(1, shares)
        )
        return frontend
    deployment: serve.Deployment = LLMBackend if routed else LLMServer
    app: serve.Application = deployment.options(**deploy_opts).bind(*server_args, **server_kwargs)
    if not routed:
        return app
    from nanovllmx.serve.ingress import LLMIngress

    # thin: parsing and tokenizing only (no engine), so no CPU of its own unless asked
    ingress_options.setdefault("ray_actor_options", {"num_cpus": 0})
    ingress_options.setdefault("logging_config", {"enable_access_log": False})
    ingress_options.setdefault("health_check_period_s", DEFAULT_HEALTH_CHECK_PERIOD_S)
    ingress: serve.Deployment = LLMIngress  # type: ignore[assignment]
    front: serve.Application = ingress.options(**ingress_options).bind(
        app,
        model,
        revision,
        log_level,
        max_request_body_bytes=max_body,
        trust_request_chat_template=trust,
        chat_template_timeout_s=template_timeout,
        prompt_job_stuck_after_s=stuck_after,
        api_key=api_key,
    )
    return front


def _frontends(value: Any) -> int:
    from nanovllmx.distributed.ray_engine import MAX_CLIENTS

    n = _coerce(value, "int")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < MAX_CLIENTS:
        raise ValueError(f"frontends must be an integer in [1, {MAX_CLIENTS - 1}], got {value!r}")
    return n


def _check_frontends(executor: str, deploy_opts: dict[str, Any], prefix_routing: Any) -> None:
    """Several HTTP frontends share one engine on Ray; not combined with several engines (yet)."""
    if executor != "ray":
        raise ValueError(
            "frontends > 1 needs the engine on Ray (its frontends attach to its scheduler actor): leave "
            "executor at auto or set it to ray (on CPU it runs with gloo)"
        )
    if can_have_replicas(deploy_opts) or prefix_routing is True:
        raise ValueError(
            "frontends > 1 runs one engine with several HTTP frontends; it cannot be combined with "
            "several engine replicas (num_replicas > 1, autoscaling_config, prefix_routing: true) yet"
        )


def _frontend_options(deploy_opts: dict[str, Any], frontends: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The frontends' Serve options: the engine's request, health and drain settings, no GPU and no
    placement group (CPU-only replicas, 1 CPU each), `frontends` replicas; `ingress_options` override."""
    engine_only = ("placement_group_bundles", "placement_group_strategy", "ray_actor_options", "num_replicas")
    opts = {k: v for k, v in deploy_opts.items() if k not in engine_only}
    opts.update(num_replicas=frontends, ray_actor_options={"num_cpus": 1})
    opts.update(overrides)
    return opts


def _warn_if_short_of_cpus(engine_opts: dict[str, Any], front_opts: dict[str, Any]) -> None:
    """Serve waits, without an error, for CPUs a cluster may never get: with `frontends: 4` (the
    GPU configs' default) on a small machine the frontends would stay pending. Say so when the app
    is built; a cluster that autoscales may still add the CPUs, so this only warns."""
    res = _cluster_resources()
    if res is None:
        return
    have = float(res.get("CPU", 0))
    bundles = engine_opts.get("placement_group_bundles")
    engine = (
        sum(float(b.get("CPU", 0)) for b in bundles)
        if bundles
        else float((engine_opts.get("ray_actor_options") or {}).get("num_cpus", 1))
    )
    per_front = float((front_opts.get("ray_actor_options") or {}).get("num_cpus", 1))
    n = front_opts.get("num_replicas")
    need = engine + per_front * (n if isinstance(n, int) else 1)
    if have < need:
        logger.warning(
            "frontends: %s HTTP frontends of %g CPU each and the engine (%g CPU) need %g CPUs; this Ray "
            "cluster has %g, so Serve keeps some pending until CPUs are added: use fewer frontends "
            "(frontends: 1 on a small machine) or ingress_options.ray_actor_options.num_cpus below 1",
            n,
            per_front,
            engine,
            need,
            have,
        )


def can_have_replicas(deploy_opts: dict[str, Any]) -> bool:
    """Whether the deployment may run more than one replica (then build_app routes by prefix)."""
    n = deploy_opts.get("num_replicas", 1)
    auto = deploy_opts.get("autoscaling_config")
    if n == "auto" or auto:
        if isinstance(auto, dict) and auto.get("max_replicas", 2) == 1:
            return False
        return True
    return isinstance(n, int) and n > 1
