"""Connecting to Ray and placing the TP x PP grid.

One placement group, one bundle per pipeline stage, each bundle holding the resources of that
stage's tp_size shards. A bundle always lands on one node, so the TP ranks of a stage (which
all-reduce twice per layer) share a node; `placement_strategy` then decides how the stages relate:
PACK (default: as few nodes as possible), SPREAD, STRICT_PACK (one node) or STRICT_SPREAD (one
node per stage). Per-shard resources: 1 GPU on CUDA, `ray_num_cpus_per_worker` CPUs (0.25 by
default on CPU, so a 2x2 grid fits a 2-core machine), `accelerator_type`, and any extra resources
in `ray_worker_resources` (one dict for all shards, or a list with one dict per stage, which pins
stages to nodes that carry a custom resource).

Who creates the group: offline (`LLM(...)` in a driver) the engine creates it and removes it at
shutdown. Under Serve, `build_app` declares the replica's own placement group instead
(`replica_placement`: bundle 0 = the replica and the scheduler actor, then one bundle per stage,
as here) and sets `placement_bundle_offset=1`: the engine then runs in the group its process runs
in (`current_placement_group`), stage s in bundle 1 + s, and never removes it (Serve does, when it
stops the replica). So a replica and its grid are placed together or not at all, and a grid that
cannot fit shows as a replica Serve cannot schedule (docs/serving.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from nanovllmx.config import EngineConfig

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

logger = logging.getLogger(__name__)

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class GridSpec(Protocol):
    """The EngineConfig fields that decide the grid's resources (an EngineConfig is one)."""

    tp_size: int
    pp_size: int
    device: str
    accelerator_type: str | None
    ray_num_cpus_per_worker: float | None
    ray_worker_resources: dict[str, float] | list[dict[str, float]] | None


@dataclass
class EngineArgsGrid:
    """A GridSpec from engine arguments, without building an EngineConfig (which loads the
    checkpoint's config: build_app runs where the checkpoint may not be)."""

    tp_size: int = EngineConfig.tp_size
    pp_size: int = EngineConfig.pp_size
    device: str = "cpu"
    accelerator_type: str | None = None
    ray_num_cpus_per_worker: float | None = None
    ray_worker_resources: dict[str, float] | list[dict[str, float]] | None = None

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> EngineArgsGrid:
        names = ("tp_size", "pp_size", "device", "accelerator_type", "ray_num_cpus_per_worker", "ray_worker_resources")
        return cls(**{k: kwargs[k] for k in names if k in kwargs})


def check_strategy(strategy: str | None) -> str:
    s = (strategy or "PACK").upper()
    if s not in STRATEGIES:
        raise ValueError(f"placement_strategy must be one of {STRATEGIES}, got {strategy!r}")
    return s


def connect_ray(cfg: EngineConfig) -> bool:
    """Use the Ray this process is connected to, else join cfg.ray_address / $RAY_ADDRESS, else
    start a local Ray. Returns True if this call started or joined Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        kwargs: dict[str, Any] = dict(include_dashboard=False)
        kwargs.update(cfg.ray_init_kwargs or {})
        ray.init(**kwargs)
    return True


def num_cpus_per_worker(cfg: GridSpec) -> float:
    if cfg.ray_num_cpus_per_worker is not None:
        if cfg.ray_num_cpus_per_worker < 0:
            raise ValueError("ray_num_cpus_per_worker must be >= 0")
        return float(cfg.ray_num_cpus_per_worker)
    return 0.25 if cfg.device == "cpu" else 0.0


def stage_extra_resources(cfg: GridSpec) -> list[dict[str, float]]:
    """Extra (custom) Ray resources of one shard, per pipeline stage."""
    extra = cfg.ray_worker_resources
    per_stage: list[dict[str, float]]
    if extra is None:
        per_stage = [{} for _ in range(cfg.pp_size)]
    elif isinstance(extra, dict):
        per_stage = [dict(extra) for _ in range(cfg.pp_size)]
    elif isinstance(extra, (list, tuple)):
        if len(extra) != cfg.pp_size or not all(isinstance(d, dict) for d in extra):
            raise ValueError(
                f"ray_worker_resources as a list needs one dict per pipeline stage ({cfg.pp_size}), got {extra!r}"
            )
        per_stage = [dict(d) for d in extra]
    else:
        raise TypeError("ray_worker_resources must be a dict, a list of dicts (one per stage) or None")
    for d in per_stage:
        for k, v in d.items():
            if k in ("CPU", "GPU"):
                raise ValueError(f"set CPUs with ray_num_cpus_per_worker; GPUs are one per shard on CUDA (got {k!r})")
            if not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"resource amounts must be > 0, got {k}={v!r}")
    if cfg.accelerator_type:
        for d in per_stage:
            d[f"accelerator_type:{cfg.accelerator_type}"] = 0.001
    return per_stage


def shard_options(cfg: GridSpec, stage: int) -> dict[str, Any]:
    """Ray actor options (resources only) of one worker of `stage`."""
    return dict(
        num_cpus=num_cpus_per_worker(cfg),
        num_gpus=1 if cfg.device == "cuda" else 0,
        resources=stage_extra_resources(cfg)[stage],
    )


def stage_bundles(cfg: GridSpec) -> list[dict[str, float]]:
    tp = cfg.tp_size
    bundles: list[dict[str, float]] = []
    for s in range(cfg.pp_size):
        o = shard_options(cfg, s)
        b = {k: v * tp for k, v in o["resources"].items()}
        if o["num_cpus"]:
            b["CPU"] = o["num_cpus"] * tp
        if o["num_gpus"]:
            b["GPU"] = float(tp)
        if not b:  # a bundle may not be empty
            b["CPU"] = 0.01 * tp
        bundles.append(b)
    return bundles


def _cluster_report() -> str:
    import ray

    lines = []
    try:
        for n in ray.nodes():
            if not n.get("Alive"):
                continue
            res = {
                k: v
                for k, v in n.get("Resources", {}).items()
                if not k.startswith("node:")
                and not k.startswith(("bundle_group", "CPU_group", "GPU_group"))
                and "_group_" not in k
                and k not in ("memory", "object_store_memory")
            }
            lines.append(f"  node {n['NodeID'][:12]} ({n.get('NodeManagerAddress')}): {res}")
        avail = {
            k: v
            for k, v in ray.available_resources().items()
            if "_group_" not in k and not k.startswith("node:") and k not in ("memory", "object_store_memory")
        }
        lines.append(f"  available now: {avail}")
    except Exception as e:  # diagnostics must never hide the real error
        lines.append(f"  (could not list the cluster: {e})")
    return "\n".join(lines)


def _why_not(bundles: list[dict[str, float]], strategy: str) -> str | None:
    """A reason the grid can never fit the cluster as it is (no autoscaling), or None."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]

    def fits(node: dict[str, float], need: dict[str, float]) -> bool:
        return all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items())

    for i, b in enumerate(bundles):
        for k in b:
            if not any(k in n for n in nodes):
                return f"no node has a {k!r} resource"
        if not any(fits(n, b) for n in nodes):
            return f"no single node can hold stage {i}'s bundle {b}"
    if strategy == "STRICT_PACK":
        total: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                total[k] = total.get(k, 0.0) + v
        if not any(fits(n, total) for n in nodes):
            return f"STRICT_PACK needs one node with {total}"
    if strategy == "STRICT_SPREAD" and len(nodes) < len(bundles):
        return f"STRICT_SPREAD needs {len(bundles)} nodes, the cluster has {len(nodes)}"
    return None


def create_placement_group(cfg: EngineConfig) -> PlacementGroup:
    """Create and wait for the grid's placement group; raise a clear error if it cannot be placed
    within cfg.placement_timeout_s."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    strategy = check_strategy(cfg.placement_strategy)
    bundles = stage_bundles(cfg)
    pg: PlacementGroup = placement_group(bundles, strategy=strategy, name="")
    ready, _ = ray.wait([pg.ready()], timeout=cfg.placement_timeout_s)
    if ready:
        try:
            ray.get(ready[0])
            return pg
        except Exception:
            remove_placement_group(pg)
            raise
    remove_placement_group(pg)
    why = _why_not(bundles, strategy)
    raise RuntimeError(
        f"cannot place the tp_size={cfg.tp_size} x pp_size={cfg.pp_size} grid within "
        f"{cfg.placement_timeout_s:g}s: asked for {len(bundles)} bundle(s) (one per pipeline stage, each "
        f"holding its {cfg.tp_size} TP shard(s)) {bundles} with strategy {strategy}"
        + (f"; {why}" if why else "; the cluster is busy or too small")
        + f".\nThe cluster:\n{_cluster_report()}\n"
        f"Lower tp_size/pp_size, free resources, or change ray_num_cpus_per_worker / ray_worker_resources / "
        f"accelerator_type / placement_strategy (placement_timeout_s sets how long to wait)."
    )


def replica_placement(
    grid: GridSpec, replica_actor_options: dict[str, Any], strategy: str | None
) -> tuple[list[dict[str, float]], str]:
    """A Serve replica's `placement_group_bundles` and `placement_group_strategy` when its engine
    runs on Ray: bundle 0 holds the replica actor (its ray_actor_options, which Serve requires to
    fit bundle 0) and the scheduler actor (no resources of its own); bundle 1 + s holds pipeline
    stage s (stage_bundles: each stage inside one node, stages placed by `strategy`)."""
    o = replica_actor_options
    first: dict[str, float] = {}
    for key, name in (("num_cpus", "CPU"), ("num_gpus", "GPU"), ("memory", "memory")):
        v = o.get(key)
        if v:
            first[name] = float(v)
    for k, v in (o.get("resources") or {}).items():
        if v:
            first[k] = float(v)
    if o.get("accelerator_type"):
        first[f"accelerator_type:{o['accelerator_type']}"] = 0.001
    if not first:  # a bundle may not be empty
        first["CPU"] = 0.01
    return [first, *stage_bundles(grid)], check_strategy(strategy)


def current_placement_group(cfg: EngineConfig) -> PlacementGroup:
    """The placement group this process runs in (a Serve replica's), checked to hold the grid:
    bundle cfg.placement_bundle_offset + s must hold stage s. Raises at once if not (an actor asked
    for resources its bundle lacks would wait forever)."""
    from ray.util.placement_group import get_current_placement_group

    offset = cfg.placement_bundle_offset
    assert offset is not None
    pg = get_current_placement_group()
    if pg is None:
        raise RuntimeError(
            f"placement_bundle_offset={offset} runs the engine in this process's placement group, but this "
            "process runs in none (a Serve replica gets one from placement_group_bundles, which build_app sets; "
            "leave placement_bundle_offset unset for the engine to create its own group)"
        )
    have = pg.bundle_specs
    need = stage_bundles(cfg)
    if len(have) < offset + len(need):
        raise RuntimeError(
            f"the placement group this process runs in has {len(have)} bundle(s) {have}; the "
            f"tp_size={cfg.tp_size} x pp_size={cfg.pp_size} grid needs bundles {offset}..{offset + len(need) - 1} "
            f"(one per pipeline stage: {need})"
        )
    for s, b in enumerate(need):
        got = have[offset + s]
        short = {k: v for k, v in b.items() if got.get(k, 0.0) + 1e-9 < v}
        if short:
            raise RuntimeError(
                f"bundle {offset + s} of this process's placement group {got} cannot hold pipeline stage {s}, "
                f"which needs {b} ({cfg.tp_size} shard(s) of {shard_options(cfg, s)})"
            )
    return pg


def bundle_node_ids(pg: PlacementGroup) -> list[str]:
    from ray.util import placement_group_table

    table = placement_group_table(pg)
    b2n = table.get("bundles_to_node_id", {})
    return [b2n.get(i) for i in range(len(table.get("bundles", {})))]


def node_visible_gpus(infos: list[dict[str, Any]]) -> list[list[str]]:
    """For each worker (its `node_info`: node_id, gpu_ids), the GPUs of this engine on its node, in
    a fixed order: what the worker makes visible before CUDA starts. Ray shows an actor only its
    own GPU, and peer memory (the one-shot all-reduce's symmetric buffers) cannot be mapped between
    processes that each call their GPU device 0; other engines' GPUs stay invisible."""
    by_node: dict[str, set[str]] = {}
    for info in infos:
        by_node.setdefault(info["node_id"], set()).update(info["gpu_ids"])

    def order(gpu: str) -> tuple[int, str]:
        return (int(gpu), "") if gpu.isdigit() else (1 << 30, gpu)  # ids, or UUIDs after them

    return [sorted(by_node[info["node_id"]], key=order) for info in infos]
